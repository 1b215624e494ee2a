"""Whole pipeline: `make demo` wall time and peak RSS in float32 and bfloat16, and a projection
of the paper's lung-C run from measured per-stage throughputs.

  .venv/bin/python bench/bench_pipeline.py [--write]

Each demo run is `launch.py --config=configs/demo.py` in a fresh workdir, a child process timed
from start to exit (phantom generation, training, segmentation, evaluation, report); peak RSS is
the child's own (wait4). The bfloat16 run adds `--config.model.dtype=bfloat16` (CNN activations
and weights in bfloat16, float32 accumulation, float32 clustering and k-means).

The projection reads the CNN, dense-feature, GDL and sampling figures that the other bench/
scripts stored in bench/results.json (run them first: `make bench` does) and counts the paper
run's work: the JULE schedule from n_s = 10,000 down to C = 100 clusters (eta = 0.9, 20 epochs a
period, plus the final period), the initial cluster count scaled from the demo's 1-NN count, and
the stride-5 grid of the whole lung-C volume (every grid position: an upper bound, the specimen
fills part of it). GPU figures are NOT measured here (no GPU on this machine): they assume an
effective float32 rate, stated in the table, to be replaced by a measurement.

Last, the whole CLI on a lung-C-sized volume (the 477x454x971 uint16 zarr of bench_sampling.py)
with the smoke config's tiny CNN at stride 5: its wall time and peak RSS show that segmenting a
volume of that size streams it (and its label volume) instead of holding it.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from configs import lung_c  # noqa: E402
from jule3d import dense  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# H100 SXM float32 (no TF32) peak is 67 TFLOP/s; 3D convolutions in cuDNN reach a fraction of it.
GPU_ASSUMED_TFLOPS = 20.0
GPU_NAME = 'one H100 (assumed 20 TFLOP/s effective float32, not measured)'


def run_demo(workdir: str, extra: list[str]) -> dict:
  """Runs the demo in a child process; wall seconds, peak RSS and the report."""
  r = run_launch('configs/demo.py', workdir, extra)
  with open(os.path.join(workdir, 'report.json')) as f:
    r['report'] = json.load(f)
  return r


def run_launch(config: str, workdir: str, extra: list[str]) -> dict:
  """Runs launch.py in a child process; its wall seconds, peak RSS (wait4) and stage timings."""
  cmd = [sys.executable, 'launch.py', f'--config={config}', f'--workdir={workdir}', *extra]
  t = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  err = proc.stderr.read()
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t
  if status != 0:
    raise SystemExit(f'{" ".join(cmd)} failed:\n{err.decode()[-3000:]}')
  with open(os.path.join(workdir, 'timings.json')) as f:
    timings = json.load(f)
  return {'wall_s': wall, 'rss_mb': usage.ru_maxrss / 1024, 'timings': timings}


def lung_c_scale(workdir: str, demo_rss_mb: float) -> str:
  """The whole CLI on a lung-C-sized volume: does memory stay bounded by slabs, not the volume?

  The smoke config's tiny CNN keeps the run to minutes (what is measured is the streaming of the
  volume, the grid and the label volume, not the CNN), on the stride-5 grid of the paper.
  """
  from bench import bench_sampling

  bench_sampling.make_volume()
  shape = bench_sampling.SHAPE
  extra = [
    f'--config.data.path={bench_sampling.PATH}',
    '--config.data.threshold=4700',
    '--config.data.labels=',
    '--config.segment.stride=5',
  ]
  r = run_launch('configs/smoke.py', workdir, extra)
  seg = os.path.join(workdir, 'segmentation.zarr')
  with open(os.path.join(seg, '.zarray')) as f:
    assert tuple(json.load(f)['shape']) == shape
  voxels = math.prod(shape)
  t = r['timings']
  return (
    f'`launch.py --config=configs/smoke.py --config.data.path=<{shape[0]}x{shape[1]}x{shape[2]} '
    'uint16 zarr> --config.data.threshold=4700 --config.segment.stride=5` (train with the smoke '
    "CNN, then segment the whole volume at the paper's stride; no labels, so no evaluation), one "
    'child process, peak RSS of that process.\n\n'
    '| volume | input size | label volume size | wall s | train s | segment s | peak RSS MiB |\n'
    '|---|---|---|---|---|---|---|\n'
    f'| {shape[0]}x{shape[1]}x{shape[2]} uint16 | {voxels * 2 / 2**20:,.0f} MiB | '
    f'{voxels / 2**20:,.0f} MiB | {r["wall_s"]:.0f} | {t["train"]:.0f} | {t["segment"]:.0f} | '
    f'{r["rss_mb"]:,.0f} |\n\n'
    f'Peer in the same run: `make demo` on its 96^3 phantom peaked at {demo_rss_mb:,.0f} MiB. A '
    f'volume {voxels / 96**3:.0f}x larger costs {r["rss_mb"] - demo_rss_mb:+,.0f} MiB of peak: '
    'neither the volume nor the label volume is ever whole in memory (one read slab with its '
    'patches, the grid features and the JAX runtime are).'
  )


def _first_number(text: str) -> float:
  return float(re.search(r'[-+]?\d[\d,]*\.?\d*', text).group().replace(',', ''))


def measured() -> dict:
  """Per-stage CPU figures from bench/results.json."""
  try:
    with open(common.RESULTS) as f:
      r = json.load(f)
    cnn = next(
      row
      for row in r['CNN throughput']['tables'][0]
      if row['conv_impl'] == 'im2col' and row['dtype'] == 'float32'
    )
    paper_dense = next(
      row for row in r['Grid features: dense vs per-patch']['tables'][0] if 'paper' in row['model']
    )
    gdl = r['GDL agglomeration']['tables'][0][0]
    sampling = {
      row['what']: row['figure']
      for row in r['Patch sampling and streaming (lung-C size)']['tables'][0]
    }
  except (OSError, KeyError, StopIteration, IndexError, ValueError) as e:
    raise SystemExit(
      f'bench/results.json lacks a figure the projection needs ({e!r}): run bench_cnn.py, '
      'bench_dense.py, bench_graph.py and bench_sampling.py with --write first (make bench).'
    ) from None
  return {
    'train_patches_s': float(cnn['training patches/s']),
    'infer_patches_s': float(cnn['inference patches/s']),
    'dense_grid_patches_s': float(
      re.search(r'\(([\d,]+)/s\)', paper_dense['dense']).group(1).replace(',', '')
    ),
    'gdl_s': float(gdl['time (s)']),
    'sample_s': _first_number(next(v for k, v in sampling.items() if k.startswith('sample')))
    + _first_number(next(v for k, v in sampling.items() if k.startswith('read'))),
  }


def schedule(n_start: int, c: int, eta: float) -> list[int]:
  """Cluster counts at the end of each period (method §3: min(ceil(eta Nc), Nc - C) merges)."""
  counts, nc = [], n_start
  while nc > c:
    nc -= min(math.ceil(eta * nc), nc - c)
    counts.append(nc)
  return counts


def projection(demo_report: dict, m: dict) -> tuple[str, dict]:
  cfg = lung_c.get_config()
  n_s, w = cfg.patches.num_patches, cfg.patches.patch_size
  first = demo_report['train_history']['periods'][0]
  demo_n = demo_report['config']['patches']['num_patches']
  n0 = round(first['clusters_start'] / demo_n * n_s)
  periods = schedule(n0, cfg.cluster.num_clusters, cfg.cluster.unfolding_rate)
  n_periods = len(periods) + int(cfg.train.final_period)
  epochs = n_periods * cfg.train.epochs_per_period
  fwd = dense.flops_per_grid_patch(cfg.model, w, cfg.segment.stride, (64, 64, 64))['per_patch']
  shape = tuple(cfg.data.expected_shape)
  grid = math.prod((n - w) // cfg.segment.stride + 1 for n in shape)
  dense_flops = dense.flops_per_grid_patch(cfg.model, w, cfg.segment.stride, shape)['dense']
  passes = len(periods) - 1  # period 0 clusters the raw patches; the final period merges nothing
  stages = [
    # name, FLOP, CPU seconds (measured rate x count), what the count is
    ('sample + read 10,000 patches', 0.0, m['sample_s'], 'host I/O, measured at lung-C size'),
    (
      f'CNN features for clustering ({passes} pass(es) over n_s)',
      passes * n_s * fwd,
      passes * n_s / m['infer_patches_s'],
      f'{m["infer_patches_s"]:.0f} patches/s inference',
    ),
    (
      f'GDL merges ({len(periods)} clusterings)',
      0.0,
      len(periods) * m['gdl_s'],
      f'{m["gdl_s"]:.2f} s per 10k -> 100 agglomeration (upper bound per period)',
    ),
    (
      f'CNN training ({epochs} epochs x {n_s:,} patches)',
      epochs * n_s * 3 * fwd,
      epochs * n_s / m['train_patches_s'],
      f'{m["train_patches_s"]:.0f} patches/s training',
    ),
    (
      f'stride-5 grid features, dense ({grid:,} positions)',
      grid * dense_flops,
      grid / m['dense_grid_patches_s'],
      f'{m["dense_grid_patches_s"]:.0f} grid patches/s (paper CNN, dense)',
    ),
  ]
  rows, cpu_total, gpu_total = [], 0.0, 0.0
  for name, flop, cpu_s, basis in stages:
    gpu_s = flop / (GPU_ASSUMED_TFLOPS * 1e12) if flop else cpu_s  # host work stays on the host
    cpu_total += cpu_s
    gpu_total += gpu_s
    rows.append(f'| {name} | {flop / 1e12:,.1f} | {_hms(cpu_s)} | {_hms(gpu_s)} | {basis} |')
  rows.append(f'| **total** | | **{_hms(cpu_total)}** | **{_hms(gpu_total)}** | |')
  text = (
    f'Paper lung-C run projected: {shape} volume, n_s = {n_s:,} patches of {w}^3, initial clusters '
    f'~{n0:,} (demo 1-NN ratio {first["clusters_start"]}/{demo_n}), schedule '
    f'{" -> ".join(map(str, [n0, *periods]))} clusters = {len(periods)} periods + the final one, '
    f'{cfg.train.epochs_per_period} epochs each. Forward {fwd / 1e6:.1f} MFLOP per patch, training '
    f'3x; dense {dense_flops / 1e6:.1f} MFLOP per grid patch. GPU column: compute only, at the assumed '
    'rate; per-step dispatch (6,000 SGD steps) and host I/O add to it.\n\n'
    f'| stage | TFLOP | this CPU (measured rates) | {GPU_NAME} | CPU rate used |\n'
    '|---|---|---|---|---|\n' + '\n'.join(rows)
  )
  return text, {'cpu_s': cpu_total, 'gpu_s': gpu_total}


def _hms(s: float) -> str:
  if s < 10:
    return f'{s:.1f} s'
  if s < 120:
    return f'{s:.0f} s'
  if s < 7200:
    return f'{s / 60:.0f} min'
  return f'{s / 3600:.1f} h'


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--write', action='store_true', help='update BENCHMARKS.md and results.json')
  args = ap.parse_args()
  runs = {}
  with tempfile.TemporaryDirectory(prefix='jule3d_bench_') as tmp:
    for dtype in ('float32', 'bfloat16'):
      runs[dtype] = run_demo(os.path.join(tmp, dtype), [f'--config.model.dtype={dtype}'])
    scale_text = lung_c_scale(os.path.join(tmp, 'lung_c_size'), runs['float32']['rss_mb'])
  rows = []
  for dtype, r in runs.items():
    rep = r['report']
    t = rep['timing_s']
    rows.append(
      f'| {dtype} | {r["wall_s"]:.0f} | {r["rss_mb"]:,.0f} | {t["train"]:.0f} | {t["segment"]:.0f} | '
      f'{t["evaluate"]:.0f} | {rep["nmi"]["jule3d"]:.3f} | {rep["nmi"]["kmeans_intensity"]:.3f} | '
      f'{rep["nmi"]["multi_otsu"]:.3f} |'
    )
  f32, b16 = (runs[d]['report']['nmi']['jule3d'] for d in ('float32', 'bfloat16'))
  demo_text = (
    '`make demo` = `launch.py --config=configs/demo.py` in a fresh workdir (phantom, training, '
    'segmentation, evaluation, report), one child process each; peak RSS of that process.\n\n'
    '| model.dtype | wall s | peak RSS MiB | train s | segment s | evaluate s | NMI jule3d | '
    'NMI k-means | NMI multi-Otsu |\n|---|---|---|---|---|---|---|---|---|\n'
    + '\n'.join(rows)
    + f'\n\nbfloat16 vs float32: wall {runs["bfloat16"]["wall_s"] / runs["float32"]["wall_s"]:.2f}x, '
    f'NMI change {b16 - f32:+.3f}. Target `make demo` <= 5 min: '
    f'{"**met**" if runs["float32"]["wall_s"] <= 300 else "**NOT met**"}.'
  )
  proj_text, _ = projection(runs['float32']['report'], measured())
  body = demo_text + '\n\n' + proj_text
  common.publish(
    'Whole pipeline and lung-C projection', 'bench/bench_pipeline.py --write', body, args.write
  )
  common.publish(
    'Segmentation memory at lung-C size', 'bench/bench_pipeline.py --write', scale_text, args.write
  )


if __name__ == '__main__':
  main()
