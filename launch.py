"""jule3d command line: one library call per mode.

  python launch.py --config=configs/lung_c.py --workdir=runs/lung_c --config.data.path=/data/lung_c.zarr

Modes: all (default: train -> segment -> evaluate), train, segment, evaluate. Bad input or config
gives one line on stderr and exit status 2.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

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


def _parse_flags(argv: list[str]) -> list[str]:
  # absl/ml_collections report a mistyped `--config.x.y=` as a raw AttributeError/KeyError traceback;
  # a user gets one actionable line instead.
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(f'{e}\nUsage: python launch.py --config=configs/demo.py --workdir=DIR [--mode=...]')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(f'bad --config override: {e} (see configs/base.py for the fields and their types)')
  except FileNotFoundError as e:
    _fail(f'--config: config file not found: {e.filename or e}')
  return []


class _QuietLibraries(logging.Filter):
  # orbax logs every save step at INFO; keep our progress lines readable.
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  from jule3d import pipeline
  from jule3d.errors import UserError

  logging.getLogger('absl').setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  try:
    pipeline.run(FLAGS.config, FLAGS.workdir, mode=FLAGS.mode, overwrite=FLAGS.overwrite)
  except UserError as e:
    _fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
