"""The batch axis over devices: padding, and dispatching one batch ahead of the host."""

import numpy as np

from pndm_jax import sharding


def test_map_padded_pads_counts_and_runs_one_batch_ahead():
  calls = []

  def fn(batch):
    calls.append(batch.copy())
    return batch * 10

  arrays = [np.arange(5), np.arange(5, 7)]
  outputs = []
  for out, valid in sharding.map_padded(fn, arrays, 4):
    outputs.append(out[:valid])
    assert len(calls) == min(len(outputs) + 1, 3)  # the next batch went out first
  assert [len(c) for c in calls] == [4, 4, 4]  # every batch one shape
  np.testing.assert_array_equal(calls[1], [4, 4, 4, 4])  # padded with the last row
  np.testing.assert_array_equal(np.concatenate(outputs), np.arange(7) * 10)
