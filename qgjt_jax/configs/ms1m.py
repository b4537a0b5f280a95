r"""QGFace on MS1MV2 with IR-50: the AdaFace recipe plus the LQ branch.

Global batch 512, SGD lr 0.1 / momentum 0.9 / weight decay 5e-4, lr x0.1 at
epochs 12, 20 and 24 of 26; proxy-updated queue of 8192; b = 0.2, lambda = 1,
the contrastive loss joins at the first milestone. As the authors' code
(their configs were never published): no positive margin in the
contrastive loss, float32 evaluation, TinyFace scored on its aligned copies
(docs/FIDELITY.md).

  python -m qgjt_jax.main --config=configs/ms1m.py --workdir=runs/ms1m_ir50 \
      --config.data.rec_dir=/data/faces_emore

data.rec_dir is the folder holding insightface's train.rec / train.idx /
property (or set data.kind=tfds and data.tfds_name=insightface_rec/ms1mv2 for
a prepared ArrayRecord copy, see `python -m qgjt_jax.data.prepare`).
"""

from qgjt_jax import base_config


def get_config():
  config = base_config.get_base_config()
  config.model.name = "ir50"
  config.data.kind = "rec"
  config.global_batch_size = 512
  config.num_epochs = 26.0
  config.optim.update(lr=0.1, momentum=0.9, milestones=(12, 20, 24))
  config.queue.update(kind="proxy", capacity=8192)
  config.head.b = 0.2
  config.contrastive.update(b=0.2, weight=1.0, start_epoch=12.0)
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 10000
  return config
