"""Progress of long work as log lines: done / total, rate and time left.

One line per update at most every `every` seconds (and always at the end), through absl logging, so
a non-interactive log (a SLURM file, `tee`) gets whole lines, never carriage-return redraws. Quiet
where the environment says CI (CI=true, as .ci/run sets) unless JULE3D_PROGRESS=1; JULE3D_PROGRESS=0
silences it anywhere.
"""

import os
import time

from absl import logging


def enabled() -> bool:
  """Whether progress lines are written (module docstring)."""
  forced = os.environ.get('JULE3D_PROGRESS', '').strip().lower()
  if forced in ('0', '1', 'false', 'true'):
    return forced in ('1', 'true')
  return os.environ.get('CI', '').strip().lower() not in ('1', 'true', 'yes')


def _duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


class Progress:
  """Progress of one piece of work: `update(done)` as it goes, each line with rate and time left.

  Args:
    what: what is being done, e.g. 'sampling training centres'.
    total: units of work in all.
    unit: the unit's name, e.g. 'planes', 'parts'.
    every: seconds between lines (the last update always writes one).
    done: units already done before this call (resumed work): the rate counts only new ones.
  """

  def __init__(self, what: str, total: int, unit: str, every: float = 10.0, done: int = 0):
    self.what, self.total, self.unit, self.every = what, int(total), unit, float(every)
    self.start_done, self.t0 = int(done), time.monotonic()
    self.last = self.t0
    self.lines = 0
    self.on = enabled()

  def line(self, done: int, now: float) -> str:
    """The text of a progress line at `done` units, at time `now` (time.monotonic)."""
    elapsed = now - self.t0
    new = done - self.start_done
    rate = new / elapsed if elapsed > 0 else 0.0
    left = (self.total - done) / rate if rate > 0 else float('nan')
    pct = 100.0 * done / self.total if self.total else 100.0
    eta = _duration(left) if left == left else '?'
    return (
      f'{self.what}: {done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.3g} {self.unit}/s, '
      f'{_duration(elapsed)} so far, {eta} left'
    )

  def update(self, done: int, extra: str = '') -> None:
    """Reports `done` units finished (a line when `every` seconds passed, or at the end).

    Args:
      done: units finished so far (not an increment).
      extra: appended to the line, e.g. the loss.
    """
    now = time.monotonic()
    if not self.on or (done < self.total and now - self.last < self.every):
      return
    self.last = now
    self.lines += 1
    logging.info('%s%s', self.line(done, now), f'; {extra}' if extra else '')
