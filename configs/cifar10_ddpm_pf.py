"""score_sde's DDPM CIFAR-10 network (continuous, VP) with F-PNDM, 50 steps.

The paper's other probability-flow network (`--config.sampler.method=pf` for that row). score_sde's
PyTorch DDPM model is NCSN++ with DDPM residual blocks, no skip rescaling, no progressive paths
and the positional embedding (its layers and their order are the same; GroupNorm's group count
agrees from 128 channels on), so it is read as the `ncsnpp` family: 2 blocks per level,
attention at 16 (once per level on the way up, unlike the DDIM U-Net). Time labels and eps as in
configs/cifar10_ddpmpp_deep_pf.py.

Weights: score_sde's `checkpoint_*.pth` (its `ema` entry) or a plain state_dict such as the PNDM
repository's, given as --config.sampler.checkpoint=PATH.
"""

from configs import cifar10_ddpmpp_deep_pf


def get_config():
  config = cifar10_ddpmpp_deep_pf.get_config()
  config.model.num_res_blocks = 2
  config.model.resblock_type = "ddpm"
  config.model.skip_rescale = False
  return config
