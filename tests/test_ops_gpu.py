"""The GPU backends of mscmat_scores ("cuda": msa._C's CUDA kernels, "triton": msa.kernels) against the einsum
reference: forward and every gradient for float32/float16/bfloat16, odd sizes, masks, texts without words, tiles
cut by Ni and Nt, texts longer than one chunk, sizes that need 64-bit offsets, opcheck and torch.compile.

Skipped without a CUDA device. A backend that is not available is skipped, unless MSA_REQUIRE_GPU_BACKENDS
names it (benchmarks/device_check.sh sets "cuda,triton"), in which case that is a failure.

Low-precision rule (flash-attention's): the kernel's error against the float32 reference is at most twice the
error of the reference itself run in the low precision, plus a small floor.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from conftest import check_close, check_only_asked_gradients, make_op_inputs, poison_masked_words

from msa.ops import backend_available, mscmat_scores, mscmat_scores_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BACKENDS = ("cuda", "triton")


@pytest.fixture(autouse=True, scope="module")
def _quick_triton():
    # One tile config per shape instead of autotuning: the tests check numbers, the benchmark tunes.
    previous = os.environ.get("MSA_TRITON_AUTOTUNE")
    os.environ["MSA_TRITON_AUTOTUNE"] = "0"
    yield
    if previous is None:
        os.environ.pop("MSA_TRITON_AUTOTUNE", None)
    else:
        os.environ["MSA_TRITON_AUTOTUNE"] = previous


def require(backend: str) -> None:
    if backend_available(backend, "cuda"):
        return
    required = {name.strip() for name in os.environ.get("MSA_REQUIRE_GPU_BACKENDS", "").split(",")}
    message = f"backend {backend!r} is not available on this machine"
    if backend in required:
        pytest.fail(message + " but MSA_REQUIRE_GPU_BACKENDS requires it")
    pytest.skip(message)


def make_inputs(ni, nt, length, heads, head_dim, mask_kind, dtype, seed=0, device="cuda"):
    return make_op_inputs(ni, nt, length, heads, head_dim, mask_kind=mask_kind, dtype=dtype, seed=seed,
                          requires_grad=True, device=device)  # fmt: skip


def run_and_compare(backend, ni, nt, length, heads, head_dim, mask_kind, dtype, backward=True, rule_dtype=None):
    """The backend's scores (and gradients) against the float64 reference, within the error rule of ``rule_dtype``
    (default ``dtype``): the reference run in that precision. Returns the inputs and the scores."""
    rule_dtype = rule_dtype or dtype
    q, u, k, v, mask = make_inputs(ni, nt, length, heads, head_dim, mask_kind, dtype)
    scores = mscmat_scores(q, u, k, v, mask, backend=backend)
    assert scores.shape == (ni, nt) and scores.dtype == dtype and scores.device.type == "cuda"
    low_inputs = [t.detach().to(rule_dtype).requires_grad_(True) for t in (q, u, k, v)]
    low = mscmat_scores_ref(*low_inputs, mask)
    exact_inputs = [t.detach().double().requires_grad_(True) for t in (q, u, k, v)]
    exact = mscmat_scores_ref(*exact_inputs, mask)
    check_close(scores, low, exact, "scores", rule_dtype)
    if mask_kind == "masked-texts":
        assert torch.all(scores[:, ::3] == 0)  # texts 0, 3, 6, ... have no real word
    if backward:
        grad_scores = torch.randn(ni, nt, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
        grads = torch.autograd.grad(scores, (q, u, k, v), grad_scores)
        low_grads = torch.autograd.grad(low, low_inputs, grad_scores.to(rule_dtype))
        exact_grads = torch.autograd.grad(exact, exact_inputs, grad_scores.double())
        for name, got, low_grad, want in zip("qukv", grads, low_grads, exact_grads):
            assert got.shape == want.shape and got.dtype == dtype, name
            check_close(got, low_grad, want, f"d{name}", rule_dtype)
    return (q, u, k, v, mask), scores


# (Ni, Nt, L, H, Dh, mask): odd sizes off every tile; L = 30 (padded), 77 (two CUDA chunks of 64), 150 (two
# Triton chunks of 128), 1; Dh 32, 64, 128 and a padded 48.
SHAPES = [
    (97, 200, 30, 12, 64, "masked-texts"),
    (200, 97, 77, 4, 32, "random"),
    (33, 65, 150, 2, 64, "masked-texts"),
    (1025, 17, 1, 2, 128, None),
    (70, 41, 19, 3, 48, "random"),
]


# float32 on two shapes only (short and chunked texts): Triton compiles its FMA kernels slowly.
PARITY = [(dtype, shape) for dtype in (torch.float16, torch.bfloat16) for shape in SHAPES]
PARITY += [(torch.float32, shape) for shape in SHAPES[:2]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,shape", PARITY, ids=lambda value: str(value).replace("torch.", ""))
def test_parity_forward_and_gradients(backend, dtype, shape):
    require(backend)
    run_and_compare(backend, *shape, dtype)


def test_triton_float32_takes_tf32_where_torch_allows_it(set_tf32):
    """float32 with TF32 on runs TF32 products (its tensor-core tiles at L 19, Dh 64): scores and gradients meet
    float16's rule (TF32 keeps float16's 10-bit mantissa), and the scores differ from those with TF32 off."""
    require("triton")
    set_tf32(True)
    inputs, scores = run_and_compare("triton", 70, 41, 19, 3, 64, "random", torch.float32, rule_dtype=torch.float16)
    set_tf32(False)
    assert not torch.equal(mscmat_scores(*inputs, backend="triton"), scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_word_masked_gives_zero_scores_and_gradients(backend):
    require(backend)
    q, u, k, v, _ = make_inputs(5, 7, 9, 2, 64, None, torch.float16)
    mask = torch.zeros(7, 9, dtype=torch.bool, device="cuda")
    scores = mscmat_scores(q, u, k, v, mask, backend=backend)
    assert torch.all(scores == 0)
    grads = torch.autograd.grad(scores.float().sum(), (q, u, k, v))
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_sizes_need_64_bit_offsets(backend):
    """k and v of more than 2^31 elements each (and Ni * Nt * L > 2^31): the last texts and the last images
    must still be right. Checked on slices, against the reference on those slices."""
    require(backend)
    free, _ = torch.cuda.mem_get_info()
    ni, nt, length, heads, head_dim = 24, 87_500, 32, 12, 64  # k: 2.15e9 elements
    if free < 24 * 2**30:
        pytest.skip("needs about 24 GiB of free GPU memory")
    assert nt * length * heads * head_dim > 2**31
    generator = torch.Generator(device="cuda").manual_seed(0)
    dtype = torch.bfloat16
    q = torch.randn(ni, heads, head_dim, device="cuda", dtype=dtype, generator=generator)
    u = torch.randn(ni, heads, head_dim, device="cuda", dtype=dtype, generator=generator)
    k = torch.randn(nt, length, heads, head_dim, device="cuda", dtype=dtype, generator=generator)
    v = torch.randn(nt, length, heads, head_dim, device="cuda", dtype=dtype, generator=generator)
    q.requires_grad_(True)
    k.requires_grad_(True)
    scores = mscmat_scores(q, u, k, v, backend=backend)
    tail = slice(nt - 40, nt)
    expected_tail = mscmat_scores_ref(*(t.detach().float() for t in (q, u, k[tail], v[tail])))
    torch.testing.assert_close(scores[:, tail].float(), expected_tail, rtol=3e-2, atol=3e-2)
    grad_scores = torch.zeros_like(scores)
    grad_scores[:, tail] = 1
    dq, dk = torch.autograd.grad(scores, (q, k), grad_scores)
    q_tail = q.detach().float().requires_grad_(True)
    k_tail = k.detach()[tail].float().requires_grad_(True)
    ref = mscmat_scores_ref(q_tail, u.detach().float(), k_tail, v.detach()[tail].float())
    ref_dq, ref_dk = torch.autograd.grad(ref.sum(), (q_tail, k_tail))
    torch.testing.assert_close(dk[tail].float(), ref_dk, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(dq.float(), ref_dq, rtol=3e-2, atol=5e-2)
    assert torch.all(dk[: nt - 40] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_image_by_text_matrix(backend):
    """Ni * Nt * L > 2^31 pairs x words; compared on the first and last image rows."""
    require(backend)
    ni, nt, length, heads, head_dim = 8192, 8300, 32, 1, 32
    q, u, k, v, mask = make_inputs(ni, nt, length, heads, head_dim, "random", torch.float16)
    with torch.no_grad():
        scores = mscmat_scores(q, u, k, v, mask, backend=backend)
        for rows in (slice(0, 16), slice(ni - 16, ni)):
            expected = mscmat_scores_ref(*(t.float() for t in (q[rows], u[rows], k, v)), mask)
            torch.testing.assert_close(scores[rows].float(), expected, rtol=1e-2, atol=1e-2)


def test_opcheck_cuda_kernels():
    require("cuda")
    q, u, k, v, mask = make_inputs(9, 6, 7, 2, 32, "random", torch.float16)
    torch.library.opcheck(torch.ops.msa.mscmat_scores.default, (q, u, k, v, mask, 0.2))
    grad = torch.randn(9, 6, device="cuda", dtype=torch.float16)
    torch.library.opcheck(
        torch.ops.msa.mscmat_scores_backward.default,
        (grad, q.detach(), u.detach(), k.detach(), v.detach(), mask, 0.2, [True, True, False, True]),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_computes_only_the_gradients_asked_for(backend):
    require(backend)
    q, u, k, v, mask = (t.detach() for t in make_inputs(37, 21, 13, 2, 64, "masked-texts", torch.bfloat16))
    grad = torch.randn(37, 21, device="cuda", dtype=torch.bfloat16)
    op = torch.ops.msa.mscmat_scores_backward if backend == "cuda" else torch.ops.msa.mscmat_scores_triton_backward

    def backward(grad, q, u, k, v, needs):
        return op(grad, q, u, k, v, mask, 0.125, needs)

    full = check_only_asked_gradients(backward, grad, (q, u, k, v))
    q.requires_grad_()
    u.requires_grad_()
    dq, du = torch.autograd.grad(mscmat_scores(q, u, k, v, mask, scale=0.125, backend=backend), (q, u), grad)
    torch.testing.assert_close(dq, full[0], rtol=0, atol=0)
    torch.testing.assert_close(du, full[1], rtol=0, atol=0)


def test_opcheck_triton_kernels():
    require("triton")
    importlib.import_module("msa.kernels.mscmat_triton")  # defines msa::mscmat_scores_triton (imported lazily)
    q, u, k, v, mask = make_inputs(9, 6, 7, 2, 32, "random", torch.bfloat16)
    torch.library.opcheck(torch.ops.msa.mscmat_scores_triton.default, (q, u, k, v, mask, 0.2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_words_contribute_nothing_whatever_their_values(backend):
    """NaN and inf in k and v at masked words change no score and no gradient (as on every backend)."""
    require(backend)
    q, u, k, v, mask = make_inputs(70, 41, 19, 2, 64, "masked-texts", torch.bfloat16)
    bad_k, bad_v = poison_masked_words(k, v, mask)
    grad_scores = torch.randn(70, 41, generator=torch.Generator().manual_seed(5)).to("cuda", torch.bfloat16)
    clean = mscmat_scores(q, u, k, v, mask, backend=backend)
    poisoned = mscmat_scores(q, u, bad_k, bad_v, mask, backend=backend)
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)
    clean_grads = torch.autograd.grad(clean, (q, u, k, v), grad_scores)
    poisoned_grads = torch.autograd.grad(poisoned, (q, u, bad_k, bad_v), grad_scores)
    for name, got, want in zip("qukv", poisoned_grads, clean_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"d{name}")
    assert torch.all(poisoned_grads[2][~mask] == 0) and torch.all(poisoned_grads[3][~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    require(backend)
    q, u, k, v, mask = make_inputs(40, 30, 12, 2, 32, "masked-texts", torch.bfloat16)

    def loss(q, u, k, v, mask):
        return (mscmat_scores(q, u, k, v, mask, backend=backend).float() ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager_value = loss(q, u, k, v, mask)
    eager_grads = torch.autograd.grad(eager_value, (q, u, k, v))
    compiled_value = compiled(q, u, k, v, mask)
    compiled_grads = torch.autograd.grad(compiled_value, (q, u, k, v))
    torch.testing.assert_close(compiled_value, eager_value, rtol=1e-3, atol=1e-3)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_current_stream_is_used(backend):
    """The kernels run on the caller's stream. The side stream first sleeps on the GPU, then overwrites q, then
    scores: a kernel launched on another stream would run at once and read the old q."""
    require(backend)
    q, u, k, v, mask = (
        t.detach() if t is not None else None for t in make_inputs(64, 48, 16, 2, 64, "random", torch.float16)
    )
    new_q = torch.randn_like(q)
    expected = mscmat_scores(new_q, u, k, v, mask, backend=backend)
    target = q.clone()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU clock cycles queued ahead of the copy
        target.copy_(new_q)
        got = mscmat_scores(target, u, k, v, mask, backend=backend)
    stream.synchronize()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
