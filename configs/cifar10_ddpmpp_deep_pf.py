"""score_sde's DDPM++ (deep, continuous, VP) CIFAR-10 network with F-PNDM, 50 steps.

The paper's probability-flow rows: the same network under `--config.sampler.method=pf` (the
adaptive probability-flow solve) or any other method. It is NCSN++ in its DDPM++ form: 8
BigGAN-style residual blocks per level, positional time embedding, no FIR, skip rescaling, no
progressive paths. It is a continuous-time network: the timestep index is turned into score_sde's
time labels at the model boundary (`ncsnpp.labels_from_timestep`, docs/methods.md §8), and its
output is eps (score_sde's score is -output / std).

Weights: score_sde's `checkpoint_*.pth` (its `ema` entry is read) or a plain state_dict such as
the PNDM repository's, given as --config.sampler.checkpoint=PATH and read on every run.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.model.name = "ncsnpp"
  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 8
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.model.resamp_with_conv = True
  config.model.fir = False
  config.model.fir_kernel = (1, 3, 3, 1)
  config.model.skip_rescale = True
  config.model.resblock_type = "biggan"
  config.model.progressive = "none"
  config.model.progressive_input = "none"
  config.model.progressive_combine = "sum"
  config.model.embedding_type = "positional"
  config.model.fourier_scale = 16.0
  config.model.centered = True
  config.sampler.num_samples = 50_000
  config.sampler.batch_size = 500
  return config
