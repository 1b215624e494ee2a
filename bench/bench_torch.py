"""The paper CNN in jule3d (oneDNN and im2col, float32) against the same network in PyTorch (CPU).

Both sides run batch 100 of 27^3 patches on all cores (XLA's CPU runtime uses every core by default;
torch.set_num_threads(os.cpu_count())). Inference = eval-mode forward (jule3d `make_embed_fn`, torch
`inference_mode`); training = one full step: forward, in-batch triplets (method §4: each same-cluster
pair, min(num_neg, clusters - 1) random negatives each, the same sampling and count on both sides),
the gamma/margin triplet loss, backward, SGD momentum 0.9 with weight decay 5e-5. The float32 matmul
rate is measured in the same run, with both libraries (the practical roofline is the faster one).

PyTorch lives in its own virtualenv (.venv-torch, `make bench-torch` creates it), never in the
project's: this script runs with the project's .venv and drives a worker process (this same file
with --worker under .venv-torch/bin/python) over stdin/stdout. Calls alternate between the two
processes, one at a time (never concurrently), round by round, after a warm-up call each; figures
are the best of --repeats rounds.

  .venv/bin/python bench/bench_torch.py            # prints the table only
  .venv/bin/python bench/bench_torch.py --write    # also updates `## CNN vs PyTorch` in BENCHMARKS.md
  .venv/bin/python bench/bench_torch.py --layers   # adds per-stage forward and training tables
  .venv/bin/python bench/bench_torch.py --impls im2col   # only one jule3d convolution

Targets: the first --impls entry (the one conv_impl 'auto' picks here) at >= 1.0x PyTorch
in training and >= 1.2x in inference (stretch: 1.5x and 2x).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = '## CNN vs PyTorch'
TORCH_PY = os.path.join(ROOT, '.venv-torch', 'bin', 'python')
# Idle pause between timed calls: lets the other process's worker threads (OpenMP / Eigen spin-wait
# after a parallel region) go to sleep before the next call starts.
SETTLE_S = 0.5
MATMUL = (4096, 1024, 4096)


# ---------------------------------------------------------------------------------------------
# PyTorch side (runs under .venv-torch; imports torch only, never jax or the project).

# The network's stages, as indices into the torch nn.Sequential (the jule3d side mirrors them).
STAGES = {
  'conv1': [0],
  'bn1+relu+pool': [1, 2, 3],
  'conv2': [4],
  'bn2+relu': [5, 6],
  'conv3': [7],
  'bn3+relu': [8, 9],
  'fc1+fc2': [10, 11, 12, 13],
}


def _torch_worker() -> None:
  """Serves JSON commands on stdin, one JSON reply per line on stdout (see `TorchWorker`)."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  out = sys.stdout
  sys.stdout = sys.stderr  # Stray prints must not corrupt the reply channel.
  torch.set_num_threads(os.cpu_count() or 1)
  env: dict[str, Any] = {}

  def setup(cmd):
    batch, patch, seed = cmd['batch'], cmd['patch'], cmd['seed']
    torch.manual_seed(seed)
    width, k, hidden, emb = cmd['width'], cmd['kernel'], cmd['hidden'], cmd['embed']
    edge = ((patch - k + 1) // 2 - k + 1) - k + 1
    bn = lambda: nn.BatchNorm3d(width, eps=1e-5, momentum=0.1)
    net = nn.Sequential(
      nn.Conv3d(1, width, k),
      bn(),
      nn.ReLU(),
      nn.MaxPool3d(2),
      nn.Conv3d(width, width, k),
      bn(),
      nn.ReLU(),
      nn.Conv3d(width, width, k),
      bn(),
      nn.ReLU(),
      nn.Flatten(),
      nn.Linear(width * edge**3, hidden),
      nn.ReLU(),
      nn.Linear(hidden, emb),
    )
    # method §2 initialisation, as jule3d: weights N(0, 0.01^2), biases 0, BN scale U(0, 1).
    for m in net.modules():
      if isinstance(m, (nn.Conv3d, nn.Linear)):
        nn.init.normal_(m.weight, std=cmd['init_std'])
        nn.init.zeros_(m.bias)
      elif isinstance(m, nn.BatchNorm3d):
        nn.init.uniform_(m.weight)
        nn.init.zeros_(m.bias)
    rng = np.random.default_rng(seed)
    # Same draws (and order) as the jule3d side: identical patches and labels.
    env['x'] = torch.from_numpy(
      rng.standard_normal((batch, patch, patch, patch)).astype(np.float32)
    ).unsqueeze(1)
    env['labels'] = torch.from_numpy(rng.integers(0, 10, batch))
    env['net'] = net
    env['opt'] = torch.optim.SGD(
      net.parameters(), lr=cmd['lr'], momentum=cmd['momentum'], weight_decay=cmd['weight_decay']
    )
    env['cfg'] = cmd
    m_idx, n_idx = torch.triu_indices(batch, batch, 1)
    env['pairs'] = (m_idx, n_idx)
    return {
      'torch': torch.__version__,
      'threads': torch.get_num_threads(),
      'mkldnn': bool(torch.backends.mkldnn.is_available()),
      'params': sum(p.numel() for p in net.parameters()),
    }

  def normalise(y):
    return y / (y.norm(dim=-1, keepdim=True) + 1e-10)

  def triplets(labels, num_neg):
    # jule3d.objective.triplets, in torch: same pairs, same negative rule, same padded count.
    b = labels.shape[0]
    k = max(1, min(num_neg, b - 2))
    m_idx, n_idx = env['pairs']
    same = labels[:, None] == labels[None, :]
    num_eff = min(num_neg, int(torch.unique(labels).numel()) - 1)
    pair_ok = same[m_idx, n_idx]
    keys = torch.where(~same[m_idx], torch.rand(m_idx.numel(), b), torch.tensor(-1.0))
    top, neg = torch.topk(keys, k, dim=1)
    ok = (top >= 0) & (torch.arange(k)[None, :] < num_eff) & pair_ok[:, None]
    return m_idx.repeat_interleave(k), n_idx.repeat_interleave(k), neg.reshape(-1), ok.reshape(-1)

  def train_step():
    cfg, net, opt = env['cfg'], env['net'], env['opt']
    net.train()
    anchor, positive, negative, ok = triplets(env['labels'], cfg['num_neg'])
    emb = normalise(net(env['x']))
    sq = (emb * emb).sum(-1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T).clamp_min(0.0)
    hinge = F.relu(cfg['gamma'] * dist[anchor, positive] - dist[anchor, negative] + cfg['margin'])
    loss = torch.where(ok, hinge, 0.0).sum() / ok.sum().clamp_min(1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {'loss': float(loss.detach()), 'triplets': int(ok.sum())}

  def infer():
    net = env['net']
    net.eval()
    with torch.inference_mode():
      normalise(net(env['x']))
    return {}

  def layers():
    # Forward time of each stage on its real input shape (inference mode), seconds per batch.
    net, x = env['net'], env['x']
    net.eval()
    res = {}
    with torch.inference_mode():
      for name, idx in STAGES.items():
        fn = lambda t, idx=idx: nn.Sequential(*[net[i] for i in idx])(t)
        fn(x)
        best = float('inf')
        for _ in range(3):
          t0 = time.perf_counter()
          y = fn(x)
          best = min(best, time.perf_counter() - t0)
        res[name] = best
        x = y
    return res

  def layers_train():
    # Forward + backward of each stage in training mode (batch-statistics BN), seconds per batch:
    # gradients for the stage's parameters and (after the first stage) for its input.
    net, x = env['net'], env['x']
    net.train()
    res = {}
    for name, idx in STAGES.items():
      seq = nn.Sequential(*[net[i] for i in idx])
      inp = x.detach().requires_grad_(idx[0] > 0)
      g = torch.randn_like(seq(inp))

      def step(seq=seq, inp=inp, g=g):
        net.zero_grad(set_to_none=True)
        inp.grad = None
        y = seq(inp)
        y.backward(g)
        return y

      step()
      best = float('inf')
      for _ in range(3):
        t0 = time.perf_counter()
        y = step()
        best = min(best, time.perf_counter() - t0)
      res[name] = best
      x = y.detach()
    return res

  def matmul(cmd):
    m, k, n = MATMUL
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float('inf')
    for _ in range(cmd['repeats']):
      t0 = time.perf_counter()
      a @ b
      best = min(best, time.perf_counter() - t0)
    return {'gflops': 2 * m * k * n / best / 1e9}

  def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    info = fn()
    info.update(wall=time.perf_counter() - t0, cpu=time.process_time() - c0)
    return info

  for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd['op']
    if op == 'quit':
      break
    if op == 'setup':
      reply = setup(cmd)
    elif op == 'eval':
      reply = timed(infer)
    elif op == 'train':
      reply = timed(train_step)
    elif op == 'matmul':
      reply = matmul(cmd)
    elif op == 'layers':
      reply = layers()
    elif op == 'layers_train':
      reply = layers_train()
    else:
      raise ValueError(f'unknown op {op!r}')
    out.write(json.dumps(reply) + '\n')
    out.flush()


class TorchWorker:
  """The PyTorch process: one JSON command per call, answered synchronously."""

  def __init__(self, python: str):
    self.proc = subprocess.Popen(
      [python, os.path.abspath(__file__), '--worker'],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )

  def __call__(self, op: str, **kwargs: Any) -> dict[str, Any]:
    """Sends one command and waits for its reply.

    Args:
      op: 'setup', 'eval', 'train', 'matmul' or 'layers'.
      **kwargs: the command's fields.

    Returns:
      The decoded reply.
    """
    self.proc.stdin.write(json.dumps({'op': op, **kwargs}) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'torch worker exited (code {self.proc.wait()}) during {op!r}')
    return json.loads(line)

  def close(self) -> None:
    """Asks the worker to exit and waits for it."""
    if self.proc.poll() is None:
      self.proc.stdin.write(json.dumps({'op': 'quit'}) + '\n')
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------
# jule3d side (project .venv).


def _jax_side(batch: int, seed: int, impl: str) -> dict[str, Any]:
  """Builds the jule3d eval and train callables on the same data as the torch worker.

  Args:
    batch: patches per call.
    seed: numpy seed of the patches and labels.
    impl: model.conv_impl.

  Returns:
    {'eval': fn, 'train': fn, 'cfg': config, 'patch': w} where each fn runs one call and returns
    {'wall', 'cpu', ...}.
  """
  # Imported here, not at module level: the torch worker runs this file without jax installed.
  import jax
  import jax.numpy as jnp

  from bench.bench_cnn import PATCH
  from configs import base
  from jule3d import model as model_lib
  from jule3d import objective

  cfg = base.get_config()
  cfg.model.conv_impl = impl
  cfg.model.dtype = 'float32'
  cfg.train.batch_size = batch
  model = model_lib.build_model(cfg.model)
  tx = objective.make_optimizer(cfg.train)
  state = objective.create_train_state(model, tx, jax.random.key(seed), PATCH)
  rng = np.random.default_rng(seed)
  patches = jnp.asarray(rng.standard_normal((batch, PATCH, PATCH, PATCH)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  batch_dict = {'patches': patches, 'labels': labels, 'valid': jnp.ones((batch,), bool)}
  embed_fn = model_lib.make_embed_fn(model)
  # A copy: the train step donates (deletes) the state's buffers.
  variables = jax.tree.map(jnp.copy, {'params': state.params, 'batch_stats': state.batch_stats})
  step = objective.make_train_step(model, tx, cfg.train)
  holder = {'state': state}

  def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    info = fn()
    info.update(wall=time.perf_counter() - t0, cpu=time.process_time() - c0)
    return info

  def infer():
    jax.block_until_ready(embed_fn(variables, patches))
    return {}

  def train():
    holder['state'], metrics = step(holder['state'], batch_dict)
    loss = float(metrics['loss'])
    if not np.isfinite(loss):
      raise RuntimeError(f'jule3d: non-finite loss {loss}')
    return {'loss': loss, 'triplets': int(metrics['num_triplets'])}

  return {
    'eval': lambda: timed(infer),
    'train': lambda: timed(train),
    'cfg': cfg,
    'patch': PATCH,
    'variables': variables,
  }


def _jax_layers(
  cfg: Any, variables: dict[str, Any], patch: int, batch: int, train: bool = False
) -> dict[str, float]:
  """Time of each stage of the network (cfg.model.conv_impl) on its real input, seconds per batch.

  Args:
    cfg: config (paper model).
    variables: {'params', 'batch_stats'}.
    patch: patch edge.
    batch: patches per call.
    train: False: forward in eval mode (running-statistics BN). True: forward + backward in
      training mode (batch-statistics BN), gradients for the stage's parameters and, after the
      first stage, for its input, as in training.

  Returns:
    {stage name: best seconds per batch}, stages as in the torch worker's STAGES.
  """
  import jax
  import jax.numpy as jnp

  from jule3d import convolution
  from jule3d import model as model_lib

  p, s = variables['params'], variables['batch_stats']
  eps = float(cfg.model.bn_epsilon)

  conv3d = convolution.conv3d_fn(convolution.resolve_conv_impl(cfg.model.conv_impl))

  def conv(name):
    return lambda q, x: conv3d(x, q['kernel']) + q['bias']

  def bn_relu(name, pool=False):
    def fn(q, x):
      if train:
        mean, var = jnp.mean(x, axis=(0, 1, 2, 3)), jnp.var(x, axis=(0, 1, 2, 3))
      else:
        mean, var = s[name]['mean'], s[name]['var']
      y = jax.nn.relu((x - mean) / jnp.sqrt(var + eps) * q['scale'] + q['bias'])
      return model_lib.max_pool3d(y, int(cfg.model.pool_size)) if pool else y

    return fn

  def fc(q, x):
    x = x.reshape(x.shape[0], -1)
    h = jax.nn.relu(x @ q['fc1']['kernel'] + q['fc1']['bias'])
    return model_lib.l2_normalize(h @ q['fc2']['kernel'] + q['fc2']['bias'])

  stages = {
    'conv1': (conv('conv1'), p['conv1']),
    'bn1+relu+pool': (bn_relu('bn1', pool=True), p['bn1']),
    'conv2': (conv('conv2'), p['conv2']),
    'bn2+relu': (bn_relu('bn2'), p['bn2']),
    'conv3': (conv('conv3'), p['conv3']),
    'bn3+relu': (bn_relu('bn3'), p['bn3']),
    'fc1+fc2': (fc, {'fc1': p['fc1'], 'fc2': p['fc2']}),
  }
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, patch, patch, patch, 1)))
  x = x.astype(jnp.float32)
  res = {}
  for i, (name, (fn, q)) in enumerate(stages.items()):
    y = jax.jit(fn)(q, x)
    if not train:
      f = jax.jit(fn)
    elif i == 0:  # the network's input needs no gradient
      f = jax.jit(lambda q, x, g, fn=fn: jax.vjp(lambda q: fn(q, x), q)[1](g))
    else:
      f = jax.jit(lambda q, x, g, fn=fn: jax.vjp(fn, q, x)[1](g))
    args = (q, x) if not train else (q, x, jnp.ones_like(y))
    jax.block_until_ready(f(*args))
    best = float('inf')
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      best = min(best, time.perf_counter() - t0)
    res[name] = best
    x = y
  return res


def _stage_rows(jls: dict[str, dict[str, float]], tl: dict[str, float]) -> list[str]:
  """Rows: stage, ms of each jule3d impl, PyTorch ms, PyTorch / the first impl."""
  first = next(iter(jls.values()))
  rows = []
  for name in [*first, 'sum']:
    ms = [sum(j.values()) if name == 'sum' else j[name] for j in jls.values()]
    t = sum(tl.values()) if name == 'sum' else tl[name]
    cells = ' | '.join(f'{m * 1e3:.0f}' for m in ms)
    rows.append(f'| {name} | {cells} | {t * 1e3:.0f} | {t / ms[0]:.2f} |')
  return rows


def _best(runs: list[dict[str, Any]]) -> tuple[float, float]:
  return min(r['wall'] for r in runs), min(r['cpu'] for r in runs)


def run(args: argparse.Namespace) -> str:
  """Runs both sides, alternating, and formats the BENCHMARKS.md section.

  Args:
    args: parsed command line.

  Returns:
    The section text (markdown), starting with SECTION.
  """
  if not os.path.exists(args.torch_python):
    raise SystemExit(
      f'{args.torch_python} not found: run `make bench-torch` (creates .venv-torch with '
      'torch==2.13.0) or pass --torch-python'
    )
  import flax
  import jax

  from bench.bench_cnn import matmul_gflops
  from bench.common import allocator_env, cpu_model, peak_rss_mb
  from jule3d import convolution
  from jule3d import model as model_lib

  load_start = os.getloadavg()[0]
  impls = list(dict.fromkeys(convolution.resolve_conv_impl(i) for i in args.impls.split(',')))
  worker = TorchWorker(args.torch_python)
  try:
    jxs = {impl: _jax_side(args.batch, args.seed, impl) for impl in impls}
    jx = jxs[impls[0]]
    cfg = jx['cfg']
    info = worker(
      'setup',
      batch=args.batch,
      patch=jx['patch'],
      seed=args.seed,
      width=int(cfg.model.conv_features[0]),
      kernel=int(cfg.model.kernel_size),
      hidden=int(cfg.model.hidden_dim),
      embed=int(cfg.model.embed_dim),
      init_std=float(cfg.model.init_std),
      lr=float(cfg.train.learning_rate),
      momentum=float(cfg.train.momentum),
      weight_decay=float(cfg.train.weight_decay),
      num_neg=int(cfg.train.num_neg),
      gamma=float(cfg.train.gamma),
      margin=float(cfg.train.margin),
    )
    print(f'torch worker: {info}', flush=True)
    fwd = model_lib.flops_per_patch(cfg.model, jx['patch'])

    first = {}
    for kind in ('eval', 'train'):
      for impl, j in jxs.items():
        first[f'{impl}_{kind}'] = j[kind]()
      first[f'torch_{kind}'] = worker(kind)
    print('warm-up (s): ' + ', '.join(f'{k} {v["wall"]:.1f}' for k, v in first.items()), flush=True)

    roof_jax = matmul_gflops(args.repeats)
    time.sleep(SETTLE_S)
    roof_torch = worker('matmul', repeats=args.repeats)['gflops']
    roof = max(roof_jax, roof_torch)
    print(f'matmul GFLOP/s: jax {roof_jax:.0f}, torch {roof_torch:.0f}', flush=True)

    sides = [*impls, 'torch']
    runs: dict[str, list] = {f'{side}_{k}': [] for k in ('eval', 'train') for side in sides}
    calls = {f'{impl}_{k}': j[k] for impl, j in jxs.items() for k in ('eval', 'train')}
    calls.update(torch_eval=lambda: worker('eval'), torch_train=lambda: worker('train'))
    for r in range(args.repeats):
      # Alternate which side goes first, so slow drifts of the shared machine hit both alike.
      order = sides if r % 2 == 0 else sides[::-1]
      for kind in ('eval', 'train'):
        for side in order:
          time.sleep(SETTLE_S)
          runs[f'{side}_{kind}'].append(calls[f'{side}_{kind}']())
      print(
        f'round {r + 1}: '
        + ', '.join(f'{k} {v[-1]["wall"]:.2f}s/{v[-1]["cpu"]:.2f}cpu' for k, v in runs.items()),
        flush=True,
      )

    layer_rows = {}
    if args.layers:
      for kind, train in (('layers', False), ('layers_train', True)):
        jls = {
          impl: _jax_layers(j['cfg'], j['variables'], j['patch'], args.batch, train=train)
          for impl, j in jxs.items()
        }
        time.sleep(SETTLE_S)
        layer_rows[kind] = _stage_rows(jls, worker(kind))
  finally:
    worker.close()
  load_end = os.getloadavg()[0]

  b = args.batch
  rows, verdicts = [], []
  res = {}
  for kind, mult in (('eval', 1), ('train', 3)):
    tw, tc = _best(runs[f'torch_{kind}'])
    for impl in impls:
      jw, jc = _best(runs[f'{impl}_{kind}'])
      res.setdefault(kind, (b / jw, b / tw))  # the first impl's: the targets' figure
      label = 'inference' if kind == 'eval' else 'training'
      rows.append(
        f'| {label} | {impl} | {b / jw:.1f} | {b / tw:.1f} | **{tw / jw:.2f}** | {b / jc:.1f} | '
        f'{b / tc:.1f} | {tc / jc:.2f} | {b / jw * mult * fwd / 1e9:.1f} '
        f'({b / jw * mult * fwd / 1e9 / roof:.0%}) | {b / tw * mult * fwd / 1e9:.1f} '
        f'({b / tw * mult * fwd / 1e9 / roof:.0%}) |'
      )
  for kind, label, target, stretch in (
    ('eval', 'inference', 1.2, 2.0),
    ('train', 'training', 1.0, 1.5),
  ):
    ours, theirs = res[kind]
    ratio = ours / theirs
    met = 'met' if ratio >= target else 'NOT met'
    extra = 'met' if ratio >= stretch else 'not met'
    verdicts.append(
      f'- {label}, {impls[0]} (wall patches/s, best of {args.repeats}): {ours:.1f} vs PyTorch '
      f'{theirs:.1f} = {ratio:.2f}x; target >= {target}x: **{met}**; stretch >= {stretch}x: '
      f'{extra}.'
    )
  eval_share = res['eval'][0] * fwd / 1e9 / roof
  verdicts.append(
    f'- inference at >= 50% of the float32 matmul roofline ({roof:.0f} GFLOP/s): '
    f'{eval_share:.0%}: **{"met" if eval_share >= 0.5 else "NOT met"}**.'
  )
  triplets_j = runs[f'{impls[0]}_train'][-1]['triplets']
  triplets_t = runs['torch_train'][-1]['triplets']

  env = allocator_env(', ')
  versions = (
    f'jax {jax.__version__}, flax {flax.__version__}, numpy {np.__version__}, torch '
    f'{info["torch"]} ({info["threads"]} threads, oneDNN {info["mkldnn"]}), Python '
    f'{platform.python_version()}'
  )
  lines = [
    SECTION,
    '',
    f'Date {datetime.date.today().isoformat()}; machine: {os.cpu_count()} CPUs ({cpu_model()}), '
    f'JAX backend {jax.default_backend()}; {versions}; allocator env: {env or "none"}.',
    f'Command: `{args.command}`.',
    '',
    f'Paper CNN (27^3 patches, conv widths {tuple(cfg.model.conv_features)}, kernel '
    f'{cfg.model.kernel_size}, FC {cfg.model.hidden_dim}/{cfg.model.embed_dim}; '
    f'{info["params"]:,} parameters in the torch copy), float32, batch {b}, all '
    f'{os.cpu_count()} cores on both sides. jule3d: conv_impl {", ".join(impls)}, `make_embed_fn` / '
    '`make_train_step`. PyTorch: eager nn.Sequential (Conv3d, BatchNorm3d, ReLU, MaxPool3d, '
    'Linear), NCDHW, `inference_mode` for inference; training = triplets sampled as '
    'jule3d.objective.triplets (same count), the same loss, backward, torch.optim.SGD(momentum '
    f'0.9, weight_decay 5e-5). Last batch: {triplets_j} valid triplets (jule3d), {triplets_t} '
    f'(PyTorch), labels from 10 clusters. Best of {args.repeats} rounds after a warm-up call '
    f'each (jule3d first call, compile included: inference {first[f"{impls[0]}_eval"]["wall"]:.1f} s, '
    f'training {first[f"{impls[0]}_train"]["wall"]:.1f} s); within a round the two processes run one after '
    'the other, never together, and the first side alternates. Forward '
    f'{fwd / 1e6:.1f} MFLOP per patch, training counted as 3x forward; "per CPU-s" = patches per '
    'second of process CPU time (all threads). 1-minute load average '
    f'{load_start:.1f} at the start, {load_end:.1f} at the end.',
    '',
    '| | conv_impl | jule3d patches/s | PyTorch patches/s | ratio jule3d/PyTorch | jule3d per CPU-s | '
    'PyTorch per CPU-s | ratio per CPU-s | jule3d GFLOP/s (of roofline) | '
    'PyTorch GFLOP/s (of roofline) |',
    '|---|---|---|---|---|---|---|---|---|---|',
    *rows,
    '',
    f'float32 matmul {MATMUL[0]}x{MATMUL[1]} @ {MATMUL[1]}x{MATMUL[2]}, same run: jnp.dot '
    f'{roof_jax:.0f} GFLOP/s, torch {roof_torch:.0f} GFLOP/s; roofline = the faster, '
    f'{roof:.0f} GFLOP/s. Peak RSS of the jule3d process {peak_rss_mb():.0f} MiB.',
    '',
    'Targets:',
    '',
    *verdicts,
  ]
  titles = {
    'layers': f'Forward (inference) time per stage, ms per batch of {b}, each stage jitted / run '
    'alone on its real input (best of 3):',
    'layers_train': f'Training time per stage (forward + backward, batch-statistics BN; parameter '
    f'gradients, and input gradients after conv1), ms per batch of {b}, each stage jitted / run '
    'alone on its real input (best of 3); the full step adds the triplet loss and the SGD update '
    f'(full step, best of {args.repeats}: jule3d {b / res["train"][0] * 1e3:.0f} ms, PyTorch '
    f'{b / res["train"][1] * 1e3:.0f} ms):',
  }
  for kind, stage_rows in layer_rows.items():
    lines += [
      '',
      titles[kind],
      '',
      '| stage | '
      + ' | '.join(f'jule3d {impl} ms' for impl in impls)
      + f' | PyTorch ms | ratio PyTorch/{impls[0]} |',
      '|---|' + '---|' * (len(impls) + 2),
      *stage_rows,
    ]
  lines.append('')
  return '\n'.join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--batch', type=int, default=100, help='patches per call (paper: 100)')
  p.add_argument('--repeats', type=int, default=5, help='timed rounds after the warm-up')
  p.add_argument('--seed', type=int, default=0, help='seed of the patches, labels and init')
  p.add_argument('--layers', action='store_true', help='add per-stage forward and training timings')
  p.add_argument(
    '--impls', default='auto,im2col', help='jule3d conv_impl values; the first one is the target'
  )
  p.add_argument('--torch-python', default=TORCH_PY, help='python of the torch virtualenv')
  p.add_argument('--write', action='store_true', help='update BENCHMARKS.md')
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    _torch_worker()
    return
  sys.path.insert(0, ROOT)
  from bench.common import command_line, put_section

  args.command = command_line('bench_torch.py', skip=('--write',))
  section = run(args)
  print()
  print(section)
  if args.write:
    put_section(section)


if __name__ == '__main__':
  main()
