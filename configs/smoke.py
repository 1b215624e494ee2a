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
  c.patches.patch_size = 15  # 15 -> 13 -> 6 -> 4 -> 2 with 3^3 kernels.
  c.patches.num_patches = 240
  # Narrower than this (4 channels, a 1^3 last map) the embedding is degenerate from the start and
  # collapses to a point after one period: the run then stops at the sigma^2 guard.
  c.model.conv_features = (8, 8, 8)
  c.model.hidden_dim = 64
  c.model.embed_dim = 16
  c.cluster.num_clusters = 6
  c.cluster.k_s = 5
  c.cluster.unfolding_rate = 0.6  # several periods, so resume-after-kill is exercised.
  c.train.epochs_per_period = 1
  c.train.batch_size = 40
  c.train.num_neg = 5
  # One training whatever its features' groups (on 240 patches the check is a coin toss): the tests
  # of train.tries drive the tries themselves (tests/test_train.py).
  c.train.tries = 1
  c.segment.stride = 6
  c.segment.kmeans_restarts = 2
  c.evaluate.kmeans_restarts = 2
  c.model.feature_batch_size = 64
  c.evaluate.atropos = False  # seconds per evaluation; tests/test_evaluate.py runs it on its own
  return c
