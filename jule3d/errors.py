"""The one exception type a user sees as a one-line message (launch.py exits with status 2)."""


class UserError(ValueError):
  """Bad input or configuration: the message names what, where, and what was expected.

  Raised before any expensive work. launch.py prints `error: <message>` on stderr, without a
  traceback, and exits with status 2.
  """
