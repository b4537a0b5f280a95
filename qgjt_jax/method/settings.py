"""The method's settings: one class per config section, each field with its
default, its allowed values and what it means.

`config.quality`, `config.head`, `config.contrastive` and `config.queue` are
built from these classes (`Section.defaults`, read by base_config.py), checked
by them at start-up (`Section.problems`, called by config_checks.py) and read
by them once, outside the trace, into the frozen settings the step runs with
(`Section.from_config`, `StepSettings.from_config`). A field keeps its
config key's name. A new option is one field here, and its use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import ml_collections

from qgjt_jax import config_keys
from qgjt_jax.method import contrastive
from qgjt_jax.method import heads
from qgjt_jax.method import quality
from qgjt_jax.method import queues


@dataclasses.dataclass(frozen=True)
class _Rule:
  """What a field may hold (checked by `Section.problems`)."""

  choices: Optional[tuple[Any, ...]] = None  # or a callable giving them
  low: Optional[float] = None  # closed interval, None = unbounded
  high: Optional[float] = None
  positive: bool = False
  what: str = ""  # what a number is, in a range's message


def option(
    default: Any,
    what: str = "",
    *,
    choices=None,
    low=None,
    high=None,
    positive: bool = False,
    meaning: str = "",
) -> Any:
  """A settings field: its default, its rule, and what it means (for
  `--mode=keys`; `what` when that says it)."""
  return dataclasses.field(
      default=default,
      metadata={
          "rule": _Rule(choices, low, high, positive, what),
          "meaning": meaning or what,
      },
  )


class Section:
  """A config section as a frozen dataclass (subclasses set NAME)."""

  NAME: ClassVar[str]

  @classmethod
  def defaults(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {f.name: f.default for f in dataclasses.fields(cls)}
    )

  @classmethod
  def meanings(cls) -> dict[str, str]:
    """{"section.key": what it means} of every field."""
    return {
        f"{cls.NAME}.{f.name}": f.metadata["meaning"]
        for f in dataclasses.fields(cls)
    }

  @classmethod
  def allowed(cls, name: str) -> Optional[str]:
    """What the field `name` may hold, in words."""
    rule = next(
        f.metadata["rule"] for f in dataclasses.fields(cls) if f.name == name
    )
    choices = rule.choices() if callable(rule.choices) else rule.choices
    if choices is not None:
      return "one of " + ", ".join(map(str, choices))
    if rule.low is not None or rule.high is not None:
      return f"in [{rule.low}, {'inf' if rule.high is None else rule.high}]"
    return "> 0" if rule.positive else None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Section":
    section = config[cls.NAME]
    return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})

  @classmethod
  def problems(cls, config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with the section's values, one line each."""
    found = []
    for field in dataclasses.fields(cls):
      rule, key = field.metadata["rule"], f"config.{cls.NAME}.{field.name}"
      value = config[cls.NAME][field.name]
      choices = rule.choices() if callable(rule.choices) else rule.choices
      if choices is not None and value not in choices:
        found.append(
            f"{key}={value!r} is not one of {tuple(choices)}; e.g. "
            f"--{key}={choices[0]}."
        )
      elif choices is None and isinstance(field.default, bool):
        if not isinstance(value, bool):
          found.append(f"{key}={value!r} must be True or False.")
      elif choices is None and not config_keys.is_number(value):
        found.append(f"{key}={value!r} must be a (finite) number.")
      elif rule.positive and value <= 0:
        found.append(f"{key}={value!r} must be a positive (finite) number.")
      elif (rule.low is not None and value < rule.low) or (
          rule.high is not None and value > rule.high
      ):
        interval = (
            f"in [{rule.low}, {rule.high}]"
            if rule.high is not None
            else f">= {rule.low}"
        )
        found.append(f"{key}={value!r} must be {interval} ({rule.what}).")
    return found


@dataclasses.dataclass(frozen=True)
class QualitySettings(Section):
  """The quality indicator (docs/METHOD.md section 2)."""

  NAME: ClassVar[str] = "quality"
  alpha: float = option(
      0.01, "the running statistics' update rate", low=0.0, high=1.0
  )
  h: float = option(0.333, "the scaler's concentration", positive=True)
  eps: float = option(1e-3, "added to sigma", positive=True)
  # The reference starts its running statistics at 0; AdaFace at 20/100.
  init_mean: float = option(
      0.0,
      "the statistics' start",
      meaning=(
          "the running mean's start (the reference starts at 0, AdaFace at 20)"
      ),
  )
  init_std: float = option(
      0.0,
      "the statistics' start",
      low=0.0,
      meaning=("the running std's start (the reference 0, AdaFace 100)"),
  )
  partition: str = option(
      "norm",
      choices=quality.PARTITIONS,
      meaning=(
          "which images count as HQ or LQ for both gates: norm (the method) or "
          "degradation (the known downscale factor, an ablation); the AdaFace "
          "margin always reads the feature norm"
      ),
  )


@dataclasses.dataclass(frozen=True)
class HeadSettings(Section):
  """The HQ branch's margin classifier (docs/METHOD.md section 3)."""

  NAME: ClassVar[str] = "head"
  kind: str = option(
      "adaface", choices=heads.HEADS, meaning="the margin head of the HQ branch"
  )
  s: float = option(64.0, "the logit scale", positive=True)
  m: float = option(0.4, "the margin")
  b: float = option(
      0.2, "a quality threshold; 0 disables the gate", low=0.0, high=1.0
  )
  sample_rate: float = option(
      1.0,
      "the share of classes kept per step",
      low=1e-6,
      high=1.0,
      meaning=(
          "the share of classes in each step's softmax: below 1, every class of "
          "the batch plus random others, per model shard (PartialFC)"
      ),
  )
  logits_dtype: str = option(
      "float32",
      choices=("float32", "bfloat16"),
      meaning=(
          "bfloat16 runs the (2B, C) cosine matmul on tensor cores (the target "
          "cosine stays float32); float32 is the reference numerics"
      ),
  )

  @property
  def sampled_share(self) -> Optional[float]:
    """The share of classes sampled, None when every class is scored."""
    return None if self.sample_rate >= 1.0 else float(self.sample_rate)


@dataclasses.dataclass(frozen=True)
class ContrastiveSettings(Section):
  """The LQ branch's contrastive loss (docs/METHOD.md section 4)."""

  NAME: ClassVar[str] = "contrastive"
  weight: float = option(1.0, "lambda, the contrastive loss weight", low=0.0)
  start_epoch: float = option(
      0.0,
      "an epoch",
      low=0.0,
      meaning=(
          "the epoch the contrastive loss joins (the authors' later joint)"
      ),
  )
  end_epoch: float = option(
      0.0,
      "an epoch; 0 never ends the loss",
      low=0.0,
      meaning="the epoch it leaves (their later detach); 0 never",
  )
  b: float = option(
      0.2, "a quality threshold; 0 disables the gate", low=0.0, high=1.0
  )
  b_warmup_epochs: float = option(
      0.0,
      "a number of epochs",
      low=0.0,
      meaning="above 0, the epochs over which "
      "the quality thresholds ramp up from 0",
  )
  b_warmup: str = option(
      "epoch",
      choices=("epoch", "step"),
      meaning=(
          "epoch: the authors' rule (b x min(1, epoch / b_warmup_epochs) per "
          "whole epoch, contrastive.b shared by both gates); step: each gate's "
          "own b, ramped per step"
      ),
  )
  s: float = option(64.0, "the logit scale", positive=True)
  m: float = option(0.4, "the static positive margin")
  gate: str = option(
      "sgn",
      choices=contrastive.GATES,
      meaning=(
          "how a pair's quality gates its contrastive row (docs/METHOD.md 4)"
      ),
  )
  gate_range: str = option(
      "half",
      choices=contrastive.GATE_RANGES,
      meaning="the range the gate maps quality onto",
  )
  pair_quality: str = option(
      "low",
      choices=contrastive.PAIR_QUALITIES,
      meaning="which view's quality is the pair's",
  )
  margin: str = option(
      "none",
      choices=contrastive.MARGINS,
      meaning=(
          "the positive margin: none (the authors' code default), static (m) "
          "or dynamic (the running positive gap)"
      ),
  )
  mask: str = option(
      "zero",
      choices=contrastive.MASKS,
      meaning=(
          "same-class queue entries: zero scores them 0 (the authors' "
          "default), neg_inf drops them, own zeroes only the anchor's views"
      ),
  )
  rescale: bool = option(
      True, meaning="scale the loss to a queue of rescale_reference rows"
  )
  rescale_reference: int = option(
      129, "the queue length the loss is scaled to", positive=True
  )
  coupling: str = option(
      "D2N",
      choices=contrastive.COUPLINGS,
      meaning=(
          "D2N: both views anchor a row; S2N: the degraded (for MoCo, the "
          "online) view only"
      ),
  )
  detach_pos: bool = option(
      False, meaning="stop the gradient through the positive"
  )


@dataclasses.dataclass(frozen=True)
class QueueSettings(Section):
  """The negatives queue (docs/METHOD.md section 5): a registered variant."""

  NAME: ClassVar[str] = "queue"
  kind: str = option(
      "proxy",
      choices=queues.names,
      meaning=(
          "the negatives queue variant (a registered one: proxy, real-time, "
          "MoCo, none...)"
      ),
  )
  capacity: int = option(
      8192, "rows", positive=True, meaning="the queue's rows (negatives)"
  )
  moco_momentum: float = option(
      0.999, "the momentum encoder's decay", low=0.0, high=1.0
  )
  progressive: bool = option(
      False,
      meaning=(
          "the authors' growing queue: from global_batch_size rows when the "
          "contrastive loss joins to capacity at the last epoch"
      ),
  )

  @property
  def variant(self) -> queues.QueueVariant:
    return queues.get(self.kind)


SECTIONS = (QualitySettings, HeadSettings, ContrastiveSettings, QueueSettings)


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the step reads of the config (and of the data), read once.

  Hashable and frozen: the step is traced with these as constants.
  """

  compute_dtype: Any
  frozen_batch_norm: bool
  steps_per_epoch: float
  num_epochs: float
  global_batch_size: int
  quality: QualitySettings
  head: HeadSettings
  contrastive: ContrastiveSettings
  queue: QueueSettings
  # The norm each loss's gradient is clipped to before they are added (0:
  # one gradient of the summed loss, clipped, if at all, by the optimiser).
  loss_clip_norm: float = 0.0

  @classmethod
  def from_config(
      cls, config: ml_collections.ConfigDict, steps_per_epoch: float
  ) -> "StepSettings":
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    return cls(
        compute_dtype=jnp.dtype(config.model.dtype),
        frozen_batch_norm=config.model.batch_norm == "frozen",
        steps_per_epoch=float(steps_per_epoch),
        num_epochs=float(config.num_epochs),
        global_batch_size=config.global_batch_size,
        loss_clip_norm=(
            float(config.optim.grad_clip_norm)
            if config.optim.get("clip_each_loss", False)
            else 0.0
        ),
        **{s.NAME: s.from_config(config) for s in SECTIONS},
    )
