"""The DDPM LSUN bedroom 256x256 U-Net: the church config's architecture, sampler and weights
options (lsun_church_pndm.py)."""

from configs import lsun_church_pndm


def get_config():
  config = lsun_church_pndm.get_config()
  config.data.dataset = "lsun_bedroom"
  return config
