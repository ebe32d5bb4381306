"""F-PNDM on an analytic model: a mixture of the ten mean 8x8 digits, exact eps, no weights."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.num_channels = 1
  config.model.name = "digits_gmm"
  config.sampler.method = "f-pndm"
  config.sampler.num_steps = 50
  config.sampler.num_samples = 64
  return config
