"""The Triton kernels of mscmat_scores on the CPU, under Triton's interpreter (TRITON_INTERPRET=1): forward and
every gradient against the einsum reference, on small odd shapes. On a machine with a GPU the compiled kernels
are tested by tests/test_ops_gpu.py instead and this file is skipped.

The interpreter must be on before triton is first imported (triton.language's own @jit helpers are made at that
moment), and in a whole test session other modules import triton first. So unless TRITON_INTERPRET=1 was set
when this process started, one test here reruns this file in a child pytest process that starts with it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import (
    check_close,
    check_only_asked_gradients,
    import_benchmark,
    make_op_inputs,
    poison_masked_words,
    require_triton_kernels,
)

from msa.ops import mscmat_scores_ref
from msa.ops.mscmat import _installed_triton_version, _major_minor

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_cannot_loop() -> str:
    """Why Triton's interpreter cannot run the kernels here ("" if it can). Before Triton 3.7 it turns a loop bound
    (a one-element array) into an int with int(), which newer numpy refuses with a TypeError."""
    version = _installed_triton_version()
    if version is None or _major_minor(version) >= (3, 7):
        return ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            int(np.array([1]))
    except TypeError:
        return (f"Triton {version}'s interpreter takes loop bounds with int() of a one-element array, which numpy "
                f"{np.__version__} refuses (fixed in Triton 3.7)")  # fmt: skip
    return ""


INTERPRETER_PROBLEM = _interpreter_cannot_loop()
pytestmark = [
    pytest.mark.skipif(
        torch.cuda.is_available(), reason="interpreter test for CPU-only machines; tests/test_ops_gpu.py covers the GPU"
    ),
    pytest.mark.skipif(bool(INTERPRETER_PROBLEM), reason=INTERPRETER_PROBLEM),
]
in_interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs in the child process with TRITON_INTERPRET=1")


@pytest.mark.skipif(INTERPRETING, reason="already under the interpreter")
def test_interpreter_suite_in_child_process():
    require_triton_kernels()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        # `python -m` puts the working directory first on sys.path: from the repository root that would import the
        # source tree's msa (no compiled extension, no msa.kernels) instead of the installed one.
        cwd=os.path.dirname(os.path.abspath(__file__)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    skipped = re.search(r"(\d+) skipped", summary)
    # Only this wrapper may be skipped in the child: every kernel test must have run there.
    assert " passed" in summary and (skipped is None or int(skipped.group(1)) <= 1), run.stdout[-3000:]


@pytest.fixture(scope="module")
def triton_module():
    require_triton_kernels()
    from msa.kernels import mscmat_triton

    assert mscmat_triton.INTERPRET
    return mscmat_triton


def make_inputs(ni, nt, length, heads, head_dim, mask_kind, dtype=torch.float32, seed=0):
    return make_op_inputs(ni, nt, length, heads, head_dim, mask_kind=mask_kind, dtype=dtype, seed=seed,
                          requires_grad=True)  # fmt: skip


def grads_of(scores, inputs, grad_scores):
    return torch.autograd.grad(scores, inputs, grad_scores)


# (Ni, Nt, L, H, Dh, mask): Ni, Nt off the 16-image tile and the 128 / next_pow2(L) text tile; L padded, one
# word, several text tiles, beyond 128 words (chunked online softmax, two-pass backward); Dh padded to a
# power of two; texts without words.
CASES = [
    (17, 5, 7, 2, 32, "random"),
    (3, 9, 1, 1, 64, None),
    (6, 5, 50, 2, 32, "masked-texts"),
    (4, 3, 130, 1, 16, "random"),
    (5, 4, 6, 3, 24, "masked-texts"),
    (2, 3, 4, 2, 16, "all-masked"),
]


@in_interpreter
def test_float32_runs_with_tf32_set_through_torchs_newer_api(triton_module, set_tf32):
    """With TF32 set through fp32_precision (torch >= 2.9), after which reading the legacy allow_tf32 raises, float32
    takes TF32 products and the op runs."""
    set_tf32(True)
    q, u, k, v, mask = make_inputs(5, 4, 6, 2, 16, "random")
    assert triton_module._input_precision(torch.float32) == "tf32"
    assert triton_module._input_precision(torch.bfloat16) == "tf32"  # (16-bit products ignore it)
    scores = triton_module.mscmat_scores_triton(q, u, k, v, mask, 0.25)
    expected = mscmat_scores_ref(*(t.double() for t in (q, u, k, v)), mask, 0.25)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)
    set_tf32(False)
    assert triton_module._input_precision(torch.float32) == "ieee"


@in_interpreter
@pytest.mark.parametrize("ni,nt,length,heads,head_dim,mask_kind", CASES)
def test_forward_and_gradients_match_reference(triton_module, ni, nt, length, heads, head_dim, mask_kind):
    q, u, k, v, mask = make_inputs(ni, nt, length, heads, head_dim, mask_kind)
    scale = 0.7 * head_dim**-0.5
    scores = triton_module.mscmat_scores_triton(q, u, k, v, mask, scale)
    expected = mscmat_scores_ref(*(t.double() for t in (q, u, k, v)), mask, scale)
    assert scores.shape == (ni, nt) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)

    grad_scores = torch.randn(ni, nt, generator=torch.Generator().manual_seed(1))
    grads = grads_of(scores, (q, u, k, v), grad_scores)
    expected_grads = grads_of(expected, (q, u, k, v), grad_scores.double())
    for name, got, want in zip("qukv", grads, expected_grads):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4, msg=f"d{name}")

    if mask_kind == "masked-texts":  # texts 0, 3, 6, ... have no real word
        assert torch.all(scores[:, ::3] == 0)
        assert torch.all(grads[2][::3] == 0) and torch.all(grads[3][::3] == 0)
    if mask_kind == "all-masked":
        assert torch.all(scores == 0)
        assert all(torch.all(g == 0) for g in grads)


@in_interpreter
@pytest.mark.parametrize(
    "tile,length,mask_kind",
    [((16, 2, 4, 1, 0, 1, 0), 7, "masked-texts"), ((16, 4, 4, 1, 1, 1, 0), 30, "random"),
     ((32, 8, 4, 1, 0, 1, 0), 9, None), ((16, 2, 4, 1, 0, 1, 128), 130, "random")],
)  # fmt: skip
def test_forward_with_every_text_of_a_program_in_one_product(triton_module, tile, length, mask_kind):
    """WIDE forward tiles (an autotune candidate the interpreter's single config does not run): all BLOCK_T texts
    in one product per head, q, u in shared memory or registers, Nt = 7 off the text tile, texts without words;
    texts longer than one chunk fall back to one text per product."""
    ni, nt, heads, head_dim = 19, 7, 2, 16
    q, u, k, v, mask = (t.detach() if t is not None else t for t in make_inputs(ni, nt, length, heads, head_dim,
                                                                                mask_kind))  # fmt: skip
    scale = 0.6 * head_dim**-0.5
    scores = triton_module._forward(q, u, k, v, mask, scale, tile=tile)
    expected = mscmat_scores_ref(*(t.double() for t in (q, u, k, v)), mask, scale)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)
    if mask_kind == "masked-texts":
        assert torch.all(scores[:, ::3] == 0)


@in_interpreter
@pytest.mark.parametrize("length", [37, 130])
def test_words_kernel_in_chunks_of_its_own(triton_module, monkeypatch, length):
    """The dk/dv kernel takes its own word chunks (configs.words_chunk: at Dh 64, 64 words where the forward takes
    128), since its softmax is elementwise: chunks of 16 words here, a partial last one, a text spread over several
    programs, one chunk of the forward's (L 37) or three (L 130)."""
    monkeypatch.setattr(triton_module, "words_chunk", lambda kind, block_l, block_d: 16)
    q, u, k, v, mask = make_inputs(4, 5, length, 2, 16, "random")
    scores = triton_module.mscmat_scores_triton(q, u, k, v, mask, 0.3)
    expected = mscmat_scores_ref(*(t.double() for t in (q, u, k, v)), mask, 0.3)
    grad_scores = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    for name, got, want in zip(
        "kv", grads_of(scores, (k, v), grad_scores), grads_of(expected, (k, v), grad_scores.double())
    ):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4, msg=f"d{name}")


@in_interpreter
@pytest.mark.parametrize("length", [9, 130])
def test_one_split_of_heads_and_texts(triton_module, monkeypatch, length):
    """At these sizes the forward splits its heads and the dq/du kernel its texts across programs (partial sums the
    caller adds up); with MIN_PROGRAMS 1 there is one split of each, so each program walks all heads or texts (as
    at large sizes on a GPU) and writes the scores and dq, du without a workspace."""
    assert triton_module._head_splits(5, 7, 2) == (2, 1) and triton_module._text_splits(5, 7, 2) == (7, 1)
    monkeypatch.setattr(triton_module, "MIN_PROGRAMS", 1)
    assert triton_module._head_splits(5, 7, 2) == (1, 2) and triton_module._text_splits(5, 7, 2) == (1, 7)
    q, u, k, v, mask = make_inputs(5, 7, length, 2, 16, "masked-texts")
    grad_scores = torch.randn(5, 7, generator=torch.Generator().manual_seed(6))
    scores = triton_module.mscmat_scores_triton(q, u, k, v, mask)
    expected = mscmat_scores_ref(q, u, k, v, mask)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    grads = grads_of(scores, (q, u, k, v), grad_scores)
    expected_grads = grads_of(expected, (q, u, k, v), grad_scores)
    for name, got, want in zip("qukv", grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"d{name}")


@in_interpreter
@pytest.mark.parametrize("length", [9, 130])
def test_backward_in_text_blocks_when_statistics_exceed_the_budget(triton_module, monkeypatch, length):
    """With the softmax statistics over budget the backward walks the texts in blocks (here two texts each, the
    last block shorter): every gradient still matches the reference and the one-block run."""
    ni, nt, heads = 5, 7, 2
    q, u, k, v, mask = make_inputs(ni, nt, length, heads, 16, "masked-texts")
    grad_scores = torch.randn(ni, nt, generator=torch.Generator().manual_seed(5))
    scores = triton_module.mscmat_scores_triton(q, u, k, v, mask)
    one_block = grads_of(scores, (q, u, k, v), grad_scores)
    monkeypatch.setattr(triton_module, "STATS_BYTES_BUDGET", 2 * 8 * ni * heads)
    assert triton_module._texts_per_stats_block(ni, nt, heads) == 2
    blocks = grads_of(triton_module.mscmat_scores_triton(q, u, k, v, mask), (q, u, k, v), grad_scores)
    expected = grads_of(mscmat_scores_ref(q, u, k, v, mask), (q, u, k, v), grad_scores)
    for name, got, same, want in zip("qukv", blocks, one_block, expected):
        torch.testing.assert_close(got, same, rtol=1e-6, atol=1e-6, msg=f"d{name}")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"d{name}")
    # A frozen image side: the images kernel computes only the statistics, block by block.
    detached = [t.detach() for t in (q, u, k, v)]
    words_only = torch.ops.msa.mscmat_scores_triton_backward(
        grad_scores, *detached, mask, ni**-0.5, [False] * 2 + [True] * 2
    )
    expected = grads_of(mscmat_scores_ref(q, u, k, v, mask, ni**-0.5), (k, v), grad_scores)
    assert words_only[0].numel() == 0 and words_only[1].numel() == 0
    for name, got, want in zip("kv", words_only[2:], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"d{name}")


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_the_reference_error(triton_module, dtype):
    """Flash-attention's rule: the kernel's error against the float32 reference is at most twice that of the
    reference run in the same low precision, plus a small floor."""
    q, u, k, v, mask = make_inputs(9, 6, 12, 2, 32, "masked-texts", dtype=dtype)
    grad_scores = torch.randn(9, 6, generator=torch.Generator().manual_seed(2)).to(dtype)
    scores = triton_module.mscmat_scores_triton(q, u, k, v, mask)
    assert scores.dtype == dtype
    low = mscmat_scores_ref(q, u, k, v, mask)
    full_inputs = [t.detach().float().requires_grad_(True) for t in (q, u, k, v)]
    full = mscmat_scores_ref(*full_inputs, mask)
    check_close(scores, low, full.detach(), "scores", dtype)
    grads = grads_of(scores, (q, u, k, v), grad_scores)
    low_grads = grads_of(low, (q, u, k, v), grad_scores)
    full_grads = grads_of(full, full_inputs, grad_scores.float())
    for name, got, low_grad, want in zip("qukv", grads, low_grads, full_grads):
        assert got.dtype == dtype
        check_close(got, low_grad, want, f"d{name}", dtype)


@in_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the forward's products
def test_masked_words_contribute_nothing_whatever_their_values(triton_module):
    """NaN and inf in k and v at masked words change no score and no gradient (as on every other backend)."""
    q, u, k, v, mask = make_inputs(5, 7, 9, 2, 16, "masked-texts")
    bad_k, bad_v = poison_masked_words(k, v, mask)
    grad_scores = torch.randn(5, 7, generator=torch.Generator().manual_seed(4))
    clean = triton_module.mscmat_scores_triton(q, u, k, v, mask)
    poisoned = triton_module.mscmat_scores_triton(q, u, bad_k, bad_v, mask)
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)
    clean_grads = grads_of(clean, (q, u, k, v), grad_scores)
    poisoned_grads = grads_of(poisoned, (q, u, bad_k, bad_v), grad_scores)
    for name, got, want in zip("qukv", poisoned_grads, clean_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"d{name}")
    assert torch.all(poisoned_grads[2][~mask] == 0) and torch.all(poisoned_grads[3][~mask] == 0)


@in_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the poison, in a product
@pytest.mark.parametrize("tile", [(16, 2, 4, 1, 0, 0, 0), (16, 2, 4, 1, 1, 0, 0), (16, 4, 4, 1, 0, 1, 0)])
def test_forward_drops_masked_words_it_loads(triton_module, tile):
    """The forward loads k, v by bounds alone, masked words included (see tiles.logits_readouts): whatever they
    hold must not reach a score, one text per product or all of a program's texts in one."""
    q, u, k, v, mask = (t.detach() for t in make_inputs(5, 7, 9, 2, 16, "masked-texts"))
    bad_k, bad_v = poison_masked_words(k, v, mask)
    clean = triton_module._forward(q, u, k, v, mask, 0.25, tile=tile)
    poisoned = triton_module._forward(q, u, bad_k, bad_v, mask, 0.25, tile=tile)
    assert torch.isfinite(clean).all()
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


@in_interpreter
def test_strided_inputs_and_integer_mask(triton_module):
    """Views with unusual strides (a slice of longer texts, a head-major q) and a 0/1 integer mask."""
    generator = torch.Generator().manual_seed(3)
    ni, nt, length, heads, head_dim = 7, 4, 5, 2, 32
    q = torch.randn(heads, ni, head_dim, generator=generator).transpose(0, 1)
    u = torch.randn(ni, heads, head_dim * 2, generator=generator)[..., ::2]  # last-dim stride 2
    k = torch.randn(nt, length + 3, heads, head_dim, generator=generator)[:, 2 : 2 + length]
    v = torch.randn(nt, length, heads, head_dim, generator=generator)
    mask = (torch.rand(nt, length, generator=generator) > 0.3).long()
    scores = triton_module.mscmat_scores_triton(q, u, k, v, mask)
    expected = mscmat_scores_ref(q, u, k, v, mask.bool())
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


@in_interpreter
def test_registered_op_schema_and_autograd(triton_module):
    q, u, k, v, mask = make_inputs(4, 3, 5, 2, 16, "random")
    torch.library.opcheck(
        torch.ops.msa.mscmat_scores_triton,
        (q, u, k, v, mask, 0.25),
        test_utils=("test_schema", "test_autograd_registration"),
    )


@in_interpreter
def test_backward_computes_only_the_gradients_asked_for(triton_module, monkeypatch):
    q, u, k, v, mask = (t.detach() if t is not None else t for t in make_inputs(5, 4, 6, 2, 16, "masked-texts"))
    grad = torch.randn(5, 4)

    def backward(grad, q, u, k, v, needs):
        return torch.ops.msa.mscmat_scores_triton_backward(grad, q, u, k, v, mask, 0.25, needs)

    full = check_only_asked_gradients(backward, grad, (q, u, k, v))
    # The words kernel (dk, dv) is not launched for a frozen text side: with it gone, dq and du still come out.
    monkeypatch.setattr(triton_module, "mscmat_scores_bwd_words_kernel", None)
    q.requires_grad_()
    u.requires_grad_()
    dq, du = torch.autograd.grad(triton_module.mscmat_scores_triton(q, u, k, v, mask, 0.25), (q, u), grad)
    torch.testing.assert_close(dq, full[0], rtol=0, atol=0)
    torch.testing.assert_close(du, full[1], rtol=0, atol=0)


@in_interpreter
def test_float64_is_refused(triton_module):
    q, u, k, v, _ = make_inputs(2, 2, 3, 1, 16, None, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        triton_module.mscmat_scores_triton(q, u, k, v)


@in_interpreter
def test_fused_backward_floor_adds_every_image_tile_once_per_text_block():
    """benchmarks/fused_backward.py times the atomic adds of its fused backward alone: every text block's program
    must add every image tile of its head exactly once (odd sizes: a partial image tile, a partial text block)."""
    fused = import_benchmark("fused_backward")
    q = torch.randn(70, 3, 16).to(torch.bfloat16)
    u = torch.randn(70, 3, 16).to(torch.bfloat16)
    dq, du = fused.image_side_atomics(q, u, num_texts=9, texts_per_program=4, block_i=32)
    assert dq.dtype == torch.float32
    torch.testing.assert_close(dq, 3 * q.float(), rtol=0, atol=0)
    torch.testing.assert_close(du, 3 * u.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="power of two"):
        fused.image_side_atomics(q[..., :12].contiguous(), u[..., :12].contiguous(), num_texts=2)


@in_interpreter
@pytest.mark.parametrize(
    "ni,nt,length,heads,head_dim,mask_kind,texts",
    [(37, 7, 9, 2, 24, "masked-texts", 2), (20, 5, 30, 1, 16, "random", 4), (16, 3, 16, 2, 32, None, 1)],
)
def test_fused_backward_matches_the_reference(ni, nt, length, heads, head_dim, mask_kind, texts):
    """The fused backward kernel (benchmark code): every gradient against the float64 reference; image tiles
    beyond Ni, a partial text block, texts without words, Dh padded, one to four texts a program."""
    fused = import_benchmark("fused_backward")
    q, u, k, v, mask = make_inputs(ni, nt, length, heads, head_dim, mask_kind)
    grad = torch.randn(ni, nt, generator=torch.Generator().manual_seed(3))
    expected = grads_of(mscmat_scores_ref(*(t.double() for t in (q, u, k, v)), mask, 0.4), (q, u, k, v), grad.double())
    got = fused.fused_backward(grad, *(t.detach() for t in (q, u, k, v)), mask, 0.4, texts_per_program=texts,
                               block_i=16)  # fmt: skip
    for name, g, want in zip("qukv", got, expected):
        assert g.shape == want.shape and g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), want.double(), rtol=1e-4, atol=1e-4, msg=f"d{name}")
    with pytest.raises(ValueError, match="exceed one product"):
        fused.fused_backward(grad, *(t.detach() for t in (q, u, k, v)), mask, texts_per_program=16)


@in_interpreter
def test_fused_backward_rows_of_the_targets_benchmark():
    """bench_gpu_targets' fused-backward rows: each fused tile with its ratio to the two-kernel backward, the floor
    with four and two texts a program, each with its share of the backward."""
    bench = import_benchmark("bench_gpu_targets")
    rows = bench.fused_backward_rows((40, 9, 32, 2, 16), 1000.0, 1e9, 1, torch.device("cpu"))
    tiles = len(import_benchmark("fused_backward").FUSED_TILES)
    fused, floors = rows[:tiles], rows[tiles:]
    for row in fused:
        assert row["mode"].startswith("fused backward, 2 texts") and row["median_ms"] > 0, row
        assert row["speedup_vs_two_kernels"] == 1000.0 / row["median_ms"], row
    assert [row["texts_per_program"] for row in floors] == [4, 2]
    for row in floors:
        assert row["median_ms"] > 0 and row["share_of_backward"] == row["median_ms"] / 1000.0, row
