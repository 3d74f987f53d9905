"""Loads the compiled extension (msa._C) when it was built; msa works without it."""

from __future__ import annotations

import importlib
import logging

import torch

logger = logging.getLogger(__name__)


def _load() -> tuple[bool, str]:
    try:
        importlib.import_module("msa._C")
    except ImportError as error:
        logger.debug("msa._C is not available: %s", error)
        return False, str(error)
    return True, ""


EXTENSION_LOADED, EXTENSION_ERROR = _load()


def module():
    """The loaded msa._C module (only when EXTENSION_LOADED)."""
    return importlib.import_module("msa._C")


def has_kernel(device_type: str) -> bool:
    """Whether msa._C registered a kernel of msa::mscmat_scores for this device type ("cpu", "cuda")."""
    if not EXTENSION_LOADED:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("msa::mscmat_scores", key)
