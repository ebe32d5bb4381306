"""Host memory that XLA:CPU frees is kept for its next call instead of going back to the OS.

XLA:CPU takes a program's temporaries as one block per call: about 500 MiB for a training step
of the CIFAR-10 U-Net at batch 8. glibc's malloc hands a block that large, asked for by one of
XLA's worker threads, straight to `mmap` and gives it back with `munmap` when the call ends, so
every step touches ~127,000 fresh pages, each a page fault the kernel zero-fills: 0.2-0.6 s of
system time per step on two cores, and the reason one step takes 1.7 s and the next 2.1 s.
With one malloc arena, no `mmap` and no trimming, the block stays in the heap and the next call
reuses it (docs/performance.md, "Host memory").
"""

import ctypes
import platform

from absl import logging

# mallopt(3) parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
SETTINGS = {
  "M_ARENA_MAX": (_M_ARENA_MAX, 1),  # every thread allocates from the main heap, which can grow
  "M_MMAP_MAX": (_M_MMAP_MAX, 0),  # large blocks come from that heap, not from mmap
  "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 2**31 - 1),  # freed memory stays for reuse
}


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep and reuse freed blocks; returns whether it did.

  Call it at process start, before jax creates its threads: a thread keeps the malloc arena
  it first allocated from. The process then holds on to its peak host memory until it exits.
  Elsewhere than glibc (macOS, musl) it changes nothing and returns False.
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  mallopt = ctypes.CDLL(None).mallopt
  failed = [name for name, (param, value) in SETTINGS.items() if mallopt(param, value) != 1]
  if failed:
    logging.warning("mallopt refused %s: host memory is handled as glibc's defaults do",
                    ", ".join(failed))
  return not failed
