"""Networks: the DDPM/DDIM U-Net, improved DDPM's UNetModel and score_sde's NCSN++ behind one
factory (`networks`), the `eps_fn` adapter the samplers take, and the conversion of x0- or
v-predicting networks' outputs to eps."""

from pndm_jax.models.config_checks import DTYPES
from pndm_jax.models.networks import (
  NETWORKS,
  apply_eps,
  architecture,
  check_config,
  check_name,
  eps_fn,
  from_architecture,
  from_config,
  name_of,
)
from pndm_jax.models.prediction import (
  PREDICTION_TYPES,
  check_conversion,
  check_prediction_type,
  eps_from_output,
  to_eps,
)
from pndm_jax.models.unet import UNet, check_model_config, unet_from_config

__all__ = ["DTYPES", "UNet", "check_model_config", "unet_from_config", "NETWORKS", "apply_eps",
           "architecture", "check_config", "check_name", "eps_fn", "from_architecture",
           "from_config", "name_of", "PREDICTION_TYPES", "check_conversion",
           "check_prediction_type", "eps_from_output", "to_eps"]
