"""A run's length: config.num_epochs of the set, or config.num_train_steps
whatever the set's size, read the same way by everything that counts
epochs."""

import pytest

from qgjt_jax import train
from tests.helpers import tiny_runs


@pytest.mark.parametrize(
    "changes, steps, epochs",
    [
        # 64 images, 8 a step: 8 steps an epoch.
        ({}, tiny_runs.STEPS, tiny_runs.TINY["num_epochs"]),
        ({"num_train_steps": 12}, 12, 1.5),
        # 9 a step: 7 steps an epoch, 61 / 7 epochs (a float that gives
        # back 60 when multiplied by 7 and truncated).
        ({"num_train_steps": 61, "global_batch_size": 9}, 61, 61 / 7),
    ],
)
def test_the_run_is_num_train_steps_long_in_this_sets_epochs(
    changes, steps, epochs, tmp_path
):
  config = tiny_runs.tiny_config(**changes)
  run = train._set_up(config, str(tmp_path))  # pylint: disable=protected-access
  assert run.num_train_steps == steps
  # The schedule, the method's settings and the record all read the epochs.
  assert run.config.num_epochs == pytest.approx(epochs)
  assert run.record["num_epochs"] == pytest.approx(epochs)
  assert run.stack.settings.num_epochs == pytest.approx(epochs)
  assert not list(tmp_path.iterdir())  # nothing written before training
