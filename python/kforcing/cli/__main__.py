"""`python -m kforcing.cli`: the `kforcing` command."""

import sys

from .commands import main

sys.exit(main())
