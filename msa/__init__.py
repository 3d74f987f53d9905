"""msa: Multi-Scale Alignment for remote-sensing image-text retrieval.

``import msa`` stays light (torch only): the model, which needs timm and transformers, loads on first use of
``msa.create_model`` / ``msa.MSAModel``.
"""

from __future__ import annotations

import importlib
from typing import Any

from msa import ops
from msa.ops import mscmat_scores

__version__ = "0.1.0"

_LAZY = {"create_model": "msa.model", "MSAModel": "msa.model"}

__all__ = ["MSAModel", "create_model", "mscmat_scores", "ops"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msa' has no attribute {name!r}")
