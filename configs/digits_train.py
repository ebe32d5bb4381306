"""A small U-Net on scikit-learn's 8x8 digits: trains on 2 CPU cores in under 10 minutes.

    python main.py --mode=train --config=configs/digits_train.py --workdir=runs/digits_train

5000 steps at ~11 steps/s (batch 64, 2 otherwise idle cores): about 8 minutes
plus ~15 s of compilation and five 50-step F-PNDM sample grids.

Native 8x8 resolution (upsampling to 16x16 costs ~4.5x per step on CPU for no
new information); levels at 8x8 and 4x4, attention only in the 4x4 middle. A
short run wants a larger learning rate, a shorter warm-up and a faster EMA than
the paper's 800k-step CIFAR-10 recipe; digits are not mirror-symmetric, so no flips.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.num_channels = 1
  config.data.random_flip = False

  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.dropout = 0.0

  config.training.batch_size = 64
  config.training.num_train_steps = 5000
  config.training.lr = 1e-3
  config.training.warmup_steps = 200
  config.training.ema_decay = 0.999
  config.training.steps_per_call = 1
  config.training.log_every = 100
  config.training.checkpoint_every = 1000
  config.training.keep_checkpoints = 2
  config.training.sample_every = 1000

  config.sampler.method = "f-pndm"
  config.sampler.num_steps = 50
  return config
