"""Distributed training helpers: process-group set-up from ``torchrun`` variables and the feature all-gather.

MSA's losses (hardest-negative triplet, alignment, consistency) need the score matrices between *all* images and
*all* texts of the global batch. Each rank encodes its local batch, :func:`all_gather_with_grad` concatenates every
rank's features, and every rank computes the same global loss ``L``.

Gradient bookkeeping: since all ranks compute the same ``L`` from the same gathered tensor, the gradient of ``L``
with respect to the gathered tensor is identical on every rank, and its slice for rank ``r`` is exactly
``dL/d(features of r)``. Keeping only the local slice (as CLIP-style training does) therefore gives each rank its
share of the encoder gradient, and the full encoder gradient is the *sum* over ranks. DDP, however, *averages*
gradients — which is right for parameters used after the gather (every rank already holds their full gradient), and
1/W too small for the encoders. The backward of the gather thus returns ``world_size * local slice``: after DDP's
averaging, every parameter holds exactly the gradient of ``L`` on the global batch, as a single process would compute
it, without any communication in the backward pass.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistributedInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` for device selection."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None) -> DistributedInfo:
    """Initialise the default process group from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ...).

    Without those variables (a plain ``python -m msa.train``) nothing is initialised and a single-process
    :class:`DistributedInfo` is returned. The backend defaults to NCCL with CUDA, else gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        # A long timeout: the other ranks wait at a barrier while rank 0 evaluates on val.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    return DistributedInfo(rank=rank, world_size=world_size, local_rank=local_rank)


class _AllGatherLocalGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.world_size = world_size
        ctx.local_size = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        start = ctx.rank * ctx.local_size
        # Times world_size: DDP averages, but the encoder gradient is the sum of the ranks' shares (see module doc).
        return grad[start : start + ctx.local_size] * ctx.world_size


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [B, ...] of every rank along dim 0 -> [W * B, ...], in rank order.

    The backward keeps the gradient of this rank's slice, scaled by the world size so that DDP's gradient averaging
    yields the single-process gradient of the global loss (module doc). Every rank must pass the same batch size B
    (the training sampler drops incomplete batches). Without an initialised process group this is the identity.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _AllGatherLocalGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor without gradient (e.g. image ids) of every rank along dim 0."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# Seconds the GIL is handed to gloo's worker threads before its process group is destroyed (see destroy_distributed).
GLOO_TEARDOWN_GRACE_S = 0.2


def destroy_distributed() -> None:
    """Destroy the default process group, if there is one.

    A gloo worker thread frees a collective's tensors after the collective has completed, and freeing a tensor
    that Python has let go of takes the GIL. torch 2.6 destroys a gloo group holding the GIL while it joins those
    threads, so a thread still freeing the last collective's buffers deadlocks the process (about one teardown in
    ten on two loaded cores; pytorch/pytorch#154976 releases the GIL there). Sleeping first hands the GIL to them.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        time.sleep(GLOO_TEARDOWN_GRACE_S)
    dist.destroy_process_group()


def gather_features(features: Any) -> Any:
    """All-gather every tensor field of an ImageFeatures / TextFeatures (lists element-wise, None kept); floating
    fields keep the local gradient (:func:`all_gather_with_grad`)."""
    values = {}
    for f in dataclasses.fields(features):
        value = getattr(features, f.name)
        if value is None:
            values[f.name] = None
        elif isinstance(value, list):
            values[f.name] = [all_gather_with_grad(v) for v in value]
        elif value.is_floating_point():
            values[f.name] = all_gather_with_grad(value)
        else:
            values[f.name] = all_gather_no_grad(value)
    return type(features)(**values)


class GlobalBatchModel(torch.nn.Module):
    """Wraps an MSAModel so that DDP sees one forward: encode the local batch, all-gather the features (local
    gradient kept), score the global batch. Returns the ``MSAOutput`` and the global image ids."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_ids: torch.Tensor
    ) -> tuple[Any, torch.Tensor]:
        image_features = gather_features(self.model.encode_image(images))
        text_features = gather_features(self.model.encode_text(input_ids, attention_mask))
        output = self.model.forward_features(image_features, text_features)
        return output, all_gather_no_grad(image_ids)
