"""Checkpoints of a training run: RNG state, atomic save, recovery after a crash, and the choice of what to resume.

A checkpoint folder (``checkpoints/last``, ``checkpoints/best``) holds ``model/`` (``save_pretrained``),
``training_state.pt`` and, written last, ``checkpoint.json`` (its step and epoch): a folder without that marker is
incomplete. Replacing ``last`` is atomic (:func:`save_checkpoint`): the new checkpoint is written and flushed to disk
in ``last.new``, the old one renamed ``last.old``, the new one renamed ``last``, then the old one deleted. A crash at
any point leaves at least one complete folder among the three, and :func:`recover_checkpoint` finds the newest.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msa.training.config import TrainConfig, UsageError, changed_settings

logger = logging.getLogger(__name__)

MARKER = "checkpoint.json"
TRAINING_STATE = "training_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sibling(directory: Path, suffix: str) -> Path:
    return directory.with_name(directory.name + suffix)


def _fsync(path: Path) -> None:
    # Directories too: a rename is durable only once the directory holding it is flushed.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def save_checkpoint(directory: Path, model: Any, training_state: dict[str, Any]) -> None:
    """Write ``directory`` (``model/``, ``training_state.pt``, ``checkpoint.json``), replacing it atomically.

    ``training_state["state"]`` must hold ``step`` and ``epoch`` (recorded in the marker).
    """
    new, old = _sibling(directory, ".new"), _sibling(directory, ".old")
    if new.exists():
        shutil.rmtree(new)  # left by a crash while writing: incomplete or older than `directory`
    model.save_pretrained(new / "model")
    torch.save(training_state, new / TRAINING_STATE)
    position = {key: training_state["state"][key] for key in ("step", "epoch")}
    (new / MARKER).write_text(json.dumps(position) + "\n")
    _fsync_tree(new)
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
    os.replace(new, directory)
    _fsync(directory.parent)
    if old.exists():
        shutil.rmtree(old)


def _marked_step(directory: Path) -> int | None:
    """The step of a complete checkpoint folder, None if it is incomplete or absent."""
    try:
        return int(json.loads((directory / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recover_checkpoint(directory: Path, repair: bool = True) -> Path | None:
    """The newest complete checkpoint among ``directory`` and the ``.new`` / ``.old`` folders a crash leaves.

    With ``repair`` (one process only), that checkpoint is moved to ``directory`` and the leftovers are deleted, so
    the folder is back to its normal state; the returned path is then ``directory``. None if nothing is complete.
    """
    candidates = [(p, _marked_step(p)) for p in (directory, _sibling(directory, ".new"), _sibling(directory, ".old"))]
    complete = [(path, step) for path, step in candidates if step is not None]
    if not complete:
        return None
    chosen = max(complete, key=lambda item: item[1])[0]  # ties keep `directory` (listed first)
    if not repair:
        return chosen
    if chosen != directory:
        logger.warning("%s was interrupted while being replaced: recovering it from %s", directory, chosen)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(chosen, directory)
        _fsync(directory.parent)
    for leftover in (_sibling(directory, ".new"), _sibling(directory, ".old")):
        if leftover.exists():
            shutil.rmtree(leftover)
    return directory


def holds_checkpoints(checkpoint_dir: Path) -> bool:
    return checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir())


def resolve_resume(config: TrainConfig, checkpoint_dir: Path, repair: bool) -> Path | None:
    """The checkpoint folder a run continues from, None to start from step 0.

    A run folder that already holds checkpoints is never started over silently: without ``resume`` it is refused,
    with ``resume="auto"`` it must hold a complete ``last`` checkpoint; ``resume="never"`` starts over.
    """
    if config.resume == "never":
        return None
    if config.resume not in (None, "auto"):
        path = Path(config.resume)
        if _marked_step(path) is None and not (path / TRAINING_STATE).is_file():
            raise UsageError(f"--resume {path}: not a complete checkpoint folder (no {MARKER} or {TRAINING_STATE})")
        return path
    if config.resume == "auto":
        found = recover_checkpoint(checkpoint_dir / "last", repair=repair)
        if found is not None:
            return found
    if holds_checkpoints(checkpoint_dir):
        contents = sorted(p.name for p in checkpoint_dir.iterdir())
        if config.resume == "auto":
            raise UsageError(
                f"{checkpoint_dir} holds {contents} but no complete checkpoint to resume from; "
                "pass --resume never to start over (deletes them)"
            )
        raise UsageError(
            f"{checkpoint_dir} already holds checkpoints {contents}: pass --resume auto to continue that run "
            "or --resume never to start over (deletes them)"
        )
    return None


def load_training_state(directory: Path, config: TrainConfig | None = None) -> dict[str, Any]:
    """``training_state.pt`` of a checkpoint folder; with ``config``, refuse settings the resume cannot honour."""
    path = directory / TRAINING_STATE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as error:
        raise UsageError(f"{path} not found: not a training checkpoint") from error
    except Exception as error:  # torch.load raises many types on a truncated or foreign file
        raise UsageError(f"{path} cannot be read ({type(error).__name__}: {error}); is it truncated?") from error
    if not isinstance(saved, dict) or not {"optimizer", "scheduler", "state", "rng"} <= set(saved):
        raise UsageError(f"{path} is not a training state (expected optimizer, scheduler, state and rng entries)")
    if config is not None and "config" in saved:
        changes = changed_settings(saved["config"], config)
        if changes:
            raise UsageError(
                f"cannot resume from {directory} with changed settings ({'; '.join(changes)}): keep the saved values "
                "or pass --resume never to start over"
            )
    return saved
