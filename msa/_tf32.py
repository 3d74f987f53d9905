"""Whether torch lets float32 CUDA matmuls use TF32: the Triton op then multiplies float32 in TF32 (as torch's own
matmul does), and ``backend="auto"`` sets aside its float32 measurements, which were taken with TF32 off."""

from __future__ import annotations

import torch


@torch.compiler.assume_constant_result  # torch.compile cannot trace the fp32_precision getter; a constant it can
def tf32_allowed() -> bool:
    """From torch 2.9 on the answer is ``torch.backends.cuda.matmul.fp32_precision`` (the legacy ``allow_tf32`` and
    ``set_float32_matmul_precision`` set it as well): reading ``allow_tf32`` raises once a program has used the
    newer API (``torch.backends.fp32_precision = "tf32"``). Older torch has only ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:  # torch < 2.9
        return bool(matmul.allow_tf32)
