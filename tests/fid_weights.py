"""Random Inception weights in the jax-fid pickle layout, for evaluation tests."""

import pickle

import numpy as np

from pndm_jax.evaluation import inception


def random_jax_fid_pickle(path, seed=0):
  """Random He-scaled weights in jax-fid's nested pickle layout."""
  rng = np.random.default_rng(seed)
  shapes = inception.variable_shapes()

  def fill(node):
    out = {}
    for key, sub in node.items():
      if isinstance(sub, dict):
        out[key] = fill(sub)
      elif key == "kernel":
        std = np.sqrt(2 / np.prod(sub.shape[:3]))  # He init over kh * kw * in
        out[key] = (std * rng.standard_normal(sub.shape)).astype(np.float32)
      elif key in ("scale", "var"):
        out[key] = rng.uniform(0.8, 1.2, sub.shape).astype(np.float32)
      else:
        out[key] = (0.1 * rng.standard_normal(sub.shape)).astype(np.float32)
    return out

  tree = fill(shapes["params"])
  stats = fill(shapes["batch_stats"])
  for name in inception.conv_layer_names():
    node, stat = tree, stats
    for part in name.split("."):
      node, stat = node[part], stat[part]
    node["bn"].update(stat["bn"])
  with open(path, "wb") as f:
    pickle.dump(tree, f)
