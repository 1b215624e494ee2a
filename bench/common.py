"""What every benchmark shares: machine description and BENCHMARKS.md section replacement."""

import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys

BENCHMARKS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'BENCHMARKS.md'
)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results.json')


def cpu_model() -> str:
  """CPU model name from lscpu ('unknown' when unavailable).

  Returns:
    The model string.
  """
  try:
    for line in subprocess.run(['lscpu'], capture_output=True, text=True).stdout.splitlines():
      if line.startswith('Model name:'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def peak_rss_mb() -> float:
  """Peak resident set size of this process in MiB (Linux ru_maxrss is in KiB).

  Returns:
    The peak RSS so far.
  """
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_line() -> str:
  """One line: date, cores, CPU, library versions.

  Returns:
    The line.
  """
  import jax
  import numpy

  return (
    f'{datetime.date.today().isoformat()}; {os.cpu_count()} cores, {cpu_model()}; '
    f'jax {jax.__version__}, numpy {numpy.__version__}, backend {jax.default_backend()}'
  )


def replace_section(title: str, body: str, path: str = BENCHMARKS) -> None:
  """Replaces (or appends) the `## title` section of BENCHMARKS.md, keeping the others.

  Args:
    title: section title, without '## '.
    body: the section's text (below the title).
    path: BENCHMARKS.md path.
  """
  header = f'## {title}'
  section = f'{header}\n\n{body.strip()}\n'
  text = open(path).read() if os.path.exists(path) else '# Benchmarks\n'
  pattern = re.compile(rf'^{re.escape(header)}\n.*?(?=^## |\Z)', re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + '\n', text, count=1)
  else:
    text = text.rstrip('\n') + '\n\n' + section
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text.rstrip('\n') + '\n')
  os.replace(tmp, path)
  if path == BENCHMARKS:
    record(title, body)


def markdown_tables(text: str) -> list[list[dict]]:
  """The pipe tables of a markdown text, each as a list of {column header: cell text} rows.

  Args:
    text: markdown.

  Returns:
    One list of rows per table, in order.
  """
  tables, rows = [], []
  for line in text.splitlines() + ['']:
    if line.startswith('|'):
      rows.append([cell.strip() for cell in line.strip().strip('|').split('|')])
      continue
    if len(rows) >= 2:
      header = rows[0]
      tables.append([dict(zip(header, r, strict=False)) for r in rows[2:]])
    rows = []
  return tables


def record(title: str, body: str, path: str = RESULTS) -> None:
  """Stores a BENCHMARKS.md section in bench/results.json: its date, text and parsed tables.

  Args:
    title: section title.
    body: the section text.
    path: results.json path.
  """
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError):
    results = {}
  results[title] = {
    'date': datetime.date.today().isoformat(),
    'text': body.strip(),
    'tables': markdown_tables(body),
  }
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def put_section(section: str, path: str = BENCHMARKS) -> None:
  """Replaces (or appends) a section given as full text starting with its '## title' line.

  Args:
    section: the section text.
    path: BENCHMARKS.md path.
  """
  title, _, body = section.partition('\n')
  replace_section(title.removeprefix('## '), body, path)


def allocator_env(sep: str = ' ') -> str:
  """The allocator settings this process runs with (GLIBC_TUNABLES, LD_PRELOAD), as NAME=value."""
  names = ('GLIBC_TUNABLES', 'LD_PRELOAD')
  return sep.join(f'{n}={os.environ[n]}' for n in names if os.environ.get(n))


def command_line(script: str, skip: tuple[str, ...] = ('--write', '--no-write')) -> str:
  """How this run was started, for its section: the allocator settings, the script, its flags.

  Args:
    script: the script's file name under bench/.
    skip: flags left out (those that only say whether to write the figures).

  Returns:
    The command, as run from the repository root.
  """
  flags = ' '.join(a for a in sys.argv[1:] if a not in skip)
  return ' '.join(x for x in (allocator_env(), f'.venv/bin/python bench/{script}', flags) if x)


def write_section(title: str, command: str, table: str) -> None:
  """A standard section: machine line, the command to reproduce, the figures.

  Args:
    title: section title.
    command: how to reproduce (run from the repo root).
    table: markdown figures.
  """
  replace_section(title, f'Measured {machine_line()}.\n\n`{command}`\n\n{table}')


def publish(title: str, command: str, table: str, write: bool) -> None:
  """Prints a benchmark's figures; with `write`, also stores them (write_section).

  Args:
    title: section title.
    command: how to reproduce (run from the repo root).
    table: markdown figures.
    write: update BENCHMARKS.md and bench/results.json.
  """
  print(table)
  if write:
    write_section(title, command, table)
