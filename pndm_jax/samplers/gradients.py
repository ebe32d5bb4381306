"""Gradient parts: a step's gradient estimate from model evaluations (docs/methods.md §5).

Single-step parts are Runge-Kutta tableaux: stage i evaluates the model a
fraction c[i] of the way through the step (in t, sigma or log-SNR), at the point
the previous stage's gradient moves the step's start x to, and the step moves
with the b-weighted sum of all stage gradients. Multistep parts (PLMS and its
lower orders, variable-step Adams in sigma, log sigma or t, DPM-Solver++ and
UniPC) combine the current evaluation with a fixed-size history kept as a ring
buffer; their per-step ring weights are precomputed here so the scan body never
branches.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import numpy as np

from pndm_jax import schedules
from pndm_jax.samplers import multistep_weights
from pndm_jax.samplers.transfer import Data, Pseudo


@dataclasses.dataclass(frozen=True)
class RungeKutta:
  """An explicit tableau whose stage i moves from x with stage i-1's gradient only.

  `c`: the stage nodes as fractions of the step in `nodes` (c[0] = 0); `b`: the
  weights of the stage gradients in the step. Its Butcher matrix is
  a[i][i-1] = c[i], which covers Euler, Heun (improved Euler), classical RK4 and
  the midpoint rule (DPM-Solver++(2S) under the data transfer, in log-SNR).
  """

  c: tuple[float, ...]
  b: tuple[float, ...]
  nodes: str = "t"  # the variable c divides the step in: t, sigma or log_snr

  def __post_init__(self):
    if len(self.c) != len(self.b) or not self.c or self.c[0] != 0:
      raise ValueError(f"a tableau needs as many nodes c as weights b and c[0] = 0, "
                       f"got c={self.c}, b={self.b}")
    if self.nodes not in schedules.STAGE_VARIABLES:
      raise ValueError(f"stage variable must be one of {schedules.STAGE_VARIABLES}, "
                       f"got {self.nodes!r}")

  @property
  def num_stages(self) -> int:
    """Model evaluations one step makes."""
    return len(self.c)


EULER = RungeKutta(c=(0.0,), b=(1.0,))
HEUN = RungeKutta(c=(0.0, 1.0), b=(1 / 2, 1 / 2))
RK4 = RungeKutta(c=(0.0, 1 / 2, 1 / 2, 1.0), b=(1 / 6, 2 / 6, 2 / 6, 1 / 6))
SIGMA_RK4 = dataclasses.replace(RK4, nodes="sigma")  # pseudo RK4 exact in sigma's midpoints
LOG_SNR_MIDPOINT = RungeKutta(c=(0.0, 1 / 2), b=(0.0, 1.0), nodes="log_snr")


# rule -> (the transfer it is written for (None: any), highest order)
MULTISTEP_RULES: dict[str, tuple[type | None, int]] = {
    "plms": (None, 4),        # the paper's constant-step Adams-Bashforth weights
    "sigma": (Pseudo, 4),     # eps interpolated in sigma (vlms; DEIS's rho-AB)
    "log_sigma": (Pseudo, 3),  # ... in log sigma (diffusers' DEISMultistepScheduler)
    "t": (Pseudo, 3),         # ... in t (DEIS's tAB)
    "dpm_solver": (Data, 3),  # DPM-Solver++ 2M / 3M, as its reference code
    "log_snr": (Data, 4),     # data prediction interpolated in log-SNR, integrated exactly
    "unipc_bh1": (Data, 3),   # UniPC with B(h) = h, predictor and corrector
    "unipc_bh2": (Data, 3),   # UniPC with B(h) = e^h - 1
}
# diffusers lowers the final orders only below this many steps (UniPC: always)
LOWER_ORDER_FINAL_BELOW = 15


class RingTables(NamedTuple):
  """Per-step ring layout of a multistep part over a grid (docs/methods.md §5).

  slots [S] int32: where step i writes its evaluation; weights [S, R]: the
  predictor's weights per slot; corrector [S, R] and correct [S] (UniPC): the
  weights that redo step i-1 with step i's evaluation, and whether step i does.
  """

  slots: np.ndarray
  weights: np.ndarray
  corrector: np.ndarray
  correct: np.ndarray


@dataclasses.dataclass(frozen=True)
class LinearMultistep:
  """A multistep rule over the last `order` evaluations, one evaluation a step.

  `rule` (MULTISTEP_RULES) says how the weights are computed: `plms` are the
  paper's PLMS coefficients (equal steps assumed); the others adapt to the
  actual spacing, and `unipc_*` add UniPC's corrector.
  """

  order: int
  rule: str = "plms"

  def __post_init__(self):
    if self.rule not in MULTISTEP_RULES:
      raise ValueError(f"multistep rule must be one of {tuple(MULTISTEP_RULES)}, "
                       f"got {self.rule!r}")
    if not 1 <= self.order <= MULTISTEP_RULES[self.rule][1]:
      raise ValueError(f"multistep rule {self.rule!r} takes orders 1 to "
                       f"{MULTISTEP_RULES[self.rule][1]}, got {self.order}")

  @property
  def transfer_kind(self) -> type | None:
    """The transfer class the rule's weights are written for (None: any)."""
    return MULTISTEP_RULES[self.rule][0]

  @property
  def corrector(self) -> bool:
    return self.rule.startswith("unipc")

  @property
  def ring_size(self) -> int:
    """Evaluations kept: the order, plus the one UniPC's corrector reaches back to."""
    return self.order + self.corrector

  def step_orders(self, discretization: schedules.Discretization, ramp: bool,
                  lower_order_final: bool) -> np.ndarray:
    """[S] evaluations step i combines.

    `ramp`: min(i + 1, order) (else order: a single-step warm-up fills the
    history). `lower_order_final`: at most S - i, as diffusers' schedulers do
    (below LOWER_ORDER_FINAL_BELOW steps; UniPC at any S). A data-prediction
    step into sigma = 0 is always first order (its log-SNR step is infinite).
    """
    d = discretization
    num_steps = len(d.t)
    steps = np.arange(num_steps)
    orders = np.minimum(steps + 1, self.order) if ramp else np.full(num_steps, self.order)
    if lower_order_final and (self.corrector or num_steps < LOWER_ORDER_FINAL_BELOW):
      orders = np.minimum(orders, num_steps - steps)
    if self.transfer_kind is Data:
      orders[d.alpha_bar(d.t_next) == 1.0] = 1
    return orders

  def ring_weights(self, discretization: schedules.Discretization, ramp: bool,
                   lower_order_final: bool = False) -> RingTables:
    """The ring tables over the grid (float64 weights).

    Step i writes slot i % ring_size; the evaluation of step i-j sits in slot
    (i-j) % ring_size and gets the j-th weight of step i's combination.
    """
    d = discretization
    num_steps, size = len(d.t), self.ring_size
    orders = self.step_orders(d, ramp, lower_order_final)
    node_of = self._node_variable(d)
    start, end = node_of(d.t), node_of(d.t_next)
    weights = np.zeros((num_steps, size))
    corrector = np.zeros((num_steps, size))
    for i in range(num_steps):
      back = i - np.arange(orders[i])
      weights[i, back % size] = self._weights(d, start[back], start[i], end[i], d.t[back],
                                              d.t[i], d.t_next[i])
      if self.corrector and i:
        back = i - 1 - np.arange(orders[i - 1])
        redo = multistep_weights.unipc_corrector_weights(start[back], end[i - 1], self.rule[-3:])
        corrector[i, np.append(i, back) % size] = redo
    correct = np.arange(num_steps) > 0 if self.corrector else np.zeros(num_steps, bool)
    return RingTables((np.arange(num_steps) % size).astype(np.int32), weights, corrector,
                      correct)

  def _node_variable(self, d: schedules.Discretization):
    """Times -> the variable the rule's nodes live in: sigma (pseudo rules) or log-SNR / 2."""
    if self.transfer_kind is Data:
      def half_log_snr(t):
        with np.errstate(divide="ignore"):  # sigma = 0: +inf
          return 0.5 * (np.log(d.alpha_bar(t)) - np.log1p(-d.alpha_bar(t)))
      return half_log_snr
    return lambda t: np.sqrt((1.0 - d.alpha_bar(t)) / d.alpha_bar(t))

  def _weights(self, d: schedules.Discretization, nodes: np.ndarray, start: float, end: float,
               node_times: np.ndarray, start_time: float, end_time: float) -> np.ndarray:
    """One step's weights, newest first."""
    k = len(nodes)
    if self.rule == "plms" or k == 1:
      return np.array(multistep_weights.ADAMS_BASHFORTH[k])
    if self.rule == "sigma":
      return multistep_weights.sigma_weights(nodes, start, end)
    if self.rule == "log_sigma":
      return multistep_weights.log_sigma_weights(nodes, start, end)
    if self.rule == "t":
      if d.convention != "consistent":
        raise ValueError(f"multistep rule 't' (DEIS's tAB) integrates over the continuous "
                         f"alpha-bar of convention 'consistent', got {d.convention!r}")
      return multistep_weights.time_weights(d.schedule, node_times, start_time, end_time)
    if self.rule == "dpm_solver":
      return multistep_weights.dpm_solver_weights(nodes, end)
    if self.rule == "log_snr":  # the log-sigma integral with u = lambda: e^u = 1 / sigma
      return multistep_weights.log_sigma_weights(np.exp(nodes), np.exp(start), np.exp(end))
    return multistep_weights.unipc_predictor_weights(nodes, end, self.rule[-3:])


@dataclasses.dataclass(frozen=True)
class Ramp:
  """A multistep part's warm-up by lower-order multistep steps (1 evaluation a step)."""


@dataclasses.dataclass(frozen=True)
class HeunRamp:
  """diffusers' PLMS start: one improved-Euler (Heun) step, then lower orders from 2.

  Only the Heun step's first evaluation enters the history. Under the
  `diffusers` convention its end move restarts a nominal step before the next
  grid time, as PNDMScheduler does (docs/methods.md §5).
  """

  rule: ClassVar[RungeKutta] = HEUN


RAMP = Ramp()
HEUN_RAMP = HeunRamp()

GradientPart = RungeKutta | LinearMultistep
Warmup = RungeKutta | Ramp | HeunRamp
