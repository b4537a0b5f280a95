r"""QGFace fine-tuning of a pretrained model on a few hundred photos of your
own people, for faces that arrive at 8-20 px as well as sharp ones.

  # 1. The photos, one sub-folder per person, detected and aligned.
  python -m qgjt_jax.data.prepare --format=image_folder --src=PHOTOS \
      --align=detect --image_size=112 --data_dir=D --name=N
  # 2. A pretrained model as a workdir (insightface's ONNX recognisers, a
  #    .pth/.safetensors backbone, or a workdir of this project as it is).
  python -m qgjt_jax.convert --src=w600k_mbf.onnx --workdir=runs/w600k_mbf
  # 3. The fine-tune (its model is the one init_from holds).
  python -m qgjt_jax.main --config=configs/finetune.py --workdir=runs/ft \
      --config.init_from=runs/w600k_mbf \
      --config.data.tfds_name=face_image_folder/N \
      --config.data.tfds_data_dir=D

Adding `--config.queue.kind=none --config.contrastive.weight=0.0` gives the
AdaFace-only baseline (the same margin head and views, no contrastive
branch). Evaluate on people the run did not see with
`--config.eval.folders="('/data/others',)" --config.eval.align=detect
--config.eval.low_res="(12, 8)"` (at the end of training, or later with
--mode=eval).

The defaults suit a few hundred photos on a CPU: 90 steps of 32 photos
(15 epochs of 200, 10 of 300), 18-20 minutes on two cores for 200 or 300
photos (docs/RESULTS.md; the AdaFace-only baseline, one backward pass a
step, 12-14):
* the degraded view is shrunk to 5-30% of its side (6-34 px at 112 px),
  JPEG-compressed and enlarged back, so training reaches the 8-12 px faces
  that hurt a model trained on sharp ones;
* the backbone learns at a tenth of the classifier's rate, from a
  classifier of class means, so the pretrained features are refined rather
  than relearned;
* the BatchNorms keep the pretrained statistics (a batch of a few dozen
  faces cannot estimate them), and each loss's gradient norm is clipped
  on its own before they are added, so the contrastive branch adds a
  step of its own instead of taking the margin loss's share of one
  clipped step (a second backward pass);
* the quality statistics start at the pretrained model's own norms on the
  training images (an imported model brings none) and follow them quickly;
  a view below q = 0.4 is low quality, which is about half of the degraded
  ones;
* only the degraded view of a low-quality pair learns from the contrastive
  loss, towards its clean view (held fixed);
* the queue holds a little more than an epoch of views, so its negatives
  are the people of the set, not stale copies.
"""

from qgjt_jax import base_config


def get_config():
  config = base_config.get_base_config()
  config.init_classifier = "class_means"
  config.init_quality = "measured"
  # The architecture, sizes and channel order come from init_from. The
  # BatchNorms keep the pretrained statistics: a batch of a few dozen
  # faces, half of them degraded, is no estimate of them, and evaluation
  # (and the quality indicator) reads the running ones.
  config.model.update(dtype="float32", remat="none", batch_norm="frozen")
  config.data.update(kind="tfds", image_size=112, worker_count=2)
  config.data.view.update(min_scale=0.05, max_scale=0.3)
  config.global_batch_size = 32
  # 90 steps whatever the set's size: 15 epochs of 200 photos, 10 of 300,
  # in about 19 minutes on two cores (the time goes in the steps).
  config.num_train_steps = 90
  # Without batch statistics nothing rescales a large step: each loss's
  # gradient norm is clipped on its own, then they are added (the margin
  # and contrastive logits are scaled by 64; clipped together, the
  # contrastive gradient took most of every clipped step).
  config.optim.update(
      lr=0.02,
      backbone_lr_scale=0.1,
      schedule="cosine",
      warmup_epochs=1.0,
      weight_decay=5e-4,
      grad_clip_norm=5.0,
      clip_each_loss=True,
  )
  config.quality.alpha = 0.05
  # Low quality below q = 0.4 (the norm 0.6 running std under its mean):
  # about half of the degraded views, the smallest ones.
  config.head.b = 0.4
  config.contrastive.b = 0.4
  # Only the degraded view anchors a contrastive row, its positive the
  # clean view without gradient: the low-quality features move towards the
  # pretrained clean ones, which stay where the pretrained model put them
  # (both views anchoring, the authors' default, pulled the clean features
  # towards the degraded ones: 3 and 4 points lower accuracy at 12 and
  # 8 px in docs/RESULTS.md's single-seed comparison).
  config.contrastive.update(coupling="S2N", detach_pos=True)
  config.queue.capacity = 512
  config.log_every_steps = 10
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 1
  config.eval_every_steps = 0  # at the end
  config.eval.batch_size = 50
  return config
