"""Throughput of the paper CNN (jule3d.model / jule3d.objective): training and inference, per conv_impl.

Paper model (27^3 patches, widths 50, FC 1350/160), float32, batch 100, run side by side for
conv_impl 'xla' (lax.conv_general_dilated) and 'im2col' (gather + matmul), with this machine's
float32 matmul rate measured in the same run as the yardstick. Training = the full jitted
train_step (forward, in-batch triplets, loss, backward, SGD update); inference = eval-mode `embed`.
Times are the best of --repeats calls after a first call that compiles.

  .venv/bin/python bench/bench_cnn.py              # prints a markdown table, updates BENCHMARKS.md
  .venv/bin/python bench/bench_cnn.py --no-write   # prints only
  .venv/bin/python bench/bench_cnn.py --bf16       # adds im2col rows with model.dtype = bfloat16
"""

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from bench.common import (  # noqa: E402
  allocator_env,
  command_line,
  cpu_model,
  peak_rss_mb,
  put_section,
)
from configs import base  # noqa: E402
from jule3d import model as model_lib  # noqa: E402
from jule3d import objective  # noqa: E402

SECTION = '## CNN throughput'
PATCH = 27


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
  """Times fn(): the first call (compile + run), then the best of `repeats` further calls.

  Wall time is what a user waits for; process CPU time (all threads) is the work done, and stays
  comparable when other jobs share the machine's cores.

  Args:
    fn: the call to time; its result is blocked on.
    repeats: timed calls after the first.

  Returns:
    (first call wall seconds, best wall seconds, best CPU seconds).
  """
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  best = best_cpu = float('inf')
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
    best_cpu = min(best_cpu, time.process_time() - c0)
  return first, best, best_cpu


def matmul_gflops(repeats: int) -> float:
  """float32 [4096, 1024] x [1024, 4096] jnp.dot rate.

  Args:
    repeats: timed calls.

  Returns:
    GFLOP/s of the best call.
  """
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (4096, 1024), jnp.float32)
  b = jax.random.normal(key_b, (1024, 4096), jnp.float32)
  dot = jax.jit(jnp.dot)
  _, best, _ = best_time(lambda: dot(a, b), repeats)
  return 2 * 4096 * 4096 * 1024 / best / 1e9


def measure(conv_impl: str, dtype: str, batch: int, repeats: int) -> dict[str, float]:
  """Inference and training rates of the paper model for one formulation.

  Args:
    conv_impl: 'xla' or 'im2col'.
    dtype: 'float32' or 'bfloat16'.
    batch: patches per call.
    repeats: timed calls after the compiling one.

  Returns:
    {'eval_s', 'eval_cpu_s', 'eval_first_s', 'train_s', 'train_cpu_s', 'train_first_s',
    'triplets'}: seconds per batch (wall, CPU, first call) and the last batch's triplet count.
  """
  cfg = base.get_config()
  cfg.model.conv_impl = conv_impl
  cfg.model.dtype = dtype
  cfg.train.batch_size = batch
  model = model_lib.build_model(cfg.model)
  tx = objective.make_optimizer(cfg.train)
  state = objective.create_train_state(model, tx, jax.random.key(0), PATCH)
  rng = np.random.default_rng(0)
  patches = jnp.asarray(rng.standard_normal((batch, PATCH, PATCH, PATCH)), jnp.float32)
  # 10 clusters per batch: many same-cluster pairs (the heavy end of the triplet work).
  labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  batch_dict = {'patches': patches, 'labels': labels, 'valid': jnp.ones((batch,), bool)}

  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  eval_first, eval_best, eval_cpu = best_time(
    lambda: model_lib.embed(model, variables, patches), repeats
  )

  step = objective.make_train_step(model, tx, cfg.train)
  holder = {'state': state, 'metrics': None}

  def one_step():
    holder['state'], holder['metrics'] = step(holder['state'], batch_dict)
    return holder['metrics']

  train_first, train_best, train_cpu = best_time(one_step, repeats)
  loss = float(holder['metrics']['loss'])
  if not np.isfinite(loss):
    raise RuntimeError(f'{conv_impl}/{dtype}: non-finite loss {loss}')
  return {
    'eval_s': eval_best,
    'eval_cpu_s': eval_cpu,
    'eval_first_s': eval_first,
    'train_s': train_best,
    'train_cpu_s': train_cpu,
    'train_first_s': train_first,
    'triplets': int(holder['metrics']['num_triplets']),
  }


def run(args: argparse.Namespace) -> str:
  """Runs every measurement and formats the BENCHMARKS.md section.

  Args:
    args: parsed command line.

  Returns:
    The section text (markdown), starting with SECTION.
  """
  cfg = base.get_config()
  fwd = model_lib.flops_per_patch(cfg.model, PATCH)
  load_start = os.getloadavg()[0]
  roof = matmul_gflops(args.repeats)
  print(f'float32 matmul 4096x4096x1024: {roof:.0f} GFLOP/s', flush=True)
  rows = []
  variants = [(impl, 'float32') for impl in args.impls.split(',')]
  if args.bf16:
    variants.append(('im2col', 'bfloat16'))
  for impl, dtype in variants:
    r = measure(impl, dtype, args.batch, args.repeats)
    eval_rate = args.batch / r['eval_s']
    train_rate = args.batch / r['train_s']
    rows.append(
      f'| {impl} | {dtype} | {eval_rate:.1f} | {eval_rate * fwd / 1e9:.1f} | '
      f'{args.batch / r["eval_cpu_s"]:.1f} | {train_rate:.1f} | {train_rate * 3 * fwd / 1e9:.1f} | '
      f'{args.batch / r["train_cpu_s"]:.1f} | {r["train_first_s"]:.1f} |'
    )
    print(rows[-1], flush=True)
  load_end = os.getloadavg()[0]
  rss = peak_rss_mb()

  env = allocator_env(', ')
  versions = (
    f'jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, '
    f'numpy {np.__version__}, Python {platform.python_version()}'
  )
  lines = [
    SECTION,
    '',
    f'Date {datetime.date.today().isoformat()}; machine: {os.cpu_count()} CPUs ({cpu_model()}), '
    f'JAX backend {jax.default_backend()}; {versions}; allocator env: {env or "none (glibc malloc)"}.',
    f'Command: `{args.command}`.',
    '',
    f'Paper CNN (27^3 patches, conv widths {tuple(cfg.model.conv_features)}, FC '
    f'{cfg.model.hidden_dim}/{cfg.model.embed_dim}), batch {args.batch}; forward '
    f'{fwd / 1e6:.1f} MFLOP per patch, training counted as 3x forward. Training = full jitted '
    'train_step (forward, triplets, loss, backward, SGD); inference = eval-mode `embed`. Best of '
    f'{args.repeats} calls after a compiling one. "per CPU-s" = patches per second of process CPU '
    'time (all threads): the work measure that stays comparable when other jobs share the cores; '
    f'1-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end. Labels drawn '
    f'from 10 clusters ({r["triplets"]} valid triplets in the last batch).',
    '',
    '| conv_impl | dtype | inference patches/s | inference GFLOP/s | inference per CPU-s | '
    'training patches/s | training GFLOP/s | training per CPU-s | first train step s |',
    '|---|---|---|---|---|---|---|---|---|',
    *rows,
    '',
    f'float32 matmul 4096x4096x1024 (jnp.dot), same run: {roof:.0f} GFLOP/s. '
    f'Peak RSS {rss:.0f} MiB (process-wide). The machine is shared: expect +-30% between runs.',
    '',
  ]
  return '\n'.join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--batch', type=int, default=100, help='patches per step (paper: 100)')
  p.add_argument('--repeats', type=int, default=3, help='timed calls after the compiling one')
  p.add_argument('--impls', default='xla,im2col', help='comma-separated conv_impl values')
  p.add_argument('--bf16', action='store_true', help='add im2col rows with dtype bfloat16')
  p.add_argument('--no-write', action='store_true', help='do not update BENCHMARKS.md')
  p.add_argument('--write', action='store_true', help='update BENCHMARKS.md (the default)')
  args = p.parse_args()
  args.command = command_line('bench_cnn.py')
  section = run(args)
  print()
  print(section)
  if not args.no_write:
    put_section(section)


if __name__ == '__main__':
  main()
