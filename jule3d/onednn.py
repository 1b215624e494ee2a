"""3D convolution on the CPU through oneDNN (the library PyTorch calls), reached through XLA's FFI.

XLA:CPU hands no 3D convolution to a library: its own conv3d runs at a few GFLOP/s and the im2col
formulation (jule3d/convolution.py) materialises every k^3 window. Here a small C++ extension
(jule3d/csrc/onednn_conv.cc) wraps oneDNN's direct convolution, forward and both gradients, as
three XLA FFI custom calls, and `conv3d` ties them together with `jax.custom_vjp`, so it works
under `jit` and `grad` like any other op.

Build: `make venv` installs oneDNN (the pinned onednn-cpu-gomp / onednn-devel-cpu-gomp wheels:
library, headers, GNU OpenMP threads) and `ensure_built()` compiles the extension with g++ against
them and `jax.ffi.include_dir()`, into .venv/jule3d-build (or $JULE3D_BUILD_DIR). It rebuilds when
the source, the compiler command or jax changes, and the result is loaded once per process. Where
anything is missing or the build fails, `available()` says False, one log line says why, and
conv_impl='auto' keeps the im2col path.

Under a sharded `jit` the custom calls have no partitioning rule: XLA gathers their operands and
every device computes the whole convolution (correct, not faster). Multi-device CPU runs are
simulated ones; real accelerators use 'xla'.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import logging

_SOURCE = os.path.join(os.path.dirname(__file__), 'csrc', 'onednn_conv.cc')
_TARGETS = {
  'jule3d_onednn_conv_fwd': 'Jule3dConvFwd',
  'jule3d_onednn_conv_bwd_data': 'Jule3dConvBwdData',
  'jule3d_onednn_conv_bwd_weights': 'Jule3dConvBwdWeights',
}


def _prefix() -> str:
  """Where pip put the oneDNN wheels' lib/ and include/: the virtualenv's data prefix."""
  return sysconfig.get_paths()['data']


def build_dir() -> str:
  return os.environ.get('JULE3D_BUILD_DIR') or os.path.join(sys.prefix, 'jule3d-build')


def _command(out: str) -> list[str]:
  prefix = _prefix()
  return [
    os.environ.get('CXX', 'g++'),
    '-O3',
    '-std=c++17',
    '-shared',
    '-fPIC',
    '-w',
    f'-I{jax.ffi.include_dir()}',
    f'-I{os.path.join(prefix, "include")}',
    _SOURCE,
    f'-L{os.path.join(prefix, "lib")}',
    '-ldnnl',
    f'-Wl,-rpath,{os.path.join(prefix, "lib")}',
    '-o',
    out,
  ]


def _library_path() -> str:
  """The built library's path: named by a digest of the source and the compile command."""
  with open(_SOURCE, 'rb') as f:
    digest = hashlib.sha256(f.read())
  digest.update(' '.join(_command('OUT')).encode())
  digest.update(jax.__version__.encode())
  return os.path.join(build_dir(), f'libjule3d_onednn-{digest.hexdigest()[:16]}.so')


def _missing() -> str | None:
  prefix = _prefix()
  header = os.path.join(prefix, 'include', 'oneapi', 'dnnl', 'dnnl.hpp')
  if not os.path.exists(header):
    return f'oneDNN headers not found ({header}): install requirements.txt'
  if not any(n.startswith('libdnnl.so') for n in os.listdir(os.path.join(prefix, 'lib'))):
    return f'libdnnl.so not found in {os.path.join(prefix, "lib")}: install requirements.txt'
  if shutil.which(os.environ.get('CXX', 'g++')) is None:
    return 'no C++ compiler (g++) on PATH'
  return None


def ensure_built() -> str:
  """Compiles the extension unless an up-to-date build exists; returns the library's path.

  Raises:
    RuntimeError: oneDNN or the compiler is missing, or the compiler failed (its message).
  """
  path = _library_path()
  if os.path.exists(path):
    return path
  why = _missing()
  if why:
    raise RuntimeError(why)
  os.makedirs(build_dir(), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.build-', suffix='.so', dir=build_dir())
  os.close(fd)
  try:
    run = subprocess.run(_command(tmp), capture_output=True, text=True)
    if run.returncode != 0:
      raise RuntimeError(
        f'{_command(tmp)[0]} failed: {run.stderr.strip()[-2000:] or run.returncode}'
      )
    os.replace(tmp, path)  # atomic: a concurrent build of the same source is equally good
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


@functools.cache
def _library() -> ctypes.CDLL | None:
  try:
    lib = ctypes.cdll.LoadLibrary(ensure_built())
  except (RuntimeError, OSError) as e:
    logging.warning('oneDNN convolution unavailable, using im2col: %s', e)
    return None
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  lib.Jule3dConvImpl.restype = ctypes.c_char_p
  return lib


def available() -> bool:
  """Whether the extension is built (building it now if needed) and registered."""
  return _library() is not None


def implementation(x_shape, kernel_shape) -> dict[str, str]:
  """oneDNN's chosen implementation per pass for these shapes, e.g. {'fwd': 'brg_conv_fwd:avx2'}."""
  n, d, h, w, c = x_shape
  k, f = kernel_shape[0], kernel_shape[-1]
  names = _library().Jule3dConvImpl(n, d, h, w, c, k, f).decode().split('|')
  return dict(zip(('fwd', 'bwd_data', 'bwd_weights'), names, strict=True))


def _call(target: str, shape, *args) -> jax.Array:
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32))(*args)


def _out_shape(x_shape, kernel_shape):
  k = kernel_shape[0]
  return (x_shape[0], *[n - k + 1 for n in x_shape[1:4]], kernel_shape[-1])


@jax.custom_vjp
def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _call('jule3d_onednn_conv_fwd', _out_shape(x.shape, kernel.shape), x, kernel)


def _conv_fwd(x, kernel):
  return _conv(x, kernel), (x, kernel)


def _conv_bwd(residuals, dy):
  x, kernel = residuals
  dy = dy.astype(jnp.float32)
  dx = _call('jule3d_onednn_conv_bwd_data', x.shape, dy, kernel)
  dk = _call('jule3d_onednn_conv_bwd_weights', kernel.shape, x, dy)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv3d(x: jax.Array, kernel: jax.Array, compute_dtype=jnp.float32) -> jax.Array:
  """VALID, stride-1 3D convolution through oneDNN (the contract of convolution.im2col_conv3d).

  Args:
    x: [B, D, H, W, C] input.
    kernel: [k, k, k, C, F] weights.
    compute_dtype: float32 only (bfloat16 configs keep the im2col path, convolution.resolve_conv_impl).

  Returns:
    [B, D-k+1, H-k+1, W-k+1, F] float32.
  """
  if jnp.dtype(compute_dtype) != jnp.float32:
    raise ValueError('the oneDNN convolution is float32 only')
  if not available():
    raise RuntimeError('the oneDNN convolution extension is not available (see the log)')
  return _conv(x.astype(jnp.float32), kernel.astype(jnp.float32))


def main() -> int:
  """`python -m jule3d.onednn` (run by make): builds the extension, one line either way, exit 0."""
  start = time.perf_counter()
  fresh = not os.path.exists(_library_path())
  try:
    path = ensure_built()
  except RuntimeError as e:
    print(f'oneDNN convolution not built ({e}): conv_impl auto uses im2col', flush=True)
    return 0
  if fresh:
    print(f'built {path} in {time.perf_counter() - start:.1f} s', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
