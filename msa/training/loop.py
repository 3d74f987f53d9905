"""The training loop: data, model and optimiser set-up, resume, epochs, validation with checkpoint selection, and
the final test of the best checkpoint.

Epochs are numbered from 1 in progress bars, logs and results; ``state["epoch"]`` counts the completed ones.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from msa import distributed as msa_dist
from msa.data import (
    Annotations,
    CaptionPairDataset,
    EpochSampler,
    RetrievalSplit,
    add_caption_noise,
    build_augmentation,
    carve_val,
    check_images,
    collate_pairs,
    load_annotations,
)
from msa.evaluation import evaluate_model
from msa.training.checkpoint import (
    load_training_state,
    recover_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from msa.training.config import PRECISIONS, TrainConfig, UsageError
from msa.training.optim import build_optimizer, make_scheduler
from msa.training.run_log import RunLog, format_metrics, plot_curves, write_results

if TYPE_CHECKING:
    from msa.model import MSAOutput

logger = logging.getLogger(__name__)

# A carved-out val split smaller than this selects the checkpoint on little evidence: the run says so.
SMALL_VAL_IMAGES = 20


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic GEMMs.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_device(name: str, info: msa_dist.DistributedInfo) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    return device


def progress_bars(config: TrainConfig, info: msa_dist.DistributedInfo) -> Any:
    """``tqdm`` on the main process when bars are wanted and stderr is a terminal (a log file gets no cursor
    codes: the loop logs a line every ``log_every`` steps instead)."""
    if config.progress and info.is_main and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm
    return None


# ------------------------------------------------------------------------------------------------------- data
def _with_val(annotations: Annotations, config: TrainConfig) -> Annotations:
    """The annotations with a val split: the dataset's own, or one carved out of train (said, and warned if tiny)."""
    if "val" in annotations.split_names():
        return annotations
    if config.val_fraction <= 0:
        logger.warning(
            "%s has no val split and val_fraction is 0: no checkpoint selection, the last weights are the result",
            annotations.source,
        )
        return annotations
    try:
        carved = carve_val(annotations, config.val_fraction, config.val_seed)
    except ValueError as error:
        message = f"{error} (val_fraction {config.val_fraction}); --val-fraction 0 trains without val"
        raise UsageError(message) from error
    counts = carved.counts()
    val_images, train_images = counts["val"][0], counts["train"][0]
    small = val_images < SMALL_VAL_IMAGES
    logger.log(
        logging.WARNING if small else logging.INFO,
        "%s has no val split: %d of %d train images carved out as val (fraction %g, seed %d)%s",
        annotations.source, val_images, val_images + train_images, config.val_fraction, config.val_seed,
        ": too few for a reliable checkpoint selection" if small else "",
    )  # fmt: skip
    return carved


def prepare_splits(config: TrainConfig, progress: Any = None) -> dict[str, RetrievalSplit]:
    """Load the dataset, carve val out of train if there is none, check the images of every split the run will use
    (train, val, and test unless ``config.test`` is off) and apply the noise protocol to train.

    Every split is checked before the first step so that a bad test image is not found after the last epoch: file
    existence by default, a full decode with ``skip_bad`` (bad images are then skipped and counted).
    """
    try:
        annotations = load_annotations(
            config.dataset,
            config.data_root,
            annotations=config.annotations,
            image_root=config.image_root,
            csv_split=config.csv_split,
            skip_bad=config.skip_bad,
        )
    except ValueError as error:  # an unknown dataset, no folder given, an unreadable annotation file
        raise UsageError(str(error)) from error
    annotations = _with_val(annotations, config)
    present = annotations.split_names()
    if "train" not in present:
        raise UsageError(f"{annotations.source}: no train split; splits present: {present}")
    if config.test and "test" not in present:
        logger.warning("%s has no test split: the run ends without a test evaluation", annotations.source)
    unused = [s for s in present if s not in ("train", "val", "test")]
    if unused:
        logger.warning("%s: splits %s are not used (only train, val and test are)", annotations.source, unused)
    used = [s for s in ("train", "val", "test") if s in present and (s != "test" or config.test)]
    splits = {}
    for name in used:
        splits[name] = check_images(annotations.split(name), config.skip_bad, decode=config.skip_bad, progress=progress)
    if config.noise_ratio > 0:
        splits["train"], _ = add_caption_noise(splits["train"], config.noise_ratio, config.noise_seed)
    return splits


# -------------------------------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """Everything one training run holds; the functions below advance it."""

    config: TrainConfig
    info: msa_dist.DistributedInfo
    device: torch.device
    output_dir: Path
    splits: dict[str, RetrievalSplit]
    model: Any
    dataset: CaptionPairDataset
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    progress: Any = None
    train_module: torch.nn.Module | None = None
    log: RunLog | None = None
    state: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_mR": -1.0, "best_epoch": -1}
    )

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"


def runtime_overrides(config: TrainConfig) -> dict[str, Any]:
    """Model config fields chosen per run rather than stored with the weights (the op backend)."""
    backend = config.backend or config.model_overrides.get("backend")
    return {"backend": backend} if backend else {}


def build_model(config: TrainConfig, device: torch.device) -> Any:
    from msa.model import create_model

    overrides = {**config.model_overrides, **runtime_overrides(config)}
    if config.preset is not None:
        overrides["preset"] = config.preset
    return create_model(config.model, **overrides).to(device)


def _build_run(config: TrainConfig, info: msa_dist.DistributedInfo, splits: dict[str, RetrievalSplit]) -> _Run:
    device = resolve_device(config.device, info)
    model = build_model(config, device)
    # Same initial weights on every rank (DDP also broadcasts rank 0's), different dropout streams.
    torch.manual_seed(config.seed + 1_000_003 * info.rank)
    augment = [a for a in config.augment if a != "timm"]
    transform = model.image_transform(train="timm" in config.augment)
    dataset = CaptionPairDataset(splits["train"], transform, build_augmentation(augment), seed=config.seed)
    sampler = EpochSampler(
        len(dataset), config.batch_size, seed=config.seed, rank=info.rank, world_size=info.world_size
    )
    steps_per_epoch = sampler.batches_per_epoch()
    if steps_per_epoch == 0:
        raise UsageError(
            f"{len(dataset)} training captions are fewer than one batch of {config.batch_size} x {info.world_size} "
            "processes: lower --batch-size"
        )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=collate_pairs,
        pin_memory=device.type == "cuda",
        # Workers' base seeds come from this generator, not the global one, so that creating a loader mid-epoch
        # (resume) does not shift the global RNG stream (dropout) with respect to an uninterrupted run.
        generator=torch.Generator().manual_seed(config.seed),
    )
    optimizer = build_optimizer(model, config)
    return _Run(
        config=config, info=info, device=device, output_dir=Path(config.output_dir), splits=splits, model=model,
        dataset=dataset, sampler=sampler, loader=loader, optimizer=optimizer,
        scheduler=make_scheduler(optimizer, config, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=config.precision == "fp16"),
        steps_per_epoch=steps_per_epoch, progress=progress_bars(config, info),
    )  # fmt: skip


def _restore(run: _Run, resume_dir: Path, saved: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    weights = resume_dir / "model" / "model.safetensors"
    try:
        state_dict = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error types on a truncated file
        raise UsageError(f"{weights} cannot be read ({type(error).__name__}: {error}); is it truncated?") from error
    run.model.load_checkpoint_state(state_dict, str(resume_dir))
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.scaler.load_state_dict(saved["scaler"])
    run.state = dict(saved["state"])
    rank = run.info.rank
    set_rng_state(saved["rng"][rank] if rank < len(saved["rng"]) else saved["rng"][0])
    logger.info(
        "resumed from %s at step %d (epoch %d, %d of its batches done)",
        resume_dir, run.state["step"], run.state["epoch"] + 1, run.state["batch_in_epoch"],
    )  # fmt: skip


def _wrap_for_training(run: _Run) -> None:
    module: torch.nn.Module = msa_dist.GlobalBatchModel(run.model)
    if run.info.enabled:
        if run.config.sync_bn:
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        module = torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    run.train_module = module


def _save_last(run: _Run) -> None:
    rngs: list[Any] = [None] * run.info.world_size
    if run.info.enabled:
        torch.distributed.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if run.info.is_main:
        training_state = {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rngs,
            "state": dict(run.state),
            "config": dataclasses.asdict(run.config),
        }
        save_checkpoint(run.checkpoint_dir / "last", run.model, training_state)
    msa_dist.barrier()


# ------------------------------------------------------------------------------------------------ training
def in_float32(output: MSAOutput) -> MSAOutput:
    """The model's output for the loss, in float32 whatever the autocast dtype (softmax/KL of the score matrices)."""
    return dataclasses.replace(
        output,
        image_embeds=output.image_embeds.float(),
        text_embeds=output.text_embeds.float(),
        scale_scores=[s.float() for s in output.scale_scores],
    )


def _train_step(run: _Run, batch: dict[str, Any]) -> dict[str, float]:
    from msa.losses import msa_loss

    config, state, device = run.config, run.state, run.device
    tokens = run.model.tokenize(batch["captions"])
    images = batch["images"].to(device, non_blocking=True)
    autocast_dtype = PRECISIONS[config.precision]
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        output, image_ids = run.train_module(
            images, tokens["input_ids"].to(device), tokens["attention_mask"].to(device), batch["image_ids"].to(device)
        )
    losses = msa_loss(in_float32(output), run.model.config.preset, image_ids=image_ids)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(losses.total).backward()
    if config.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    state["step"] += 1
    state["batch_in_epoch"] += 1
    row = {
        "step": state["step"],
        "epoch": state["epoch"] + 1,
        "loss": losses.total.item(),
        "triplet": losses.triplet.item(),
        "alignment": losses.alignment.item(),
        "consistency": losses.consistency.item(),
        "lr": lr,
    }
    if not math.isfinite(row["loss"]):
        raise FloatingPointError(f"non-finite loss {row['loss']} at step {state['step']} (epoch {row['epoch']})")
    return row


def _train_epoch(run: _Run) -> bool:
    """Train the rest of the current epoch; True when ``max_steps`` stopped it."""
    config, state = run.config, run.state
    epoch = state["epoch"]
    run.sampler.set_epoch(epoch, start_batch=state["batch_in_epoch"])
    run.dataset.set_epoch(epoch)
    run.model.train()
    batches = run.loader
    if run.progress:
        total = len(run.sampler) // config.batch_size
        batches = run.progress(run.loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, total=total)
    tick = time.perf_counter()
    for batch in batches:
        row = _train_step(run, batch)
        row["images_per_s"] = len(batch["image_ids"]) * run.info.world_size / max(time.perf_counter() - tick, 1e-9)
        tick = time.perf_counter()
        run.log.step(row)
        if state["step"] % max(1, config.log_every) == 0:
            if run.progress:
                batches.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
            elif run.info.is_main:
                logger.info(
                    "epoch %d/%d step %d: loss %.4f, lr %.3g, %.1f images/s",
                    row["epoch"], config.epochs, row["step"], row["loss"], row["lr"], row["images_per_s"],
                )  # fmt: skip
        if config.save_every_steps and state["step"] % config.save_every_steps == 0:
            _save_last(run)
        if config.max_steps is not None and state["step"] >= config.max_steps:
            return True
    return False


def _evaluate(run: _Run, model: Any, split: RetrievalSplit) -> dict[str, dict[str, float]]:
    config, progress = run.config, run.progress
    return evaluate_model(
        model,
        split,
        modes=config.eval_modes,
        fusion_weight=config.fusion_weight,
        device=run.device,
        batch_size=config.eval_batch_size,
        chunk_size=config.eval_chunk_size,
        autocast_dtype=PRECISIONS[config.precision] if run.device.type == "cuda" else None,
        progress=(lambda it, **kw: progress(it, leave=False, **kw)) if progress else None,
    )


def _validate(run: _Run) -> None:
    """Evaluate val (main process), keep ``checkpoints/best`` by the selected mode's mR, and say the scores."""
    config, state = run.config, run.state
    if run.info.is_main:
        metrics = _evaluate(run, run.model, run.splits["val"])
        run.log.evaluation({"split": "val", "epoch": state["epoch"], "step": state["step"], "metrics": metrics})
        selected = metrics[config.select_mode]["mR"]
        if selected > state["best_mR"]:
            state["best_mR"], state["best_epoch"] = selected, state["epoch"]
            save_checkpoint(run.checkpoint_dir / "best", run.model, {"state": dict(state)})
        shown = [m for m in metrics if not m.startswith("mscmat_s")]
        logger.info(
            "epoch %d/%d val: %s; best epoch %d (%s mR %.2f)",
            state["epoch"], config.epochs, format_metrics(metrics, shown), state["best_epoch"], config.select_mode,
            state["best_mR"],
        )  # fmt: skip
    if run.info.enabled:
        shared = [state["best_mR"], state["best_epoch"]]
        torch.distributed.broadcast_object_list(shared, src=0)
        state["best_mR"], state["best_epoch"] = shared


def _train_epochs(run: _Run) -> str:
    """Epochs until the end (``"finished"``) or ``max_steps`` (``"stopped"``, with ``checkpoints/last`` written)."""
    config, state = run.config, run.state
    epoch_bar = run.progress(total=config.epochs, initial=state["epoch"], desc="epochs") if run.progress else None
    status = "finished"
    while state["epoch"] < config.epochs:
        stopped = _train_epoch(run)
        if stopped and state["batch_in_epoch"] < run.steps_per_epoch:
            _save_last(run)
            status = "stopped"
            break
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        if "val" in run.splits and (state["epoch"] % config.eval_every == 0 or state["epoch"] == config.epochs):
            _validate(run)
        _save_last(run)
        if epoch_bar is not None:
            epoch_bar.update(1)
        if stopped:
            status = "stopped"
            break
    if epoch_bar is not None:
        epoch_bar.close()
    return status


# --------------------------------------------------------------------------------------------- start, finish
def _resume_point(config: TrainConfig, info: msa_dist.DistributedInfo, checkpoint_dir: Path) -> Path | None:
    """The checkpoint to continue from (the main process first repairs an interrupted replace)."""
    resume_dir = None
    if info.is_main:
        resume_dir = resolve_resume(config, checkpoint_dir, repair=True)
        if config.resume == "never" and checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        recover_checkpoint(checkpoint_dir / "best", repair=True)
    msa_dist.barrier()
    if not info.is_main:
        resume_dir = resolve_resume(config, checkpoint_dir, repair=False)
    return resume_dir


def _test(run: _Run, best_dir: Path, result: dict[str, Any]) -> None:
    """Test metrics of the best checkpoint into ``result``; on failure the results so far are written first."""
    from msa.model import MSAModel

    try:
        best_model = MSAModel.from_pretrained(best_dir / "model", **runtime_overrides(run.config)).to(run.device)
        metrics = _evaluate(run, best_model, run.splits["test"])
    except Exception as error:
        result["test_error"] = f"{type(error).__name__}: {error}"
        write_results(run.output_dir, result)
        raise
    row = {"split": "test", "epoch": run.state["best_epoch"], "step": run.state["step"], "metrics": metrics}
    run.log.evaluation(row)
    result["test"] = metrics
    logger.info("test, best checkpoint (epoch %d): %s", run.state["best_epoch"], format_metrics(metrics, ["global"]))


def _finish(run: _Run, status: str) -> dict[str, Any]:
    config, state = run.config, run.state
    result: dict[str, Any] = {"status": status, "output_dir": str(run.output_dir), "steps": state["step"]}
    result["run"] = {
        "model": config.model, "dataset": config.dataset, "preset": run.model.config.preset, "seed": config.seed,
        "epochs": config.epochs,
    }  # fmt: skip
    result["best"] = {"epoch": state["best_epoch"], "val_mR": state["best_mR"], "select_mode": config.select_mode}
    result["skipped"] = {name: dict(split.skipped) for name, split in run.splits.items() if split.skipped}
    if status == "finished" and run.info.is_main:
        best_dir = run.checkpoint_dir / "best"
        if recover_checkpoint(best_dir) is None:
            # No val split: the last weights are the result.
            save_checkpoint(best_dir, run.model, {"state": dict(state)})
        if config.test and "test" in run.splits:
            _test(run, best_dir, result)
        write_results(run.output_dir, result)
        plot_curves(run.output_dir, config.select_mode)
    return result


def train(config: TrainConfig, info: msa_dist.DistributedInfo | None = None) -> dict[str, Any]:
    """Run one training (one seed). Returns ``{"status", "output_dir", "steps", "run", "best", "skipped", "test"}``.

    ``status`` is ``"finished"`` or ``"stopped"`` (``max_steps`` reached; continue with ``resume="auto"``).

    Raises:
        UsageError: a setting, file or split the run cannot use, found before the first step where possible.
    """
    info = info or msa_dist.DistributedInfo()
    output_dir = Path(config.output_dir)
    resume_dir = _resume_point(config, info, output_dir / "checkpoints")
    # Read (and compared with the settings) before anything slow: a refused resume costs nothing.
    saved = load_training_state(resume_dir, config) if resume_dir is not None else None
    seed_everything(config.seed, config.deterministic)
    splits = prepare_splits(config)
    run = _build_run(config, info, splits)
    if saved is not None:
        _restore(run, resume_dir, saved)
    _wrap_for_training(run)
    if info.is_main:
        import yaml

        # Written once the settings are known to run (a refused resume leaves the previous file).
        (output_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    run.log = RunLog(output_dir, info.is_main, config.tensorboard, run.state["step"] if saved is not None else None)
    try:
        result = _finish(run, _train_epochs(run))
    finally:
        run.log.close()
    msa_dist.barrier()
    return result
