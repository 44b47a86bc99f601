"""`python -m daemon` is the same as the `i2vd` console script."""

from __future__ import annotations

import sys

from daemon.cli import main

if __name__ == "__main__":
    sys.exit(main())
