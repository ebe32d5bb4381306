"""Random-weight diffusers UNet2DModels in the DDPM architecture, for conversion tests."""

import diffusers
import torch

# The settings of ddpm-cifar10-32's config.json that make a UNet2DModel the DDPM/DDIM network.
DDPM_SETTINGS = dict(layers_per_block=2, attention_head_dim=None, norm_eps=1e-6,
                     downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)


def diffusers_unet(arch: dict, seed: int = 0):
  """A UNet2DModel with random weights (norm scales/biases perturbed too), in eval mode."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**arch, **DDPM_SETTINGS).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model
