"""Training the CIFAR-10 U-Net as the reference does (docs/methods.md §9), sampled with F-PNDM."""

from configs import cifar10_pndm


def get_config():
  config = cifar10_pndm.get_config()
  config.training.batch_size = 128
  config.training.num_train_steps = 800_000
  config.training.loss = "l2"
  config.sampler.num_samples = 64
  return config
