"""F-PNDM (50 steps) on the shipped digits U-Net: the README's first command, no downloads.

The model in assets/digits_unet is the EMA of `configs/digits_train.py`; the README has the
commands that reproduce it.
"""

import os

from configs import default, digits_train

SHIPPED_MODEL = os.path.join(default.ASSETS, "digits_unet")


def get_config():
  config = digits_train.get_config()
  config.sampler.checkpoint = SHIPPED_MODEL
  config.sampler.method = "f-pndm"
  config.sampler.num_steps = 50
  config.sampler.num_samples = 64
  config.eval.metric = "fd_digits"
  return config
