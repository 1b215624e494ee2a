"""The report a person reads first: report.md, from report.json (its figures: jule3d/figures.py)."""

import numpy as np

from jule3d.figures import CAPTION, CAPTION_NO_REFERENCE, TITLES
from jule3d.groups import verdict as group_verdict


def _num(v, fmt: str = '.3f') -> str:
  return '-' if v is None else format(v, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return lines + ['| ' + ' | '.join(r) + ' |' for r in rows]


def _foreground_lines(rep: dict) -> list[str]:
  t, cov = rep.get('threshold'), rep.get('coverage')
  lines = []
  if t:
    rule = 'derived by Otsu from the histogram' if t['rule'] == 'otsu' else t['rule']
    test = '>=' if t['direction'] == 'above' else '<='
    lines.append(
      f'- Foreground: voxel {test} {t["value"]:g} ({rule}): {t["foreground_fraction"]:.1%} of the '
      f'volume ({t["foreground_voxels"]:,} voxels)'
    )
  if cov:
    share = cov['labelled_fraction']
    share = '-' if share is None else f'{100 * share:.1f}%'
    where = 'foreground voxels'
    if cov['domain'] != 'foreground':  # config.patches.domain = 'specimen'
      where = f'voxels of the domain {cov["domain"]!r} (the foreground and the air it encloses)'
    lines.append(
      f'- Labelled: {share} of the {cov["foreground_voxels"]:,} {where} got a jule3d label > 0'
    )
  return lines


def _segment_lines(segments: dict) -> list[str]:
  methods = [m for m, s in (segments or {}).items() if s]
  if not methods:
    return []
  labels = sorted({r['label'] for m in methods for r in segments[m]['sizes']})
  by = {m: {r['label']: r for r in segments[m]['sizes']} for m in methods}
  rows = [['labelled (> 0)', *[f'{segments[m]["labelled_voxels"]:,}' for m in methods]]]
  for label in labels:
    cells = [str(label)]
    for m in methods:
      r = by[m].get(label)
      cells.append('-' if r is None else f'{r["voxels"]:,} ({r["fraction"]:.1%})')
    rows.append(cells)
  return [
    '## Segment sizes',
    '',
    'Voxels per label and its share of the voxels the method labelled. Label ids are each '
    "method's own (the intensity baselines number theirs by intensity): compare sizes, not ids.",
    '',
    *_table(['label', *[TITLES.get(m, m) for m in methods]], rows),
    '',
  ]


def _groups_lines(groups, reading=None) -> list[str]:
  if not isinstance(groups, dict):
    return []
  k = groups['k']
  read = []
  if isinstance(reading, dict):
    layer = {'hidden': 'hidden layer'}.get(reading['layer'], reading['layer'])
    read = [f"k-means read the CNN's {layer} ({reading['why']}).", '']
  return [
    '## Do the features hold K groups? (no reference needed)',
    '',
    *read,
    f"k-means leaves {groups['unexplained_k']:.3f} of the learned features' variance with K = {k} "
    f'segments and {groups["unexplained_k_minus_1"]:.3f} with {k - 1}: ratio {groups["ratio"]:.2f}, '
    f'where one continuum without groups gives {groups["continuum_ratio"]:.2f}. So '
    f'{group_verdict(groups)}.',
    '',
  ]


def _score_lines(rep: dict) -> list[str]:
  lines = ['## Scores on annotated voxels', '']
  nmis = {m: s for m, s in rep['nmi'].items() if s is not None}
  best = max(nmis.values(), default=None)
  rows = []
  for m, s in rep['nmi'].items():
    text = _num(s)
    if s is not None and s == best and len(nmis) > 1:
      text = f'**{text}**'
    elif s is None:
      text = 'skipped: ' + rep.get('skipped', {}).get(m, 'not computed')
    unc = rep['uncovered_fraction'].get(m)
    rows.append([TITLES.get(m, m), text, _num(rep['dice_mean'].get(m)), _num(unc, '.1%')])
  lines += _table(['method', 'NMI', 'mean Dice', 'annotated voxels labelled 0'], rows)
  lines += [
    '',
    "NMI = I(Y;P) / sqrt(H(Y) H(P)) (sklearn, geometric). The prediction's 0 counts as one more "
    'cluster. Dice: each reference class against its Hungarian-matched cluster (matched label in '
    'brackets).',
    '',
  ]
  methods = [m for m in rep['dice'] if rep['dice'][m]]
  if methods:
    rows = []
    for i, r in enumerate(rep['dice'][methods[0]]):
      cells = [f'{r["name"]} ({r["class"]})', f'{r["voxels"]:,}']
      for m in methods:
        d = rep['dice'][m][i]
        cells.append(f'{d["dice"]:.3f} ({d["label"] if d["label"] is not None else "none"})')
      rows.append(cells)
    lines += _table(['reference class', 'voxels', *[TITLES.get(m, m) for m in methods]], rows)
    lines.append('')
  return lines


_GEOMETRY = {
  'file': "(the file's own geometry, kept in every output)",
  'config': '(from config.data.spacing: the file has none)',
  'override': "(config.data.spacing_override: replaces the file's)",
  'expected': "(the config's expected_spacing: the file has none)",
  'default': '(1.0: neither the file nor the config gives one)',
}


def _geometry_lines(v: dict) -> list[str]:
  lines = []
  if v.get('affine') is not None:
    a = np.asarray(v['affine'], np.float64)
    norms = np.linalg.norm(a[:3, :3], axis=0)
    direction = a[:3, :3] / np.where(norms > 0, norms, 1.0)
    rows = '; '.join(' '.join(f'{x:.4g}' for x in row) for row in direction)
    origin = ', '.join(f'{x:.6g}' for x in a[:3, 3])
    lines.append(f'- Geometry (RAS, as NIfTI): origin ({origin}), direction [{rows}]')
  grid = v.get('working_grid')
  if grid:
    lines.append(f'- Working grid: {grid["description"]}; labels written back on the input grid')
  return lines


def markdown(rep: dict) -> str:
  """report.md from the report dict (what report.json holds).

  Args:
    rep: evaluate's report dict (with or without scores: 'nmi' is absent without a reference).

  Returns:
    The Markdown text.
  """
  v, c = rep['volume'], rep['config']
  scored = 'nmi' in rep
  shape = ' x '.join(str(s) for s in v['shape'])
  spacing = ', '.join(f'{s:g}' for s in v['spacing'])
  threshold = (rep.get('threshold') or {}).get('value', c['data']['threshold'])
  if scored:
    reference = f'`{v["labels"]}`, {rep["annotated_voxels"]:,} annotated voxels scored'
  else:
    reference = (
      'none given (config.data.labels is empty), so no NMI or Dice: compare the segment sizes and '
      'the slices below'
    )
  lines = [
    '# jule3d report',
    '',
    f'- Volume: `{v["path"]}`, {shape} voxels, {v["dtype"]}, spacing ({spacing}) '
    f'{_GEOMETRY.get(v.get("geometry"), "")}'.rstrip(),
    *_geometry_lines(v),
    f'- Reference: {reference}',
    f'- Segmentation: `{v["segmentation"]}`',
    f'- Date: {rep["date"]}',
    f'- Config: K = {c["segment"]["num_segments"]}, seed {c["seed"]}, threshold '
    f'{threshold:g} ({c["data"]["foreground"]}), patch {c["patches"]["patch_size"]}, '
    f'stride {c["segment"]["stride"]}, n_s = {c["patches"]["num_patches"]}, '
    f'C = {c["cluster"]["num_clusters"]}',
    *_foreground_lines(rep),
    '',
  ]
  if scored:
    lines += _score_lines(rep)
  lines += _segment_lines(rep.get('segments'))
  lines += _groups_lines(rep.get('groups'), rep.get('reading'))
  figs = rep.get('figures') or {}
  errors = rep.get('figures_error') or {}
  lines += ['## Slices', '']
  if 'slices' in figs:
    lines += [f'![slices]({figs["slices"]})', '', report_caption(scored), '']
  elif not c.get('evaluate', {}).get('figures', True):
    lines += ['Figures disabled (config.evaluate.figures = False).', '']
  for name, error in errors.items():
    lines += [
      f'Figure `{name}` could not be drawn ({error}); the rest of the report is complete.',
      '',
    ]
  lines += _phase1(rep.get('train_history'), figs)
  t = rep['timing_s']
  rows = [[k, _num(s, '.1f')] for k, s in t.items()]
  lines += ['## Timings (seconds)', '', *_table(['stage', 'seconds'], rows), '']
  lines += ['## Baselines', '']
  for m, b in rep['baselines'].items():
    if 'skipped' in b:
      lines.append(f'- {TITLES.get(m, m)}: skipped ({b["skipped"]})')
      continue
    if 'thresholds' in b:
      what = ', '.join(f'{x:.6g}' for x in b['thresholds'])
      centres = ', '.join(f'{x:.6g}' for x in b.get('centres', []))
      what = f'thresholds [{what}]' + (f', centres [{centres}]' if centres else '')
    else:  # Atropos: a mixture model with a spatial prior, no thresholds
      what = f'GMM + MRF (weight {b.get("mrf")}), {b.get("seconds", 0):.0f} s'
    lines.append(
      f'- {TITLES.get(m, m)}: {what}; labels in `{b["path"]}`'
      + (' (reused)' if b.get('reused') else '')
    )  # fmt: skip
  vs = ', '.join(f'{k} {x}' for k, x in rep['versions'].items() if x)
  lines += ['', '## Versions', '', vs, '']
  return '\n'.join(lines)


def report_caption(reference: bool = True) -> str:
  """Caption of the slices figure.

  Args:
    reference: whether the figure has a reference column.

  Returns:
    The caption text.
  """
  return '*' + (CAPTION if reference else CAPTION_NO_REFERENCE) + '*'


def _phase1(history, figs) -> list[str]:
  lines = ['## Phase 1 (JULE training)', '']
  periods = (history or {}).get('periods') or []
  if not periods:
    return lines + [
      'No train_history.json in the workdir (training ran elsewhere, or not yet).',
      '',
    ]
  first, last = periods[0], periods[-1]
  seconds = sum(p.get('seconds', 0) for p in periods)
  lines.append(
    f'{len(periods)} periods, {first["clusters_start"]} -> {last["clusters_end"]} clusters, mean '
    f'loss {first["loss_mean"]:.4f} (first period) -> {last["loss_mean"]:.4f} (last), '
    f'{seconds:.0f} s.'
  )
  raw = history.get('nmi_patches_raw')
  if last.get('nmi_patches') is not None:
    lines.append(
      f"NMI of the training patches' clusters vs the reference: {last['nmi_patches']:.3f} after "
      f'learning, {_num(raw)} clustering the raw patches (no learning).'
    )
  tries = history.get('tries')
  if tries:  # train.tries: trained again because the features did not hold K groups
    ratios = ', '.join(f'{t["ratio"]:.2f} (seed {t["seed"]})' for t in tries)
    lines.append(
      f'{len(tries)} trainings (train.tries: another from scratch while the trained features of the '
      f'training patches did not hold K distinct groups); group ratios {ratios}; kept: try '
      f'{history["kept"] + 1}, the lowest, whose model is the newest checkpoint in checkpoints/ '
      '(the others are in tries/).'
    )
  start, trained = history.get('groups_start'), history.get('groups')
  if not tries and start and trained and not (start['distinct'] or trained['distinct']):
    lines.append(
      f'One training (train.tries): neither the period-0 features (group ratio {start["ratio"]:.2f}) '
      f'nor the trained ones ({trained["ratio"]:.2f}) hold K distinct groups, and a training that '
      'starts without them is not expected to find them. Where the classes differ along one '
      "continuum, as MNI152's tissues do along the T1 intensity, an intensity model places the cuts "
      "better: on MNI152 this report's baselines score 0.68-0.71 NMI against jule3d's 0.63-0.68 "
      '(README "Results"); compare them in the slices (their labels: baselines/*.zarr).'
    )
  lines.append('')
  if 'training' in figs:
    lines += [f'![training]({figs["training"]})', '']
  return lines
