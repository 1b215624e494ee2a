"""jule3d command line: one library call per mode.

  python launch.py --config=configs/lung_c.py --workdir=runs/lung_c --config.data.path=/data/lung_c.zarr

Modes: all (default: train -> segment -> evaluate), train, segment, evaluate. Bad input or config
gives one line on stderr and exit status 2. SIGTERM (or Ctrl-C) stops the run cleanly with one
line and exit status 143 (130): the same command resumes it. One run at a time per --workdir.
"""

import errno
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from configs import base

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Config file, e.g. configs/demo.py (or configs/lung_c.py:cpu).', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, outputs and the report.')
flags.DEFINE_enum('mode', 'all', ['all', 'train', 'segment', 'evaluate'], 'What to run.')
flags.DEFINE_bool('overwrite', False, 'Replace existing outputs / start over in a used workdir.')
flags.mark_flags_as_required(['config', 'workdir'])


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


_FIELDS = '(see configs/base.py for the fields and their types)'


def _config_arg(argv: list[str]) -> str:
  # The text given to --config (the flag itself may not be parsed when loading it failed).
  for i, arg in enumerate(argv):
    if arg.startswith(('--config=', '-config=')):
      return arg.split('=', 1)[1]
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def _override_problem(e: Exception) -> str:
  # ml_collections raises KeyError("'name'\nDid you mean ...?"), sometimes inside an AttributeError.
  if e.args and isinstance(e.args[0], KeyError):
    e = e.args[0]
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  first, *rest = text.strip().split('\n')
  if isinstance(e, KeyError) and first.startswith("'") and first.endswith("'"):
    first = f'no field {first} in the config'
  return ' '.join([first, *(f'({line.strip()})' for line in rest if line.strip())])


def _renamed(argv: list[str]) -> str:
  # An override of a field that an earlier version had under another name: say the new name.
  for arg in argv:
    field = arg.split('=', 1)[0].removeprefix('--config.').removeprefix('-config.')
    if field in base.RENAMED:
      return f': config.{field} is now config.{base.RENAMED[field]}'
  return ''


def _parse_flags(argv: list[str]) -> list[str]:
  # absl/ml_collections report a mistyped `--config.x.y=` as a raw AttributeError/KeyError traceback;
  # a user gets one actionable line instead.
  try:
    rest = FLAGS(argv)
    # ml_collections defers a config file that fails to load until the config is first used.
    FLAGS.config.keys()
    return rest
  except flags.Error as e:
    hint = f' {_FIELDS}' if str(e).startswith('flag --config.') else ''
    _fail(f'{e}{hint}\nUsage: python launch.py --config=configs/demo.py --workdir=DIR [--mode=...]')
  except OSError as e:
    # ml_collections wraps the reason ("[Errno 2] No such file or directory: ...") in its own text.
    reason = str(e).strip().splitlines()[-1].strip()
    reason = reason[reason.find('[Errno') :] if '[Errno' in reason else reason
    _fail(
      f'--config={_config_arg(argv)}: the config file cannot be loaded ({reason}): give an '
      'existing config file, e.g. --config=configs/demo.py.'
    )
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(f'bad --config override: {_override_problem(e)}{_renamed(argv)} {_FIELDS}')
  return []


class _QuietLibraries(logging.Filter):
  # orbax logs every save step at INFO, and JAX logs each accelerator backend it did not find
  # ("Unable to initialize backend 'tpu'") at INFO on every CPU run: keep our progress lines readable.
  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    if record.pathname.endswith('xla_bridge.py'):
      return not str(record.msg).startswith('Unable to initialize backend')
    return '/orbax/' not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  from jule3d import interrupt, pipeline
  from jule3d.errors import UserError

  interrupt.install()  # SIGTERM / SIGINT: finish the checkpoint being written, then stop cleanly

  logging.getLogger('absl').setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  try:
    pipeline.run(FLAGS.config, FLAGS.workdir, mode=FLAGS.mode, overwrite=FLAGS.overwrite)
  except UserError as e:
    _fail(str(e))
  except interrupt.Stopped as e:
    print(
      f'stopped by {e.name}: finished work is kept and nothing is left half-written; rerun the '
      'same command to resume.',
      file=sys.stderr,
    )
    sys.exit(128 + e.signum)  # what a shell reports for a process ended by that signal
  except (OSError, ValueError) as e:
    if not disk_full(e):
      raise
    _fail(
      f'no space left on the device of --workdir {FLAGS.workdir!r} ({str(e).splitlines()[0]}): '
      'free space there (or choose another --workdir) and rerun the same command; finished work '
      'is kept and resumed, and no output is half-written under its final name.'
    )


def disk_full(e: BaseException) -> bool:
  """True for a write that failed because the disk or the quota is full (OS or tensorstore)."""
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  return 'No space left on device' in str(e) or 'Disk quota exceeded' in str(e)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
