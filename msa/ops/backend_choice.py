"""The GPU backend ``backend="auto"`` picks from measurements: per card, dtype and use (inference or training), the
faster of the Triton and CUDA kernels at measured problem sizes, stored in ``backend_choices.json``.

``benchmarks/bench_backends.py`` times both kernels side by side on a card and merges its table into that file
(``--install``); a card, dtype or use without measurements keeps the default order of ``available_backends``.
A call takes the choice measured at the size nearest to its own (``work`` = Ni Nt L H Dh, compared on a log scale).

The file::

    {"<torch.cuda.get_device_name()>": {
        "measured": "<git sha, torch, triton, date>",
        "<dtype>": {"inference": [[work, backend], ...], "training": [[work, backend], ...]}}}

float16 uses bfloat16's measurements when it has none of its own (the same kernels, the same tile sizes). float32
with TF32 allowed (see msa._tf32) has none: the float32 ones were taken with TF32 off, and only the Triton kernels
multiply in TF32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from msa._tf32 import tf32_allowed

CHOICES_FILE = Path(__file__).with_name("backend_choices.json")
USES = ("inference", "training")
GPU_BACKENDS = ("triton", "cuda")
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}


def load_choices(path: Path = CHOICES_FILE) -> dict:
    """The measured choices in ``path``, checked: {card: {"measured": str, dtype: {use: [[work, backend], ...]}}}."""
    if not path.is_file():
        return {}
    table = json.loads(path.read_text())
    for card, entry in table.items():
        for dtype, uses in entry.items():
            if dtype == "measured":
                continue
            for use, points in uses.items():
                if use not in USES or not all(len(p) == 2 and p[0] > 0 and p[1] in GPU_BACKENDS for p in points):
                    raise ValueError(f"{path}: bad entry {card!r} / {dtype!r} / {use!r}: {points!r}")
    return table


# Read once at import: a plain dict is what torch.compile can look into while tracing a call.
_CHOICES = load_choices()


@torch.compiler.assume_constant_result
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def nearest_choice(points: list, work: int) -> str:
    """The backend of the measured point whose work is nearest to ``work`` on a log scale."""
    target = math.log(max(work, 1))
    # A loop rather than min(points, key=...), which torch 2.6's torch.compile cannot trace.
    chosen, nearest = points[0][1], math.inf
    for point_work, backend in points:
        distance = abs(math.log(point_work) - target)
        if distance < nearest:
            chosen, nearest = backend, distance
    return chosen


def measured_choice(
    device: torch.device, dtype: torch.dtype, work: int, training: bool, candidates: list[str]
) -> str | None:
    """The measured faster backend for a call on ``device`` (None without measurements for it, or when that
    backend is not among ``candidates``, the ones available here)."""
    if device.type != "cuda" or not _CHOICES or (dtype == torch.float32 and tf32_allowed()):
        return None
    entry = _CHOICES.get(_device_name(device.index if device.index is not None else torch.cuda.current_device()))
    if entry is None:
        return None
    name = DTYPE_NAMES.get(dtype)
    by_use = entry.get(name) or (entry.get("bfloat16") if name == "float16" else None)
    points = (by_use or {}).get("training" if training else "inference")
    if not points:
        return None
    choice = nearest_choice(points, work)
    return choice if choice in candidates else None
