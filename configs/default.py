"""Default configuration; experiment configs import `get_config()` and override it."""

import os

import ml_collections

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # cifar10 | celeb_a | lsun_church | lsun_bedroom (tfds) | digits | image_folder | npz
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.num_channels = 3
  config.data.random_flip = True
  config.data.path = ""               # image_folder / npz sources
  config.data.data_dir = ""           # tensorflow-datasets data_dir ("" = default)
  config.data.npz_key = ""            # npz source: array name ("" = the file's only array)
  config.data.digits_fit = "resize"   # digits at image_size > 8: resize | pad

  config.model = ml_collections.ConfigDict()
  config.model.name = "unet"  # unet | iddpm | ncsnpp (docs/methods.md §8) | digits_gmm (analytic)
  config.model.gmm_std = 0.15         # digits_gmm: per-pixel std of each component
  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.model.resamp_with_conv = True
  config.model.dtype = "float32"      # computation dtype; bfloat16 on accelerators
  config.model.prediction_type = "epsilon"  # epsilon | sample | v_prediction (converted to eps)

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "linear"  # linear | scaled_linear (quad) | cosine
                                        # (squaredcos_cap_v2) | trained
  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_start = 1e-4    # linear / scaled_linear endpoints (Stable Diffusion v1:
  config.diffusion.beta_end = 0.02      # scaled_linear, 0.00085 .. 0.012)
  config.diffusion.trained_betas = ""   # schedule 'trained': a .npy or text file of float64 betas

  config.training = ml_collections.ConfigDict()
  config.training.batch_size = 64
  config.training.num_train_steps = 800_000
  config.training.loss = "l1"
  config.training.lr = 2e-4
  config.training.warmup_steps = 5000
  config.training.beta1 = 0.9
  config.training.beta2 = 0.999
  config.training.adam_eps = 1e-8
  config.training.grad_clip = 1.0
  config.training.ema_decay = 0.9999
  config.training.steps_per_call = 1
  config.training.log_every = 100
  config.training.checkpoint_every = 5000
  config.training.keep_checkpoints = 3
  config.training.restore_fallback = False  # unreadable latest checkpoint: error (or the previous)
  config.training.sample_every = 10_000     # sample grid PNG from the EMA params (0 = never)
  config.training.num_grid_samples = 64

  config.sampler = ml_collections.ConfigDict()
  config.sampler.method = "f-pndm"
  config.sampler.num_steps = 50
  config.sampler.convention = "paper"  # alpha-bar convention: paper | consistent | diffusers
  config.sampler.spacing = "uniform"  # timesteps: uniform | linspace | leading | trailing |
                                      # quadratic | time_uniform | logsnr | karras (consistent)
  config.sampler.steps_offset = 0     # spacing 'leading': added to every timestep (diffusers')
  config.sampler.set_alpha_to_one = False  # convention 'diffusers': last step ends at 1, not A[0]
  config.sampler.grid_end = "zero"  # or sigma_min: end at A[0] (consistent, fractional spacings)
  config.sampler.eta = 0.0
  # deterministic methods' options (docs/methods.md §6): None keeps the method's own
  config.sampler.lower_order_final = ml_collections.config_dict.placeholder(bool)
  config.sampler.denoise_to_zero = False  # one more evaluation: A[0] -> the data prediction
  config.sampler.thresholding = False  # clip each evaluation's data prediction (Imagen's)
  config.sampler.threshold_ratio = 0.995  # thresholding: the quantile of |x0| per image ...
  config.sampler.threshold_max = 1.0      # ... clamped to [1, threshold_max]
  config.sampler.num_samples = 64
  config.sampler.batch_size = 64
  config.sampler.seed = 0
  config.sampler.checkpoint = ""      # params dir, training run or step dir, DDIM .ckpt, diffusers
  config.sampler.checkpoint_step = -1  # training run: which step's EMA (-1 = the latest)
  config.sampler.checkpoint_list_entry = -1  # list .ckpt: -1 = the EMA entry DDIM saves last;
                                             # 0 = raw training weights
  config.sampler.chunk_size = 1000
  config.sampler.save_pngs = False
  config.sampler.sample_dir = ""      # "" = <workdir>/samples/<method>-<steps>-seed<seed>-<hash>

  config.eval = ml_collections.ConfigDict()
  config.eval.metric = "fid"          # fid | fd_digits (the digits model's stand-in; not FID)
  config.eval.inception_weights = ""  # pytorch-fid pt_inception-2015-12-05-*.pth or jax-fid pickle
  config.eval.digits_classifier = os.path.join(ASSETS, "digits_classifier.msgpack")  # fd_digits
  config.eval.stats_file = ""         # reference statistics .npz (mu, sigma)
  config.eval.num_images = 0          # --mode=stats: images from the dataset (0 = all)
  config.eval.overwrite = False       # --mode=stats: replace an existing stats_file
  config.eval.subset = False          # --mode=eval: score fewer than num_samples images
  config.eval.batch_size = 200
  return config
