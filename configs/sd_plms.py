"""Stable Diffusion v1's sampler: diffusers' PNDMScheduler in PLMS mode, step for step.

SD v1's scheduler_config.json reads: beta_schedule scaled_linear, beta_start 0.00085,
beta_end 0.012, skip_prk_steps true, steps_offset 1, set_alpha_to_one false, timestep_spacing
leading. Each maps to one setting below (docs/methods.md §3); skip_prk_steps picks the method:
`plms` (true) or `pndm` (false, the PRK warm-up). The model is the analytic digits mixture, whose
exact eps follows this schedule, so the config runs anywhere without weights; a network trained
with this schedule samples the same way (set config.model and config.sampler.checkpoint).
"""

from configs import gmm_pndm


def get_config():
  config = gmm_pndm.get_config()
  config.diffusion.schedule = "scaled_linear"
  config.diffusion.beta_start = 0.00085
  config.diffusion.beta_end = 0.012
  config.sampler.method = "plms"
  config.sampler.num_steps = 50
  config.sampler.convention = "diffusers"
  config.sampler.spacing = "leading"
  config.sampler.steps_offset = 1
  config.sampler.set_alpha_to_one = False
  return config
