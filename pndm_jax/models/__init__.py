"""Networks: the DDPM/DDIM U-Net and the `eps_fn` adapter the samplers take."""

from pndm_jax.models.unet import DTYPES, UNet, check_model_config, eps_fn, unet_from_config

__all__ = ["DTYPES", "UNet", "check_model_config", "eps_fn", "unet_from_config"]
