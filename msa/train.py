"""``python -m msa.train`` and the ``msa-train`` console script: the application lives in :mod:`msa.training`
(its public names are re-exported here for code that imports them from ``msa.train``)."""

import sys

from msa.training import *  # noqa: F403
from msa.training import __all__  # noqa: F401
from msa.training.main import main

if __name__ == "__main__":
    sys.exit(main())
