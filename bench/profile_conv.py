"""Where the paper CNN's time goes on this CPU: each piece of the im2col convolution, forward and
backward, jitted and timed alone on the real shapes (batch 100, float32).

  .venv/bin/python bench/profile_conv.py [--write]

Pieces: the column gather, the forward matmul (columns @ kernel), and in the backward the kernel
gradient (columns^T @ dy), the column gradient (dy @ kernel^T) and its overlap-add into the
input gradient (col2im). Matmul GFLOP/s are set against a square float32 matmul in the same run:
the shapes here are skinny (50 output channels), which is what limits the CNN (see the closing
figures). Best of 3 after a compiling call.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import publish  # noqa: E402
from jule3d import convolution  # noqa: E402

BATCH = 100
# (name, input edge, input channels, kernel, output channels): the paper CNN's convolutions.
LAYERS = (('conv1', 27, 1, 5, 50), ('conv2', 11, 50, 5, 50), ('conv3', 7, 50, 5, 50))


def best(fn, *args, repeats: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return min(times)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--write', action='store_true', help='update BENCHMARKS.md')
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((4096, 1024), np.float32))
  b = jnp.asarray(rng.standard_normal((1024, 4096), np.float32))
  roof = 2 * 4096 * 1024 * 4096 / best(jax.jit(jnp.dot), a, b) / 1e9
  rows, total = [], {}
  for name, edge, cin, k, cout in LAYERS:
    o = edge - k + 1
    x = jnp.asarray(rng.standard_normal((BATCH, edge, edge, edge, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((k**3 * cin, cout), np.float32))
    cols = jax.jit(lambda x, k=k: convolution._columns(x, k))(x)
    dy = jnp.asarray(rng.standard_normal((BATCH * o**3, cout), np.float32))
    dcols = jnp.dot(dy, w.T)
    m, kk = BATCH * o**3, k**3 * cin
    flop = 2 * m * kk * cout
    pieces = [
      ('gather columns', best(jax.jit(lambda x, k=k: convolution._columns(x, k)), x), 0),
      ('fwd matmul cols @ W', best(jax.jit(jnp.dot), cols, w), flop),
      ('bwd dW = cols^T @ dy', best(jax.jit(lambda c, d: c.T @ d), cols, dy), flop),
    ]
    if cin > 1:  # the first layer's input needs no gradient
      shaped = (BATCH, o, o, o, k, k, k, cin)
      pieces += [
        ('bwd dcols = dy @ W^T', best(jax.jit(lambda d, w: d @ w.T), dy, w), flop),
        (
          'bwd col2im',
          best(jax.jit(lambda d, s=shaped: convolution._col2im(d.reshape(s))), dcols),
          0,
        ),
      ]
    for piece, t, f in pieces:
      rate = f'{f / t / 1e9:.0f} ({f / t / 1e9 / roof:.0%})' if f else '-'
      rows.append(
        f'| {name} | {piece} | {m:,} x {kk:,} x {cout} | {t * 1e3:.0f} | {rate} | '
        f'{cols.nbytes / 2**20:,.0f} |'
      )
      kind = 'matmul' if f else 'data movement'
      total[kind] = total.get(kind, 0.0) + t
  table = (
    f'Paper CNN convolutions, batch {BATCH}, float32, im2col formulation; square matmul '
    f'4096x1024 @ 1024x4096 in the same run: {roof:.0f} GFLOP/s.\n\n'
    '| layer | piece | matmul M x K x N | ms | GFLOP/s (of square matmul) | columns MiB |\n'
    '|---|---|---|---|---|---|\n' + '\n'.join(rows) + '\n\n'
    f"Sum over the pieces of one training step's convolutions: matmuls {total['matmul'] * 1e3:.0f} "
    f'ms, gathers and col2im {total["data movement"] * 1e3:.0f} ms.'
  )
  publish(
    'Convolution profile (im2col, training)', 'bench/profile_conv.py --write', table, args.write
  )


if __name__ == '__main__':
  main()
