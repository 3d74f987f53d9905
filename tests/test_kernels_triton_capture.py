"""The Triton ops as torch.compile captures and compiles them for CUDA inputs, checked on a machine without a GPU.

Fake CUDA tensors go through AOTAutograd with Inductor's decompositions, torch's analysis of each kernel launch
(which of its tensors the kernel writes), Inductor's lowering and code generation, and the loading of the generated
module, which compiles every kernel config for sm_90; it stops where the compiled kernels would be loaded onto a
card (tests/test_ops_gpu.py runs the whole thing there). Failures of this kind reached a card before, or would have:
torch 2.11's Inductor could not lower a bool -> uint8 view of the word mask; a launch whose arguments did not match
the kernel's signature made torch take the kernel to write every tensor it gets (a compiled call then copies q, u,
k and v first); the generated module named ``-inf``, a module constant of the kernels, without defining it; and it
passes float arguments as float64, in which the forward did not compile. Each fails here.

The stand-ins for the card (a Triton driver naming sm_90, an H100's device properties, a stop before the kernels
are loaded) reach into torch's private modules; where those have moved the test skips and says so.
"""

from __future__ import annotations

import ast
import os
import types
from pathlib import Path

import pytest
import torch
from conftest import require_triton_kernels

from msa.ops import mscmat_scores
from msa.ops.mscmat import _major_minor

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: tests/test_ops_gpu.py compiles"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter launches no kernels"),
    pytest.mark.skipif(
        _major_minor(torch.__version__) < (2, 11),
        reason=f"the stand-ins for a GPU cover torch 2.11 (the GPU machine's) and later; torch {torch.__version__}'s "
        "Inductor reaches for the CUDA driver elsewhere",
    ),
]

# The tensors each kernel may write; the rest (q, u, k, v, the mask, the gradient of the scores) it only reads.
WRITTEN = {
    "mscmat_scores_fwd_kernel": {"Out"},
    "mscmat_scores_bwd_images_kernel": {"DQ", "DU", "Stats"},
    "mscmat_scores_bwd_words_kernel": {"DK", "DV"},
}

H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, warp_size=32,
    max_threads_per_multi_processor=2048, max_threads_per_block=1024, regs_per_multiprocessor=65536,
    shared_memory_per_block_optin=232448, total_memory=80 << 30, L2_cache_size=50 << 20, gcnArchName="",
)  # fmt: skip


class _Generated(Exception):
    """Raised in place of loading the module Inductor generated; carries its source."""


class _Sm90Driver:
    """The one thing torch's launch analysis asks Triton's driver: the target to compile for."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def _private(module_name: str, *names: str):
    import importlib

    try:
        module = importlib.import_module(module_name)
        return [getattr(module, name) for name in names]
    except (ImportError, AttributeError) as error:
        pytest.skip(f"torch {torch.__version__}: {module_name} has moved ({error}); the card's test covers this")


class _Compiled:
    """Stand-ins for the steps that need a card once Inductor has compiled a kernel's configs: records them."""

    configs_compiled: dict[str, int] = {}

    @staticmethod
    def make_launchers(autotuner):
        _Compiled.configs_compiled[autotuner.fn.__name__] = len(autotuner.compile_results)
        autotuner.launchers = [None] * len(autotuner.compile_results)


def _stop_after_loading(load):
    def stop(graph):
        module = load(graph)  # compiles the kernels (one compile thread: here, in this process)
        raise _Generated(Path(module.__file__).read_text())

    return stop


@pytest.fixture
def capture_for_sm90(monkeypatch):
    """Stand-ins for the card, undone afterwards; yields the capture function (see ``_capture``)."""
    triton = require_triton_kernels()
    import msa.kernels.mscmat_triton  # noqa: F401  (defines the ops)

    (compile_fx_inner, _) = _private("torch._inductor.compile_fx", "compile_fx_inner", "_check_triton_bf16_support")
    (get_interface_for_device,) = _private("torch._dynamo.device_interface", "get_interface_for_device")
    (device_properties,) = _private("torch._inductor.runtime.hints", "DeviceProperties")
    (kernel_side_table,) = _private("torch._higher_order_ops.triton_kernel_wrap", "kernel_side_table")
    (aot_function,) = _private("torch._functorch.aot_autograd", "aot_function")
    (select_decomp_table,) = _private("torch._inductor.decomposition", "select_decomp_table")
    (graph_lowering,) = _private("torch._inductor.graph", "GraphLowering")
    (caching_autotuner,) = _private("torch._inductor.runtime.triton_heuristics", "CachingAutotuner")
    _private("torch._inductor.scheduler", "has_triton")
    _private("torch._inductor.runtime.triton_helpers", "set_driver_to_gpu")

    interface = get_interface_for_device("cuda")
    for name, stand_in in (
        ("get_device_properties", lambda device=None: H100),
        ("get_compute_capability", lambda device=None: 90),
        ("is_triton_capable", lambda device=None: True),
        ("raise_if_triton_unavailable", lambda device=None: None),
    ):
        monkeypatch.setattr(interface, name, staticmethod(stand_in))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: H100)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr("torch._inductor.scheduler.has_triton", lambda: True)
    monkeypatch.setattr("torch._inductor.compile_fx._check_triton_bf16_support", lambda graph: None)
    monkeypatch.setattr("torch._inductor.runtime.triton_helpers.set_driver_to_gpu", lambda: None)
    monkeypatch.setattr(graph_lowering, "compile_to_module", _stop_after_loading(graph_lowering.compile_to_module))
    monkeypatch.setattr(caching_autotuner, "_make_launchers", _Compiled.make_launchers)
    _Compiled.configs_compiled = {}
    # Set the attribute that holds the active driver (reset_active would look for a GPU): "_active" from Triton
    # 3.6 on, "active" before.
    holder = "_active" if hasattr(triton.runtime.driver, "_active") else "active"
    monkeypatch.setattr(triton.runtime.driver, holder, _Sm90Driver())
    device_properties.create.cache_clear()
    yield lambda fn, args: _capture(fn, args, aot_function, select_decomp_table, compile_fx_inner, kernel_side_table)
    device_properties.create.cache_clear()


def _capture(fn, args, aot_function, select_decomp_table, compile_fx_inner, kernel_side_table):
    """Traces fn(*args) as torch.compile's AOT stage does and has Inductor generate and load its code. Returns each
    kernel launch in the graph as (kernel name, the tensors torch found it writes), and the generated source."""
    launches = []

    def lower(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                name = getattr(kernel, "fn", kernel).__name__
                launches.append((name, set(node.kwargs["tensors_to_clone"])))
        return compile_fx_inner(graph_module, example_inputs)

    compiled = aot_function(fn, fw_compiler=lower, decompositions=select_decomp_table())
    # One compile thread: the kernels compile in this process, where the stand-ins are.
    with torch._inductor.config.patch(fx_graph_cache=False, compile_threads=1), pytest.raises(Exception) as raised:
        compiled(*args)
    cause = raised.value
    while cause is not None and not isinstance(cause, _Generated):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        raise AssertionError("Inductor did not generate and load the code") from raised.value
    return launches, cause.args[0]


def _configs_in(source: str, kernel: str) -> list[dict]:
    """The configs the generated module autotunes ``kernel`` over (a list of dicts of numbers and booleans)."""
    start = source.index("configs=[", source.index(f"async_compile.triton('{kernel}'")) + len("configs=")
    return ast.literal_eval(source[start : source.index("]", start) + 1])


@pytest.mark.parametrize(
    "dtype,masked,autotune", [(torch.bfloat16, True, "1"), (torch.bfloat16, True, "0"), (torch.float32, False, "1")]
)
def test_ops_compile_for_cuda_and_write_only_their_outputs(capture_for_sm90, monkeypatch, dtype, masked, autotune):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from msa.kernels.configs import BWD_IMAGES_TILES, BWD_WORDS_TILES, FWD_TILES, fitting_tiles, tile_kind

    monkeypatch.setenv("MSA_TRITON_AUTOTUNE", autotune)
    with FakeTensorMode():
        q, u = (torch.empty(40, 2, 32, device="cuda", dtype=dtype) for _ in range(2))
        k, v = (torch.empty(30, 12, 2, 32, device="cuda", dtype=dtype) for _ in range(2))
        grad_scores = torch.empty(40, 30, device="cuda", dtype=dtype)
        mask = torch.ones(30, 12, device="cuda", dtype=torch.bool) if masked else None

        def forward(q, u, k, v, mask):
            return mscmat_scores(q, u, k, v, mask, scale=0.2, backend="triton")

        def backward(grad_scores, q, u, k, v, mask):
            return torch.ops.msa.mscmat_scores_triton_backward(grad_scores, q, u, k, v, mask, 0.2, [True] * 4)

        launches, forward_source = capture_for_sm90(forward, (q, u, k, v, mask))
        backward_launches, backward_source = capture_for_sm90(backward, (grad_scores, q, u, k, v, mask))
    launches += backward_launches
    assert sorted(name for name, _ in launches) == sorted(WRITTEN)
    for name, written in launches:
        assert written and written <= WRITTEN[name], f"{name}: torch finds it writes {sorted(written)}"
    # The tile pruner holds under torch.compile too: the fitting tiles (12 words padded to 16, Dh 32), or the
    # first of them with autotuning off.
    kind = tile_kind(dtype, "ieee", 16, 32)
    for source, kernel, tiles, role in (
        (forward_source, "mscmat_scores_fwd_kernel", FWD_TILES, "fwd"),
        (backward_source, "mscmat_scores_bwd_images_kernel", BWD_IMAGES_TILES, "bwd_images"),
        (backward_source, "mscmat_scores_bwd_words_kernel", BWD_WORDS_TILES, "bwd_words"),
    ):
        fitting = [tile[:4] for tile in fitting_tiles(tiles, kind, 16, 32, role)]
        configs = [
            (c["BLOCK_I"], c.get("BLOCK_T", 1), c["num_warps"], c["num_stages"]) for c in _configs_in(source, kernel)
        ]
        assert configs == (fitting[:1] if autotune == "0" else fitting), kernel
        # Every config compiles (Inductor drops any that do not); the generated configs carry no register cap, so the
        # forward's capped tile is its uncapped twin there and compiles once.
        distinct = {tuple(sorted(config.items())) for config in _configs_in(source, kernel)}
        assert _Compiled.configs_compiled.get(kernel) == len(distinct), f"{kernel}: not every config compiled"
