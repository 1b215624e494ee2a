"""The bad-input catalogue: the command line, run as a user would, on malformed inputs and configs.

Every bad input must give exit status 2, exactly one line starting 'error:' (absl's 'FATAL Flags
parsing error' for flag-level problems) that names the problem and the fix, no traceback, and leave
the workdir as it was: a workdir that did not exist stays absent (or empty), an existing one keeps
its listing and its files' mtimes.

Decisions recorded here (and checked by the 'accepted' cases at the end):
  * A zarr with missing chunks is NOT a bad input: zarr writers omit chunks that hold only the fill
    value, and tensorstore reads a missing chunk as the fill value, so jule3d opens it. A chunk that
    is present but damaged, or unreadable array metadata, is a bad input.
  * Reference labels are not limited to uint8: evaluation widens them, so int32 labels up to 300
    classes are scored like any others (only jule3d's own segmentation is uint8).
  * Permissions: root reads and writes anything, so as root the unreadable-file and read-only-workdir
    cases fake the answer of os.access (what jule3d asks) in the child process through a
    sitecustomize module, as tests/test_volume.py does in-process; as another user they use chmod.
"""

import dataclasses
import gzip
import json
import os
import pathlib
from collections.abc import Callable

import nibabel as nib
import numpy as np
import pytest
import tensorstore as ts
import tifffile
from helpers import run_cli
from sklearn.metrics import normalized_mutual_info_score

SMOKE = '--config=configs/smoke.py'
SHAPE = (30, 30, 30)  # smoke patches are 15^3: 16^3 candidate centres

_FAKE_ACCESS = """
import json, os
_denied = {os.path.realpath(p): m for p, m in json.loads(os.environ['FAKE_ACCESS_DENIED']).items()}
_real_access = os.access
def _access(path, mode, *args, **kwargs):
  if mode & _denied.get(os.path.realpath(os.fspath(path)), 0):
    return False
  return _real_access(path, mode, *args, **kwargs)
os.access = _access
"""

# A disk that is (nearly) full: shutil.disk_usage reports FAKE_FREE_BYTES free, as `df` would.
_FAKE_FREE = """
import os, shutil
_real_usage = shutil.disk_usage
def _usage(path):
  u = _real_usage(path)
  return type(u)(u.total, u.total - int(os.environ['FAKE_FREE_BYTES']), int(os.environ['FAKE_FREE_BYTES']))
shutil.disk_usage = _usage
"""


def _image(seed: int = 0, shape=SHAPE) -> np.ndarray:
  # Above the smoke threshold (2000) almost everywhere: plenty of foreground centres.
  return np.random.default_rng(seed).integers(1000, 5000, shape).astype(np.uint16)


def _npy(folder: pathlib.Path, array: np.ndarray, name: str = 'vol.npy') -> str:
  path = folder / name
  np.save(path, array)
  return str(path)


def _zarr(folder: pathlib.Path, array: np.ndarray, name: str = 'vol.zarr') -> pathlib.Path:
  path = folder / name
  store = ts.open(
    {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': str(path)}},
    create=True,
    dtype=ts.dtype(array.dtype.name),
    shape=array.shape,
    chunk_layout=ts.ChunkLayout(chunk_shape=[10, 10, 10]),
  ).result()
  store.write(array).result()
  return path


def _path(flag_value: str) -> list[str]:
  return [f'--config.data.path={flag_value}']


# --- Builders: each makes its input under `tmp` and returns the extra command line arguments -------


def _missing_path(tmp):
  return _path(f'{tmp}/nope.nii.gz')


def _unsupported_extension(tmp):
  (tmp / 'scan.xyz').write_text('hello')
  return _path(f'{tmp}/scan.xyz')


def _garbage_gzip(tmp):
  (tmp / 'broken.nii.gz').write_bytes(b'\x1f\x8b\x08\x00 not really gzip')
  return _path(f'{tmp}/broken.nii.gz')


def _truncated_nii_gz(tmp):
  path = tmp / 'cut.nii.gz'
  nib.save(nib.Nifti1Image(_image(), np.eye(4)), str(path))
  data = path.read_bytes()
  assert gzip.decompress(data)  # a real gzip stream ...
  path.write_bytes(data[: len(data) // 2])  # ... cut in half: the header parses, the voxels end
  return _path(str(path))


def _corrupt_zarr_chunk(tmp):
  path = _zarr(tmp, _image())
  chunk = next(p for p in sorted(path.iterdir()) if not p.name.startswith('.'))
  chunk.write_bytes(b'not a compressed chunk')
  return _path(str(path))


def _broken_zarr_metadata(tmp):
  path = _zarr(tmp, _image())
  (path / '.zarray').write_text('{"shape": [30, 30')
  return _path(str(path))


def _zarr_group(tmp):
  (tmp / 'group.zarr').mkdir()
  (tmp / 'group.zarr' / '.zgroup').write_text('{"zarr_format": 2}')
  return _path(str(tmp / 'group.zarr'))


def _bad_inline_spec(tmp):
  return _path('{"driver": "zarr", "kvstore": ')


def _tiff_slices_of_different_sizes(tmp):
  folder = tmp / 'slices'
  folder.mkdir()
  image = _image()
  for z in range(SHAPE[0]):
    plane = image[z] if z != 7 else image[z, :-2]
    tifffile.imwrite(folder / f'slice_{z + 1}.tif', plane)
  return _path(str(folder))


def _folder_without_tiffs(tmp):
  folder = tmp / 'scan'
  folder.mkdir()
  (folder / 'notes.txt').write_text('the slices are on the other disk')
  return _path(str(folder))


def _empty_folder(tmp):
  (tmp / 'empty').mkdir()
  return _path(str(tmp / 'empty'))


def _unreadable_file(tmp):
  return _path(_npy(tmp, _image(), 'secret.npy'))


def _complex_voxels(tmp):
  return _path(_npy(tmp, _image().astype(np.complex64), 'complex.npy'))


def _image_2d(tmp):
  return _path(_npy(tmp, _image()[0], '2d.npy'))


def _image_4d(tmp):
  image = _image()
  return _path(_npy(tmp, np.stack([image, image], -1), '4d.npy'))


def _too_few_centres(tmp):
  return [*_path(_npy(tmp, _image())), '--config.data.threshold=4990']


def _nan_voxels(tmp):
  image = _image().astype(np.float32)
  image[3, 4, 5] = np.nan
  return _path(_npy(tmp, image, 'nan.npy'))


def _labels_of_another_shape(tmp):
  image = _npy(tmp, _image())
  labels = _npy(tmp, np.ones((30, 30, 29), np.uint8), 'labels.npy')
  return [*_path(image), f'--config.data.labels={labels}']


def _labels_zarr_with_a_corrupt_chunk(tmp):
  image = _npy(tmp, _image())
  labels = np.zeros(SHAPE, np.uint8)
  labels[5:25] = 1 + np.arange(30)[:, None] % 3  # every chunk holds labels: every chunk is stored
  path = _zarr(tmp, labels, 'labels.zarr')
  chunk = next(p for p in sorted(path.iterdir()) if not p.name.startswith('.'))
  chunk.write_bytes(b'not a compressed chunk')
  return [*_path(image), f'--config.data.labels={path}']


def _negative_labels(tmp):
  labels = np.zeros(SHAPE, np.int16)
  labels[12, 3, 4] = -1
  image = _npy(tmp, _image())
  return [*_path(image), f'--config.data.labels={_npy(tmp, labels, "neg.npy")}']


def _fractional_labels(tmp):
  labels = np.ones(SHAPE, np.float32)
  labels[7, 7, 7] = 1.5  # e.g. a probability map given where a label volume was meant
  image = _npy(tmp, _image())
  return [*_path(image), f'--config.data.labels={_npy(tmp, labels, "prob.npy")}']


def _nifti(folder: pathlib.Path, array: np.ndarray, affine: np.ndarray, name: str) -> str:
  path = folder / name
  nib.save(nib.Nifti1Image(array, affine), str(path))
  return str(path)


def _spacing_contradicting_the_header(tmp):
  # A clinical CT (0.57 x 0.57 x 5 mm) run with a config made for a micro-CT's 0.02951 mm voxels.
  image = _nifti(tmp, _image(), np.diag([0.57, 0.57, 5.0, 1.0]), 'ct.nii.gz')
  return [*_path(image), '--config.data.spacing=(0.02951,0.02951,0.02951)']


def _labels_on_another_grid(tmp):
  image = _nifti(tmp, _image(), np.eye(4), 'ct.nii.gz')
  moved = np.eye(4)
  moved[:3, 3] = (0.0, 12.0, 0.0)  # the same size, but 12 voxels off: another scan's labels
  labels = _nifti(tmp, np.ones(SHAPE, np.uint8), moved, 'labels.nii.gz')
  return [*_path(image), f'--config.data.labels={labels}']


def _damaged_nrrd(tmp):
  (tmp / 'scan.nrrd').write_bytes(b'NRRD0004\ntype: banana\n\n' + b'\0' * 64)
  return _path(f'{tmp}/scan.nrrd')


def _big_npy(tmp):
  # 64 MiB of voxels to convert: more than the 300 MiB free minus the run's own 256 MiB.
  return _path(_npy(tmp, np.full((256, 256, 256), 3000, np.float32), 'big.npy'))


def _phantom_with_too_few_centres(tmp):
  # The phantom is generated into the workdir before the count fails: it must not stay there.
  return ['--config.patches.num_patches=100000']


def _more_segments_than_grid_patches(tmp):
  # A valid K (<= 255), but the stride-6 grid of this volume holds at most 3^3 = 27 patches: found
  # before training, not after it.
  return [*_path(_npy(tmp, _image())), '--config.segment.num_segments=200']


def _args(*args):
  return lambda tmp: list(args)


@dataclasses.dataclass(frozen=True)
class Case:
  """One malformed input or config.

  Attributes:
    make: builds the input under a folder and returns the extra command line arguments.
    problem: text the error line must contain (what is wrong, where).
    fix: text the error line (or the usage line after it) must contain (what to do).
    workdir: 'new' (absent), 'existing' (holds files and an existing cache/), 'readonly' (existing,
      not writable), 'file' (an existing file), 'none' (no --workdir flag).
    unreadable: the input file is made unreadable.
    free_bytes: the workdir's disk reports only this much free space (0: the real figure).
  """

  make: Callable[[pathlib.Path], list[str]]
  problem: str
  fix: str
  workdir: str = 'new'
  unreadable: str = ''
  free_bytes: int = 0


CASES = {
  # Inputs.
  'missing path': Case(_missing_path, 'nope.nii.gz', 'no such file'),
  'unsupported extension': Case(_unsupported_extension, '.xyz', 'expected a zarr'),
  'not gzip at all': Case(_garbage_gzip, 'broken.nii.gz', 'damaged'),
  'truncated .nii.gz': Case(_truncated_nii_gz, 'cut.nii.gz', 'truncated', workdir='existing'),
  'zarr with a corrupt chunk': Case(_corrupt_zarr_chunk, 'vol.zarr', 'damaged'),
  'zarr with broken metadata': Case(_broken_zarr_metadata, 'vol.zarr', 'could not be opened'),
  'zarr group, not an array': Case(_zarr_group, 'group.zarr', 'give the folder of one array'),
  'bad inline tensorstore spec': Case(_bad_inline_spec, 'config.data.path', 'not valid JSON'),
  'TIFF slices of different sizes': Case(
    _tiff_slices_of_different_sizes, 'slice_8.tif', 'must have the same size'
  ),
  'folder without TIFFs': Case(_folder_without_tiffs, 'scan', '.tif/.tiff slices'),
  'empty folder': Case(_empty_folder, 'empty', '.tif/.tiff slices'),
  'unreadable file': Case(
    _unreadable_file, 'secret.npy', 'permission denied', unreadable='secret.npy'
  ),
  'complex64 voxels': Case(_complex_voxels, 'complex64', 'expected integers, floats'),
  '2D image': Case(_image_2d, '2D image', 'one .tif file per slice'),
  '4D image': Case(_image_4d, '4D image', 'save a single channel'),
  'too few foreground centres': Case(_too_few_centres, 'num_patches = 240', 'change the threshold'),
  'phantom with too few centres': Case(
    _phantom_with_too_few_centres, 'num_patches = 100000', 'lower num_patches', workdir='existing'
  ),
  'NaN voxels': Case(_nan_voxels, 'nan.npy', 'replace them with a finite value'),
  'labels of another shape': Case(_labels_of_another_shape, 'labels.npy', 'must match the image'),
  'labels on another grid': Case(_labels_on_another_grid, 'origin (0, 12, 0)', "the image's grid"),
  'spacing contradicting the header': Case(
    _spacing_contradicting_the_header, '(0.57, 0.57, 5)', 'spacing_override=True'
  ),
  'damaged NRRD': Case(_damaged_nrrd, 'scan.nrrd', 'damaged'),
  'labels zarr with a corrupt chunk': Case(
    _labels_zarr_with_a_corrupt_chunk, 'labels.zarr', 'damaged'
  ),
  'negative labels': Case(_negative_labels, 'neg.npy', 'expected labels >= 0'),
  'fractional labels': Case(_fractional_labels, 'prob.npy', 'expected integer labels'),
  # Config values.
  'unknown config field': Case(_args('--config.train.epochz=3'), 'epochz', 'configs/base.py'),
  'renamed config field': Case(
    _args('--config.segment.batch_size=64'), 'batch_size', 'is now config.model.feature_batch_size'
  ),
  'zero feature batch': Case(
    _args('--config.model.feature_batch_size=0'), 'model.feature_batch_size', '>= 1'
  ),
  'unknown head': Case(_args('--config.model.head=max'), 'model.head', "'flatten' or 'mean'"),
  'unknown outside fill': Case(
    _args('--config.patches.outside_fill=zero'), 'patches.outside_fill', "'mirror' or 'mean'"
  ),
  'unknown layer': Case(
    _args('--config.segment.layer=fc2'), 'segment.layer', "'embedding', 'hidden' or 'auto'"
  ),
  'unknown augmentation': Case(
    _args('--config.train.augment=flips'), 'train.augment', "'none' or 'symmetries'"
  ),
  'even centre path': Case(_args('--config.model.centre_size=2'), 'model.centre_size', 'odd edge'),
  'misspelled config section': Case(
    _args('--config.trian.epochs_per_period=3'), "'trian'", 'Did you mean "train"'
  ),
  'wrong type': Case(
    _args('--config.train.epochs_per_period=abc'), 'epochs_per_period', 'configs/base.py'
  ),
  'zero patch size': Case(_args('--config.patches.patch_size=0'), 'patches.patch_size', '>= 1'),
  'even patch size': Case(_args('--config.patches.patch_size=14'), 'patch_size', 'an odd number'),
  'negative stride': Case(_args('--config.segment.stride=-5'), 'segment.stride', '>= 1'),
  'stride larger than the patch': Case(
    _args('--config.segment.stride=17'), 'segment.stride', 'at most the patch size'
  ),
  'C = n_s': Case(_args('--config.cluster.num_clusters=240'), 'num_clusters', 'fewer clusters'),
  'more clusters than patches': Case(
    _args('--config.cluster.num_clusters=1000'), 'num_clusters = 1000', 'fewer clusters'
  ),
  'K < 2': Case(_args('--config.segment.num_segments=1'), 'num_segments', '>= 2'),
  'zero outside block': Case(
    _args('--config.patches.mask_outside=True', '--config.patches.outside_block=0'),
    'patches.outside_block',
    '>= 1',
  ),
  'K > 255': Case(_args('--config.segment.num_segments=300'), 'num_segments', 'at most 255'),
  'K more than the grid patches': Case(
    _more_segments_than_grid_patches, 'num_segments = 200', 'lower the stride or K', 'existing'
  ),
  'K_s not below n_s': Case(_args('--config.cluster.k_s=240'), 'cluster.k_s', 'fewer neighbours'),
  'eta > 1': Case(_args('--config.cluster.unfolding_rate=1.5'), 'unfolding_rate', '(0, 1]'),
  'eta = 0': Case(_args('--config.cluster.unfolding_rate=0'), 'unfolding_rate', '(0, 1]'),
  'foreground sideways': Case(
    _args('--config.data.foreground=sideways'), "'sideways'", "'above' or 'below'"
  ),
  'process id out of range': Case(
    _args('--config.distributed.num_processes=2', '--config.distributed.process_id=2'),
    'distributed.process_id',
    '0 .. distributed.num_processes - 1',
  ),
  'several processes, no coordinator': Case(
    _args('--config.distributed.num_processes=2'), 'distributed.coordinator', "'host:port'"
  ),
  'coordinator without a port': Case(
    _args('--config.distributed.coordinator=node0', '--config.distributed.num_processes=2'),
    "'node0'",
    "'host:port'",
  ),
  'negative spacing': Case(
    _args('--config.data.spacing=(-0.03,0.03,0.03)'), 'data.spacing', 'positive numbers'
  ),
  # Command line and workdir.
  'unknown mode': Case(_args('--mode=fly'), '--mode', 'should be one of'),
  'missing --workdir': Case(_args(), '--workdir', 'Usage', workdir='none'),
  'nonexistent config file': Case(
    _args('--config=configs/nope.py'), 'configs/nope.py', 'configs/demo.py'
  ),
  'nonexistent config file with an override': Case(
    _args('--config=configs/nope.py', '--config.seed=3'), 'configs/nope.py', 'configs/demo.py'
  ),
  'workdir is a file': Case(_args(), 'is not a folder', 'choose a directory', workdir='file'),
  'read-only workdir': Case(_args(), 'not writable', 'choose a directory', workdir='readonly'),
  'full workdir disk': Case(
    _args(), 'MiB free', 'free space there', workdir='existing', free_bytes=100 << 20
  ),
  'input larger than the free space': Case(
    _big_npy, 'MiB free', 'choose another --workdir', free_bytes=300 << 20
  ),
}


def _snapshot(path: pathlib.Path) -> dict:
  """Every entry under `path` (itself included): relative name -> (is_dir, size, mtime_ns).

  A folder counts by its presence only: its mtime moves when a temporary entry comes and goes.
  """
  if not path.exists():
    return {}
  if path.is_file():
    return {'.': (False, path.stat().st_size, path.stat().st_mtime_ns)}
  out = {'.': (True, 0, 0)}
  for root, dirs, names in os.walk(path):
    for name in dirs + names:
      p = pathlib.Path(root) / name
      key = str(p.relative_to(path))
      out[key] = (True, 0, 0) if p.is_dir() else (False, p.stat().st_size, p.stat().st_mtime_ns)
  return out


def _deny(path: pathlib.Path, mode: int, monkeypatch) -> None:
  """Makes `path` refuse `mode` (os.R_OK / os.W_OK) to the child process."""
  if os.geteuid() != 0:
    os.chmod(path, 0 if mode == os.R_OK else 0o555)
    return
  site = path.parent / 'fake_site'
  site.mkdir(exist_ok=True)
  (site / 'sitecustomize.py').write_text(_FAKE_ACCESS)
  monkeypatch.setenv('PYTHONPATH', str(site))
  monkeypatch.setenv('FAKE_ACCESS_DENIED', json.dumps({str(path): mode}))


def _prepare_workdir(kind: str, tmp: pathlib.Path, monkeypatch) -> pathlib.Path:
  workdir = tmp / 'work'
  if kind in ('existing', 'readonly'):
    (workdir / 'cache' / 'earlier.zarr').mkdir(parents=True)
    (workdir / 'cache' / 'earlier.zarr' / '.zarray').write_text('{}')
    (workdir / 'notes.txt').write_text('my notes')
  if kind == 'readonly':
    _deny(workdir, os.W_OK, monkeypatch)
  if kind == 'file':
    workdir.write_text('not a folder')
  return workdir


def _error_problems(proc, case: Case) -> list[str]:
  lines = proc.stderr.strip().splitlines()
  starts = ('error:', 'FATAL Flags parsing error')
  errors = [i for i, line in enumerate(lines) if line.startswith(starts)]
  problems = []
  if proc.returncode != 2:
    problems.append(f'exit status {proc.returncode}')
  if 'Traceback' in proc.stderr:
    problems.append('traceback')
  if len(errors) != 1:
    problems.append(f'{len(errors)} error lines')
    return problems
  line, after = lines[errors[0]], lines[errors[0] + 1 :]
  if after and not (len(after) == 1 and after[0].startswith('Usage:')):
    problems.append(f'more lines after the error line: {after[:3]}')
  if case.problem not in line:
    problems.append(f'problem {case.problem!r} not named')
  if case.fix not in ' '.join([line, *after]):
    problems.append(f'fix {case.fix!r} not given')
  return problems


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input_one_line_exit_2_workdir_untouched(name, tmp_path, monkeypatch):
  case = CASES[name]
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  args = case.make(inputs)
  if case.unreadable:
    _deny(inputs / case.unreadable, os.R_OK, monkeypatch)
  workdir = _prepare_workdir(case.workdir, tmp_path, monkeypatch)
  if case.free_bytes:
    site = tmp_path / 'fake_disk'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(_FAKE_FREE)
    monkeypatch.setenv('PYTHONPATH', str(site))
    monkeypatch.setenv('FAKE_FREE_BYTES', str(case.free_bytes))
  before = _snapshot(workdir)
  workdir_flag = [] if case.workdir == 'none' else [f'--workdir={workdir}']
  config = [] if any(a.startswith('--config=') for a in args) else [SMOKE]
  try:
    proc = run_cli(*config, *workdir_flag, *args, timeout=120)
  finally:
    if os.geteuid() != 0:  # let pytest clean up
      for path in (workdir, inputs / case.unreadable):
        if path.exists():
          os.chmod(path, 0o755)
  problems = _error_problems(proc, case)
  after = _snapshot(workdir)
  if case.workdir == 'new':
    if after not in ({}, {'.': (True, 0, 0)}):
      problems.append(f'the new workdir holds {sorted(after)}')
  elif after != before:
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    problems.append(f'the workdir changed: {changed}')
  assert not problems, f'{name}: {problems}\nstderr tail: {proc.stderr[-1500:]}'


def test_catalogue_size():
  assert len(CASES) >= 24


# --- Accepted inputs: odd but valid, they must get past opening ------------------------------------


def _segment_without_checkpoint(path: str, workdir: pathlib.Path):
  """--mode=segment on a fresh workdir: opening succeeds, then the missing checkpoint is the error."""
  proc = run_cli(SMOKE, f'--workdir={workdir}', '--mode=segment', *_path(path), timeout=120)
  lines = proc.stderr.strip().splitlines()
  error = [line for line in lines if line.startswith('error:')]
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-1500:]
  assert len(error) == 1 and 'no checkpoint' in error[0], proc.stderr[-1500:]
  assert os.path.basename(path) not in error[0]


def test_path_with_spaces_and_unicode_opens(tmp_path):
  folder = tmp_path / 'my scans ü 東京'
  folder.mkdir()
  _segment_without_checkpoint(_npy(folder, _image(), 'lung ñ 1.npy'), folder / 'run é 1')
  _segment_without_checkpoint(str(_zarr(folder, _image(), 'lung ñ 2.zarr')), folder / 'run é 2')


def test_zarr_with_missing_chunks_reads_the_fill_value(tmp_path):
  path = _zarr(tmp_path, _image())
  chunks = sorted(p for p in path.iterdir() if not p.name.startswith('.'))
  assert len(chunks) == 27
  chunks[0].unlink()  # a writer that skips chunks holding only the fill value leaves this
  _segment_without_checkpoint(str(path), tmp_path / 'work')


def test_int32_labels_with_300_classes_are_scored(tmp_path):
  rng = np.random.default_rng(1)
  image = _npy(tmp_path, _image())
  labels = np.zeros(SHAPE, np.int32)
  labels[10:20] = rng.integers(1, 301, (10, *SHAPE[1:]))  # 44 and 300 collide in uint8
  labels[10, 0, :2] = (44, 300)
  seg = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 4).astype(np.uint8)
  workdir = tmp_path / 'work'
  workdir.mkdir()
  seg_path = str(workdir / 'segmentation.zarr')
  store = ts.open(
    {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': seg_path}},
    create=True,
    dtype=ts.uint8,
    shape=SHAPE,
  ).result()
  store.write(seg).result()
  proc = run_cli(
    SMOKE,
    f'--workdir={workdir}',
    '--mode=evaluate',
    *_path(image),
    f'--config.data.labels={_npy(tmp_path, labels, "labels.npy")}',
    timeout=180,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((workdir / 'report.json').read_text())
  mask = labels > 0
  expected = normalized_mutual_info_score(labels[mask], seg[mask], average_method='geometric')
  assert report['nmi']['jule3d'] == pytest.approx(expected, rel=1e-9)
  classes = [row['class'] for row in report['dice']['jule3d']]
  assert sorted(classes) == sorted(np.unique(labels[mask]).tolist())
  assert max(classes) == 300
  assert os.path.getsize(workdir / 'figures' / 'slices.png') > 0
