"""Smoke test: the real code paths on a tiny phantom, in seconds. Used by the test suite.

Command:
  python launch.py --config=configs/smoke.py --workdir=/tmp/jule3d_smoke

Expected runtime: well under a minute on 2 CPU cores (most of it JAX compilation). The result is
not meant to be good, only complete: a checkpoint, train_history.json ending at C clusters,
a segmentation and a report.
"""

from configs import demo


def get_config():
  """Returns the smoke-test config (the demo, shrunk)."""
  c = demo.get_config()
  c.data.phantom_shape = (40, 36, 44)
  c.patches.patch_size = 13  # 13 -> 11 -> 5 -> 3 -> 1 with 3^3 kernels.
  c.patches.num_patches = 240
  c.model.conv_features = (4, 4, 4)
  c.model.hidden_dim = 16
  c.model.embed_dim = 8
  c.cluster.num_clusters = 6
  c.cluster.k_s = 5
  c.cluster.unfolding_rate = 0.6  # several periods, so resume-after-kill is exercised.
  c.train.epochs_per_period = 1
  c.train.batch_size = 40
  c.train.num_neg = 5
  c.train.gamma = 1.0  # with gamma = 2 this tiny CNN collapses (loss pinned at the margin).
  c.segment.stride = 6
  c.segment.kmeans_restarts = 2
  c.segment.batch_size = 64
  return c
