"""``python -m triggers.demo`` runs :mod:`triggers.contrib.demo`."""

import sys

from triggers.contrib.demo import main, run_demo

__all__ = ["main", "run_demo"]

if __name__ == "__main__":
    sys.exit(main())
