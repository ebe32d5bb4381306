"""Sampling the DDIM/DDPM CIFAR-10 U-Net (35.7M) with F-PNDM, 50 steps, `paper` convention.

Weights: a DDIM-repository `.ckpt` or the diffusers `ddpm-cifar10-32` folder, given as
--config.sampler.checkpoint=PATH (or converted first with --mode=convert). A plain state_dict
`.ckpt` (e.g. the PNDM repository's EMA file) is read as it is; of a training list
[model, optimizer, epoch, step, EMA] the default checkpoint_list_entry=-1 reads the EMA entry.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.dropout = 0.1
  config.sampler.num_samples = 50_000
  config.sampler.batch_size = 500
  return config
