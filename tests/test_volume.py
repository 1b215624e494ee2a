"""Opening, converting and writing volumes (method §1): each format against numpy, nibabel, tifffile."""

import gzip
import json
import locale
import os

import nibabel as nib
import numpy as np
import pytest
import tensorstore as ts
import tifffile

from jule3d import files, volume
from jule3d.errors import UserError

SHAPE = (20, 17, 13)  # odd sizes, not multiples of the test chunk
CHUNK = 8  # several slabs per axis, so the slab/stream paths run more than once
AFFINE = np.array(
  [[0.0, -0.5, 0.0, 10.0], [0.7, 0.0, 0.0, -3.0], [0.0, 0.0, 1.25, 5.0], [0, 0, 0, 1]]
)


def _array(dtype=np.int16, seed=0, shape=SHAPE):
  rng = np.random.default_rng(seed)
  if np.dtype(dtype).kind == 'f':
    return rng.normal(-300, 900, size=shape).astype(dtype)
  return rng.integers(-1024, 3000, size=shape).astype(dtype)  # CT-like, negative HU included


def _open(path, tmp_path, **kw):
  kw.setdefault('chunk', CHUNK)
  return volume.open_volume(str(path), cache_dir=str(tmp_path / 'cache'), **kw)


def _all(vol):
  return vol.read((0, 0, 0), vol.shape)


def _leftovers(folder):
  return [n for n in os.listdir(folder) if '.tmp-' in n]


def _warnings(monkeypatch):
  said = []
  monkeypatch.setattr(
    volume.geometry.logging, 'warning', lambda msg, *args: said.append(msg % args)
  )
  return said


# --- Formats: voxels and spacing round-trip -------------------------------------------------------


def _write_zarr(path, a, attrs):
  store = ts.open(
    {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': str(path)}},
    create=True,
    dtype=ts.dtype(a.dtype.name),
    shape=a.shape,
    chunk_layout=ts.ChunkLayout(chunk_shape=[7, 8, 9, 1][: a.ndim]),
  ).result()
  store.write(a).result()
  (path / '.zattrs').write_text(json.dumps(attrs))


def _zarr2(tmp_path, a, sp):
  _write_zarr(tmp_path / 'v.zarr', a, {'spacing': sp})
  return tmp_path / 'v.zarr', None


def _zarr3(tmp_path, a, sp):
  path = tmp_path / 'v3.zarr'
  meta = {'shape': list(a.shape), 'data_type': a.dtype.name, 'attributes': {'spacing': sp}}
  kv = {'driver': 'file', 'path': str(path)}
  store = ts.open({'driver': 'zarr3', 'kvstore': kv, 'metadata': meta}, create=True).result()
  store.write(a).result()
  return path, None


def _n5(tmp_path, a, sp, key='resolution'):
  path = tmp_path / 'v.n5'
  meta = {'dimensions': list(a.shape), 'blockSize': [8, 8, 8], 'dataType': a.dtype.name}
  kv = {'driver': 'file', 'path': str(path)}
  ts.open({'driver': 'n5', 'kvstore': kv, 'metadata': meta}, create=True).result().write(a).result()
  attrs = json.loads((path / 'attributes.json').read_text())
  attrs[key] = sp if key == 'resolution' else {'dimensions': sp, 'unit': 'um'}
  (path / 'attributes.json').write_text(json.dumps(attrs))
  return path, None


def _n5_pixel_resolution(tmp_path, a, sp):
  return _n5(tmp_path, a, sp, key='pixelResolution')


def _json_file(tmp_path, a, sp):
  zarr, _ = _zarr2(tmp_path, a, sp)
  spec = tmp_path / 'spec.json'
  spec.write_text(json.dumps({'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': str(zarr)}}))
  return spec, None


def _json_inline_translated(tmp_path, a, sp):
  zarr, _ = _zarr2(tmp_path, a, sp)
  lo, hi = [10, 0, 0], [10 + a.shape[0], *a.shape[1:]]  # a domain that does not start at 0
  out = [{'input_dimension': 0, 'offset': -10}, {'input_dimension': 1}, {'input_dimension': 2}]
  transform = {'input_inclusive_min': lo, 'input_exclusive_max': hi, 'output': out}
  kv = {'driver': 'file', 'path': str(zarr)}
  return json.dumps({'driver': 'zarr', 'kvstore': kv, 'transform': transform}), None


def _nifti(tmp_path, a, sp, suffix='.nii.gz'):
  affine = AFFINE.copy()
  affine[:3, :3] *= np.asarray(sp) / np.linalg.norm(affine[:3, :3], axis=0)
  path = tmp_path / f'v{suffix}'
  nib.save(nib.Nifti1Image(a, affine), str(path))
  return path, affine


def _nifti_plain(tmp_path, a, sp):
  return _nifti(tmp_path, a, sp, suffix='.nii')


def _tif_imagej(tmp_path, a, sp):
  path = tmp_path / 'v.tif'
  meta = {'spacing': sp[0], 'unit': 'um', 'axes': 'ZYX'}
  tifffile.imwrite(path, a, imagej=True, resolution=(1 / sp[2], 1 / sp[1]), metadata=meta)
  return path, None


def _tif_compressed(tmp_path, a, sp):  # page by page
  tifffile.imwrite(tmp_path / 'v.tiff', a, compression='zlib')
  return tmp_path / 'v.tiff', None


def _tif_one_volumetric_page(tmp_path, a, sp):  # no per-plane pages: loaded whole
  tifffile.imwrite(tmp_path / 'v.tif', a, volumetric=True, tile=(16, 16, 16), compression='zlib')
  return tmp_path / 'v.tif', None


def _tif_folder(tmp_path, a, sp):
  folder = tmp_path / 'slices'
  folder.mkdir()
  for z in range(a.shape[0]):  # slice_2 must come before slice_10: natural, not text order
    tifffile.imwrite(folder / f'slice_{z + 1}.tif', a[z])
  (folder / 'notes.txt').write_text('not a slice')
  (folder / '._slice_3.tif').write_bytes(b'macOS resource fork, not a TIFF')
  return folder, None


def _npy(tmp_path, a, sp):
  np.save(tmp_path / 'v.npy', a)
  return tmp_path / 'v.npy', None


def _npy_fortran_4d(tmp_path, a, sp):  # Fortran order, and a trailing axis of size 1 squeezed
  np.save(tmp_path / 'v.npy', np.asfortranarray(a[..., None]))
  return tmp_path / 'v.npy', None


FORMATS = {
  'zarr2': (_zarr2, True),
  'zarr3': (_zarr3, True),
  'n5': (_n5, True),
  'n5_pixelResolution': (_n5_pixel_resolution, True),
  'json_file': (_json_file, True),
  'json_inline': (_json_inline_translated, True),
  'nii_gz': (_nifti, True),
  'nii': (_nifti_plain, True),
  'tif_imagej': (_tif_imagej, True),
  'tif_zlib': (_tif_compressed, False),
  'tif_volumetric': (_tif_one_volumetric_page, False),
  'tif_folder': (_tif_folder, False),
  'npy': (_npy, False),
  'npy_fortran_4d': (_npy_fortran_4d, False),
}


@pytest.mark.parametrize('dtype', [np.int16, np.float32])
@pytest.mark.parametrize('fmt', list(FORMATS))
def test_format_round_trips_voxels_and_spacing(tmp_path, fmt, dtype):
  a = _array(dtype, seed=len(fmt))
  make, has_spacing = FORMATS[fmt]
  sp = [0.5, 0.25, 2.0]  # anisotropic
  path, affine = make(tmp_path, a, sp)
  vol = _open(path, tmp_path, name='data.path')
  assert vol.shape == a.shape and vol.dtype == a.dtype
  np.testing.assert_array_equal(_all(vol), a)
  assert vol.store.domain.inclusive_min == (0, 0, 0)
  np.testing.assert_allclose(vol.spacing, sp if has_spacing else (1.0, 1.0, 1.0), rtol=1e-6)
  if affine is None:
    assert vol.affine is None
  else:
    np.testing.assert_allclose(vol.affine, affine, rtol=1e-6, atol=1e-6)
  in_place = fmt.startswith(('zarr', 'n5', 'json'))
  cache = tmp_path / 'cache'
  assert (not cache.exists() or not os.listdir(cache)) if in_place else len(os.listdir(cache)) == 1
  assert vol.path == str(path)


def test_bool_becomes_uint8_and_4d_zarr_is_squeezed(tmp_path):
  a = _array(np.int16) > 500
  np.save(tmp_path / 'm.npy', a)
  vol = _open(tmp_path / 'm.npy', tmp_path)
  assert vol.dtype == np.uint8
  np.testing.assert_array_equal(_all(vol), a.astype(np.uint8))
  _write_zarr(tmp_path / 'm.zarr', a[..., None], {'spacing': [1, 2, 3, 9]})
  vol = _open(tmp_path / 'm.zarr', tmp_path)
  assert vol.dtype == np.uint8 and vol.shape == SHAPE and vol.spacing == (1, 2, 3)
  np.testing.assert_array_equal(_all(vol), a.astype(np.uint8))


def test_nifti_scaling_and_big_endian_follow_nibabel(tmp_path):
  a = _array(np.int16).astype('>i2')
  img = nib.Nifti1Image(a, np.eye(4))
  img.header.set_slope_inter(0.5, -7.0)
  nib.save(img, str(tmp_path / 's.nii'))
  expected = np.asanyarray(nib.load(str(tmp_path / 's.nii')).dataobj)
  vol = _open(tmp_path / 's.nii', tmp_path)
  assert vol.dtype == expected.dtype
  np.testing.assert_array_equal(_all(vol), expected)


def test_spacing_override_replaces_the_files_and_keeps_direction_and_origin(tmp_path, monkeypatch):
  a = _array()
  path, affine = _nifti(tmp_path, a, [0.5, 0.25, 2.0])
  said = _warnings(monkeypatch)
  vol = _open(path, tmp_path, spacing=(3.0, 3.0, 1.5), spacing_override=True, name='data.path')
  assert vol.spacing == (3.0, 3.0, 1.5) and vol.geometry == 'override'
  assert any('(3, 3, 1.5)' in w and '(0.5, 0.25, 2)' in w for w in said), said
  np.testing.assert_allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), [3.0, 3.0, 1.5])
  directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
  np.testing.assert_allclose(vol.affine[:3, :3] / [3.0, 3.0, 1.5], directions, atol=1e-6)
  np.testing.assert_allclose(vol.affine[:3, 3], affine[:3, 3])


# --- Cache ----------------------------------------------------------------------------------------


def test_conversion_is_cached_and_redone_when_the_source_changes(tmp_path, monkeypatch):
  calls = []
  convert = volume.convert._convert
  monkeypatch.setattr(
    volume.convert, '_convert', lambda *a, **k: calls.append(1) or convert(*a, **k)
  )
  path = tmp_path / 'v.npy'
  a, b = _array(seed=1), _array(seed=2)
  np.save(path, a)
  first = _open(path, tmp_path)
  [entry] = os.listdir(tmp_path / 'cache')
  mtime = os.stat(tmp_path / 'cache' / entry).st_mtime_ns
  again = _open(path, tmp_path)
  assert len(calls) == 1 and os.listdir(tmp_path / 'cache') == [entry]
  assert os.stat(tmp_path / 'cache' / entry).st_mtime_ns == mtime
  np.testing.assert_array_equal(_all(again), a)
  np.save(path, b)  # same size: only the content and mtime change
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  changed = _open(path, tmp_path)
  assert len(calls) == 2 and len(os.listdir(tmp_path / 'cache')) == 2
  np.testing.assert_array_equal(_all(changed), b)
  np.testing.assert_array_equal(_all(first), a)  # the old copy is left to its readers
  _open(path, tmp_path, chunk=4)  # another chunk size is another copy
  assert len(calls) == 3


def test_default_cache_dir_is_reused(tmp_path, monkeypatch):
  monkeypatch.setattr(volume.convert.tempfile, 'gettempdir', lambda: str(tmp_path))
  np.save(tmp_path / 'v.npy', _array())
  vol = volume.open_volume(str(tmp_path / 'v.npy'))
  [cache] = [p for p in tmp_path.iterdir() if p.name.startswith('jule3d-cache')]
  assert len(os.listdir(cache)) == 1
  assert (
    volume.open_volume(str(tmp_path / 'v.npy')).store.spec().to_json()['kvstore']
    == (vol.store.spec().to_json()['kvstore'])
  )


# --- Reading --------------------------------------------------------------------------------------


@pytest.mark.parametrize('depth', [1, 6, 20, 64])
def test_slabs_and_read_equal_numpy_slicing(tmp_path, depth):
  a = _array(np.float32)
  np.save(tmp_path / 'v.npy', a)
  vol = _open(tmp_path / 'v.npy', tmp_path)
  starts = []
  for z0, slab in vol.slabs(depth):
    starts.append(z0)
    np.testing.assert_array_equal(slab, a[z0 : z0 + depth])
  assert starts == list(range(0, SHAPE[0], depth))
  np.testing.assert_array_equal(vol.read((3, 0, 5), (19, 17, 6)), a[3:19, :, 5:6])
  assert vol.read((4, 4, 4), (4, 9, 9)).shape == (0, 5, 5)
  with pytest.raises(IndexError):
    vol.read((0, 0, 0), (21, 17, 13))


# --- Bad input ------------------------------------------------------------------------------------


def _raises(path, tmp_path, *words, **kw):
  with pytest.raises(UserError) as info:
    _open(path, tmp_path, name='data.path', **kw)
  message = str(info.value)
  assert '\n' not in message and 'config.data.path' in message
  assert str(path)[:100] in message, message
  for w in words:
    assert w in message, message
  cache = tmp_path / 'cache'
  assert not cache.exists() or not os.listdir(cache)  # nothing left behind
  return message


def test_missing_path(tmp_path):
  _raises(tmp_path / 'nope.nii.gz', tmp_path, 'no such file')


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
  (tmp_path / 'v.png').write_bytes(b'\x89PNG')
  _raises(tmp_path / 'v.png', tmp_path, "'.png'", '.nii.gz', '.npy', '.tif', 'zarr', 'N5')


@pytest.mark.parametrize('name', ['v.npy', 'v.tif', 'v.nii', 'v.nii.gz'])
def test_garbage_bytes(tmp_path, name):
  (tmp_path / name).write_bytes(b'this is not an image at all ' * 20)
  _raises(tmp_path / name, tmp_path, 'not a readable')


def test_truncated_nii_gz_fails_during_conversion_and_leaves_nothing(tmp_path):
  path, _ = _nifti(tmp_path, _array(seed=3), [1, 1, 1])
  data = gzip.decompress(path.read_bytes())
  path.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2])
  (tmp_path / 'cache').mkdir()
  (tmp_path / 'cache' / 'other.zarr').mkdir()  # what was there before survives
  with pytest.raises(UserError, match='damaged or truncated') as info:
    _open(path, tmp_path, name='data.path')
  assert str(path) in str(info.value)
  assert os.listdir(tmp_path / 'cache') == ['other.zarr']
  os.rmdir(tmp_path / 'cache' / 'other.zarr')
  os.rmdir(tmp_path / 'cache')
  _raises(path, tmp_path, 'truncated')
  assert not (tmp_path / 'cache').exists()  # a cache folder it created is removed again


@pytest.mark.parametrize('suffix', ['.nii', '.npy', '.tif'])
def test_truncated_uncompressed_files(tmp_path, suffix):
  a = _array()
  path = tmp_path / f'v{suffix}'
  if suffix == '.nii':
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(path))
  elif suffix == '.npy':
    np.save(path, a)
  else:
    tifffile.imwrite(path, a)
  path.write_bytes(path.read_bytes()[: a.nbytes // 2])  # cuts into the voxels, not just a trailer
  _raises(path, tmp_path)


@pytest.mark.parametrize('shape', [(20, 17), (20, 17, 13, 2), (4, 20, 17, 13)])
def test_not_3d(tmp_path, shape):
  np.save(tmp_path / 'v.npy', np.zeros(shape, np.int16))
  _raises(tmp_path / 'v.npy', tmp_path, f'{len(shape)}D', str(shape))


def test_2d_and_colour_tiffs(tmp_path):
  tifffile.imwrite(tmp_path / 'flat.tif', np.zeros((17, 13), np.uint16))
  _raises(tmp_path / 'flat.tif', tmp_path, '2D', 'folder')
  tifffile.imwrite(tmp_path / 'rgb.tif', np.zeros((5, 17, 13, 3), np.uint8), photometric='rgb')
  _raises(tmp_path / 'rgb.tif', tmp_path, 'colour')


def test_tiff_folder_with_mismatched_slices_names_the_slice(tmp_path):
  folder = tmp_path / 'slices'
  folder.mkdir()
  for z in range(4):
    tifffile.imwrite(folder / f's{z}.tif', np.zeros((17, 13 if z != 2 else 12), np.uint16))
  _raises(folder, tmp_path, "'s2.tif'", '17x12', "'s0.tif'", '17x13')


def test_folder_without_tiffs_or_metadata(tmp_path):
  folder = tmp_path / 'empty'
  folder.mkdir()
  (folder / 'readme.txt').write_text('x')
  _raises(folder, tmp_path, '.tif', 'zarr', 'DICOM')


def test_zarr_group_is_not_a_volume(tmp_path):
  group = tmp_path / 'g.zarr'
  group.mkdir()
  (group / 'zarr.json').write_text(json.dumps({'zarr_format': 3, 'node_type': 'group'}))
  _raises(group, tmp_path, 'group', 'array')


@pytest.mark.parametrize('attr', [[1.0, 2.0], [1.0, 0.0, 1.0], 'fine'])
def test_bad_spacing_attribute(tmp_path, attr):
  _write_zarr(tmp_path / 'v.zarr', _array(), {'spacing': attr})
  _raises(tmp_path / 'v.zarr', tmp_path, "attribute 'spacing'", '3 positive numbers')
  vol = _open(tmp_path / 'v.zarr', tmp_path, spacing=(1, 2, 3))  # a given spacing fills it in
  assert vol.spacing == (1, 2, 3) and vol.geometry == 'config'


@pytest.mark.parametrize('spec', ['{"driver": "zarr", ', '{"driver": "no-such-driver"}'])
def test_bad_inline_spec(tmp_path, spec):
  _raises(spec, tmp_path)


@pytest.mark.parametrize('spacing', [(1.0, 2.0), (1.0, -2.0, 1.0), (1.0, float('nan'), 1.0)])
def test_bad_spacing_override(tmp_path, spacing):
  np.save(tmp_path / 'v.npy', _array())
  _raises(tmp_path / 'v.npy', tmp_path, 'spacing', '3 positive numbers', spacing=spacing)


def test_unreadable_file(tmp_path, monkeypatch):
  path = tmp_path / 'v.npy'
  np.save(path, _array())
  if os.geteuid() != 0:  # root reads anything: there, pretend the permission bits say no
    os.chmod(path, 0)
  else:
    real = os.access
    monkeypatch.setattr(os, 'access', lambda p, m: False if str(p) == str(path) else real(p, m))
  _raises(path, tmp_path, 'permission')


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_validate_volume_names_the_first_non_finite_slab(tmp_path, bad):
  a = _array(np.float32)
  a[15, 3, 4] = bad
  a[18, 0, 0] = bad
  np.save(tmp_path / 'v.npy', a)
  vol = _open(tmp_path / 'v.npy', tmp_path)
  monkey_depth = 4  # several slabs even for this tiny volume
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(volume.integrity, '_SLAB_BYTES', monkey_depth * 4 * SHAPE[1] * SHAPE[2] * 4)
    with pytest.raises(UserError) as info:
      volume.validate_volume(vol)
  message = str(info.value)
  assert str(vol.path) in message and '(15, 3, 4)' in message and 'planes 12..15' in message
  a[15, 3, 4] = a[18, 0, 0] = 0
  np.save(tmp_path / 'ok.npy', a)
  volume.validate_volume(_open(tmp_path / 'ok.npy', tmp_path))


# --- Writers --------------------------------------------------------------------------------------


def test_save_zarr_round_trips_atomically_and_replaces(tmp_path):
  a, b = _array(np.float32), _array(np.int16, seed=5)
  out = tmp_path / 'out.zarr'
  affine = AFFINE.copy()
  affine[:3, :3] *= np.asarray([0.5, 0.25, 2.0]) / np.linalg.norm(AFFINE[:3, :3], axis=0)
  volume.save_zarr(str(out), a, spacing=(0.5, 0.25, 2.0), affine=affine, chunk=CHUNK)
  vol = volume.open_volume(str(out))
  np.testing.assert_array_equal(_all(vol), a)
  np.testing.assert_allclose(vol.spacing, (0.5, 0.25, 2.0), rtol=1e-12)
  assert vol.store.chunk_layout.read_chunk.shape == (8, 8, 8) and vol.geometry == 'file'
  np.testing.assert_array_equal(vol.affine, affine)
  volume.save_zarr(str(out), b, spacing=(1, 1, 1))
  vol = volume.open_volume(str(out))
  np.testing.assert_array_equal(_all(vol), b)
  assert vol.affine is None and vol.dtype == np.int16
  assert os.listdir(tmp_path) == ['out.zarr']


def test_streamed_zarr_writer_commits_or_leaves_nothing(tmp_path):
  a = _array(np.int16)
  final = tmp_path / 'labels.zarr'
  tmp = files.temp_path(str(final))
  store = volume.create_zarr(tmp, SHAPE, np.int16, (1.0, 2.0, 3.0), chunk=CHUNK)
  for z0 in range(0, SHAPE[0], 6):
    z1 = min(z0 + 6, SHAPE[0])
    store[z0:z1] = a[z0:z1]
  assert not final.exists()
  volume.commit_zarr(tmp, str(final))
  np.testing.assert_array_equal(_all(volume.open_volume(str(final))), a)
  with pytest.raises(RuntimeError), volume.zarr_writer(str(final), SHAPE, bool, (1, 1, 1)) as s:
    s[0:5] = np.ones((5, *SHAPE[1:]), bool)
    raise RuntimeError('job killed half-way')
  np.testing.assert_array_equal(_all(volume.open_volume(str(final))), a)  # old output intact
  with volume.zarr_writer(str(final), SHAPE, bool, (1, 1, 1)) as s:
    s[...] = np.ones(SHAPE, np.uint8)
  vol = volume.open_volume(str(final))
  assert vol.dtype == np.uint8 and _all(vol).min() == 1
  assert os.listdir(tmp_path) == ['labels.zarr']


@pytest.mark.parametrize('source', ['array', 'volume'])
@pytest.mark.parametrize('suffix', ['.nii.gz', '.nii'])
def test_write_nifti_round_trips_through_nibabel(tmp_path, source, suffix):
  a = _array(np.int16)
  sp = (0.5, 0.25, 2.0)
  affine = AFFINE.copy()
  affine[:3, :3] *= np.asarray(sp) / np.linalg.norm(affine[:3, :3], axis=0)
  data = a
  if source == 'volume':
    np.save(tmp_path / 'v.npy', a)
    data = _open(tmp_path / 'v.npy', tmp_path)
  out = tmp_path / f'out{suffix}'
  out.write_bytes(b'an older output')
  volume.write_nifti(str(out), data, sp, affine)
  img = nib.load(str(out))
  np.testing.assert_array_equal(np.asanyarray(img.dataobj), a)
  np.testing.assert_allclose(img.header.get_zooms(), sp)
  np.testing.assert_allclose(img.affine, affine, atol=1e-6)
  np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)
  assert img.header['qform_code'] > 0 and img.header['sform_code'] > 0
  assert not _leftovers(tmp_path)
  volume.write_nifti(str(out), a > 0, sp)  # no affine: diag(spacing); bool stored as uint8
  img = nib.load(str(out))
  np.testing.assert_array_equal(np.asanyarray(img.dataobj), (a > 0).astype(np.uint8))
  np.testing.assert_allclose(img.affine, np.diag([*sp, 1.0]))
  vol = _open(out, tmp_path / 'again')  # and our own reader agrees
  np.testing.assert_array_equal(_all(vol), (a > 0).astype(np.uint8))


@pytest.mark.parametrize('dtype', [np.complex64, object])
def test_non_numeric_voxels(tmp_path, dtype):
  np.save(tmp_path / 'v.npy', np.zeros(SHAPE, dtype), allow_pickle=True)
  _raises(tmp_path / 'v.npy', tmp_path, 'type', 'expected integers, floats or booleans')


def test_write_nifti_failing_half_way_leaves_the_old_file(tmp_path):
  volume.save_zarr(str(tmp_path / 'v.zarr'), _array(), (1, 1, 1), chunk=CHUNK)
  (tmp_path / 'v.zarr' / '1.1.1').write_bytes(b'a damaged chunk')
  vol = volume.open_volume(str(tmp_path / 'v.zarr'))
  out = tmp_path / 'out.nii.gz'
  out.write_bytes(b'an older output')
  with pytest.raises(ValueError):
    volume.write_nifti(str(out), vol, (1, 1, 1))
  assert out.read_bytes() == b'an older output' and not _leftovers(tmp_path)


# --- Geometry: the file's is the truth ------------------------------------------------------------

LPS = np.diag([-1.0, -1.0, 1.0])  # ITK's LPS world <-> NIfTI's RAS world


def _rotation(degrees, axis):
  k = np.asarray(axis, np.float64) / np.linalg.norm(axis)
  cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
  t = np.deg2rad(degrees)
  return np.eye(3) + np.sin(t) * cross + (1 - np.cos(t)) * cross @ cross  # Rodrigues


SCAN_SPACING = (0.57, 0.57, 5.0)
SCAN = np.eye(4)  # a clinical CT's geometry: oblique, shifted, thick slices
SCAN[:3, :3] = _rotation(30, (1, 2, 3)) @ np.diag(SCAN_SPACING)
SCAN[:3, 3] = (-12.5, 7.25, 3.0)


def _scan_nifti(tmp_path, a=None, name='scan.nii.gz'):
  a = _array(np.int16, seed=7) if a is None else a
  nib.save(nib.Nifti1Image(a, SCAN), str(tmp_path / name))
  return tmp_path / name, a, nib.load(str(tmp_path / name)).affine


def test_nifti_affine_and_spacing_are_the_files_exactly(tmp_path):
  path, a, affine = _scan_nifti(tmp_path)
  vol = _open(path, tmp_path)
  np.testing.assert_allclose(vol.affine, affine, rtol=0, atol=1e-6)
  np.testing.assert_allclose(vol.affine, SCAN, rtol=0, atol=1e-5)  # as written (float32 header)
  np.testing.assert_allclose(vol.spacing, np.linalg.norm(affine[:3, :3], axis=0), rtol=1e-12)
  assert vol.geometry == 'file' and vol.dtype == np.int16 and _all(vol).min() < 0
  np.testing.assert_array_equal(_all(vol), a)


@pytest.mark.parametrize('source', ['array', 'volume'])
def test_write_nifti_writes_the_affine_exactly(tmp_path, source):
  path, a, affine = _scan_nifti(tmp_path)
  vol = _open(path, tmp_path)
  out = tmp_path / 'seg.nii.gz'
  volume.write_nifti(str(out), a if source == 'array' else vol, vol.spacing, vol.affine)
  img = nib.load(str(out))
  np.testing.assert_allclose(img.affine, affine, rtol=0, atol=1e-6)
  np.testing.assert_allclose(img.get_qform(), affine, rtol=0, atol=1e-5)
  np.testing.assert_allclose(img.header.get_zooms(), vol.spacing, rtol=1e-6)
  np.testing.assert_array_equal(np.asanyarray(img.dataobj), a)
  np.testing.assert_allclose(_open(out, tmp_path / 'again').affine, affine, rtol=0, atol=1e-6)


@pytest.mark.parametrize('writer', ['save_zarr', 'zarr_writer'])
def test_zarr_outputs_round_trip_the_affine(tmp_path, writer):
  path, a, affine = _scan_nifti(tmp_path)
  vol = _open(path, tmp_path)
  out = tmp_path / 'seg.zarr'
  if writer == 'save_zarr':
    volume.save_zarr(str(out), a, vol.spacing, vol.affine, chunk=CHUNK)
  else:
    with volume.zarr_writer(str(out), a.shape, a.dtype, vol.spacing, vol.affine, CHUNK) as store:
      store.write(a).result()
  again = volume.open_volume(str(out))
  np.testing.assert_allclose(again.affine, affine, rtol=0, atol=1e-6)
  np.testing.assert_allclose(again.spacing, vol.spacing, rtol=1e-12)
  assert again.geometry == 'file'
  np.testing.assert_array_equal(_all(again), a)


def test_a_config_spacing_that_contradicts_the_file_is_refused_before_converting(tmp_path):
  path, _, _ = _scan_nifti(tmp_path)
  message = _raises(path, tmp_path, spacing=(0.02951,) * 3)  # configs/lung_c.py's old spacing
  assert '(0.02951, 0.02951, 0.02951)' in message and '(0.57, 0.57, 5)' in message, message
  assert 'remove config.data.spacing' in message and 'spacing_override=True' in message
  with pytest.raises(UserError, match=r'0\.02951.*0\.57'):
    _open(path, tmp_path, spacing=(0.02951,) * 3)
  vol = _open(path, tmp_path, spacing=(0.57, 0.57, 5.00001))  # agreeing (within 1e-4): accepted
  assert vol.geometry == 'file' and vol.spacing == tuple(np.linalg.norm(vol.affine[:3, :3], axis=0))


def test_spacing_override_keeps_direction_and_origin_of_an_oblique_scan(tmp_path):
  path, _, affine = _scan_nifti(tmp_path)
  vol = _open(path, tmp_path, spacing=(0.5, 0.5, 2.5), spacing_override=True)
  assert vol.spacing == (0.5, 0.5, 2.5) and vol.geometry == 'override'
  np.testing.assert_allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), (0.5, 0.5, 2.5))
  directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
  np.testing.assert_allclose(vol.affine[:3, :3] / (0.5, 0.5, 2.5), directions, atol=1e-12)
  np.testing.assert_array_equal(vol.affine[:3, 3], affine[:3, 3])
  _raises(path, tmp_path / 'x', 'spacing_override', 'config.data.spacing', spacing_override=True)


def test_expected_spacing_applies_only_to_an_input_without_spacing(tmp_path, monkeypatch):
  said = _warnings(monkeypatch)
  np.save(tmp_path / 'v.npy', _array())
  vol = _open(tmp_path / 'v.npy', tmp_path, expected_spacing=(0.03,) * 3, name='data.path')
  assert vol.spacing == (0.03,) * 3 and vol.geometry == 'expected' and vol.affine is None
  assert not said
  path, _, affine = _scan_nifti(tmp_path)
  vol = _open(path, tmp_path, expected_spacing=(0.03,) * 3, name='data.path')
  assert vol.geometry == 'file' and vol.spacing == tuple(np.linalg.norm(affine[:3, :3], axis=0))
  np.testing.assert_array_equal(vol.affine, affine)
  [warning] = said
  assert '(0.57, 0.57, 5)' in warning and '(0.03, 0.03, 0.03)' in warning, warning
  vol = _open(tmp_path / 'v.npy', tmp_path, spacing=(1, 2, 3), expected_spacing=(0.03,) * 3)
  assert vol.spacing == (1, 2, 3) and vol.geometry == 'config'  # data.spacing wins over expected


def test_npy_takes_the_config_spacing_or_warns_it_has_none(tmp_path, monkeypatch):
  said = _warnings(monkeypatch)
  np.save(tmp_path / 'v.npy', _array())
  vol = _open(tmp_path / 'v.npy', tmp_path, spacing=(0.5, 0.5, 2.0), name='data.path')
  assert vol.spacing == (0.5, 0.5, 2.0) and vol.geometry == 'config' and not said
  vol = _open(tmp_path / 'v.npy', tmp_path, name='data.path')
  assert vol.spacing == (1.0, 1.0, 1.0) and vol.geometry == 'default'
  [warning] = said
  assert 'config.data.spacing' in warning and 'no voxel spacing' in warning


def test_labels_on_another_grid_are_refused(tmp_path):
  path, a, _ = _scan_nifti(tmp_path)
  image = _open(path, tmp_path)
  same, _, _ = _scan_nifti(tmp_path, (a > 0).astype(np.uint8), 'labels.nii.gz')  # Slicer-like
  volume.check_same_grid(image, _open(same, tmp_path))
  np.save(tmp_path / 'labels.npy', (a > 0).astype(np.uint8))  # no geometry at all: accepted
  volume.check_same_grid(image, _open(tmp_path / 'labels.npy', tmp_path))
  shifted = SCAN.copy()
  shifted[:3, 3] += (4.0, 0, 0)
  nib.save(nib.Nifti1Image((a > 0).astype(np.uint8), shifted), str(tmp_path / 'moved.nii.gz'))
  moved = _open(tmp_path / 'moved.nii.gz', tmp_path)
  assert not volume.same_grid(image, moved)
  with pytest.raises(UserError) as info:
    volume.check_same_grid(image, moved)
  message = str(info.value)
  assert '\n' not in message and 'config.data.labels' in message and 'moved.nii.gz' in message
  for origin in ('(-12.5, 7.25, 3)', '(-8.5, 7.25, 3)'):
    assert origin in message, message
  assert message.count('(0.57, 0.57, 5)') == 2, message


# --- ITK formats: NRRD, MetaImage, DICOM ----------------------------------------------------------


def _erase_metadata(image):
  for key in image.GetMetaDataKeys():  # NIfTI header fields MetaImage cannot store: no warnings
    image.EraseMetaData(key)
  return image


def test_itk_convention_equals_itks_own_nifti_reading(tmp_path):
  import SimpleITK as sitk

  path, a, affine = _scan_nifti(tmp_path)
  image = _erase_metadata(sitk.ReadImage(str(path)))
  for suffix in ('.nrrd', '.mha'):
    sitk.WriteImage(image, str(tmp_path / f'itk{suffix}'), useCompression=True)
  nifti = _open(path, tmp_path)
  for suffix in ('.nrrd', '.mha'):
    vol = _open(tmp_path / f'itk{suffix}', tmp_path)
    assert vol.shape == a.shape and vol.dtype == nifti.dtype == np.int16
    np.testing.assert_array_equal(_all(vol), _all(nifti))
    np.testing.assert_allclose(vol.affine, nifti.affine, rtol=0, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, nifti.spacing, rtol=1e-6)
    assert vol.geometry == 'file'


def _itk_array(dtype):
  a = _array(np.int16 if dtype == np.uint8 else dtype, seed=11)
  return (a % 7).astype(np.uint8) if dtype == np.uint8 else a  # labels 0..6


@pytest.mark.parametrize('dtype', [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize('suffix', ['.nrrd', '.nhdr', '.mha', '.mhd'])
def test_write_itk_round_trips_voxels_dtype_and_geometry(tmp_path, suffix, dtype):
  import SimpleITK as sitk

  a = _itk_array(dtype)
  out = tmp_path / f'seg{suffix}'
  out.write_bytes(b'an older output')
  volume.write_itk(str(out), a, SCAN_SPACING, SCAN)
  names = sorted(os.listdir(tmp_path))
  if suffix in ('.nhdr', '.mhd') and len(names) == 1:
    pytest.skip(f'this SimpleITK writes {suffix} with the voxels inside, not detached')
  assert len(names) == (2 if suffix in ('.nhdr', '.mhd') else 1), names  # no temporary left
  assert np.dtype(sitk.GetArrayViewFromImage(sitk.ReadImage(str(out))).dtype) == dtype
  vol = _open(out, tmp_path / 'c')
  assert vol.shape == a.shape and vol.dtype == dtype and vol.geometry == 'file'
  np.testing.assert_array_equal(_all(vol), a)
  np.testing.assert_allclose(vol.affine, SCAN, rtol=0, atol=1e-9)
  np.testing.assert_allclose(vol.spacing, SCAN_SPACING, rtol=1e-9)
  again = tmp_path / f'again{suffix}'  # a Volume, its own geometry: the same file content
  volume.write_itk(str(again), vol, vol.spacing, vol.affine)
  np.testing.assert_array_equal(_all(_open(again, tmp_path / 'c2')), a)


def test_write_itk_without_affine_and_its_failures(tmp_path, monkeypatch):
  import SimpleITK as sitk

  a = _itk_array(np.uint8) > 3  # bool: written as uint8
  out = tmp_path / 'mask.nrrd'
  volume.write_itk(str(out), a, (0.5, 0.25, 2.0))
  image = sitk.ReadImage(str(out))
  assert image.GetPixelID() == sitk.sitkUInt8 and image.GetSpacing() == (0.5, 0.25, 2.0)
  assert image.GetOrigin() == (0, 0, 0) and image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
  vol = _open(out, tmp_path / 'c')
  np.testing.assert_allclose(vol.affine, np.diag([-0.5, -0.25, 2.0, 1.0]))  # LPS identity in RAS
  np.testing.assert_array_equal(_all(vol), a.astype(np.uint8))
  before = out.read_bytes()
  monkeypatch.setattr(
    sitk, 'WriteImage', lambda *args, **kw: (_ for _ in ()).throw(OSError('full'))
  )
  with pytest.raises(OSError):
    volume.write_itk(str(out), a, (1, 1, 1))
  assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ['c', 'mask.nrrd']
  assert files._TEMPORARY.match(os.path.basename(files.temp_path(str(out))))  # cleaned if killed


def test_detached_data_file_is_stamped_and_must_exist(tmp_path):
  out = tmp_path / 'v.nhdr'
  volume.write_itk(str(out), _array(), SCAN_SPACING, SCAN)
  [data] = [n for n in os.listdir(tmp_path) if n != 'v.nhdr']
  source = volume.convert._SOURCES['nrrd'](str(out), 'v')
  assert source.files == (str(out), str(tmp_path / data))  # an edited data file is converted again
  os.rename(tmp_path / data, tmp_path / 'elsewhere')
  _raises(out, tmp_path, repr(data), 'data file')


def test_itk_bad_inputs(tmp_path):
  import SimpleITK as sitk

  (tmp_path / 'bad.nrrd').write_bytes(b'this is not an image at all ' * 20)
  _raises(tmp_path / 'bad.nrrd', tmp_path, 'not a readable NRRD file')
  (tmp_path / 'bad.mha').write_bytes(b'ObjectType = Image\nNDims = banana\n')
  _raises(tmp_path / 'bad.mha', tmp_path, 'not a readable MetaImage file')
  sitk.WriteImage(sitk.GetImageFromArray(np.zeros((17, 13), np.int16)), str(tmp_path / 'flat.nrrd'))
  _raises(tmp_path / 'flat.nrrd', tmp_path, '2D')
  rgb = sitk.GetImageFromArray(np.zeros((5, 17, 13, 3), np.uint8), isVector=True)
  sitk.WriteImage(rgb, str(tmp_path / 'rgb.mha'))
  _raises(tmp_path / 'rgb.mha', tmp_path, 'colour', '3 components')
  volume.write_itk(str(tmp_path / 'cut.nrrd'), _array(), (1, 1, 1))
  data = (tmp_path / 'cut.nrrd').read_bytes()
  (tmp_path / 'cut.nrrd').write_bytes(data[: len(data) // 2])  # the header parses, the voxels end
  _raises(tmp_path / 'cut.nrrd', tmp_path, 'damaged or truncated')


def _write_dicom_series(folder, a, spacing, rotation, origin, uid, names):
  """One slice file per index of axis 2 (ITK's z), tags as a scanner writes them."""
  saved = locale.setlocale(locale.LC_ALL)
  try:
    _write_dicom_slices(folder, a, spacing, rotation, origin, uid, names)
  finally:  # GDCM's writer leaves the process in the C locale: later text decoding would be ASCII
    locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(folder, a, spacing, rotation, origin, uid, names):
  import SimpleITK as sitk

  folder.mkdir(exist_ok=True)
  image = sitk.GetImageFromArray(a.transpose())
  image.SetSpacing(spacing)
  image.SetDirection(rotation.ravel().tolist())
  image.SetOrigin(origin)
  writer = sitk.ImageFileWriter()
  writer.KeepOriginalImageUIDOn()
  iop = '\\'.join(f'{v:.10f}' for v in (*rotation[:, 0], *rotation[:, 1]))
  for z, name in enumerate(names):
    plane = image[:, :, z]
    ipp = '\\'.join(f'{v:.10f}' for v in image.TransformIndexToPhysicalPoint((0, 0, z)))
    tags = {
      '0008|0060': 'CT',
      '0008|0018': f'{uid}.{z + 1}',  # SOPInstanceUID
      '0020|000d': '1.2.826.0.1.3680043.2.1125.7',  # StudyInstanceUID
      '0020|000e': uid,  # SeriesInstanceUID
      '0020|0013': str(z + 1),
      '0020|0032': ipp,  # ImagePositionPatient
      '0020|0037': iop,  # ImageOrientationPatient
      '0028|0030': f'{spacing[1]}\\{spacing[0]}',  # PixelSpacing: row (y), then column (x)
      '0018|0050': str(spacing[2]),  # SliceThickness
    }
    for key, value in tags.items():
      plane.SetMetaData(key, value)
    writer.SetFileName(str(folder / name))
    writer.Execute(plane)


def test_dicom_series_in_position_order_with_its_geometry(tmp_path):
  import SimpleITK as sitk

  a = _array(np.int16, seed=13, shape=(19, 16, 12))  # (x, y, z): 12 slices
  spacing, origin = (0.57, 0.6, 2.5), (10.0, -20.0, 30.5)
  rotation = _rotation(30, (1, 2, 3))
  # File names that sort differently from the slice positions (text or natural order alike).
  names = [f'IM{n:04d}.dcm' for n in np.random.default_rng(1).permutation(a.shape[2])]
  assert sorted(names) != names
  _write_dicom_series(
    tmp_path / 'ct', a, spacing, rotation, origin, '1.2.826.0.1.3680043.2.1125.1', names
  )
  before = locale.setlocale(locale.LC_ALL)
  vol = _open(tmp_path / 'ct', tmp_path, name='data.path')
  assert locale.setlocale(locale.LC_ALL) == before  # reading leaves the process's locale alone
  assert vol.shape == a.shape and vol.dtype == np.int16 and vol.geometry == 'file'
  np.testing.assert_array_equal(_all(vol), a)
  np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-6)
  expected = np.eye(4)
  expected[:3, :3] = LPS @ rotation @ np.diag(spacing)
  expected[:3, 3] = LPS @ np.asarray(origin)
  np.testing.assert_allclose(vol.affine, expected, rtol=0, atol=1e-6)
  itk = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / 'ct')))
  np.testing.assert_allclose(itk.GetOrigin(), origin, atol=1e-6)  # ITK reads the same geometry
  np.testing.assert_array_equal(sitk.GetArrayFromImage(itk).transpose(), a)
  (tmp_path / 'ct' / names[3]).unlink()  # a missing slice: the stack is not evenly spaced
  _raises(tmp_path / 'ct', tmp_path / 'x', 'unevenly spaced')


def test_dicom_folder_with_two_series_is_refused(tmp_path):
  uids = ('1.2.826.0.1.3680043.2.1125.2', '1.2.826.0.1.3680043.2.1125.3')
  for k, uid in enumerate(uids):  # 4 and 5 slices
    a = _array(np.int16, seed=k, shape=(10, 9, 4 + k))
    names = [f's{k}_{z}.dcm' for z in range(a.shape[2])]
    _write_dicom_series(tmp_path / 'mixed', a, (1, 1, 2), np.eye(3), (0, 0, 0), uid, names)
  _raises(tmp_path / 'mixed', tmp_path, *uids, '(4 files)', '(5 files)', 'one series')
