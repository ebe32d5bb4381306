"""The DDIM CelebA-64 U-Net, linear schedule, F-PNDM 50 steps, `paper` convention.

Weights: the DDIM repository's CelebA `.ckpt`, given as --config.sampler.checkpoint=PATH (or
converted first with --mode=convert). It is a 5-entry list [model, optimizer, epoch, step, EMA];
the default checkpoint_list_entry=-1 reads the EMA entry (the last), the weights its published
samples use; --config.sampler.checkpoint_list_entry=0 reads the raw training weights.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "celeb_a"
  config.data.image_size = 64
  config.model.ch_mult = (1, 2, 2, 2, 4)
  config.model.dropout = 0.1
  config.diffusion.schedule = "linear"
  config.sampler.method = "f-pndm"
  config.sampler.num_steps = 50
  config.sampler.convention = "paper"
  config.sampler.num_samples = 50_000
  config.sampler.batch_size = 256
  return config
