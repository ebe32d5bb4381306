"""host_memory.keep_freed_memory: XLA:CPU's per-call temporaries stop page-faulting."""

import json
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# One program whose temporaries (128 MiB, above glibc's largest mmap threshold) are taken from
# XLA's worker thread on every call, called twelve times with a pause between calls (as a
# training loop has host work between steps; XLA frees a call's temporaries just after its
# result is ready); the minor page faults of each of the last six calls.
SCRIPT = """
import json, resource, sys, time
from pndm_jax import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
def f(x):
  a = jax.lax.optimization_barrier(jnp.sin(x))  # whole [4096, 4096] temporaries
  return jnp.sum(a * jnp.cos(x))
x = jnp.ones((4096, 4096), jnp.float32)
compiled = jax.jit(f).lower(x).compile()
faults = []
for _ in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  compiled(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  time.sleep(0.05)
print(json.dumps(dict(kept=kept, faults=faults[6:],
                      temp_bytes=compiled.memory_analysis().temp_size_in_bytes)))
"""


def run(mode: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.splitlines()[-1])


def test_temporaries_are_reused_instead_of_faulted_in():
  kept, default = run("keep"), run("default")
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    assert not kept["kept"]  # nothing to set: changes nothing
    return
  assert kept["kept"] and not default["kept"]
  pages = kept["temp_bytes"] // PAGE
  assert kept["temp_bytes"] > 32 << 20, kept  # the premise: a block glibc would mmap
  # glibc's defaults unmap the block after each call and fault all of it in on the next
  assert min(default["faults"]) > 0.9 * pages, (default, pages)
  assert max(kept["faults"]) < 0.05 * pages, (kept, pages)
