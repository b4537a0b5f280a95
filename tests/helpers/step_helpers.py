"""Random batches for train-step tests (the tiny recipe is
`tiny_runs.tiny_config`)."""

import numpy as np

from qgjt_jax.method.batch import make_batch

NUM_CLASSES = 10


def random_batch(seed: int, config, num_classes: int = NUM_CLASSES):
  rng = np.random.default_rng(seed)
  b, size = config.global_batch_size, config.data.image_size
  image_h = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
  # The degraded view: a blurred, noisier copy, so norms differ by view.
  image_l = (
      (
          (image_h.astype(np.int32) // 32) * 32
          + rng.integers(0, 16, image_h.shape)
      )
      .clip(0, 255)
      .astype(np.uint8)
  )
  return make_batch(
      image_h,
      image_l,
      rng.integers(0, num_classes, (b,), dtype=np.int32),
      degrade_l=rng.uniform(0.1, 0.5, (b,)).astype(np.float32),
  )
