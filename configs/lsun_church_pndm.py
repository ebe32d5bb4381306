"""The DDPM LSUN church 256x256 U-Net with F-PNDM 50 steps.

Weights: a DDIM-repository `.ckpt` or a diffusers UNet2DModel folder, given as
--config.sampler.checkpoint=PATH (or converted first with --mode=convert). A plain state_dict is
read as it is; of a training list the default checkpoint_list_entry=-1 reads the EMA entry.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "lsun_church"
  config.data.image_size = 256
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.sampler.num_samples = 50_000
  config.sampler.batch_size = 32
  return config
