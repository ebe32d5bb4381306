"""pndm_jax: pseudo numerical methods for diffusion models (Liu et al., ICLR 2022) in JAX."""
