"""`python -m jule3d.phantom`: see jule3d/phantom/cli.py."""

import sys

from jule3d.phantom.cli import main

sys.exit(main())
