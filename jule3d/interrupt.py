"""SIGTERM and SIGINT as a clean stop: finish the write in progress, then stop with `Stopped`.

Batch schedulers (SLURM, Kubernetes, pre-emptible cloud machines) send SIGTERM some seconds before
SIGKILL. `install` (called by launch.py, never by the library itself) turns the signal into a
`Stopped` exception raised in the main thread, which unwinds like any error: every writer removes
its temporary, and no output is left half-written under its final name. Inside a `deferred()`
section (a checkpoint being saved) the signal is held until the section ends, so the checkpoint is
finished rather than abandoned. Everything finished before the signal is kept, and rerunning the
same command resumes from it, as after SIGKILL.

`Stopped` derives from BaseException, like KeyboardInterrupt, so that `except Exception` handlers
(a baseline that may fail, a damaged checkpoint to skip) do not swallow it.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
  """The run was asked to stop by a signal; `signum` says which."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name


_depth = 0  # nesting of deferred() sections (main thread only)
_pending: int | None = None  # a signal that arrived inside a deferred() section


def _handler(signum: int, frame) -> None:
  global _pending
  if _depth > 0:
    _pending = signum
    return
  raise Stopped(signum)


def install() -> None:
  """Makes SIGTERM and SIGINT raise `Stopped` in the main thread (a no-op in other threads)."""
  if threading.current_thread() is not threading.main_thread():
    return
  for signum in SIGNALS:
    signal.signal(signum, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """A section a stop signal does not interrupt: it is raised as `Stopped` when the section ends.

  An exception raised inside the section propagates unchanged (the signal is then raised at the
  next deferred() exit or not at all: the run is failing anyway).
  """
  global _depth, _pending
  _depth += 1
  try:
    yield
  finally:
    _depth -= 1
  if _depth == 0 and _pending is not None:
    signum, _pending = _pending, None
    raise Stopped(signum)
