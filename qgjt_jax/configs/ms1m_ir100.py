r"""QGFace on MS1MV2 with IR-100; otherwise the recipe of configs/ms1m.py.

  python -m qgjt_jax.main --config=configs/ms1m_ir100.py \
      --workdir=runs/ms1m_ir100 --config.data.rec_dir=/data/faces_emore
"""

from configs import ms1m


def get_config():
  config = ms1m.get_config()
  config.model.name = "ir100"
  return config
