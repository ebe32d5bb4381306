"""Networks: the DDPM/DDIM U-Net, the `eps_fn` adapter the samplers take, and the conversion
of x0- or v-predicting networks' outputs to eps."""

from pndm_jax.models.prediction import (
  PREDICTION_TYPES,
  check_conversion,
  check_prediction_type,
  eps_from_output,
  to_eps,
)
from pndm_jax.models.unet import DTYPES, UNet, check_model_config, eps_fn, unet_from_config

__all__ = ["DTYPES", "UNet", "check_model_config", "eps_fn", "unet_from_config",
           "PREDICTION_TYPES", "check_conversion", "check_prediction_type", "eps_from_output",
           "to_eps"]
