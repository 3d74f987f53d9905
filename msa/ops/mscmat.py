"""The public op ``mscmat_scores``: input checks and the choice of kernel (backend)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re

import torch

from msa.ops import _extension
from msa.ops.backend_choice import measured_choice
from msa.ops.reference import mscmat_scores_ref

if _extension.EXTENSION_LOADED:
    from msa.ops import _registration  # noqa: F401  (fake kernels and autograd of the compiled op)

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

# With gradients, the CPU kernel keeps the softmax p and p * (r - o) * scale of the forward ([H, Nt, L, Ni] each, in
# float32) for the backward while both fit in this many bytes, and recomputes them tile by tile beyond it
# (8 GEMM-sized products per forward + backward instead of 6). 512 MiB covers Ni = Nt = 400 at L = 32, H = 12.
# The same number caps the memory the CPU kernel holds for reuse once freed (see empty_cache).
# Set with set_saved_softmax_budget() or the MSA_SAVED_SOFTMAX_MB environment variable (read at import).
DEFAULT_SAVED_SOFTMAX_BUDGET = 512 * 2**20


def _budget_from_environment() -> int:
    value = os.environ.get("MSA_SAVED_SOFTMAX_MB")
    if value is None or value.strip() == "":
        return DEFAULT_SAVED_SOFTMAX_BUDGET
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(
            f"MSA_SAVED_SOFTMAX_MB (environment variable) must be a number of MiB, got {value!r}"
        ) from None
    if megabytes < 0:
        raise ValueError(f"MSA_SAVED_SOFTMAX_MB (environment variable) must be >= 0, got {value!r}")
    return int(megabytes * 2**20)


def _apply_budget(num_bytes: int) -> None:
    global _saved_softmax_budget
    _saved_softmax_budget = num_bytes
    if _extension.EXTENSION_LOADED:
        _extension.module().set_block_cache_limit(num_bytes)


_apply_budget(_budget_from_environment())


def set_saved_softmax_budget(num_bytes: int | None) -> None:
    """Bytes the CPU backend may keep from forward to backward (softmax and readouts, ``8 * H * Ni * Nt * L`` in
    float32); ``0`` always recomputes, ``None`` restores the default (or ``MSA_SAVED_SOFTMAX_MB``).

    The same number caps the memory the CPU backend holds once freed, for the next step to reuse (the kept softmax
    and the word gradients of a training step; fresh pages from the system would cost a page fault each):
    :func:`empty_cache` returns it to the system."""
    if num_bytes is not None and num_bytes < 0:
        raise ValueError(f"the saved softmax budget must be >= 0 bytes, got {num_bytes}")
    _apply_budget(_budget_from_environment() if num_bytes is None else int(num_bytes))


def empty_cache() -> int:
    """Returns to the system the memory the CPU backend holds for reuse, and the number of bytes that was.

    A training step on the CPU frees the softmax its forward kept and its word gradients once used; the CPU
    backend holds such blocks (up to the saved-softmax budget) because the next step asks for the same sizes.
    Call this when training is over and the memory is wanted elsewhere. A no-op without the compiled extension."""
    if not _extension.EXTENSION_LOADED:
        return 0
    held = _extension.module().block_cache_bytes()
    _extension.module().set_block_cache_limit(0)
    _extension.module().set_block_cache_limit(_saved_softmax_budget)
    return held


def saved_softmax_bytes(q: torch.Tensor, k: torch.Tensor) -> int:
    """Bytes the CPU backend keeps for the backward of ``mscmat_scores(q, u, k, v)``: p and r, [H, Nt, L, Ni]."""
    itemsize = 8 if q.dtype == torch.float64 else 4
    num_texts, length, heads, _ = k.shape
    return 2 * heads * num_texts * length * q.shape[0] * itemsize


# The Triton kernels compile for sm_90 under Triton 3.4.0, 3.5.1, 3.6.0 and 3.8.0 (benchmarks/kernel_report.py
# --launched --check); under 3.3.1 every one fails (tl.dot cannot take a None accumulator passed through a helper).
# torch 2.8 is the first release that installs Triton 3.4.
TRITON_MIN_VERSION = (3, 4)


def _installed_triton_version() -> str | None:
    """The installed Triton's version, None if there is none; from the package metadata, which is found without
    importing Triton (torch's nightlies name the package pytorch-triton)."""
    if importlib.util.find_spec("triton") is None:
        return None
    for distribution in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    import triton  # a copy without package metadata

    return triton.__version__


def _major_minor(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "3.6.0" or "2.11.0+cu130"."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def triton_problem(version: str | None) -> str:
    """Why Triton ``version`` (None: not installed) cannot run msa's kernels; "" when it can."""
    if version is None:
        return "triton is not installed: `pip install triton`"
    if _major_minor(version) < TRITON_MIN_VERSION:
        wanted = ".".join(map(str, TRITON_MIN_VERSION))
        return (
            f"the 'triton' backend needs triton >= {wanted} (its kernels do not compile under older ones), "
            f"found {version}: install torch >= 2.8, which brings it"
        )
    return ""


# Looked up once at import: torch.compile then sees plain constants.
_COMPILED_KERNELS = {device: _extension.has_kernel(device) for device in ("cpu", "cuda")}
_TRITON_PROBLEM = triton_problem(_installed_triton_version())
_TRITON_KERNELS_INSTALLED = importlib.util.find_spec("msa.kernels") is not None

_HOW_TO_BUILD = (
    "reinstall msa from a source checkout so that the extension compiles: "
    "`pip install --no-build-isolation .` (see README, 'Building')"
)


def _triton_available(device: torch.device) -> bool:
    # Under TRITON_INTERPRET=1 triton runs its kernels on CPU tensors (a slow numpy simulation, for testing).
    runs_here = device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return not _TRITON_PROBLEM and runs_here and _TRITON_KERNELS_INSTALLED


def backend_available(backend: str, device: torch.device | str) -> bool:
    """Whether ``backend`` can run ``mscmat_scores`` on tensors of ``device``."""
    device = torch.device(device)
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu" and _COMPILED_KERNELS["cpu"]
    if backend == "cuda":
        return device.type == "cuda" and _COMPILED_KERNELS["cuda"]
    if backend == "triton":
        return _triton_available(device)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device``, fastest first: the order ``backend="auto"`` takes where no
    measurement of this card says otherwise (see :func:`resolve_backend`)."""
    # On a GPU, Triton first: on an H200 it was 4.4x (forward) and 6.4x (backward) faster than the WMMA CUDA kernel
    # at Ni = Nt = 4096 in bf16, which was faster only at B = 128 and in float32 (README, "GPU kernels").
    order = {"cpu": ["cpu"], "cuda": ["triton", "cuda"]}.get(torch.device(device).type, [])
    return [name for name in order if backend_available(name, device)] + ["reference"]


def _unavailable_reason(backend: str, device: torch.device) -> str:
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, these are on {device}"
        return f"msa._C was not built ({_extension.EXTENSION_ERROR or 'no CPU kernel registered'}); {_HOW_TO_BUILD}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, these are on {device}"
        return (
            "msa._C was built without its CUDA kernels; install a CUDA build of torch and the CUDA toolkit, set "
            "CUDA_HOME, then " + _HOW_TO_BUILD + " (MSA_FORCE_CUDA=1 builds them without a visible GPU)"
        )
    if _TRITON_PROBLEM:
        return _TRITON_PROBLEM
    return f"the 'triton' backend runs on CUDA tensors (or under TRITON_INTERPRET=1), these are on {device}"


_warned_about_fallback = False


def _warn_once_about_fallback(device: torch.device) -> None:
    # A source checkout without an in-place build imports msa without msa._C: say so once, or the einsum
    # gets measured (and trained with) unknowingly.
    global _warned_about_fallback
    if _warned_about_fallback or device.type != "cpu" or _COMPILED_KERNELS["cpu"] or torch.compiler.is_compiling():
        return
    _warned_about_fallback = True
    import msa

    logger.warning(
        "mscmat_scores backend='auto' uses the einsum reference: the msa imported from %s has no compiled "
        "extension (%s); %s",
        os.path.dirname(msa.__file__),
        _extension.EXTENSION_ERROR or "no CPU kernel registered",
        _HOW_TO_BUILD,
    )


def resolve_backend(
    backend: str,
    device: torch.device | str,
    *,
    dtype: torch.dtype | None = None,
    work: int | None = None,
    training: bool = False,
) -> str:
    """The concrete backend that ``backend`` names for tensors on ``device``.

    ``"auto"`` (overridable by the ``MSA_BACKEND`` environment variable) picks, given the call's ``dtype`` and
    ``work`` (Ni Nt L H Dh), the backend measured faster on this card for that dtype, size and use (``training``:
    forward + backward), where ``msa/ops/backend_choices.json`` has measurements (:mod:`msa.ops.backend_choice`),
    else the first of :func:`available_backends`. An explicit backend that cannot run raises ``RuntimeError``
    naming the fix.
    """
    device = torch.device(device)
    if backend == "auto":
        backend = os.environ.get("MSA_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(
                f"unknown backend {backend!r} in the MSA_BACKEND environment variable; expected one of {BACKENDS}"
            )
        if backend == "auto":
            candidates = available_backends(device)
            chosen = candidates[0]
            if dtype is not None and work is not None:
                chosen = measured_choice(device, dtype, work, training, candidates) or chosen
            if chosen == "reference":
                _warn_once_about_fallback(device)
            return chosen
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if not backend_available(backend, device):
        reason = _unavailable_reason(backend, device)
        raise RuntimeError(f"mscmat_scores backend {backend!r} is not available: {reason}")
    return backend


def _check_inputs(q, u, k, v, word_mask) -> None:
    for name, tensor, rank, layout in (
        ("q", q, 3, "[Ni, H, Dh]"),
        ("u", u, 3, "[Ni, H, Dh]"),
        ("k", k, 4, "[Nt, L, H, Dh]"),
        ("v", v, 4, "[Nt, L, H, Dh]"),
    ):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"mscmat_scores: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != rank:
            raise ValueError(f"mscmat_scores: {name} must be {layout}, got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"mscmat_scores: {name} must be a floating-point tensor, got {tensor.dtype}")
    if q.shape[-1] == 0:
        raise ValueError(
            f"mscmat_scores: the head dim Dh (last dim of q, u, k, v) must be at least 1, got {tuple(q.shape)}"
        )
    if u.shape != q.shape:
        raise ValueError(f"mscmat_scores: u must have q's shape {tuple(q.shape)} [Ni, H, Dh], got {tuple(u.shape)}")
    if k.shape[2:] != q.shape[1:]:
        raise ValueError(
            f"mscmat_scores: k must be [Nt, L, H={q.shape[1]}, Dh={q.shape[2]}] to match q, got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"mscmat_scores: v must have k's shape {tuple(k.shape)} [Nt, L, H, Dh], got {tuple(v.shape)}")
    for name, tensor in (("u", u), ("k", k), ("v", v)):
        if tensor.dtype != q.dtype:
            raise TypeError(f"mscmat_scores: {name} has dtype {tensor.dtype} but q has {q.dtype}; use one dtype")
        if tensor.device != q.device:
            raise ValueError(f"mscmat_scores: {name} is on {tensor.device} but q is on {q.device}; use one device")
    if word_mask is not None:
        if not isinstance(word_mask, torch.Tensor):
            raise TypeError(f"mscmat_scores: word_mask must be a torch.Tensor or None, got {type(word_mask).__name__}")
        expected = (k.shape[0], k.shape[1])
        if tuple(word_mask.shape) != expected:
            raise ValueError(
                f"mscmat_scores: word_mask must be [Nt, L] = {list(expected)}, got {list(word_mask.shape)}"
            )
        if word_mask.is_floating_point() or word_mask.is_complex():
            raise TypeError(
                f"mscmat_scores: word_mask must be bool or integer (nonzero = real token), got {word_mask.dtype}; "
                "additive float masks are not accepted"
            )
        if word_mask.device != q.device:
            raise ValueError(f"mscmat_scores: word_mask is on {word_mask.device} but q is on {q.device}")


def mscmat_scores(
    q: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    word_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Every image x text score of one MSCMAT scale, fused.

    ``scores[i, j] = sum_h sum_l softmax_l(scale * <q[i,h], k[j,l,h]>) * <u[i,h], v[j,l,h]>`` with the softmax
    over the valid words of text j. A text without a valid word scores exactly 0. Differentiable in q, u, k, v.

    Args:
        q: image queries [Ni, H, Dh].
        u: image readout vectors [Ni, H, Dh].
        k: word keys [Nt, L, H, Dh].
        v: word values [Nt, L, H, Dh].
        word_mask: [Nt, L] bool or integer, nonzero = real token (transformers' attention_mask convention);
            None = every token is real.
        scale: logit scale; default ``Dh ** -0.5``.
        backend: "auto" (fastest available for the device, else the reference), "reference", "cpu", "cuda" or
            "triton". The ``MSA_BACKEND`` environment variable overrides "auto".

    Returns:
        scores [Ni, Nt] in the inputs' dtype.
    """
    _check_inputs(q, u, k, v, word_mask)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, u, k, v))
    work = q.shape[0] * k.shape[0] * k.shape[1] * q.shape[1] * q.shape[2]
    chosen = resolve_backend(backend, q.device, dtype=q.dtype, work=work, training=training)
    if word_mask is not None and word_mask.dtype != torch.bool:
        word_mask = word_mask != 0
    if chosen == "reference":
        return mscmat_scores_ref(q, u, k, v, word_mask, scale)
    if q.shape[0] == 0 or k.shape[0] == 0:
        return q.new_zeros((q.shape[0], k.shape[0]))
    if chosen == "triton":
        from msa.kernels.mscmat_triton import mscmat_scores_triton

        return mscmat_scores_triton(q, u, k, v, word_mask, scale)
    if chosen == "cpu" and training:
        keep_softmax = saved_softmax_bytes(q, k) <= _saved_softmax_budget
        return torch.ops.msa.mscmat_scores_for_grad(q, u, k, v, word_mask, scale, keep_softmax)[0]
    return torch.ops.msa.mscmat_scores(q, u, k, v, word_mask, scale)
