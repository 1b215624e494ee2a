"""One run per workdir: an operating-system lock held for the whole run.

`exclusive(workdir)` takes `fcntl.flock` on WORKDIR/.jule3d.lock and writes the holder (pid, host,
start time) into it. A second run on the same workdir is refused at once with one line naming the
holder. The kernel drops the lock with its process, so after SIGKILL (or a crash, or a reboot) the
next run is not blocked (the file left behind is simply locked again). A run that ends removes the
file while still holding the lock; a run that opened it just before sees that its file is no
longer the one at the path and starts over on the new one, so two runs never hold two files.

Multi-host runs: process 0 takes the lock (pipeline.run); the workdir is then on a shared
filesystem, whose flock must work across hosts (NFSv4, Lustre mounted with `-o flock`, GPFS). Where
flock is not supported (ENOLCK, ENOSYS, EOPNOTSUPP: e.g. Lustre without `flock`, some FUSE mounts)
the run goes on unlocked after one warning.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from absl import logging

from jule3d.errors import UserError
from jule3d.workdir import LOCK

_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def _holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode())
    return f'pid {info["pid"]} on host {info["host"]}, started {info["started"]}'
  except (OSError, ValueError, KeyError, TypeError):
    return 'holder unknown: it is just starting'


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[bool]:
  """Holds the workdir's lock for the duration of the block; the lock file goes with it.

  Args:
    workdir: an existing run directory.

  Yields:
    True when locked, False when the filesystem does not support flock (warned once).

  Raises:
    UserError: another live run holds the lock.
  """
  path = os.path.join(workdir, LOCK)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(fd)
      os.close(fd)
      raise UserError(
        f'--workdir {workdir!r} is in use by another run ({holder}): wait for it to finish '
        '(or stop it), or choose another --workdir.'
      ) from None
    except OSError as e:
      os.close(fd)
      if e.errno not in _UNSUPPORTED:
        raise
      logging.warning(
        'cannot lock --workdir %s (%s): its filesystem does not support flock, so nothing stops a '
        'second run from using it at the same time; make sure none does.',
        workdir,
        e.strerror,
      )
      yield False
      return
    # The holder before us may have removed the file between our open and our flock: then we hold
    # a lock on a file nobody else will open; start again on the file now at `path`.
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    started = time.strftime('%Y-%m-%d %H:%M:%S %Z')
    info = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + '\n').encode(), 0)
    yield True
  finally:
    with contextlib.suppress(OSError):
      os.unlink(path)  # while still holding the lock: a run that opened it retries (above)
    os.close(fd)
