"""GDL agglomeration (jule3d.merge) vs sklearn average-linkage on the same kNN graph.

10,000 L2-normalised 160-d features from a 100-component gaussian mixture with varied spreads,
agglomerated from the 1-NN components down to 100 clusters. Times exclude compilation (measured
separately on a first call) and the shared kNN graph; NMI is against the mixture component.

  .venv/bin/python bench/bench_graph.py            # prints a markdown table
  .venv/bin/python bench/bench_graph.py --write    # and updates BENCHMARKS.md's section
"""

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import scipy  # noqa: E402
import scipy.sparse  # noqa: E402
import sklearn  # noqa: E402
from sklearn.cluster import AgglomerativeClustering  # noqa: E402
from sklearn.metrics import normalized_mutual_info_score  # noqa: E402

from bench.common import cpu_model, peak_rss_mb, put_section  # noqa: E402
from jule3d import graph, merge  # noqa: E402

SECTION = '## GDL agglomeration'


def mixture(n: int, d: int, components: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Samples an L2-normalised gaussian mixture with varied spreads and weights.

  Args:
    n: samples.
    d: dimension.
    components: mixture components.
    seed: RNG seed.

  Returns:
    (features float32 (n, d), true component int (n,)).
  """
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(components, d))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  # Spreads from separable to overlapping (per-axis std vs unit-norm centres ~sqrt(2) apart in
  # 160-d): with 0.1-0.3 neither method recovers the mixture fully, so the NMIs say something.
  spread = rng.uniform(0.1, 0.3, components)
  weights = rng.dirichlet(np.full(components, 5.0))
  truth = rng.choice(components, size=n, p=weights)
  x = centres[truth] + spread[truth, None] * rng.normal(size=(n, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), truth


def run(args: argparse.Namespace) -> str:
  """Runs both methods and returns the markdown section.

  Args:
    args: parsed command line.

  Returns:
    The BENCHMARKS.md section text.
  """
  x, truth = mixture(args.n, args.dim, args.components, args.seed)
  kw = dict(k_c=args.k_c, lam=args.lam)

  t0 = time.perf_counter()
  idx, d2 = graph.knn_graph(x, args.k_s)
  w, _ = graph.knn_weights(d2, args.a)
  lab0 = graph.initial_clusters(idx)
  t_knn_first = time.perf_counter() - t0
  nc0 = int(lab0.max()) + 1
  num = nc0 - args.clusters

  t0 = time.perf_counter()
  merge.merge_period(x, idx, w, lab0, num, **kw)  # compiles + runs
  t_first = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    ours = merge.merge_period(x, idx, w, lab0, num, **kw)
    times.append(time.perf_counter() - t0)
  t_ours = min(times)
  t0 = time.perf_counter()
  idx, d2 = graph.knn_graph(x, args.k_s)
  w, _ = graph.knn_weights(d2, args.a)
  graph.initial_clusters(idx)
  t_knn = time.perf_counter() - t0
  rss_ours = peak_rss_mb()

  n = args.n
  conn = scipy.sparse.csr_matrix(
    (np.ones(n * args.k_s), np.asarray(idx).reshape(-1), np.arange(0, n * args.k_s + 1, args.k_s)),
    shape=(n, n),
  )
  sk_times = []
  for _ in range(args.sk_repeats):
    model = AgglomerativeClustering(n_clusters=args.clusters, linkage='average', connectivity=conn)
    t0 = time.perf_counter()
    theirs = model.fit(x).labels_
    sk_times.append(time.perf_counter() - t0)
  t_sk = min(sk_times)
  rss_all = peak_rss_mb()

  nmi_ours = normalized_mutual_info_score(truth, ours, average_method='geometric')
  nmi_sk = normalized_mutual_info_score(truth, theirs, average_method='geometric')
  nmi_init = normalized_mutual_info_score(truth, lab0, average_method='geometric')
  cmd = 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python bench/bench_graph.py --write'
  versions = (
    f'jax {jax.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, '
    f'scikit-learn {sklearn.__version__}, Python {platform.python_version()}'
  )
  table = [
    '| method | time (s) | compile (s) | NMI vs mixture component | clusters |',
    '|---|---|---|---|---|',
    f'| jule3d GDL merge loop ({num} merges, P = {merge.slot_bucket(nc0, args.k_c)}) | '
    f'{t_ours:.2f} | {t_first - t_ours:.2f} | {nmi_ours:.4f} | {ours.max() + 1} |',
    f'| sklearn AgglomerativeClustering(average, same kNN connectivity) fit | {t_sk:.2f} | - | '
    f'{nmi_sk:.4f} | {theirs.max() + 1} |',
    f'| (shared) kNN graph + weights + 1-NN components | {t_knn:.2f} | '
    f'{t_knn_first - t_knn:.2f} | {nmi_init:.4f} | {nc0} |',
  ]
  lines = [
    SECTION,
    '',
    f'Date {datetime.date.today().isoformat()}; machine: {os.cpu_count()} CPUs ({cpu_model()}), '
    f'JAX backend {jax.default_backend()}; {versions}.',
    f'Command: `{cmd}`.',
    '',
    f'{args.n} L2-normalised {args.dim}-d features from a {args.components}-component gaussian '
    f'mixture (varied spreads and weights, seed {args.seed}); kNN K_s = {args.k_s}, K_c = '
    f'{args.k_c}, lambda = {args.lam}, a = {args.a}; from the {nc0} 1-NN components down to '
    f'{args.clusters} clusters. Times: best of {args.repeats} (ours) / {args.sk_repeats} '
    '(sklearn), after a first call that compiles; compile = first call minus best.',
    '',
    *table,
    '',
    f'Ratio sklearn / ours: {t_sk / t_ours:.2f}x (> 1: ours faster). Peak RSS: {rss_ours:.0f} MiB '
    f'after ours, {rss_all:.0f} MiB after sklearn too (process-wide maximum).',
    '',
  ]
  return '\n'.join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--n', type=int, default=10_000)
  p.add_argument('--dim', type=int, default=160)
  p.add_argument('--components', type=int, default=100)
  p.add_argument('--clusters', type=int, default=100)
  p.add_argument('--k_s', type=int, default=20)
  p.add_argument('--k_c', type=int, default=5)
  p.add_argument('--lam', type=float, default=1.0)
  p.add_argument('--a', type=float, default=1.0)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--sk_repeats', type=int, default=2)
  p.add_argument('--write', action='store_true', help='update the section in BENCHMARKS.md')
  args = p.parse_args()
  section = run(args)
  print(section)
  if args.write:
    put_section(section)


if __name__ == '__main__':
  main()
