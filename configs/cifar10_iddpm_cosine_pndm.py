"""improved DDPM's CIFAR-10 `UNetModel` (cosine schedule, learned variances) with F-PNDM, 50 steps.

The paper's iDDPM rows. The network is the one improved-diffusion trains with
`--num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3` (attention at 16x16 and
8x8, 4 heads, scale-shift norm); its output has 6 channels, the first 3 are eps. It was trained
on 4000 cosine steps with rescaled timesteps (t * 1000 / 4000), so on this 1000-step cosine
schedule the timestep index is exactly what it was fed.

Weights: an improved-diffusion CIFAR-10 EMA state_dict (`.pt`, e.g. `cifar10_uncond_50M_500K.pt`
from openai/improved-diffusion, or the PNDM repository's copy), given as
--config.sampler.checkpoint=PATH and read on every run.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.model.name = "iddpm"
  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (16, 8)
  config.model.dropout = 0.3
  config.model.num_heads = 4
  config.model.num_head_channels = -1     # -1: split into num_heads heads
  config.model.num_heads_upsample = -1    # -1: num_heads
  config.model.use_scale_shift_norm = True
  config.model.resblock_updown = False
  config.model.learn_sigma = True         # 2C output channels; the first C are eps
  config.diffusion.schedule = "cosine"
  config.sampler.num_samples = 50_000
  config.sampler.batch_size = 500
  return config
