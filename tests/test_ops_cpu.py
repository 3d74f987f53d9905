"""msa.ops.mscmat_scores on the CPU: parity with the reference, gradients, registration, bad inputs."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import check_only_asked_gradients, make_op_inputs, poison_masked_words

from msa.ops import (
    _extension,
    available_backends,
    empty_cache,
    mscmat_scores,
    mscmat_scores_ref,
    resolve_backend,
    saved_softmax_bytes,
    set_saved_softmax_budget,
)
from msa.ops import mscmat as dispatcher

needs_cpu_kernel = pytest.mark.skipif(
    "cpu" not in available_backends("cpu"), reason="msa._C was not built: pip install --no-build-isolation ."
)


def as_double(*tensors):
    return [t.detach().double() for t in tensors]


GRID = list(itertools.product([1, 7, 97], [1, 7, 97], [1, 30, 33], [1, 12], [8, 64, 80]))


@needs_cpu_kernel
@pytest.mark.parametrize("ni,nt,length,heads,head_dim", GRID)
def test_forward_matches_reference(ni, nt, length, heads, head_dim):
    for masked in (False, True):
        q, u, k, v, mask = make_op_inputs(ni, nt, length, heads, head_dim, mask_kind="masked-texts" if masked else None)
        fused = mscmat_scores(q, u, k, v, mask, backend="cpu")
        expected = mscmat_scores_ref(*as_double(q, u, k, v), mask)
        assert fused.shape == (ni, nt) and fused.dtype == torch.float32
        scale = expected.abs().max().clamp_min(1.0)
        torch.testing.assert_close(fused.double(), expected, rtol=0, atol=2e-6 * scale)
        if masked:
            assert torch.all(fused[:, 0] == 0), "a text with no valid word must score exactly 0"


@needs_cpu_kernel
@pytest.mark.parametrize("ni,nt,length,heads,head_dim", [(7, 97, 33, 12, 8), (97, 7, 30, 1, 80), (33, 40, 1, 3, 64)])
def test_float32_gradients_match_reference(ni, nt, length, heads, head_dim):
    q, u, k, v, mask = make_op_inputs(ni, nt, length, heads, head_dim, requires_grad=True)
    grad_out = torch.randn(ni, nt, dtype=torch.float64)
    fused_grads = torch.autograd.grad(mscmat_scores(q, u, k, v, mask, backend="cpu"), (q, u, k, v), grad_out.float())
    ref_inputs = [t.requires_grad_() for t in as_double(q, u, k, v)]
    ref_grads = torch.autograd.grad(mscmat_scores_ref(*ref_inputs, mask), ref_inputs, grad_out)
    for name, fused, ref in zip("quvk", fused_grads, ref_grads):
        assert torch.isfinite(fused).all(), name
        torch.testing.assert_close(fused.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().clamp_min(1.0))


@needs_cpu_kernel
@pytest.mark.parametrize("threads,heads", [(4, 1), (3, 2), (1, 3)])
def test_gradients_with_more_threads_than_heads(threads, heads):
    # Fewer heads than threads splits the images into chunks with private dk/dv buffers, summed at the end.
    q, u, k, v, mask = make_op_inputs(80, 8, 4, heads, 16, requires_grad=True)
    grad_out = torch.randn(80, 8)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused_grads = torch.autograd.grad(mscmat_scores(q, u, k, v, mask, backend="cpu"), (q, u, k, v), grad_out)
    finally:
        torch.set_num_threads(previous)
    ref_inputs = [t.requires_grad_() for t in as_double(q, u, k, v)]
    ref_grads = torch.autograd.grad(mscmat_scores_ref(*ref_inputs, mask), ref_inputs, grad_out.double())
    for fused, ref in zip(fused_grads, ref_grads):
        torch.testing.assert_close(fused.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().clamp_min(1.0))


@needs_cpu_kernel
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(masked):
    q, u, k, v, mask = make_op_inputs(
        5, 6, 7, 2, 8, dtype=torch.float64, mask_kind="masked-texts" if masked else None, requires_grad=True
    )
    assert torch.autograd.gradcheck(lambda *x: mscmat_scores(*x, mask, backend="cpu"), (q, u, k, v))


@needs_cpu_kernel
def test_bfloat16_runs_in_float32_and_rounds_once():
    q, u, k, v, mask = make_op_inputs(9, 11, 30, 4, 32, dtype=torch.bfloat16)
    fused = mscmat_scores(q, u, k, v, mask, backend="cpu")
    assert fused.dtype == torch.bfloat16
    expected = mscmat_scores_ref(*as_double(q, u, k, v), mask)
    # The kernel computes in float32 from the bf16 inputs: the only error is the final rounding to bf16.
    torch.testing.assert_close(fused.double(), expected, rtol=2**-8, atol=1e-5)


@needs_cpu_kernel
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked):
    q, u, k, v, mask = make_op_inputs(6, 5, 9, 2, 8, mask_kind="masked-texts" if masked else None, requires_grad=True)
    torch.library.opcheck(torch.ops.msa.mscmat_scores.default, (q, u, k, v, mask, 0.3))
    grad = torch.randn(6, 5)
    torch.library.opcheck(
        torch.ops.msa.mscmat_scores_backward.default,
        (grad, *(t.detach() for t in (q, u, k, v)), mask, 0.3, [True, False, False, True]),
    )


@needs_cpu_kernel
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_torch_compile_fullgraph(backend):
    q, u, k, v, mask = make_op_inputs(8, 9, 10, 2, 16, requires_grad=True)

    def scores_sum(q, u, k, v, mask):
        return (mscmat_scores(q, u, k, v, mask, backend=backend) * 2.0).sum()

    compiled = torch.compile(scores_sum, fullgraph=True, backend="aot_eager")
    eager_value = scores_sum(q, u, k, v, mask)
    eager_grads = torch.autograd.grad(eager_value, (q, u, k, v))
    compiled_value = compiled(q, u, k, v, mask)
    compiled_grads = torch.autograd.grad(compiled_value, (q, u, k, v))
    torch.testing.assert_close(compiled_value, eager_value)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


@needs_cpu_kernel
def test_non_contiguous_and_expanded_inputs():
    q, u, k, v, mask = make_op_inputs(6, 5, 9, 3, 8)
    q_strided = torch.randn(3, 6, 8).transpose(0, 1)  # [6, 3, 8], not contiguous
    u_expanded = torch.randn(1, 3, 8).expand(6, 3, 8)  # stride 0 along images
    k_sliced = torch.randn(5, 9, 3, 16)[..., ::2]  # every other element of the last dim
    int_mask = mask.to(torch.int64)  # transformers' attention_mask dtype
    fused = mscmat_scores(q_strided, u_expanded, k_sliced, v, int_mask, backend="cpu")
    expected = mscmat_scores_ref(*as_double(q_strided, u_expanded, k_sliced, v), mask)
    torch.testing.assert_close(fused.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_kernel)])
@pytest.mark.parametrize("ni,nt", [(0, 5), (4, 0), (0, 0)])
def test_empty_batch_gives_empty_scores(backend, ni, nt):
    q, u, k, v, mask = make_op_inputs(ni, nt, 6, 2, 8, mask_kind=None)
    scores = mscmat_scores(q, u, k, v, backend=backend)
    assert scores.shape == (ni, nt)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_nan_and_inf_propagate_like_torch(backend):
    q, u, k, v, mask = make_op_inputs(4, 5, 6, 2, 8, mask_kind=None)
    q[1, 0, 0] = float("nan")
    v[2, 3, 1, 4] = float("inf")
    scores = mscmat_scores(q, u, k, v, backend=backend)
    expected = mscmat_scores_ref(q, u, k, v)
    assert torch.equal(scores.isnan(), expected.isnan())
    assert torch.isnan(scores[1]).all()
    assert torch.isinf(scores[[0, 2, 3], 2]).all()
    finite = torch.isfinite(expected)
    torch.testing.assert_close(scores[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "q": a["q"][0]}, r"q must be \[Ni, H, Dh\], got shape \(3, 8\)"),
        (lambda a: {**a, "u": a["u"][:2]}, r"u must have q's shape \(4, 3, 8\)"),
        (lambda a: {**a, "k": a["k"][..., :4]}, r"k must be \[Nt, L, H=3, Dh=8\] to match q, got \(5, 6, 3, 4\)"),
        (lambda a: {**a, "k": a["k"][:, :, :2]}, r"k must be \[Nt, L, H=3, Dh=8\]"),
        (lambda a: {**a, "v": a["v"][:, :4]}, r"v must have k's shape \(5, 6, 3, 8\)"),
        (lambda a: {**a, "word_mask": torch.ones(5, 7, dtype=torch.bool)}, r"word_mask must be \[Nt, L\] = \[5, 6\]"),
        (lambda a: {**a, "word_mask": torch.zeros(5, 6)}, r"word_mask must be bool or integer"),
        (lambda a: {**a, "v": a["v"].double()}, r"v has dtype torch.float64 but q has torch.float32"),
        (lambda a: {**a, "k": a["k"].to("meta")}, r"k is on meta but q is on cpu"),
        (lambda a: {**a, "q": a["q"].long()}, r"q must be a floating-point tensor"),
    ],
)
def test_bad_inputs_name_the_argument(change, message):
    q, u, k, v, _ = make_op_inputs(4, 5, 6, 3, 8, mask_kind=None)
    arguments = change({"q": q, "u": u, "k": k, "v": v, "word_mask": None})
    with pytest.raises((ValueError, TypeError), match=message):
        mscmat_scores(**arguments)


def test_unknown_backend_is_rejected():
    q, u, k, v, _ = make_op_inputs(2, 3, 4, 1, 8, mask_kind=None)
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        mscmat_scores(q, u, k, v, backend="fastest")


def test_unavailable_backend_names_the_fix():
    q, u, k, v, _ = make_op_inputs(2, 3, 4, 1, 8, mask_kind=None)
    with pytest.raises(RuntimeError, match="'cuda' backend runs on CUDA tensors"):
        mscmat_scores(q, u, k, v, backend="cuda")


def test_missing_extension_falls_back_to_reference(monkeypatch):
    monkeypatch.setitem(dispatcher._COMPILED_KERNELS, "cpu", False)
    assert resolve_backend("auto", "cpu") == "reference"
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        resolve_backend("cpu", "cpu")
    q, u, k, v, mask = make_op_inputs(3, 4, 5, 2, 8)
    torch.testing.assert_close(mscmat_scores(q, u, k, v, mask), mscmat_scores_ref(q, u, k, v, mask))


@pytest.mark.parametrize("version", ["3.3.1", "3.2.0+git35c6c7c6"])
def test_triton_older_than_its_kernels_need_is_not_offered(monkeypatch, version):
    """On a GPU with an older Triton (torch 2.6 and 2.7 bring 3.2 and 3.3), auto takes another backend and an
    explicit 'triton' says which version it needs, rather than failing in the kernels' compile."""
    monkeypatch.setattr(dispatcher, "_TRITON_KERNELS_INSTALLED", True)
    monkeypatch.setattr(dispatcher, "_TRITON_PROBLEM", dispatcher.triton_problem(version))
    assert "triton" not in available_backends("cuda")
    with pytest.raises(RuntimeError, match=rf"needs triton >= 3\.4 .* found {re.escape(version)}: install torch"):
        resolve_backend("triton", "cuda")
    monkeypatch.setattr(dispatcher, "_TRITON_PROBLEM", dispatcher.triton_problem("3.4.0"))
    assert "triton" in available_backends("cuda")
    assert dispatcher.triton_problem(None).startswith("triton is not installed")


@needs_cpu_kernel
def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("MSA_BACKEND", "reference")
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("cpu", "cpu") == "cpu"  # an explicit choice wins over the environment
    monkeypatch.setenv("MSA_BACKEND", "auto")
    assert resolve_backend("auto", "cpu") == "cpu"


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_masked_words_contribute_nothing_whatever_their_values(backend):
    q, u, k, v, mask = make_op_inputs(6, 7, 9, 3, 8, dtype=torch.float64, requires_grad=True)
    bad_k, bad_v = poison_masked_words(k, v, mask)
    grad_out = torch.randn(6, 7, dtype=torch.float64)
    clean = mscmat_scores(q, u, k, v, mask, backend=backend)
    poisoned = mscmat_scores(q, u, bad_k, bad_v, mask, backend=backend)
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)
    clean_grads = torch.autograd.grad(clean, (q, u, k, v), grad_out)
    poisoned_grads = torch.autograd.grad(poisoned, (q, u, bad_k, bad_v), grad_out)
    for name, got, want in zip("quvk", poisoned_grads, clean_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=f"d{name}")
    for name, grad in (("k", poisoned_grads[2]), ("v", poisoned_grads[3])):
        assert torch.all(grad[~mask] == 0), f"d{name} at masked words must be 0"


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_fully_masked_text_scores_zero_even_for_non_finite_images(backend):
    q, u, k, v, mask = make_op_inputs(4, 5, 6, 2, 8, dtype=torch.float64, requires_grad=True)
    assert not mask[0].any()
    q, u = q.detach().clone(), u.detach().clone()
    q[1], u[2] = float("nan"), float("inf")
    k, v = poison_masked_words(k, v, mask)
    q, u, k, v = (t.requires_grad_() for t in (q, u, k, v))
    scores = mscmat_scores(q, u, k, v, mask, backend=backend)
    assert torch.all(scores[:, 0] == 0), scores[:, 0]
    assert torch.isfinite(scores[[0, 3]]).all()
    dq, du, dk, dv = torch.autograd.grad(scores[:, 0].sum(), (q, u, k, v))
    # The finite images and the masked text get no gradient from the masked text's scores.
    for grad in (dq[[0, 3]], du[[0, 3]], dk[0], dv[0]):
        assert torch.all(grad == 0), grad


@pytest.fixture
def saved_softmax_budget():
    """Sets the CPU backend's saved-softmax budget for one test, restoring the default afterwards."""
    yield set_saved_softmax_budget
    set_saved_softmax_budget(None)


@needs_cpu_kernel
@pytest.mark.parametrize("budget", [0, 2**40], ids=["recompute", "keep-softmax"])
@pytest.mark.parametrize(
    "ni,nt,length,heads,head_dim",
    [(7, 97, 33, 12, 8), (130, 9, 30, 2, 64), (17, 5, 1, 3, 16), (21, 11, 7, 2, 13), (300, 70, 9, 1, 20)],
)
def test_both_backward_paths_match_reference(saved_softmax_budget, budget, ni, nt, length, heads, head_dim):
    saved_softmax_budget(budget)
    q, u, k, v, mask = make_op_inputs(ni, nt, length, heads, head_dim, requires_grad=True)
    grad_out = torch.randn(ni, nt, dtype=torch.float64)
    fused = mscmat_scores(q, u, k, v, mask, backend="cpu")
    fused_grads = torch.autograd.grad(fused, (q, u, k, v), grad_out.float())
    ref_inputs = [t.requires_grad_() for t in as_double(q, u, k, v)]
    expected = mscmat_scores_ref(*ref_inputs, mask)
    ref_grads = torch.autograd.grad(expected, ref_inputs, grad_out)
    torch.testing.assert_close(fused.double(), expected.detach(), rtol=0, atol=2e-6 * expected.abs().max().item())
    for name, got, want in zip("quvk", fused_grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().clamp_min(1.0), msg=name)


@needs_cpu_kernel
@pytest.mark.parametrize("budget", [0, 2**40], ids=["recompute", "keep-softmax"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_both_backward_paths(saved_softmax_budget, budget, masked):
    saved_softmax_budget(budget)
    q, u, k, v, mask = make_op_inputs(
        5, 6, 7, 2, 8, dtype=torch.float64, mask_kind="masked-texts" if masked else None, requires_grad=True
    )
    assert torch.autograd.gradcheck(lambda *x: mscmat_scores(*x, mask, backend="cpu"), (q, u, k, v))


@needs_cpu_kernel
def test_softmax_is_kept_only_within_the_budget(saved_softmax_budget, monkeypatch):
    q, u, k, v, mask = make_op_inputs(6, 5, 9, 3, 8, requires_grad=True)
    needed = saved_softmax_bytes(q, k)
    assert needed == 2 * 3 * 5 * 9 * 6 * 4
    calls = []
    op = torch.ops.msa.mscmat_scores_for_grad

    def spy(*args):
        calls.append(args[-1])
        return op(*args)

    monkeypatch.setattr(dispatcher.torch.ops.msa, "mscmat_scores_for_grad", spy)
    for budget in (needed, needed - 1):
        saved_softmax_budget(budget)
        mscmat_scores(q, u, k, v, mask, backend="cpu")
    assert calls == [True, False]
    saved_softmax_budget(None)
    with torch.no_grad():
        mscmat_scores(q, u, k, v, mask, backend="cpu")  # no graph, nothing kept: the plain op
    assert calls == [True, False]


@needs_cpu_kernel
def test_backward_writes_nothing_of_the_kept_softmax_size():
    """Neither autograd (zero gradients for the kept, non-differentiable tensors) nor the op (copies of k and v to
    zero their masked words) fills or copies anything of size H Nt L Ni or Nt L H Dh on the way back."""
    q, u, k, v, mask = make_op_inputs(6, 5, 9, 3, 8, mask_kind="random", requires_grad=True)
    large = (3 * 5 * 9 * 6, 5 * 9 * 3 * 8)
    scores = mscmat_scores(q, u, k, v, mask, backend="cpu")
    with torch.profiler.profile(record_shapes=True) as prof:
        scores.backward(torch.randn_like(scores))
    filled = [
        (event.name, event.input_shapes)
        for event in prof.events()
        if event.name in ("aten::fill_", "aten::zero_", "aten::copy_", "aten::clone", "aten::masked_fill_")
        and event.input_shapes
        and event.input_shapes[0]
        and math.prod(event.input_shapes[0]) in large
    ]
    assert filled == []


def cached_bytes() -> int:
    return _extension.module().block_cache_bytes()


@needs_cpu_kernel
def test_freed_softmax_and_gradients_are_reused_not_aliased(saved_softmax_budget):
    """The kept softmax and the word gradients (>= 1 MiB each here) come back to the next call once freed, are
    never handed out twice while alive, and every element is rewritten: stale NaNs left in them do not leak."""
    q, u, k, v, mask = make_op_inputs(64, 32, 16, 8, 64, mask_kind="random")
    scale = 64**-0.5
    grad = torch.randn(64, 32)
    empty_cache()

    def forward():
        return torch.ops.msa.mscmat_scores_for_grad(q, u, k, v, mask, scale, True)

    def backward(probs, logit_grads):
        return torch.ops.msa.mscmat_scores_for_grad_backward(
            grad, q, u, k, v, mask, probs, logit_grads, scale, [True] * 4
        )

    scores, probs, logit_grads = forward()
    grads = backward(probs, logit_grads)
    block_bytes = probs.numel() * 4
    assert block_bytes >= 2**20 and k.numel() * 4 >= 2**20
    expected = [t.clone() for t in (scores, probs, logit_grads, *grads)]
    addresses = {t.data_ptr() for t in (probs, logit_grads, grads[2], grads[3])}
    for tensor in (probs, logit_grads, *grads):
        tensor.fill_(float("nan"))
    del probs, logit_grads, grads, tensor
    assert cached_bytes() == 2 * block_bytes + 2 * k.numel() * 4

    scores, probs, logit_grads = forward()
    grads = backward(probs, logit_grads)
    assert {t.data_ptr() for t in (probs, logit_grads, grads[2], grads[3])} == addresses
    assert cached_bytes() == 0
    for got, want in zip((scores, probs, logit_grads, *grads), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    _, other_probs, other_logit_grads = forward()  # while the first ones live: fresh blocks
    assert not addresses & {other_probs.data_ptr(), other_logit_grads.data_ptr()}

    del scores, probs, logit_grads, grads, other_probs, other_logit_grads, got
    held = cached_bytes()
    assert held == 4 * block_bytes + 2 * k.numel() * 4
    assert empty_cache() == held and cached_bytes() == 0


@needs_cpu_kernel
def test_block_cache_holds_at_most_the_budget(saved_softmax_budget):
    q, u, k, v, mask = make_op_inputs(64, 32, 16, 8, 64, mask_kind="random")
    block_bytes = 8 * 32 * 16 * 64 * 4
    for budget, held in ((0, 0), (block_bytes, block_bytes), (2 * block_bytes - 1, block_bytes)):
        empty_cache()
        saved_softmax_budget(budget)
        outputs = torch.ops.msa.mscmat_scores_for_grad(q, u, k, v, mask, 0.125, True)
        del outputs
        assert cached_bytes() == held, budget
    saved_softmax_budget(None)
    assert cached_bytes() == block_bytes  # a larger limit frees nothing


@needs_cpu_kernel
def test_cached_tensors_resize_like_any_other():
    q, u, k, v, mask = make_op_inputs(64, 32, 16, 8, 64, mask_kind="random")
    _, probs, _ = torch.ops.msa.mscmat_scores_for_grad(q, u, k, v, mask, 0.125, True)
    before = probs.flatten().clone()
    probs.resize_(2 * before.numel())  # a new block from the cache's allocator, the data copied over
    assert torch.equal(probs[: before.numel()], before)
    probs.resize_(0)


def test_saved_softmax_budget_rejects_negative_sizes():
    with pytest.raises(ValueError, match="budget must be >= 0"):
        set_saved_softmax_budget(-1)


@needs_cpu_kernel
@pytest.mark.parametrize("keep_softmax", [False, True])
def test_backward_computes_only_the_gradients_asked_for(keep_softmax):
    q, u, k, v, mask = make_op_inputs(6, 5, 9, 3, 8)
    scale = 8**-0.5
    _, probs, readouts = torch.ops.msa.mscmat_scores_for_grad(q, u, k, v, mask, scale, keep_softmax)
    grad = torch.randn(6, 5)

    def backward_for_grad(grad, q, u, k, v, needs):
        return torch.ops.msa.mscmat_scores_for_grad_backward(grad, q, u, k, v, mask, probs, readouts, scale, needs)

    def backward(grad, q, u, k, v, needs):
        return torch.ops.msa.mscmat_scores_backward(grad, q, u, k, v, mask, scale, needs)

    full = check_only_asked_gradients(backward_for_grad, grad, (q, u, k, v))
    check_only_asked_gradients(backward, grad, (q, u, k, v))
    # Through autograd: a frozen text side gets no gradient, the image side the same as before.
    q.requires_grad_()
    u.requires_grad_()
    dq, du = torch.autograd.grad(mscmat_scores(q, u, k, v, mask, backend="cpu"), (q, u), grad)
    torch.testing.assert_close(dq, full[0])
    torch.testing.assert_close(du, full[1])


@needs_cpu_kernel
@pytest.mark.parametrize("keep_softmax", [False, True])
def test_opcheck_of_the_ops_for_gradients(keep_softmax):
    q, u, k, v, mask = make_op_inputs(6, 5, 9, 2, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.msa.mscmat_scores_for_grad.default, (q, u, k, v, mask, 0.3, keep_softmax))
    _, probs, readouts = torch.ops.msa.mscmat_scores_for_grad(q, u, k, v, mask, 0.3, keep_softmax)
    detached = [t.detach() for t in (q, u, k, v)]
    for needs in ([True] * 4, [True, False, False, True]):
        torch.library.opcheck(
            torch.ops.msa.mscmat_scores_for_grad_backward.default,
            (torch.randn(6, 5), *detached, mask, probs, readouts, 0.3, needs),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic"),
        )


@needs_cpu_kernel
def test_fake_kernel_checks_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, u = torch.empty(4, 3, 8), torch.empty(4, 3, 8)
        k, v = torch.empty(5, 6, 3, 8), torch.empty(5, 6, 2, 8)
        with pytest.raises(RuntimeError, match="k and v must be"):
            torch.ops.msa.mscmat_scores(q, u, k, v, None, 0.3)
        with pytest.raises(RuntimeError, match="word_mask must be"):
            torch.ops.msa.mscmat_scores_for_grad(q, u, k, k, torch.empty(5, 7, dtype=torch.bool), 0.3, True)
        scores, probs, _ = torch.ops.msa.mscmat_scores_for_grad(q, u, k, k, None, 0.3, True)
        assert scores.shape == (4, 5) and probs.shape == (3, 5, 6, 4) and probs.dtype == torch.float32


@needs_cpu_kernel
@pytest.mark.parametrize("budget", [0, 2**40], ids=["recompute", "keep-softmax"])
def test_torch_compile_fullgraph_both_backward_paths(saved_softmax_budget, budget):
    saved_softmax_budget(budget)
    q, u, k, v, mask = make_op_inputs(8, 9, 10, 2, 16, requires_grad=True)

    def scores_sum(q, u, k, v, mask):
        return (mscmat_scores(q, u, k, v, mask, backend="cpu") * 2.0).sum()

    compiled = torch.compile(scores_sum, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(scores_sum(q, u, k, v, mask), (q, u, k, v))
    compiled_grads = torch.autograd.grad(compiled(q, u, k, v, mask), (q, u, k, v))
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


def test_head_dim_zero_is_rejected():
    q, u, k, v, _ = make_op_inputs(2, 3, 4, 1, 0, mask_kind=None)
    with pytest.raises(ValueError, match="head dim Dh"):
        mscmat_scores(q, u, k, v)


def test_unknown_backend_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("MSA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="'fastest' in the MSA_BACKEND environment variable"):
        resolve_backend("auto", "cpu")


def test_auto_falling_back_to_the_reference_warns_once(monkeypatch, caplog):
    monkeypatch.setitem(dispatcher._COMPILED_KERNELS, "cpu", False)
    monkeypatch.setattr(dispatcher, "_warned_about_fallback", False)
    with caplog.at_level("WARNING", logger="msa.ops.mscmat"):
        for _ in range(3):
            assert resolve_backend("auto", "cpu") == "reference"
        assert resolve_backend("reference", "cpu") == "reference"
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1, warnings
    import msa

    assert "einsum reference" in warnings[0] and str(Path(msa.__file__).parent) in warnings[0]


def test_saved_softmax_budget_from_the_environment(saved_softmax_budget, monkeypatch):
    monkeypatch.setenv("MSA_SAVED_SOFTMAX_MB", "1.5")
    saved_softmax_budget(None)
    assert dispatcher._saved_softmax_budget == int(1.5 * 2**20)
    monkeypatch.setenv("MSA_SAVED_SOFTMAX_MB", "lots")
    with pytest.raises(ValueError, match="MSA_SAVED_SOFTMAX_MB \\(environment variable\\) must be a number"):
        saved_softmax_budget(None)
    monkeypatch.delenv("MSA_SAVED_SOFTMAX_MB")
    saved_softmax_budget(None)
    assert dispatcher._saved_softmax_budget == dispatcher.DEFAULT_SAVED_SOFTMAX_BUDGET
