"""PNDM-family samplers and the fast samplers they are compared with, as pure, scanned JAX
functions (docs/methods.md §4-§7).

    method = samplers.get_method("f-pndm")
    discretization = schedules.Discretization(schedules.Schedule("linear"), num_steps=50)
    x0 = samplers.sample_deterministic(eps_fn, x_T, method, discretization)
    method.num_evals(discretization)  # 59
"""

from pndm_jax.samplers.ancestral import FixedLarge, FixedSmall, sample_ancestral
from pndm_jax.samplers.deterministic import sample_deterministic
from pndm_jax.samplers.dispatch import run_sampler
from pndm_jax.samplers.gradients import (
                                         EULER,
                                         HEUN,
                                         HEUN_RAMP,
                                         LOG_SNR_MIDPOINT,
                                         RAMP,
                                         RK4,
                                         SIGMA_RK4,
                                         HeunRamp,
                                         LinearMultistep,
                                         Ramp,
                                         RungeKutta,
)
from pndm_jax.samplers.methods import (
                                       ALIASES,
                                       GRADIENTS,
                                       PRESETS,
                                       TRANSFERS,
                                       WARMUPS,
                                       Ancestral,
                                       Deterministic,
                                       Method,
                                       ProbabilityFlow,
                                       canonical_name,
                                       get_method,
                                       method_options,
)
from pndm_jax.samplers.model_call import EpsFn
from pndm_jax.samplers.probability_flow import sample_probability_flow
from pndm_jax.samplers.thresholding import Thresholding
from pndm_jax.samplers.transfer import CLASSICAL, DATA, PSEUDO, Classical, Data, Pseudo

__all__ = ["run_sampler", "sample_deterministic", "sample_ancestral", "sample_probability_flow",
           "get_method", "canonical_name", "method_options", "Method", "Deterministic", "Ancestral",
           "ProbabilityFlow", "PRESETS", "ALIASES", "TRANSFERS", "GRADIENTS", "WARMUPS", "Pseudo",
           "Classical", "Data", "PSEUDO", "CLASSICAL", "DATA", "RungeKutta", "LinearMultistep",
           "Ramp", "HeunRamp", "EULER", "HEUN", "RK4", "SIGMA_RK4", "LOG_SNR_MIDPOINT", "RAMP",
           "HEUN_RAMP", "Thresholding", "FixedSmall", "FixedLarge", "EpsFn"]
