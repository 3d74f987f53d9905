"""``python -m msa.train`` and the ``msa-train`` console script: the application lives in :mod:`msa.training`."""

import sys

from msa.training.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
