r"""The embedded default: a small IResNet on generated mixed-quality faces.

Runs on a laptop CPU in a few minutes, evaluates HQ-HQ, HQ-LQ and LQ-LQ
verification on held-out identities, and leaves an orbax checkpoint:

  python -m qgjt_jax.main --config=configs/synthetic.py --workdir=runs/demo
  python -m qgjt_jax.main --config=configs/synthetic.py --workdir=runs/demo \
      --mode=eval
"""

from qgjt_jax import base_config


def get_config():
  config = base_config.get_base_config()
  config.model.update(
      name="ir18",
      base_width=16,
      embedding_size=128,
      dtype="float32",
      dropout_rate=0.0,
  )
  # 40 px keeps a CPU step under a second; the degraded view still spans
  # 4 to 20 px before upscaling.
  config.data.update(kind="synthetic", image_size=40, worker_count=0)
  config.data.synthetic.update(
      num_identities=64,
      images_per_identity=32,
      eval_identities=40,
      eval_pairs=600,
  )
  # A short run: faster statistics, and a threshold that marks the clearly
  # degraded views as LQ so both branches are visible.
  config.quality.alpha = 0.05
  config.head.b = 0.4
  config.contrastive.update(b=0.4, start_epoch=2.0)
  config.queue.capacity = 1024
  config.global_batch_size = 64
  config.num_epochs = 10.0
  config.optim.update(lr=0.1, milestones=(7, 9), warmup_epochs=0.5)
  config.log_every_steps = 20
  config.checkpoint_every_steps = 100
  config.eval_every_steps = 0  # evaluate at the end only
  config.eval.batch_size = 100
  return config
