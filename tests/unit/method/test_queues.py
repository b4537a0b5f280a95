"""A queue variant is one registered class: the config checks, the state,
the step and the checkpoints find it through the registry."""

import dataclasses

import numpy as np
import pytest

from qgjt_jax import config_checks
from qgjt_jax.method import queues
from tests.helpers import tiny_runs


class DegradedOnlyQueue(queues.RealtimeQueue):
  """Both views encoded, but only the degraded ones enqueued (B keys per
  step), used as stored; and a counter of steps as its own state."""

  name = "degraded_only"

  def keys_per_step(self, batch_size):
    return batch_size

  def init_state(self, params, batch_stats, stats):
    return np.zeros((), np.int32)

  def next_state(self, ctx, state, prepared):
    return state.variant_state + 1

  def encode(self, ctx, state, batch, rngs, params, prepared):
    views = super().encode(ctx, state, batch, rngs, params, prepared)
    return dataclasses.replace(
        views, keys=views.q, key_labels=views.labels[: views.q.shape[0]]
    )


@pytest.fixture
def registered():
  queues.register(DegradedOnlyQueue)
  yield DegradedOnlyQueue.name
  del queues._VARIANTS[DegradedOnlyQueue.name]  # pylint: disable=protected-access


@pytest.mark.slow
def test_a_registered_variant_trains_through_the_config(registered, tmp_path):
  config = tiny_runs.tiny_config(
      **{
          "queue.kind": registered,
          "num_epochs": 0.25,  # two steps of 8
          "checkpoint_every_steps": 2,
          "queue.capacity": 8,
      }
  )
  config_checks.check_values(config)  # the registry is the list of choices
  results, output = tiny_runs.run_in_process(config, tmp_path)
  assert results, output
  metrics = tiny_runs.step_metrics(tmp_path)
  assert metrics[2]["loss_con"] > 0 and np.isfinite(metrics[2]["loss"])
  assert 0.0 <= metrics[2]["quality_auc"] <= 1.0
  state = tiny_runs.load_state(tmp_path, 2)
  assert int(state["variant_state"]) == 2  # its own state, checkpointed
  assert int(state["queue"]["count"]) == 8  # B keys a step, capacity 8
  filled = state["queue"]["labels"] >= 0
  assert filled.sum() == 8


def test_the_checks_name_the_registered_variants_and_their_needs(registered):
  config = tiny_runs.tiny_config(**{"queue.kind": "fifo"})
  with pytest.raises(config_checks.ConfigError, match=registered):
    config_checks.check_values(config)
  small = tiny_runs.tiny_config(
      **{"queue.kind": registered, "queue.capacity": 7}
  )
  with pytest.raises(
      config_checks.ConfigError,
      match="smaller than the 8 keys the 'degraded_only'",
  ):
    config_checks.check_train_config(small)
  assert queues.get("moco").keys_per_step(8) == 8
  assert queues.get("proxy").keys_per_step(8) == 16
