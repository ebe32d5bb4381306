"""diffusers' PNDMPipeline on the CIFAR-10 DDPM U-Net: PNDMScheduler's defaults, step for step.

Those defaults are the `linear` schedule (1e-4 .. 0.02), the PRK warm-up (skip_prk_steps false:
method `pndm`, i.e. F-PNDM), timestep_spacing leading, steps_offset 0 and set_alpha_to_one false
(docs/methods.md §3). Weights as in configs/cifar10_pndm.py.
"""

from configs import cifar10_pndm


def get_config():
  config = cifar10_pndm.get_config()
  config.sampler.method = "pndm"
  config.sampler.convention = "diffusers"
  config.sampler.spacing = "leading"
  return config
