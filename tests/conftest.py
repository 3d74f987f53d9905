"""Shared test fixtures and helpers. Import the helpers with ``from conftest import ...`` (pytest puts tests/ on
sys.path)."""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path

import pytest
import torch

# ---- mscmat_scores: inputs and the low-precision error rule ----------------------------------------------------

MASK_KINDS = (None, "random", "masked-texts", "all-masked")


def make_op_inputs(
    ni: int,
    nt: int,
    length: int,
    heads: int,
    head_dim: int,
    *,
    mask_kind: str | None = "masked-texts",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    requires_grad: bool = False,
    device: str | torch.device = "cpu",
):
    """Random ``q, u`` [Ni, H, Dh], ``k, v`` [Nt, L, H, Dh] and a bool word mask [Nt, L] for ``mscmat_scores``.

    Values are drawn in float64 on the CPU from ``seed`` and then cast, so every dtype and device sees the same
    numbers. ``mask_kind``: None (no mask), "random" (about 60% real words, the first word of every text real),
    "masked-texts" (random, and texts 0, 3, 6, ... without a real word: they must score 0),
    "all-masked" (no real word anywhere).
    """
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        values = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return values.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    q, u = randn(ni, heads, head_dim), randn(ni, heads, head_dim)
    k, v = randn(nt, length, heads, head_dim), randn(nt, length, heads, head_dim)
    if mask_kind is None:
        return q, u, k, v, None
    mask = torch.rand(nt, length, generator=generator) > 0.4
    mask[:, 0] = True
    if mask_kind == "masked-texts":
        mask[::3] = False
    elif mask_kind == "all-masked":
        mask[:] = False
    return q, u, k, v, mask.to(device)


def check_close(got: torch.Tensor, low_precision: torch.Tensor, want: torch.Tensor, name: str, dtype: torch.dtype):
    """flash-attention's rule: the kernel's error against the float64 (or float32) reference ``want`` is at most
    twice the error of the reference itself run in the low precision (``low_precision``), plus a small floor scaled
    to the values."""
    want = want.double()
    kernel_error = (got.double() - want).abs().max().item()
    reference_error = (low_precision.double() - want).abs().max().item()
    magnitude = max(1.0, want.abs().max().item())
    floor = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * magnitude
    assert kernel_error <= 2 * reference_error + floor, (
        f"{name}: kernel error {kernel_error:.3e} > 2 x reference error {reference_error:.3e} + {floor:.1e}"
    )


def check_only_asked_gradients(backward, grad, inputs):
    """``backward(grad, q, u, k, v, needs_grad)`` for every subset of the four gradients: an asked-for gradient
    equals the one computed with all four, one not asked for is an empty tensor."""
    full = backward(grad, *inputs, [True] * 4)
    for asked in itertools.product([False, True], repeat=4):
        got = backward(grad, *inputs, list(asked))
        for name, needed, partial, complete in zip("qukv", asked, got, full):
            if needed:
                torch.testing.assert_close(
                    partial, complete, rtol=0, atol=0, msg=lambda m, name=name, asked=asked: f"d{name}, {asked}: {m}"
                )
            else:
                assert partial.numel() == 0, f"d{name} was not asked for ({asked}) but has shape {partial.shape}"
    return full


def poison_masked_words(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
    """k and v with NaN, +inf and -inf written at every masked word: the scores and gradients of every backend must
    not change (a masked word contributes nothing, whatever it holds)."""
    poisoned_k, poisoned_v = k.detach().clone(), v.detach().clone()
    masked = ~mask
    poisoned_k[masked] = float("nan")
    poisoned_v[masked] = float("inf")
    poisoned_v[masked.nonzero()[::2].unbind(1)] = float("-inf")
    poisoned_v[masked.nonzero()[1::3].unbind(1)] = float("nan")
    return poisoned_k.requires_grad_(k.requires_grad), poisoned_v.requires_grad_(v.requires_grad)


def require_triton_kernels():
    """The triton module, or a skip of the calling test that says why where the installed Triton cannot compile
    msa's kernels: none installed, or one older than msa.ops.mscmat.TRITON_MIN_VERSION (torch < 2.8 brings one).
    Reads the version without importing triton (the interpreter tests need TRITON_INTERPRET set before that)."""
    from msa.ops import mscmat

    if mscmat._TRITON_PROBLEM:
        pytest.skip(mscmat._TRITON_PROBLEM)
    import triton

    return triton


# --- Synthetic datasets (see tests/synthetic_data.py) ---------------------------------------------------------------


def import_benchmark(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is not a package; its scripts import each other)."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """Factory: ``synthetic_dataset(layout="karpathy", num_images=10, captions_per_image=5, seed=0)`` writes (once per
    session and argument set) a synthetic dataset and returns its :class:`synthetic_data.SyntheticDataset`.

    The files are shared by every test asking for the same arguments: read them, never modify them (copy the folder
    with ``shutil.copytree`` first, or call ``synthetic_data.write_synthetic_dataset`` into ``tmp_path``).
    """
    # Imported here, not at the top: the op helpers above are also imported by scripts that have no PIL
    # (benchmarks/kernel_report.py lists the GPU tests' launches on a bare machine).
    from synthetic_data import write_synthetic_dataset

    cache: dict[tuple, object] = {}

    def make(layout: str = "karpathy", num_images: int = 10, captions_per_image: int = 5, seed: int = 0):
        key = (layout, num_images, captions_per_image, seed)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"synthetic_{layout}")
            cache[key] = write_synthetic_dataset(root, layout, num_images, captions_per_image, seed)
        return cache[key]

    return make


@pytest.fixture
def set_tf32():
    """A setter of torch's TF32 setting for float32 CUDA matmuls (``set_tf32(True)``; the newer fp32_precision API
    where torch has it, else allow_tf32), restored after the test."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(torch.backends, "fp32_precision") else "allow_tf32"
    previous = getattr(matmul, name)
    yield lambda on: setattr(matmul, name, ("tf32" if on else "ieee") if name == "fp32_precision" else on)
    setattr(matmul, name, previous)
