"""Segmentation quality: the recommended method, the paper's, each extension off, and hand-made features.

Runs the whole CLI (`launch.py`) once per (data set, seed, variant) and reads the NMI of jule3d and
of the baselines from each report.json, so every figure is measured exactly as a user's run:

  data sets  demo        the built-in phantom 96^3 (configs/demo.py)
             phantom128  the same phantom generator at 128^3 (phantom seed 0)
             mni152      the MNI152 T1 template into CSF/GM/WM (configs/mni152.py; needs nilearn)
  variants   recommended the shipped configs (configs/base.py RECOMMENDED)
             paper       ':paper', the paper's method as it is
             mean_fill, no_mask, no_domain, raw_init, texture_init, flatten_head, no_centre,
                         no_smoothing, no_fill, no_envelope, one_try: one extension of the
                         recommended method off (the ablation)
             embedding_layer, hidden_layer: k-means reads one layer of the CNN whatever the
                         training's group check (segment.layer 'auto' off, either way)
             intensity_only, descriptor_only: the same pipeline with the CNN features replaced by
                         the centre voxel's intensity or the period-0 descriptor (the cue the rule
                         picks: what the method adds by hand; smoothing and fill stay on)
             augment:    an option measured and left off (train.augment = 'symmetries'; README
                         "Honest reading"); run only when named (`--variants=...` or
                         `--variants=all`), not by default

Variants that change only phase 2 segment with the recommended run's checkpoint in one
`--mode=all` process (`--config.segment.checkpoint`: nothing is trained; training is identical),
and every run reuses the recommended run's baselines (same image, K and seed); Atropos, which takes
no seed, is computed once per data set and reused by the other seeds (jule3d/atropos.py reuses a
store only while its settings match). `one_try` is the recommended run itself wherever that run
trained once (its train_history.json holds no 'tries': train.tries only acts after a first training
that lost groups its period-0 features held), so it is run only where the recommended run trained
again; likewise `embedding_layer` and `hidden_layer` only where the recommended run read the other
layer (report.json 'reading'); the table says how many of their figures are the recommended run's. Results accumulate
in WORKDIR/results.json: rerunning skips what is already there (use --fresh to start over). The runs
share JAX's persistent compilation cache in WORKDIR/jax_cache (the same programs compile once for
every seed and variant; `--no-compile-cache` compiles each run afresh).

  python bench/quality.py --write                        # everything (make quality)
  python bench/quality.py --data=demo --seeds=0 --variants=recommended,paper
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = {
  'demo': ('configs/demo.py', []),
  'phantom128': ('configs/demo.py', ['--config.data.phantom_shape=(128,128,128)']),
  'mni152': ('configs/mni152.py', []),
}
# name -> (config argument, flags, trains its own model, what it is)
VARIANTS = {
  'recommended': ('', [], True, 'the recommended method (shipped configs)'),
  'paper': ('paper', [], True, "the paper's method (`:paper`)"),
  # Phase-2 variants first: they are cheap (the recommended run's checkpoint).
  'intensity_only': (
    '',
    ['--config.segment.features=intensity'],
    False,
    'hand-made: centre intensity, no CNN',
  ),
  'descriptor_only': (
    '',
    ['--config.segment.features=initial'],
    False,
    'hand-made: the period-0 cue, no CNN',
  ),
  'no_smoothing': ('', ['--config.segment.smoothing=0'], False, 'no Potts smoothing'),
  'texture_init': (
    '',
    ['--config.cluster.initial_features=texture'],
    True,
    'period 0 on the 3-number texture descriptor (no cue rule)',
  ),
  'flatten_head': ('', ['--config.model.head=flatten'], True, "the paper's flatten head"),
  'no_centre': ('', ['--config.model.centre_size=0'], True, 'no centre path'),
  'no_fill': ('', ['--config.segment.fill=False'], False, 'faces left unlabelled'),
  'no_envelope': (
    '',
    ['--config.segment.fill_envelope=False'],
    False,
    'the fill stops at the domain (pores open onto the surface unlabelled)',
  ),
  'embedding_layer': (
    '',
    ['--config.segment.layer=embedding'],
    False,
    "k-means always reads the CNN's embedding (the paper's), whatever the training's group check",
  ),
  'hidden_layer': (
    '',
    ['--config.segment.layer=hidden'],
    False,
    "k-means always reads the CNN's hidden layer, whatever the training's group check",
  ),
  'raw_init': ('', ['--config.cluster.initial_features=raw'], True, 'period 0 on L2 raw voxels'),
  'no_domain': (
    '',
    ['--config.patches.domain=foreground'],
    True,
    'foreground only (no enclosed air)',
  ),
  'mean_fill': (
    '',
    ['--config.patches.outside_fill=mean'],
    True,
    "masking fills the specimen's mean, not its mirror image",
  ),
  'no_mask': ('', ['--config.patches.mask_outside=False'], True, 'no specimen masking'),
  'one_try': (
    '',
    ['--config.train.tries=1'],
    True,
    'one training, whether or not its features hold K groups',
  ),
  'augment': (
    '',
    ['--config.train.augment=symmetries'],
    True,
    "tried, not recommended: training patches under the cube's 48 symmetries",
  ),
}
LAYER_OF = {'embedding_layer': 'embedding', 'hidden_layer': 'hidden'}  # segment.layer each reads
OPTIONAL = ('augment',)  # measured and left off: run only when named
BASELINES = ('kmeans_intensity', 'multi_otsu', 'atropos')
SAME_RUN = {
  'one_try': 'the recommended run trained once, so train.tries=1 is the same run',
  'embedding_layer': 'the recommended run read the embedding, so segment.layer=embedding is the '
  'same run',
  'hidden_layer': 'the recommended run read the hidden layer, so segment.layer=hidden is the same '
  'run',
}


def _env(root: str, cache: bool) -> dict[str, str]:
  """The runs' environment: with `cache`, JAX's persistent compilation cache under `root`.

  The table's runs compile the same programs over and over (every seed, and the variants that keep
  the shapes); from the cache a run loads them instead. A compiled program is the same whether
  compiled or loaded, so the labels are too (README "Benchmarks"). The cache holds executable code:
  it lives in the benchmark's own folder, never in a shared place.
  """
  env = dict(os.environ)
  if cache:
    env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(root, 'jax_cache')
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'  # default 1 s: most of ours are less
  return env


def _share_atropos(data: str, workdir: str, root: str) -> None:
  """Gives `workdir` another seed's Atropos store of the same data set, where one exists.

  Atropos draws no seed of ours, so its labels are the same for every seed; jule3d/atropos.py reuses
  the copy only while its stored settings (image, K, threshold) match the run's, else recomputes.
  """
  target = os.path.join(workdir, 'baselines', 'atropos.zarr')
  if os.path.exists(target):
    return
  for name in sorted(os.listdir(root)):
    store = os.path.join(root, name, 'baselines', 'atropos.zarr')
    if name.startswith(f'{data}-s') and name.endswith('-recommended') and os.path.isdir(store):
      shutil.copytree(store, target)
      return


def _trained_once(workdir: str) -> bool:
  """Whether the run in `workdir` trained once (no second try: train_history.json has no 'tries')."""
  with open(os.path.join(workdir, 'train_history.json')) as f:
    return 'tries' not in json.load(f)


def _read_layer(workdir: str) -> str | None:
  """The CNN layer the run in `workdir` segmented with (report.json 'reading'; segment.py)."""
  with open(os.path.join(workdir, 'report.json')) as f:
    return (json.load(f).get('reading') or {}).get('layer')


def _same_run(variant: str, reference: str) -> bool:
  """Whether `variant` would repeat the recommended run in `reference` (SAME_RUN says why)."""
  if variant == 'one_try':
    return _trained_once(reference)
  if variant in LAYER_OF:
    return _read_layer(reference) == LAYER_OF[variant]
  return False


def _scores(workdir: str) -> dict:
  """The NMIs and jule3d's uncovered share from a run's report.json."""
  with open(os.path.join(workdir, 'report.json')) as f:
    rep = json.load(f)
  return {'nmi': rep['nmi'], 'uncovered': rep['uncovered_fraction'].get('jule3d')}


def _run(data: str, seed: int, variant: str, root: str, cache: bool = True) -> dict:
  config, data_flags = DATA[data]
  arg, flags, trains, _ = VARIANTS[variant]
  workdir = os.path.join(root, f'{data}-s{seed}-{variant}')
  reference = os.path.join(root, f'{data}-s{seed}-recommended')
  shutil.rmtree(workdir, ignore_errors=True)
  if _same_run(variant, reference):
    return {**_scores(reference), 'wall_s': 0.0, 'same_run': SAME_RUN[variant]}
  if variant != 'recommended' and os.path.isdir(os.path.join(reference, 'baselines')):
    shutil.copytree(os.path.join(reference, 'baselines'), os.path.join(workdir, 'baselines'))
  _share_atropos(data, workdir, root)
  cmd = [
    sys.executable, os.path.join(ROOT, 'launch.py'), f'--config={config}' + (f':{arg}' if arg else ''),
    f'--workdir={workdir}', f'--config.seed={seed}', *data_flags, *flags,
  ]  # fmt: skip
  if not trains:  # `--mode=all` segments with the recommended run's model (same training)
    cmd.append(f'--config.segment.checkpoint={reference}')
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(root, cache), capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  wall = time.time() - t0
  return {
    **_scores(workdir),
    'wall_s': round(wall, 1),
    'compile_cache': cache,
    'command': ' '.join(cmd[1:]).replace(ROOT + '/', ''),
  }


def _fmt(v) -> str:
  return '-' if v is None else f'{v:.3f}'


def table(results: dict, data: str, seeds: list[int], variants: list[str]) -> str:
  """Markdown table of one data set: a row per variant and per baseline, a column per seed."""
  head = ['run', *[f'seed {s}' for s in seeds], 'mean', 'what']
  rows = []

  def row(name, values, what):
    vals = [v for v in values if v is not None]
    mean = sum(vals) / len(vals) if vals and len(vals) == len(values) else None
    rows.append([name, *[_fmt(v) for v in values], _fmt(mean), what])

  for v in variants:
    got = [results.get(f'{data}/{s}/{v}') for s in seeds]
    if any(g is not None for g in got):
      row(f'jule3d {v}', [g and g['nmi']['jule3d'] for g in got], VARIANTS[v][3])
  ref = [results.get(f'{data}/{s}/recommended') or results.get(f'{data}/{s}/paper') for s in seeds]
  for b in BASELINES:
    what = (
      'baseline (same voxels; no seed, computed once)'
      if b == 'atropos'
      else 'baseline (same voxels, same seed)'
    )
    row(b, [g and g['nmi'].get(b) for g in ref], what)
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--data', default=','.join(DATA))
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument(
    '--variants', default=','.join(v for v in VARIANTS if v not in OPTIONAL),
    help=f"comma-separated, or 'all' (default: all but {', '.join(OPTIONAL)})",
  )  # fmt: skip
  p.add_argument('--workdir', default=os.path.join(ROOT, 'runs', 'quality'))
  p.add_argument('--fresh', action='store_true', help='forget earlier results')
  p.add_argument('--write', action='store_true', help='update BENCHMARKS.md')
  p.add_argument(
    '--no-compile-cache', dest='cache', action='store_false',
    help="compile every run's programs afresh (default: JAX's persistent cache in WORKDIR)",
  )  # fmt: skip
  a = p.parse_args(argv)
  data = a.data.split(',')
  seeds = [int(s) for s in a.seeds.split(',')]
  variants = list(VARIANTS) if a.variants == 'all' else a.variants.split(',')
  for name in data + variants:
    if name not in DATA and name not in VARIANTS:
      raise SystemExit(
        f'unknown data set or variant {name!r}: expected {list(DATA)} / {list(VARIANTS)}'
      )
  if any(not VARIANTS[v][2] for v in variants) and 'recommended' not in variants:
    variants = ['recommended', *variants]  # phase-2 variants reuse its checkpoint
  variants = sorted(variants, key=lambda v: (v != 'recommended', list(VARIANTS).index(v)))
  os.makedirs(a.workdir, exist_ok=True)
  store = os.path.join(a.workdir, 'results.json')
  results = {} if a.fresh or not os.path.exists(store) else json.load(open(store))
  t0, ran = time.time(), 0
  for d in data:
    for s in seeds:
      for v in variants:
        key = f'{d}/{s}/{v}'
        if key in results:
          continue
        results[key] = _run(d, s, v, a.workdir, a.cache)
        ran += 'same_run' not in results[key]
        how = (
          'the recommended run' if 'same_run' in results[key] else f'{results[key]["wall_s"]:.0f} s'
        )
        print(f'{key}: jule3d {results[key]["nmi"]["jule3d"]:.3f} ({how})', flush=True)
        with open(store + '.tmp', 'w') as f:
          json.dump(results, f, indent=1)
        os.replace(store + '.tmp', store)
  wall = time.time() - t0
  keys = [f'{d}/{s}/{v}' for d in data for s in seeds for v in variants]
  runs_s = sum(results[k]['wall_s'] for k in keys if k in results)
  body = [
    'NMI (geometric, annotated voxels) of the whole CLI per data set, seed and variant '
    '(bench/quality.py docstring); baselines from the same runs.',
    f'Wall time of the {sum(k in results and "same_run" not in results[k] for k in keys)} runs of '
    f'this table: {runs_s / 60:.0f} min '
    f'(this invocation ran {ran} of them in {wall / 60:.1f} min; runs already in '
    f'{os.path.relpath(store, ROOT)} are not repeated). '
    f'{sum(results[k].get("compile_cache", False) for k in keys if k in results)} of them shared '
    "JAX's persistent compilation cache (WORKDIR/jax_cache).",
  ]
  carried = {}  # reason -> the variants carried over for it
  for k in keys:
    if 'reused' in results.get(k, {}):
      carried.setdefault(results[k]['reused'], set()).add(k.split('/')[2])
  body += [
    f'Carried over from an earlier tree, not rerun: {r} ({", ".join(sorted(v))}).'
    for r, v in sorted(carried.items())
  ]
  for variant, why in SAME_RUN.items():
    same = [k for k in keys if k.endswith(f'/{variant}') and 'same_run' in results.get(k, {})]
    if same:
      body.append(
        f'{len(same)} of the runs are not run again: {why} ({", ".join(same)}); their figures '
        "are the recommended run's."
      )
  for d in data:
    body += ['', f'### {d}', '', table(results, d, seeds, variants)]
  text = '\n'.join(body)
  cmd = 'python bench/quality.py ' + ' '.join(
    x for x in (f'--data={a.data}', f'--seeds={a.seeds}', f'--variants={a.variants}') if x
  )
  common.publish('Segmentation quality', cmd, text, a.write)
  return 0


if __name__ == '__main__':
  sys.exit(main())
