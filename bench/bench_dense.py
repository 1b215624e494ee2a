"""Grid feature extraction: dense (fully convolutional) vs per-patch, same model, same run.

  .venv/bin/python bench/bench_dense.py [--write]

Demo model on a 96^3 random int16 volume at stride 4 and stride 1 (per-patch timed on a contiguous
subset of at least one feature batch and extrapolated), paper model on a 64^3 volume at stride 5 and a 48^3 volume at stride 1.
Voxels/s counts the s^3 voxels each grid patch labels (stride 1: one voxel per patch). Compilation
excluded (a warm-up call first). Prints a markdown table; --write updates BENCHMARKS.md.
"""

import argparse
import os
import sys
import time
import types

import jax
import numpy as np
import tensorstore as ts

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import publish  # noqa: E402
from configs import base, demo  # noqa: E402
from jule3d import dense, features, grid, model  # noqa: E402


def measure(name: str, cfg, edge: int, stride: int, subset: int) -> str:
  w = cfg.patches.patch_size
  net = model.build_model(cfg.model)
  v = jax.tree.map(np.asarray, model.init_variables(net, jax.random.PRNGKey(0), w))
  arr = np.random.default_rng(0).integers(0, 4000, (edge,) * 3).astype(np.int16)
  vol = types.SimpleNamespace(store=ts.array(arr), shape=arr.shape, dtype=arr.dtype)
  axes = grid.axes(arr.shape, w, stride)
  cen = np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 3).astype(np.int32)
  flops = dense.flops_per_grid_patch(cfg.model, w, stride, arr.shape)
  dense.dense_grid_features(vol, cen[:1], w, net, v, 2000.0, 1000.0, stride=stride)
  t = time.perf_counter()
  out = dense.dense_grid_features(vol, cen, w, net, v, 2000.0, 1000.0, stride=stride)
  td = time.perf_counter() - t
  idx = np.arange(len(cen))[len(cen) // 2 - subset // 2 :][:subset]
  fn, bs = model.make_embed_fn(net), cfg.model.feature_batch_size
  features.grid_features(vol, cen[idx[:bs]], w, fn, v, 2000.0, 1000.0, bs, slab_depth=stride)
  t = time.perf_counter()
  ref = features.grid_features(vol, cen[idx], w, fn, v, 2000.0, 1000.0, bs, slab_depth=stride)
  tp = (time.perf_counter() - t) * len(cen) / len(idx)
  diff = float(np.abs(out[idx] - ref).max())
  return (
    f'| {name} | {edge}^3, stride {stride} | {len(cen):,} | {td:.2f} s ({len(cen) / td:,.0f}/s) | '
    f'{tp:.1f} s ({len(cen) / tp:,.0f}/s, from {len(idx):,}) | {tp / td:.1f}x | '
    f'{len(cen) * stride**3 / td:,.0f} / {len(cen) * stride**3 / tp:,.0f} | '
    f'{flops["dense"] / 1e6:.2f} / {flops["per_patch"] / 1e6:.2f} | {diff:.1e} |'
  )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--write', action='store_true', help='update BENCHMARKS.md')
  args = ap.parse_args()
  rows = [
    measure('demo CNN', demo.get_config(), 96, 4, 8000),
    measure('demo CNN', demo.get_config(), 96, 1, 4000),
    measure('paper CNN', base.get_config(), 64, 5, 256),
    measure('paper CNN', base.get_config(), 48, 1, 256),
  ]
  table = '\n'.join(
    [
      '| model | volume | grid patches | dense | per-patch (extrapolated) | speedup | '
      'voxels/s labelled, dense / per-patch | MFLOP per grid patch, dense / per-patch | '
      'max abs diff |',
      '|---|---|---|---|---|---|---|---|---|',
      *rows,
    ]
  )
  publish('Grid features: dense vs per-patch', 'bench/bench_dense.py --write', table, args.write)


if __name__ == '__main__':
  main()
