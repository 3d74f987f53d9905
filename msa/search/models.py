"""Which model an index belongs to: loading a model from a checkpoint folder or a named config, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

# Config fields that change how a model is built or run but not what it computes from given weights: a model
# created from a named config and the same model after save_pretrained / from_pretrained must match.
_RUNTIME_FIELDS = ("backend", "image_pretrained", "text_pretrained", "text_config", "text_model", "tokenizer")

# Named configs get deterministic random weights (seed 0), so that an index built with "msa-tiny" can be searched
# with "msa-tiny" again. Real use passes a trained checkpoint folder.
NAMED_MODEL_SEED = 0


def load_model(spec: str, device: torch.device | str = "cpu") -> Any:
    """An :class:`msa.model.MSAModel` in eval mode from a ``save_pretrained`` folder (or a run / checkpoint folder
    holding one) or a named config (random weights seeded with :data:`NAMED_MODEL_SEED`).

    Raises:
        ValueError: ``spec`` is neither an existing model folder nor a known config name (the message lists both).
    """
    from msa.configs import list_models
    from msa.evaluate import resolve_checkpoint
    from msa.model import MSAModel, create_model

    path = Path(spec)
    if path.exists():
        try:
            folder = resolve_checkpoint(path)
        except FileNotFoundError as error:
            raise ValueError(f"--model {spec}: {error}") from None
        model = MSAModel.from_pretrained(folder)
    elif spec in list_models():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(NAMED_MODEL_SEED)
            model = create_model(spec)
    else:
        raise ValueError(f"--model {spec}: neither a model folder nor a named config (known: {list_models()})")
    return model.to(device).eval()


def model_spec(spec: str) -> str:
    """The form of ``spec`` stored in the manifest: an absolute path for a folder, the name otherwise."""
    path = Path(spec)
    return str(path.resolve()) if path.exists() else spec


def model_fingerprint(model: Any) -> str:
    """SHA-256 over the config (without the runtime fields) and every tensor of the state dict (name, dtype,
    shape, bytes), in name order."""
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _RUNTIME_FIELDS}
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
