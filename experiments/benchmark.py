"""Speed, compile time and memory against PyTorch / diffusers, both sides in one run (issue 14).

Both sides compute the same function: the U-Net of `--config` gets random Flax weights, which
`convert.to_state_dict` maps onto the `UNet2DModel` of `convert.diffusers_config`, and the two
forwards are compared once (`parity`: max abs difference of eps). Every timing runs both sides in
turn per repeat (the order reversed every other repeat) and reports the median of `--repeats`, on
one machine, PyTorch getting as many threads as XLA:CPU's pool (the CPUs this process may run on).
Ours: params resident on the devices, the batch sharded over `--devices`, the forward and the
samplers compiled ahead of time (compile excluded; the samplers draw their noise inside the
program, as `main.py` does), training compiled by its warm-up step. Speed ratios are ours over
theirs: > 1 means ours is faster.

- forward: seconds of one network call on the batch. Ours: the jitted `apply`; theirs:
  `UNet2DModel` in eval mode under `torch.inference_mode`. `speed_ratio_ours_over_torch` =
  torch seconds / our seconds.
- sampler: wall seconds of `--method` with `--steps` on the config's grid over the batch
  (`generation.make_generate_fn`), its NFE (`method.num_evals`) and
  `overhead_wall_over_nfe_x_forward` = wall / (NFE x forward seconds): 1 means the sampler costs
  exactly its network calls.
- diffusers: images/s (batch / wall) of `UNet2DModel` + `PNDMScheduler` in both modes, `prk`
  (`skip_prk_steps=False`, the paper's F-PNDM) and `plms` (`skip_prk_steps=True`, PLMS only),
  each against ours on diffusers' own grid: the scheduler's config goes through
  `diffusers_scheduler.apply_scheduler_config` (convention `diffusers`, which reproduces
  PNDMScheduler step for step as `f-pndm` and `plms`; tests/test_diffusers_parity.py).
  `equal_steps`: that method with `--steps` (the same NFE by construction); `equal_nfe`:
  `--method` on the same grid with the largest step count whose NFE is at most diffusers' (its
  unet calls, len(scheduler.timesteps)); the NFE used is recorded, or why none fits. A run that is
  the same program as another is measured once (`same_run_as`). Ratio:
  `images_per_s_ratio_ours_over_diffusers`; each side also has its overhead (wall / (NFE x its
  own forward)).
- compile: seconds to lower + compile the method's program (x_T -> x0 for `--method` on the
  config's spacing under the `consistent` convention, since `paper` cannot run S = N) at S = 10
  and S = 1000, one forward, and the whole `generate` program sampling uses at `--steps` (which
  also draws the noise: threefry costs compile time of its own), each from cleared caches
  (`jax.clear_caches()`, persistent cache off); `compile_ratio_sampler_over_forward`. All are
  compiled with `compiler_options.PROGRAMS`, as sampling is.
- memory: the compiled samplers' `memory_analysis()` (temp + argument + output bytes) at S = 10
  and S = 1000 (flat in S: the steps are a scan; `memory_ratio_s1000_over_s10`), and the devices'
  `peak_bytes_in_use` after the sampler measurements where the backend reports it (GPU). What
  cannot be measured is None.
- train: seconds per training step, after three warm-up steps (the first, `first_step_s`,
  is ours with the compile; ours is ~30% slower over the next two), of `pndm_jax.train` (the
  config's loss, Adam with its warm-up, grad_clip, EMA and dropout; one step per call) and of
  the same step in PyTorch on the `UNet2DModel` (flips, antithetic timesteps,
  x_t = sqrt(a) x0 + sqrt(1 - a) eps, the loss summed over pixels and averaged over the batch,
  Adam with the same lr warm-up / betas / eps, `clip_grad_norm_`, an EMA copy with the same
  decay), on the same random batch; `speed_ratio_ours_over_torch`. A third side,
  `ours_xla_defaults`, is our step compiled with XLA's default options instead of
  `compiler_options.PROGRAMS` (on CPU: with the YNNPACK fusions), timed in the same turns:
  `speed_ratio_programs_over_xla_defaults` says what those options do for training.

Both sides run in one process, with glibc's malloc set as `main.py` sets it
(`host_memory.keep_freed_memory`: freed blocks are kept for reuse, not unmapped;
`--nokeep_freed_memory` leaves glibc's defaults; the environment records which).

With --dtype=bfloat16 ours computes in bfloat16 (float32 params); the torch network is converted
to bfloat16 for the forward and sampling (the sampler state stays float32 on both sides) and
trains under `torch.autocast`. Writes benchmark.json (the numbers, every repeat, and the
environment: load averages before and after, CPU model, thread counts, versions, devices,
XLA_FLAGS, argv, date) and benchmark.md (the tables, also printed) to --out.

  python -m experiments.benchmark                   # CIFAR-10 U-Net (35.7M), batch 8, 50 steps
  python -m experiments.benchmark --quick           # a tiny U-Net, < 1 min; what the tests run
  python -m experiments.benchmark --batch=8 --steps=10 --repeats=1   # ~2 min on 2 CPU cores
  python -m experiments.benchmark --dtype=bfloat16 --devices=2
  python -m experiments.benchmark --train_only --out=experiments/results/benchmark_train
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def requested_devices(argv: list[str]) -> int:
  """--devices as given on the command line (absl parses it, and reports a bad value, only
  after jax is imported); 1 where it is absent or not a positive integer."""
  value = "1"
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      value = arg.split("=", 1)[1]
    elif arg == "--devices" and i + 1 < len(argv):
      value = argv[i + 1]
  return int(value) if value.isdigit() and int(value) > 0 else 1


def force_host_devices(count: int) -> None:
  """Makes XLA:CPU present `count` devices (XLA_FLAGS is read when jax is imported)."""
  rest = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{rest.strip()} --xla_force_host_platform_device_count={count}".strip()


if __name__ == "__main__":
  force_host_devices(requested_devices(sys.argv))

import diffusers  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import report  # noqa: E402
from pndm_jax import (  # noqa: E402
  compiler_options,
  convert,
  diffusers_scheduler,
  generation,
  host_memory,
  models,
  sampler_spec,
  samplers,
  schedules,
  sharding,
  train,
)

config_flags.DEFINE_config_file("config", "configs/cifar10_pndm.py",
                                "The network, schedule and training settings.")
flags.DEFINE_integer("batch", 8, "Images per call (forward, samplers, training step).",
                     lower_bound=1)
flags.DEFINE_integer("steps", 50, "Sampler steps.", lower_bound=1)
flags.DEFINE_string("method", "f-pndm", "Our sampler for the sampler, compile and memory "
                    "measurements and for diffusers' equal-NFE comparison.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both networks.")
flags.DEFINE_integer("devices", 1, "JAX devices the batch is sharded over (on CPU, host devices "
                     "made with XLA_FLAGS=--xla_force_host_platform_device_count).", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Timed repeats of each measurement (the median is reported).",
                     lower_bound=1)
flags.DEFINE_string("out", "experiments/results/benchmark", "Output directory.")
flags.DEFINE_bool("train_only", False, "Only the training step (its three sides): a few minutes "
                  "where the whole run takes twenty.")
flags.DEFINE_bool("keep_freed_memory", True, "Both sides run with glibc's malloc set to keep and "
                  "reuse freed memory, as main.py does (pndm_jax/host_memory.py); false: "
                  "glibc's defaults.")
flags.DEFINE_bool("quick", False, "A tiny U-Net on 8x8 images, batch 2, 5 steps, 1 repeat "
                  "(unless given): for the tests.")
FLAGS = flags.FLAGS

QUICK = dict(batch=2, steps=5, repeats=1)
QUICK_MODEL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
QUICK_IMAGE_SIZE = 8
COMPILE_STEPS = (10, 1000)
TRAIN_WARMUP_STEPS = 3
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                            "cosine": "squaredcos_cap_v2"}
# max abs eps difference the two forwards may have (eps is O(1)): bfloat16 rounds at ~4e-3, and
# float32 on a GPU convolves in TF32 by default on both sides (2e-3 seen on an H100)
PARITY_TOLERANCE = {"float32": 1e-3, "float32_gpu": 1e-2, "bfloat16": 0.25}
MODES = {"prk": False, "plms": True}  # diffusers' PNDMScheduler mode -> skip_prk_steps


def xla_cpu_threads() -> int:
  """The size of XLA:CPU's intra-op thread pool: the CPUs this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment(mesh, threads: int, torch_device: torch.device) -> dict[str, Any]:
  devices = list(mesh.devices.flat)
  return dict(
      argv=list(sys.argv), date=datetime.datetime.now().isoformat(timespec="seconds"),
      cpu_model=cpu_model(), cpu_count=os.cpu_count(), xla_cpu_threads=threads,
      torch_num_threads=torch.get_num_threads(),
      torch_num_interop_threads=torch.get_num_interop_threads(), torch_device=str(torch_device),
      jax_backend=jax.default_backend(), num_devices=len(devices),
      device_kinds=sorted({d.device_kind for d in devices}),
      xla_flags=os.environ.get("XLA_FLAGS", ""), platform=platform.platform(),
      jax_default_matmul_precision=jax.config.jax_default_matmul_precision,
      torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
      torch_float32_matmul_precision=torch.get_float32_matmul_precision(),
      versions={name: importlib.metadata.version(name)
                for name in ("jax", "jaxlib", "flax", "torch", "diffusers")}
      | dict(python=platform.python_version()))


def make_config(config: ml_collections.ConfigDict, dtype: str, quick: bool
                ) -> ml_collections.ConfigDict:
  """The run's config: the compute dtype, and the tiny network of --quick."""
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  if quick:
    config.model.update(QUICK_MODEL)
    config.data.image_size = QUICK_IMAGE_SIZE
  if config.model.name != "unet" or not config.model.resamp_with_conv:
    raise app.UsageError("diffusers' UNet2DModel is the DDPM U-Net with convolutional "
                         "resampling: needs config.model.name='unet', resamp_with_conv=True")
  if schedules.from_config(config.diffusion).name not in DIFFUSERS_BETA_SCHEDULES:
    raise app.UsageError(f"PNDMScheduler takes the schedules {list(DIFFUSERS_BETA_SCHEDULES)} "
                         f"by name, not {config.diffusion.schedule!r}")
  return config


def spec_for(config: ml_collections.ConfigDict, scheduler: diffusers.PNDMScheduler | None = None,
             **sampler: Any) -> sampler_spec.SamplerSpec:
  """The sampler spec of `config` on `scheduler`'s grid if given (there its method too: f-pndm or
  plms, convention `diffusers`), with the `config.sampler` settings `sampler` changed."""
  config = config.copy_and_resolve_references()
  if scheduler is not None:
    diffusers_scheduler.apply_scheduler_config(config, dict(scheduler.config))
  config.sampler.update(sampler)
  return sampler_spec.from_config(config)


def describe(spec: sampler_spec.SamplerSpec) -> dict[str, Any]:
  d = spec.discretization
  return dict(method=spec.method_name, steps=d.num_steps, nfe=spec.nfe, convention=d.convention,
              spacing=d.spacing)


def compile_timed(fn, *args, repeats: int = 1) -> tuple[Any, dict[str, Any]]:
  """`fn` (a jax.jit) lowered and compiled ahead of time from cleared caches `repeats` times:
  the compiled program and the median seconds (each repeat's too)."""
  runs = []
  for _ in range(repeats):
    jax.clear_caches()
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    end = time.perf_counter()
    runs.append(dict(lower_s=lowered_at - start, compile_s=end - lowered_at,
                     total_s=end - start))
  return compiled, {k: statistics.median(r[k] for r in runs) for k in runs[0]} | dict(
      repeats_total_s=[r["total_s"] for r in runs])


def memory(compiled) -> dict[str, int] | None:
  """Bytes XLA planned for a compiled program (None where the backend does not say)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  out = {f"{name}_bytes": int(getattr(stats, f"{name}_size_in_bytes"))
         for name in ("temp", "argument", "output", "alias", "generated_code")}
  return out | dict(total_bytes=out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"])


def peak_bytes(devices) -> int | None:
  """The largest `peak_bytes_in_use` of `devices` (None where a backend keeps no such count)."""
  stats = [d.memory_stats() for d in devices]
  if any(s is None or "peak_bytes_in_use" not in s for s in stats):
    return None
  return max(int(s["peak_bytes_in_use"]) for s in stats)


def timing(seconds: list[float]) -> dict[str, Any]:
  return dict(s=statistics.median(seconds), repeats_s=seconds)


def sampler_side(seconds: list[float], batch: int, nfe: int, forward_s: float) -> dict[str, Any]:
  """A sampler's wall time, images/s and overhead over its network calls."""
  wall = statistics.median(seconds)
  return dict(wall_s=wall, repeats_s=seconds, images_per_s=batch / wall,
              overhead_wall_over_nfe_x_forward=wall / (nfe * forward_s))


class Bench:
  """One network with random weights on both sides, one batch, and the measurements."""

  def __init__(self, config: ml_collections.ConfigDict, batch: int, repeats: int, mesh):
    self.config, self.batch, self.repeats, self.mesh = config, batch, repeats, mesh
    data = config.data
    self.model = models.unet_from_config(config.model, data.image_size, data.num_channels)
    self.shape = (batch, data.image_size, data.image_size, data.num_channels)  # NHWC
    params = jax.jit(self.model.init)(jax.random.key(config.seed),  # compiled: op by op is
                                      jnp.zeros((1, *self.shape[1:])),  # many times slower
                                      jnp.zeros((1,)))["params"]
    self.num_params = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    self.state_dict = {k: torch.tensor(v)
                       for k, v in convert.to_state_dict(params, self.model, "diffusers").items()}
    self.replicated, self.sharded = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    self.params = jax.device_put(params, self.replicated)
    self.indices = jax.device_put(np.arange(batch, dtype=np.int32), self.sharded)
    self.eps_model = generation.network_model(self.model)
    rng = np.random.default_rng(config.seed)
    self.x = rng.standard_normal(self.shape).astype(np.float32)
    self.t = rng.integers(0, config.diffusion.num_timesteps, batch)
    self.images = rng.uniform(-1, 1, self.shape).astype(np.float32)
    self.schedule = schedules.from_config(config.diffusion)
    self.device = torch.device("cuda" if jax.default_backend() == "gpu"
                               and torch.cuda.is_available() else "cpu")
    self.bf16 = config.model.dtype == "bfloat16"
    self.torch_dtype = torch.bfloat16 if self.bf16 else torch.float32
    self.net = self.torch_unet().eval()
    if self.bf16:
      self.net.to(torch.bfloat16)
    self.samplers: dict[str, dict[str, Any]] = {}

  def torch_unet(self) -> diffusers.UNet2DModel:
    """The diffusers UNet2DModel of our network, with our weights (float32)."""
    net = diffusers.UNet2DModel(**convert.diffusers_config(self.model))
    net.load_state_dict(self.state_dict)  # strict: every key, both ways
    return net.to(self.device)

  def torch_tensor(self, nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))).to(self.device)

  def torch_sync(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def interleaved(self, runs: dict[str, Callable[[], Any]], repeats: int | None = None
                  ) -> dict[str, list[float]]:
    """Seconds of each run per repeat (default --repeats), the runs taking turns (the order
    reversed every other repeat)."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats or self.repeats):
      for name in list(runs)[::1 if r % 2 == 0 else -1]:
        start = time.perf_counter()
        runs[name]()
        seconds[name].append(time.perf_counter() - start)
    return seconds

  def forward(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """(the forward timings, the parity of the two forwards, our compile seconds) on the batch."""
    fn = jax.jit(lambda p, x, t: models.eps_fn(self.model, p)(x, t),
                 in_shardings=(self.replicated, self.sharded, self.sharded),
                 out_shardings=self.sharded, compiler_options=compiler_options.PROGRAMS)
    x = jax.device_put(self.x, self.sharded)
    t = jax.device_put(self.t.astype(np.float32), self.sharded)
    compiled, compile_seconds = compile_timed(fn, self.params, x, t, repeats=self.repeats)
    ours = lambda: compiled(self.params, x, t).block_until_ready()
    x_torch = self.torch_tensor(self.x).to(self.torch_dtype)
    t_torch = torch.from_numpy(self.t).to(self.device)

    def theirs():
      with torch.inference_mode():
        out = self.net(x_torch, t_torch).sample
      self.torch_sync()
      return out

    # the parity check is also each side's warm-up call
    diff = np.abs(np.asarray(ours()) - theirs().float().cpu().numpy().transpose(0, 2, 3, 1))
    dtype = self.config.model.dtype
    gpu_float32 = dtype == "float32" and self.device.type == "cuda"
    parity = dict(forward_max_abs_diff=float(diff.max()),
                  tolerance=PARITY_TOLERANCE["float32_gpu" if gpu_float32 else dtype])
    seconds = self.interleaved(dict(ours=ours, torch=theirs))
    result = dict(ours=timing(seconds["ours"]), torch=timing(seconds["torch"]))
    result["speed_ratio_ours_over_torch"] = result["torch"]["s"] / result["ours"]["s"]
    return result, parity, compile_seconds

  def sampler(self, spec: sampler_spec.SamplerSpec) -> dict[str, Any]:
    """Our sampler for `spec` compiled (once per program): its run, compile seconds, memory."""
    key = json.dumps(spec.image_settings(), sort_keys=True, default=str)
    if key not in self.samplers:
      generate = generation.make_generate_fn(self.eps_model, spec, self.mesh)
      compiled, seconds = compile_timed(generate, self.params, self.indices)
      self.samplers[key] = dict(
          key=key, spec=spec, compile=seconds, memory=memory(compiled),
          run=lambda: compiled(self.params, self.indices)[0].block_until_ready())
    return self.samplers[key]

  def our_sampler(self, steps: int, method: str, forward_s: float) -> dict[str, Any]:
    """`method` with `steps` on the config's grid: wall, NFE, images/s, overhead."""
    entry = self.sampler(spec_for(self.config, num_steps=steps, method=method))
    seconds = self.interleaved(dict(ours=entry["run"]))["ours"]
    return describe(entry["spec"]) | sampler_side(seconds, self.batch, entry["spec"].nfe,
                                                  forward_s)

  def pndm_scheduler(self, skip_prk_steps: bool) -> diffusers.PNDMScheduler:
    s = self.schedule
    return diffusers.PNDMScheduler(
        num_train_timesteps=s.num_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
        beta_schedule=DIFFUSERS_BETA_SCHEDULES[s.name], skip_prk_steps=skip_prk_steps)

  def diffusers_mode(self, skip_prk_steps: bool, steps: int, method: str,
                     forward: dict[str, Any]) -> dict[str, Any]:
    """diffusers' PNDM pipeline loop vs ours at equal steps and at equal NFE."""
    scheduler = self.pndm_scheduler(skip_prk_steps)
    scheduler.set_timesteps(steps, device=self.device)
    nfe = len(scheduler.timesteps)
    x_T = self.torch_tensor(self.x)

    def theirs():
      scheduler.set_timesteps(steps, device=self.device)  # also resets the multistep history
      x = x_T
      with torch.inference_mode():
        for t in scheduler.timesteps:
          eps = self.net(x.to(self.torch_dtype), t).sample.float()
          x = scheduler.step(eps, t, x).prev_sample
      self.torch_sync()

    ours = dict(equal_steps=self.sampler(spec_for(self.config, scheduler, num_steps=steps)))
    pick = report.steps_for_budget(
        lambda s: spec_for(self.config, scheduler, num_steps=s, method=method).nfe, nfe)
    if not isinstance(pick, str):
      ours["equal_nfe"] = self.sampler(spec_for(self.config, scheduler, num_steps=pick[0],
                                                method=method))
    runs = {"diffusers": theirs} | {entry["key"]: entry["run"] for entry in ours.values()}
    seconds = self.interleaved(runs)
    result = dict(skip_prk_steps=skip_prk_steps, steps=steps,
                  diffusers=dict(nfe=nfe) | sampler_side(seconds["diffusers"], self.batch, nfe,
                                                         forward["torch"]["s"]))
    for name, entry in ours.items():
      side = describe(entry["spec"]) | sampler_side(seconds[entry["key"]], self.batch,
                                                    entry["spec"].nfe, forward["ours"]["s"])
      side["images_per_s_ratio_ours_over_diffusers"] = (
          side["images_per_s"] / result["diffusers"]["images_per_s"])
      result[name] = side
    if isinstance(pick, str):
      result["equal_nfe"] = dict(method=samplers.canonical_name(method), skipped=pick)
    elif ours["equal_nfe"] is ours["equal_steps"]:
      result["equal_nfe"]["same_run_as"] = "equal_steps"
    return result

  def sampler_program(self, spec: sampler_spec.SamplerSpec) -> tuple[Any, dict[str, float]]:
    """The method's own program, x_T -> x0 (no noise draw), compiled as `generation` does."""
    method, d = spec.method, spec.discretization
    fn = jax.jit(lambda p, x: samplers.run_sampler(models.eps_fn(self.model, p), x, method, d)[0],
                 in_shardings=(self.replicated, self.sharded), out_shardings=self.sharded,
                 compiler_options=compiler_options.PROGRAMS)
    return compile_timed(fn, self.params, jax.device_put(self.x, self.sharded),
                         repeats=self.repeats)

  def compile_and_memory(self, method: str, forward: dict[str, float], steps: int
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compile seconds (against the `forward`'s) and planned bytes of the method's program at
    COMPILE_STEPS, on the config's spacing under `consistent` (`paper` cannot take S = N on the
    uniform grid), and of the whole generate program (noise draw + sampler) at `steps`."""
    compiled: dict[str, Any] = dict(forward=forward)
    planned: dict[str, Any] = {}
    for steps_ in COMPILE_STEPS:
      spec = spec_for(self.config, num_steps=steps_, method=method, convention="consistent")
      program, seconds = self.sampler_program(spec)
      compiled[f"sampler_s{steps_}"] = describe(spec) | seconds | dict(
          compile_ratio_sampler_over_forward=seconds["total_s"] / forward["total_s"])
      planned[f"sampler_s{steps_}"] = memory(program)
    entry = self.sampler(spec_for(self.config, num_steps=steps, method=method))
    compiled["generate"] = describe(entry["spec"]) | entry["compile"] | dict(
        compile_ratio_sampler_over_forward=entry["compile"]["total_s"] / forward["total_s"])
    planned["generate"] = entry["memory"]
    first, last = (planned[f"sampler_s{s}"] for s in (COMPILE_STEPS[0], COMPILE_STEPS[-1]))
    planned[f"memory_ratio_s{COMPILE_STEPS[-1]}_over_s{COMPILE_STEPS[0]}"] = (
        None if first is None else last["total_bytes"] / first["total_bytes"])
    return compiled, planned

  def train_step(self) -> dict[str, Any]:
    """Seconds per training step, ours (`pndm_jax.train`) and the same step in PyTorch."""
    config, training = self.config, self.config.training
    tx = train.make_optimizer(training)
    key = jax.random.key(config.seed)
    # each side starts from the weights both sides already hold
    batches = jax.device_put(self.images[None], train.steps_batch_sharding(self.mesh))

    def ours_with(options: dict[str, Any] | None) -> Callable[[], None]:
      fn = train.make_train_fn(self.model, tx, self.schedule, train.step_settings(config),
                               self.mesh, key, options=options)
      state = jax.jit(lambda params: train.initial_state(params, tx),
                      out_shardings=self.replicated)(self.params)

      def run():
        nonlocal state
        state, metrics = fn(state, batches)  # the state is donated
        jax.block_until_ready((state, metrics))

      return run

    net = self.torch_unet().train()
    params = list(net.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=training.lr, betas=(training.beta1, training.beta2),
                           eps=training.adam_eps)
    warmup = max(int(training.warmup_steps), 1)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: min((n + 1) / warmup, 1.0))
    alphas_cumprod = torch.tensor(self.schedule.alphas_cumprod, dtype=torch.float32,
                                  device=self.device)
    x0, n, b = self.torch_tensor(self.images), len(alphas_cumprod), self.batch

    def theirs():
      x = x0
      if config.data.random_flip:
        x = torch.where(torch.rand(b, 1, 1, 1, device=self.device) < 0.5, x.flip(3), x)
      half = torch.randint(0, n, (b // 2 + 1,), device=self.device)
      t = torch.cat([half, n - 1 - half])[:b]
      a = alphas_cumprod[t].view(-1, 1, 1, 1)
      noise = torch.randn_like(x)
      with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
        eps = net(a.sqrt() * x + (1 - a).sqrt() * noise, t).sample
      err = eps.float() - noise
      loss = (err.abs() if training.loss == "l1" else err.square()).sum((1, 2, 3)).mean()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      if training.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, training.grad_clip)
      opt.step()
      lr_schedule.step()
      with torch.no_grad():
        for e, p in zip(ema, params):
          e.lerp_(p, 1.0 - training.ema_decay)
      self.torch_sync()

    # warm-up: ours compiles in its first step; both sides take TRAIN_WARMUP_STEPS steps
    # before the timed ones (ours runs ~30% slower over its first two steps after the compile)
    runs = dict(ours=ours_with(None), torch=theirs, ours_xla_defaults=ours_with({}))
    first = self.interleaved(runs, repeats=TRAIN_WARMUP_STEPS)
    seconds = self.interleaved(runs)
    result = {name: timing(seconds[name]) | dict(first_step_s=first[name][0],
                                                 warmup_s=first[name]) for name in runs}
    result |= dict(loss=training.loss, grad_clip=training.grad_clip,
                   dropout=config.model.dropout,
                   speed_ratio_ours_over_torch=result["torch"]["s"] / result["ours"]["s"],
                   speed_ratio_programs_over_xla_defaults=(result["ours_xla_defaults"]["s"]
                                                           / result["ours"]["s"]))
    return result


def sampler_label(side: dict[str, Any]) -> str:
  return f"{side['method']} S={side['steps']} ({side['convention']}, {side['spacing']})"


def tables(result: dict[str, Any]) -> str:
  """The markdown tables of a result (of a --train_only run: the training rows)."""
  s, tr, env = result["settings"], result["train"], result["environment"]
  speed = [["training step", "s/step", tr["ours"]["s"], tr["torch"]["s"],
            tr["speed_ratio_ours_over_torch"]],
           ["training step compiled with XLA's default options (ours: that step)", "s/step",
            tr["ours_xla_defaults"]["s"], tr["torch"]["s"],
            tr["torch"]["s"] / tr["ours_xla_defaults"]["s"]]]
  header = (
      f"{env['cpu_model']}; {env['num_devices']} x {', '.join(env['device_kinds'])} "
      f"({env['jax_backend']}), XLA:CPU threads {env['xla_cpu_threads']}, torch threads "
      f"{env['torch_num_threads']} on {env['torch_device']}; load average "
      f"{env['loadavg_before'][0]:.2f} before, {env['loadavg_after'][0]:.2f} after; malloc "
      f"{'keeps freed memory' if env.get('malloc_keeps_freed_memory') else 'as glibc defaults'}. "
      f"{s['num_params'] / 1e6:.1f}M-parameter U-Net on {s['image_size']}x{s['image_size']}, "
      f"{s['dtype']}, batch {s['batch']}, median of {s['repeats']} repeat(s).")
  speed_table = lambda rows: report.markdown_table(
      ["measurement", "unit", "ours", "PyTorch / diffusers",
       "speed ratio ours / theirs (> 1: ours faster)"], rows)
  if "forward" not in result:
    return header + "\n\n" + speed_table(speed)
  fwd = result["forward"]
  speed.insert(0, [f"forward, batch {s['batch']}", "s", fwd["ours"]["s"], fwd["torch"]["s"],
                   fwd["speed_ratio_ours_over_torch"]])
  overhead = [[f"ours: {sampler_label(result['sampler'])}", result["sampler"]["nfe"],
               result["sampler"]["wall_s"], result["sampler"]["images_per_s"],
               result["sampler"]["overhead_wall_over_nfe_x_forward"]]]
  for mode, r in result["diffusers"].items():
    theirs = r["diffusers"]
    overhead.append([f"diffusers {mode.upper()}, S={r['steps']}", theirs["nfe"],
                     theirs["wall_s"], theirs["images_per_s"],
                     theirs["overhead_wall_over_nfe_x_forward"]])
    for name in ("equal_steps", "equal_nfe"):
      ours = r[name]
      label = f"diffusers {mode.upper()}, {name.replace('_', ' ')}"
      if "skipped" in ours:
        speed.append([label, "images/s", f"{ours['method']}: {ours['skipped']}",
                      theirs["images_per_s"], "-"])
        continue
      speed.append([f"{label}: {sampler_label(ours)}, NFE {ours['nfe']} vs {theirs['nfe']}"
                    + (" (the same run)" if "same_run_as" in ours else ""),
                    "images/s", ours["images_per_s"], theirs["images_per_s"],
                    ours["images_per_s_ratio_ours_over_diffusers"]])
      if "same_run_as" not in ours:
          overhead.append([f"ours: {sampler_label(ours)}", ours["nfe"], ours["wall_s"],
                         ours["images_per_s"], ours["overhead_wall_over_nfe_x_forward"]])
  c, m = result["compile"], result["memory"]
  mib = lambda b: "-" if b is None else f"{b['total_bytes'] / 2**20:.1f}"
  compile_rows = [["one forward", "-", c["forward"]["total_s"], 1.0, "-"]]
  programs = [("sampler", f"sampler_s{steps}") for steps in COMPILE_STEPS]
  compile_rows += [[f"{what}: {sampler_label(c[name])}", c[name]["nfe"], c[name]["total_s"],
                    c[name]["compile_ratio_sampler_over_forward"], mib(m[name])]
                   for what, name in [*programs, ("generate (noise + sampler)", "generate")]]
  peak = m["peak_bytes_in_use_after_sampling"]
  return (
      f"{header} Forward parity: max abs eps difference "
      f"{result['parity']['forward_max_abs_diff']:.2e} (tolerance "
      f"{result['parity']['tolerance']:g}).\n\n" + speed_table(speed)
      + "\n\nSamplers: overhead = wall / (NFE x that side's forward).\n\n"
      + report.markdown_table(["sampler", "NFE", "wall (s)", "images/s", "overhead"], overhead)
      + "\n\nCompile (lower + compile, from cleared caches) and XLA's planned memory "
      f"(temp + arguments + outputs); device peak bytes in use: {peak}.\n\n"
      + report.markdown_table(["program", "NFE", "compile (s)", "compile / forward's", "MiB"],
                              compile_rows))


def main(argv):
  del argv
  # both sides, before jax starts its threads
  kept = FLAGS.keep_freed_memory and host_memory.keep_freed_memory()
  loadavg_before = os.getloadavg()
  batch, steps, repeats = (QUICK[name] if FLAGS.quick and not FLAGS[name].present
                           else FLAGS[name].value for name in ("batch", "steps", "repeats"))
  try:
    method = samplers.get_method(FLAGS.method)
  except ValueError as e:
    raise app.UsageError(f"--method={FLAGS.method}: {e}") from None
  if isinstance(method, samplers.ProbabilityFlow):
    raise app.UsageError(f"--method {FLAGS.method}: an adaptive solver has no NFE before a run")
  if len(jax.devices()) < FLAGS.devices or batch % FLAGS.devices:
    raise app.UsageError(f"--devices={FLAGS.devices}: {len(jax.devices())} available, and the "
                         f"batch ({batch}) must be a multiple of it")
  jax.config.update("jax_enable_compilation_cache", False)  # every compile is a real one
  threads = xla_cpu_threads()
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  config = make_config(FLAGS.config, FLAGS.dtype, FLAGS.quick)
  mesh = sharding.batch_mesh(jax.devices()[:FLAGS.devices])
  bench = Bench(config, batch, repeats, mesh)
  result: dict[str, Any] = dict(settings=dict(
      batch=batch, steps=steps, method=samplers.canonical_name(FLAGS.method), dtype=FLAGS.dtype,
      devices=FLAGS.devices, repeats=repeats, quick=FLAGS.quick, train_only=FLAGS.train_only,
      num_params=bench.num_params, image_size=config.data.image_size, model=config.model.to_dict(),
      diffusion=config.diffusion.to_dict()))
  start = time.perf_counter()
  done = lambda what: print(f"{what} ({time.perf_counter() - start:.0f} s)", flush=True)
  if not FLAGS.train_only:
    result["forward"], result["parity"], forward_compile = bench.forward()
    done(f"forward; parity: max abs eps difference "
         f"{result['parity']['forward_max_abs_diff']:.2e}")
    if result["parity"]["forward_max_abs_diff"] > result["parity"]["tolerance"]:
      print("WARNING: the two networks disagree beyond the tolerance", flush=True)
    result["compile"], result["memory"] = bench.compile_and_memory(FLAGS.method,
                                                                  forward_compile, steps)
    done("compile and memory")
    result["sampler"] = bench.our_sampler(steps, FLAGS.method, result["forward"]["ours"]["s"])
    done("sampler")
    result["diffusers"] = {}
    for mode, skip_prk_steps in MODES.items():
      result["diffusers"][mode] = bench.diffusers_mode(skip_prk_steps, steps, FLAGS.method,
                                                       result["forward"])
      done(f"diffusers {mode}")
    result["memory"]["peak_bytes_in_use_after_sampling"] = peak_bytes(mesh.devices.flat)
  result["train"] = bench.train_step()
  done("training step")
  result["environment"] = environment(mesh, threads, bench.device) | dict(
      loadavg_before=loadavg_before, loadavg_after=os.getloadavg(),
      malloc_keeps_freed_memory=kept)

  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "benchmark.json"), "w") as f:
    json.dump(result, f, indent=2)
  body = tables(result)
  report.write_markdown(os.path.join(FLAGS.out, "benchmark.md"),
                        "Speed, compile time and memory vs PyTorch / diffusers", body)
  print(body)


if __name__ == "__main__":
  app.run(main)
