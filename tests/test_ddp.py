"""DDP on 2 CPU processes (gloo): the global-batch loss and every gradient equal one process on the global batch."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msa.distributed import all_gather_no_grad, all_gather_with_grad, destroy_distributed

WORLD_SIZE = 2
LOCAL_BATCH = 3
CAPTIONS = [
    "many buildings and green trees are around a playground .",
    "a plane is parked on the runway .",
    "a river crosses the farmland .",
    "a plane is parked on the runway .",  # a duplicate caption across ranks
    "several storage tanks stand near a road",
    "the beach is next to the blue sea with waves",
]
# Images 1 and 3 are the same image (ids equal): improved preset masks that false negative across ranks.
IMAGE_IDS = [0, 1, 2, 1, 4, 5]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _global_batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(WORLD_SIZE * LOCAL_BATCH, 3, 64, 64, generator=generator)
    images[3] = images[1]
    return images, torch.tensor(IMAGE_IDS)


def _make_model(preset: str):
    from msa.model import create_model

    torch.manual_seed(0)
    model = create_model("msa-tiny", preset=preset, backend="reference")
    # Eval mode: BatchNorm statistics of a local batch differ from the global batch's (use --sync-bn for that).
    return model.eval()


def _loss_and_grads(model, output, image_ids, preset):
    from msa.losses import msa_loss

    loss = msa_loss(output, preset, image_ids=image_ids).total
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _worker(rank: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    from msa.distributed import GlobalBatchModel

    images, image_ids = _global_batch()
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for preset in ("paper", "improved"):
        model = _make_model(preset)
        ddp = torch.nn.parallel.DistributedDataParallel(GlobalBatchModel(model))
        tokens = model.tokenize(CAPTIONS[local])
        output, gathered_ids = ddp(images[local], tokens["input_ids"], tokens["attention_mask"], image_ids[local])
        assert output.scale_scores[0].shape == (WORLD_SIZE * LOCAL_BATCH, WORLD_SIZE * LOCAL_BATCH)
        results[preset] = (*_loss_and_grads(model, output, gathered_ids, preset), gathered_ids)
    if rank == 0:
        torch.save(results, result_path)
    dist.barrier()
    destroy_distributed()


def _run(worker, result_path: str) -> None:
    # fork: the workers inherit the parent's imports (transformers, timm: seconds each) instead of re-importing.
    mp.start_processes(worker, args=(_free_port(), result_path), nprocs=WORLD_SIZE, join=True, start_method="fork")


def test_ddp_two_processes_match_single_process_on_global_batch():
    models = {preset: _make_model(preset) for preset in ("paper", "improved")}
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "rank0.pt")
        _run(_worker, result_path)
        distributed = torch.load(result_path)
    images, image_ids = _global_batch()
    for preset, model in models.items():
        output = model(images, **model.tokenize(CAPTIONS))
        loss, grads = _loss_and_grads(model, output, image_ids, preset)
        ddp_loss, ddp_grads, gathered_ids = distributed[preset]
        assert gathered_ids.tolist() == IMAGE_IDS
        torch.testing.assert_close(ddp_loss, loss, rtol=1e-5, atol=1e-6)
        assert ddp_grads.keys() == grads.keys() and len(grads) > 50
        # Encoders (gathered with the local gradient x world size) and MSCMAT (after the gather) alike.
        for name, grad in grads.items():
            torch.testing.assert_close(ddp_grads[name], grad, rtol=2e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        assert any(n.startswith("image_encoder") for n in grads) and any(n.startswith("mscmat") for n in grads)


def _gather_worker(rank: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    # A stand-in: rank r holds x_r = (r + 1) * w; loss = sum(gathered^2 * position weights), same on every rank.
    weight = torch.ones(2, requires_grad=True)
    local = (rank + 1) * weight.unsqueeze(0)
    gathered = all_gather_with_grad(local)
    positions = torch.tensor([[1.0], [10.0]])
    loss = (gathered.pow(2) * positions).sum()
    loss.backward()
    # Mean over ranks, as DDP does.
    dist.all_reduce(weight.grad)
    weight.grad /= WORLD_SIZE
    ids = all_gather_no_grad(torch.tensor([rank]))
    if rank == 0:
        torch.save({"gathered": gathered.detach(), "grad": weight.grad, "ids": ids}, result_path)
    destroy_distributed()


def test_gather_keeps_local_gradient_scaled_for_mean_reduction():
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "rank0.pt")
        _run(_gather_worker, result_path)
        result = torch.load(result_path)
    assert result["gathered"].tolist() == [[1.0, 1.0], [2.0, 2.0]]
    assert result["ids"].tolist() == [0, 1]
    # Single process: loss = sum(w^2) * 1 + sum((2w)^2) * 10 = 41 sum(w^2) -> d/dw = 82 w = 82.
    assert result["grad"].tolist() == [82.0, 82.0]


@pytest.mark.parametrize("shape", [(3,), (2, 5)])
def test_gather_is_identity_without_process_group(shape):
    tensor = torch.randn(shape, requires_grad=True)
    assert all_gather_with_grad(tensor) is tensor and all_gather_no_grad(tensor) is tensor


def test_destroy_distributed_ends_a_gloo_group_and_does_nothing_without_one(tmp_path):
    destroy_distributed()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    summed = torch.ones(3)
    dist.all_reduce(summed)
    destroy_distributed()
    assert not dist.is_initialized() and summed.tolist() == [1.0, 1.0, 1.0]
