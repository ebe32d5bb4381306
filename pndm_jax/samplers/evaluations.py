"""A deterministic method over a grid as one table row per model evaluation (docs/methods.md §4).

Whatever its transfer, tableau, warm-up or options, a deterministic run is a
sequence of model evaluations of one shape. With x the current step's start and
G a buffer of gradients (the multistep history ring, then the stages of the step
in progress), evaluation j does

    x_e     = x + R_in x + S_in G[source]         the point: a Runge-Kutta stage, or x
    G[slot] = gx x + gxe x_e + ge eps(x_e, t)     the transfer's gradient quantity
    x       = x_p + Rc x_p + Sc (C . G)  if correct   UniPC's corrector (x_p: the last step's
                                                      corrected start)
    x       = x + R_out x + S_out (W . G)         the step's end move (all zero mid-step)

The tables are float64, built once per (method, grid) on the host; the sampler
scans one body over them, so the compiled program holds the network once
whatever the method, and compile time does not grow with the step count.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pndm_jax import schedules
from pndm_jax.samplers.gradients import EULER, HeunRamp, RungeKutta
from pndm_jax.samplers.methods import Deterministic, final_alpha_bar
from pndm_jax.samplers.transfer import Transfer

# the coefficient columns, each [E]; `corrector` and `weights` are [E, slots]
COEFFICIENTS = ("R_in", "S_in", "gx", "gxe", "ge", "Rc", "Sc", "R_out", "S_out")


class Evaluations(NamedTuple):
  """The per-evaluation tables of a run (E rows: its NFE), as the module docstring reads them."""

  t: np.ndarray          # [E] model timestep
  source: np.ndarray     # [E] int32: the slot whose gradient moves x to the stage
  slot: np.ndarray       # [E] int32: where the evaluation's gradient goes
  correct: np.ndarray    # [E] bool: UniPC's corrector redoes the previous step first
  ends: np.ndarray       # [E] bool: the evaluation ends a step
  coefficients: dict[str, np.ndarray]  # COEFFICIENTS [E], corrector and weights [E, slots]


def _rows(count: int, num_slots: int) -> dict[str, np.ndarray]:
  """`count` rows that do nothing but evaluate at x (all coefficients zero)."""
  rows = {name: np.zeros(count) for name in COEFFICIENTS}
  rows.update(t=np.zeros(count), source=np.zeros(count, np.int32),
              slot=np.zeros(count, np.int32), correct=np.zeros(count, bool),
              ends=np.zeros(count, bool), corrector=np.zeros((count, num_slots)),
              weights=np.zeros((count, num_slots)))
  return rows


def _gradient_terms(transfer: Transfer, coefficients: dict[str, np.ndarray],
                    shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
  """(gx, gxe, ge) [steps, stages] of the transfer's g = gx x + gxe x_e + ge e."""
  return tuple(np.broadcast_to(v, shape) for v in transfer.gradient_terms(coefficients))


def _stage_slot(step: int, stage: int, ring_size: int) -> int:
  """Stage 0 writes the step's ring slot (step mod ring_size; 0 without a ring), stage k > 0
  the k-th slot after the ring."""
  if stage == 0:
    return step % ring_size if ring_size else 0
  return max(ring_size, 1) - 1 + stage


def _single_steps(transfer: Transfer, rule: RungeKutta, d: schedules.Discretization,
                  plan: schedules.StepPlan, steps: range, ring_size: int,
                  num_slots: int) -> dict[str, np.ndarray]:
  """Rows of grid steps `steps` taken with tableau `rule` (moves and times from `plan`).

  Stage 0's gradient goes to the history ring's slot of the step when there is
  a ring (a multistep method's warm-up), the later stages' to the slots after it.
  """
  c = transfer.coefficients(d, plan)
  num_stages = rule.num_stages
  terms = _gradient_terms(transfer, c, plan.eval_t.shape)
  rows = _rows(len(steps) * num_stages, num_slots)
  for row, (i, k) in enumerate((i, k) for i in steps for k in range(num_stages)):
    slots = [_stage_slot(i, stage, ring_size) for stage in range(num_stages)]
    rows["t"][row] = plan.eval_t[i, k]
    rows["slot"][row] = slots[k]
    for name, term in zip(("gx", "gxe", "ge"), terms):
      rows[name][row] = term[i, k]
    if k:
      rows["source"][row] = slots[k - 1]
      rows["R_in"][row], rows["S_in"][row] = c["R"][i, k - 1], c["S"][i, k - 1]
    if k == num_stages - 1:
      rows["ends"][row] = True
      rows["R_out"][row], rows["S_out"][row] = c["R"][i, k], c["S"][i, k]
      rows["weights"][row, slots] = rule.b
  return rows


def _multistep_steps(method: Deterministic, d: schedules.Discretization, first: int,
                     num_slots: int) -> dict[str, np.ndarray]:
  """Rows of the multistep steps first..S-1: one evaluation each, combined with the ring."""
  transfer, gradient = method.transfer, method.gradient
  tables = gradient.ring_weights(d, ramp=not isinstance(method.warmup, RungeKutta),
                                 lower_order_final=method.lower_order_final)
  plan = d.plan((0.0,))
  c = transfer.coefficients(d, plan)
  terms = _gradient_terms(transfer, c, plan.eval_t.shape)
  steps = slice(first, None)
  rows = _rows(len(d.t) - first, num_slots)
  ring = slice(0, gradient.ring_size)
  rows["t"] = plan.eval_t[steps, 0]
  rows["slot"] = tables.slots[steps]
  for name, term in zip(("gx", "gxe", "ge"), terms):
    rows[name] = term[steps, 0]
  rows["ends"][:] = True
  rows["R_out"], rows["S_out"] = c["R"][steps, 0], c["S"][steps, 0]
  rows["weights"][:, ring] = tables.weights[steps]
  if gradient.corrector:  # step i redoes step i-1: its move coefficients, shifted by one
    previous = lambda v: np.concatenate([v[:1, 0], v[:-1, 0]])[steps]
    rows["Rc"], rows["Sc"] = previous(c["R"]), previous(c["S"])
    rows["corrector"][:, ring] = tables.corrector[steps]
    rows["correct"] = tables.correct[steps]
  return rows


def _denoise(d: schedules.Discretization, num_slots: int) -> dict[str, np.ndarray]:
  """The row that replaces x at the grid's end alpha-bar A[0] by the data prediction there
  (the model asked at t = 0)."""
  a = final_alpha_bar(d)
  rows = _rows(1, num_slots)
  rows["t"][0] = d.schedule.time_of_alpha_bar(a)
  rows["gxe"][0], rows["ge"][0] = 1.0 / np.sqrt(a), -np.sqrt((1.0 - a) / a)
  rows["ends"][0] = True
  rows["R_out"][0], rows["S_out"][0], rows["weights"][0, 0] = -1.0, 1.0, 1.0  # x = g
  return rows


def evaluations(method: Deterministic, discretization: schedules.Discretization) -> Evaluations:
  """The tables of `method` over `discretization`: method.num_evals(discretization) rows."""
  method.check_steps(discretization)
  d, transfer, gradient = discretization, method.transfer, method.gradient
  num_steps = len(d.t)
  if isinstance(gradient, RungeKutta):
    num_slots, full = gradient.num_stages, num_steps - method.final_euler_steps
    plan = d.plan(gradient.c, nodes=gradient.nodes, num_steps=full)
    blocks = [_single_steps(transfer, gradient, d, plan, range(full), 0, num_slots)]
    if full < num_steps:  # lower_order_final: the last step is Euler
      blocks.append(_single_steps(transfer, EULER, d, d.plan(EULER.c), range(full, num_steps),
                                  0, num_slots))
  else:
    warm, rule = method.warmup_steps, method.warmup_rule
    num_slots = gradient.ring_size + (rule.num_stages - 1 if warm else 0)
    blocks = []
    if warm:
      plan = d.plan(rule.c, restart=isinstance(method.warmup, HeunRamp), nodes=rule.nodes,
                    num_steps=warm)
      blocks.append(_single_steps(transfer, rule, d, plan, range(warm), gradient.ring_size,
                                  num_slots))
    blocks.append(_multistep_steps(method, d, warm, num_slots))
  if method.denoise_to_zero:
    blocks.append(_denoise(d, num_slots))
  rows = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
  coefficients = {k: rows[k] for k in (*COEFFICIENTS, "corrector", "weights")}
  return Evaluations(rows["t"], rows["source"], rows["slot"], rows["correct"], rows["ends"],
                     coefficients)

