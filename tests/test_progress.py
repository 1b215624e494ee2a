"""Progress lines (jule3d/progress.py): rate and time left, throttled, quiet in CI."""

from absl import logging

from jule3d import progress


def _lines(monkeypatch):
  got = []
  monkeypatch.setattr(logging, 'info', lambda fmt, *a: got.append(fmt % a))
  return got


def test_quiet_in_ci_unless_forced(monkeypatch):
  monkeypatch.delenv('JULE3D_PROGRESS', raising=False)
  monkeypatch.setenv('CI', 'true')
  assert not progress.enabled()
  monkeypatch.setenv('JULE3D_PROGRESS', '1')
  assert progress.enabled()
  monkeypatch.delenv('CI')
  monkeypatch.setenv('JULE3D_PROGRESS', '0')
  assert not progress.enabled()


def test_one_line_per_update_with_rate_and_time_left(monkeypatch):
  monkeypatch.setenv('JULE3D_PROGRESS', '1')
  got = _lines(monkeypatch)
  clock = iter([100.0, 102.0, 104.0])  # start, then two updates 2 s apart
  monkeypatch.setattr(progress.time, 'monotonic', lambda: next(clock))
  p = progress.Progress('grid features', 10, 'parts', every=0.0)
  p.update(4, 'loss 0.1')
  p.update(10)
  assert got[0] == ('grid features: 4/10 parts (40%), 2 parts/s, 2s so far, 3s left; loss 0.1')
  assert got[1].startswith('grid features: 10/10 parts (100%), 2.5 parts/s, 4s so far, 0s left')
  assert '\r' not in ''.join(got)


def test_throttled_but_the_end_is_always_shown(monkeypatch):
  monkeypatch.setenv('JULE3D_PROGRESS', '1')
  got = _lines(monkeypatch)
  p = progress.Progress('sampling', 50, 'planes', every=3600.0)
  for done in range(1, 51):
    p.update(done)
  assert len(got) == 1 and got[0].startswith('sampling: 50/50 planes (100%)')


def test_resumed_work_counts_only_new_units_in_the_rate(monkeypatch):
  monkeypatch.setenv('JULE3D_PROGRESS', '1')
  got = _lines(monkeypatch)
  clock = iter([0.0, 10.0])
  monkeypatch.setattr(progress.time, 'monotonic', lambda: next(clock))
  progress.Progress('training', 20, 'epochs', every=0.0, done=15).update(16)
  assert '1/10 epochs' not in got[0] and '16/20 epochs (80%), 0.1 epochs/s' in got[0]
  assert '40s left' in got[0]
