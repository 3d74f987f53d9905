"""Train MSA on a retrieval dataset: ``msa-train --config configs/rsicd_paper.yaml`` or ``python -m msa.train``.

Multi-GPU: ``torchrun --nproc-per-node 8 -m msa.train --config ...``; the score matrices then span the global batch
(features all-gathered with the local gradient kept, see :mod:`msa.distributed`).

Settings come from, in increasing priority: the defaults of :class:`TrainConfig` (the published hyper-parameters:
AdamW, lr 1e-5, weight decay 0.1, batch 32, 60 epochs, no schedule, no augmentation), a YAML file (``--config``) and
command-line flags. The output folder receives ``config.yaml``, ``train_log.csv`` / ``train_log.jsonl`` (per step),
``eval_log.jsonl`` (per epoch), TensorBoard events, ``checkpoints/last`` (exact resume) and ``checkpoints/best``
(best val mR), ``results.md`` / ``results.json`` (test metrics of the best checkpoint, every scoring mode) and
``curves.png`` (loss and val mR).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msa import distributed as msa_dist
from msa.data import (
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
from msa.evaluation import METRIC_KEYS, SCORING_MODES, evaluate_model, metrics_table

logger = logging.getLogger("msa.train")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LR_SCHEDULES = ("none", "cosine", "linear", "step")


@dataclass
class TrainConfig:
    """Every setting of a training run (YAML keys and ``--kebab-case`` flags have these names)."""

    # model
    model: str = "msa-resnet50-bert"
    preset: str | None = None  # None: the model config's preset; "paper" / "improved" override it
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # data
    dataset: str = "rsicd"
    data_root: str | None = None
    annotations: str | None = None
    image_root: str | None = None
    csv_split: str | None = None
    skip_bad: bool = False
    val_fraction: float = 0.1  # only used when the dataset has no val split (RSITMD as distributed)
    val_seed: int = 0
    noise_ratio: float = 0.0
    noise_seed: int = 0
    augment: list[str] = field(default_factory=list)  # published: none; "timm" = the backbone's train transform
    workers: int = 2
    # optimisation (published: AdamW, lr 1e-5, wd 0.1, batch 32, 60 epochs, constant lr)
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: str = "none"
    warmup_steps: int = 0
    lr_step_epochs: int = 20
    lr_step_gamma: float = 0.1
    grad_clip: float | None = None
    precision: str = "fp32"
    sync_bn: bool = False
    # reproducibility
    seed: int = 0
    seeds: list[int] | None = None
    deterministic: bool = False
    # evaluation
    eval_modes: list[str] = field(default_factory=lambda: list(SCORING_MODES))
    select_mode: str = "global"  # which scoring mode's val mR picks the best checkpoint
    fusion_weight: float = 1.0
    eval_batch_size: int = 128
    eval_chunk_size: int = 1024
    eval_every: int = 1
    test: bool = True
    # run control
    output_dir: str = "runs/msa"
    device: str = "auto"
    resume: str | None = None  # a checkpoint folder, or "auto" (output_dir/checkpoints/last if present)
    save_every_steps: int = 0
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total: partial runs
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.preset not in (None, "paper", "improved"):
            raise ValueError(f"preset must be paper or improved, got {self.preset!r}")
        unknown = set(self.eval_modes) - set(SCORING_MODES)
        if unknown:
            raise ValueError(f"unknown eval modes {sorted(unknown)}; choose from {SCORING_MODES}")
        per_scale = self.select_mode.startswith("mscmat_s") and "scales" in self.eval_modes
        if self.select_mode not in self.eval_modes and not per_scale:
            raise ValueError(f"select_mode {self.select_mode!r} is not evaluated; eval_modes are {self.eval_modes}")


# ------------------------------------------------------------------------------------------------- configuration
def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (unknown keys raise) with ``overrides`` applied on top."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training settings {unknown} (from {path}); known: {sorted(known)}")
    return TrainConfig(**values)


def _str2bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msa-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--config", help="YAML file of TrainConfig settings (flags override it)")
    add("--model", help="model name (msa.configs.list_models) or a save_pretrained folder")
    add("--preset", choices=["paper", "improved"], help="loss/model preset (default: the model config's)")
    add("--model-override", action="append", metavar="KEY=VALUE", help="MSAConfig field override (YAML value)")
    add("--dataset", help="rsicd, rsitmd, ucm, sydney, nwpu, karpathy or csv")
    add("--data-root", help="dataset folder as distributed")
    add("--annotations", help="explicit annotation file (JSON or CSV)")
    add("--image-root", help="explicit image folder")
    add("--csv-split", help="split of the rows of a CSV annotation file")
    add("--skip-bad", type=_str2bool, nargs="?", const=True, help="skip and count empty captions / bad images")
    add("--val-fraction", type=float, help="train share carved out as val when the dataset has no val split")
    add("--val-seed", type=int, help="seed of the val carve-out")
    add("--noise-ratio", type=float, help="noisy correspondence: share of train captions shuffled (0.2 = 20%%)")
    add("--noise-seed", type=int, help="seed of the noisy-correspondence shuffle")
    add("--augment", nargs="*", help="train augmentations: flip vflip rot90 rotate crop, or timm")
    add("--workers", type=int, help="data-loader worker processes")
    add("--epochs", type=int, help="number of epochs")
    add("--batch-size", type=int, help="per-process batch size (global batch = this x world size)")
    add("--lr", type=float, help="learning rate")
    add("--weight-decay", type=float, help="AdamW weight decay")
    add("--lr-schedule", choices=LR_SCHEDULES, help="learning-rate schedule after the warm-up")
    add("--warmup-steps", type=int, help="linear warm-up steps")
    add("--grad-clip", type=float, help="clip the gradient norm to this value")
    add("--precision", choices=list(PRECISIONS), help="autocast dtype (fp16 uses a gradient scaler)")
    add("--sync-bn", type=_str2bool, nargs="?", const=True, help="SyncBatchNorm across ranks")
    add("--seed", type=int, help="random seed")
    add("--seeds", type=int, nargs="+", help="run once per seed and report mean ± std")
    add("--deterministic", type=_str2bool, nargs="?", const=True, help="deterministic algorithms only")
    add("--eval-modes", nargs="+", choices=SCORING_MODES, help="scoring modes to evaluate")
    add("--select-mode", help="scoring mode whose val mR selects the best checkpoint (default global)")
    add("--fusion-weight", type=float, help="fusion = global + weight x mscmat")
    add("--eval-batch-size", type=int, help="batch size of the evaluation encoders")
    add("--eval-chunk-size", type=int, help="images/texts per block of the MSCMAT scoring")
    add("--eval-every", type=int, help="validate every N epochs")
    add("--test", type=_str2bool, nargs="?", const=True, help="evaluate the best checkpoint on test at the end")
    add("--output-dir", help="run folder")
    add("--device", help="auto, cpu, cuda, cuda:1 ...")
    add("--resume", help="checkpoint folder to resume from, or 'auto'")
    add("--save-every-steps", type=int, help="also write checkpoints/last every N steps")
    add("--max-steps", type=int, help="stop after this many steps in total (a checkpoint is written)")
    add("--log-every", type=int, help="log every N steps")
    add("--tensorboard", type=_str2bool, nargs="?", const=True, help="write TensorBoard events")
    add("--progress", type=_str2bool, nargs="?", const=True, help="show progress bars")
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    overrides = args.pop("model_override") or []
    if overrides:
        import yaml

        model_overrides = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"--model-override expects KEY=VALUE, got {item!r}")
            model_overrides[key] = yaml.safe_load(value)
        base = load_config(path).model_overrides if path else {}
        args["model_overrides"] = {**base, **model_overrides}
    return load_config(path, **args)


# ---------------------------------------------------------------------------------------------------- utilities
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


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup_steps``, then constant (published), cosine or linear decay to 0, or step decay
    by ``lr_step_gamma`` every ``lr_step_epochs`` epochs. Stepped once per optimizer step."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if config.lr_schedule == "linear":
            return 1.0 - progress
        if config.lr_schedule == "step":
            return config.lr_step_gamma ** (step // max(1, config.lr_step_epochs * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class GlobalBatchModel(torch.nn.Module):
    """Wraps an MSAModel so that DDP sees one forward: encode the local batch, all-gather the features (local
    gradient kept), score the global batch. Returns the :class:`MSAOutput` and the global image ids."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_ids: torch.Tensor
    ) -> tuple[Any, torch.Tensor]:
        image_features = gather_features(self.model.encode_image(images))
        text_features = gather_features(self.model.encode_text(input_ids, attention_mask))
        output = self.model.forward_features(image_features, text_features)
        return output, msa_dist.all_gather_no_grad(image_ids)


def gather_features(features: Any) -> Any:
    """All-gather every tensor field of an ImageFeatures / TextFeatures (lists element-wise, None kept)."""
    values = {}
    for f in dataclasses.fields(features):
        value = getattr(features, f.name)
        if value is None:
            values[f.name] = None
        elif isinstance(value, list):
            values[f.name] = [msa_dist.all_gather_with_grad(v) for v in value]
        elif value.is_floating_point():
            values[f.name] = msa_dist.all_gather_with_grad(value)
        else:
            values[f.name] = msa_dist.all_gather_no_grad(value)
    return type(features)(**values)


def prepare_splits(config: TrainConfig, progress: Any = None) -> dict[str, RetrievalSplit]:
    """Load the dataset, carve val out of train if there is none, check images, apply the noise protocol to train."""
    annotations = load_annotations(
        config.dataset,
        config.data_root,
        annotations=config.annotations,
        image_root=config.image_root,
        csv_split=config.csv_split,
        skip_bad=config.skip_bad,
    )
    if "val" not in annotations.split_names() and config.val_fraction > 0:
        annotations = carve_val(annotations, config.val_fraction, config.val_seed)
    splits = {}
    for name in annotations.split_names():
        # Decoding every image is slow: only with --skip-bad (otherwise a bad file raises when it is first read).
        splits[name] = check_images(annotations.split(name), config.skip_bad, decode=config.skip_bad, progress=progress)
    if "train" not in splits:
        raise ValueError(f"{config.dataset}: no train split; splits present: {list(splits)}")
    if config.noise_ratio > 0:
        splits["train"], _ = add_caption_noise(splits["train"], config.noise_ratio, config.noise_seed)
    return splits


# ------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(directory: Path, model: Any, training_state: dict[str, Any]) -> None:
    """``directory/model`` (save_pretrained) + ``directory/training_state.pt``; written to a temporary folder and
    renamed, so an interruption while saving never leaves a half-written checkpoint."""
    temporary = directory.with_name(directory.name + ".tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    model.save_pretrained(temporary / "model")
    torch.save(training_state, temporary / "training_state.pt")
    if directory.exists():
        shutil.rmtree(directory)
    temporary.rename(directory)


def load_training_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / "training_state.pt", map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------------------ logging
class RunLog:
    """Per-step CSV + JSON-lines logs, per-epoch eval JSON lines and TensorBoard, on the main process only."""

    STEP_FIELDS = ("step", "epoch", "loss", "triplet", "alignment", "consistency", "lr", "images_per_s")

    def __init__(self, directory: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.directory = directory
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate(resume_step)
        else:
            for name in ("train_log.csv", "train_log.jsonl", "eval_log.jsonl"):
                (directory / name).unlink(missing_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(directory / "tensorboard"), purge_step=resume_step)
            except ImportError:
                logger.warning("tensorboard is not installed: no TensorBoard events")

    def _truncate(self, step: int) -> None:
        # Rows logged after the checkpoint we resume from would be logged again: drop them.
        for name, key in (("train_log.jsonl", "step"), ("eval_log.jsonl", "step")):
            path = self.directory / name
            if path.exists():
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                path.write_text("".join(json.dumps(r) + "\n" for r in rows if r[key] <= step))
        rows = read_jsonl(self.directory / "train_log.jsonl")
        with open(self.directory / "train_log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.STEP_FIELDS)
            writer.writeheader()
            writer.writerows({k: r.get(k) for k in self.STEP_FIELDS} for r in rows)

    def step(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        csv_path = self.directory / "train_log.csv"
        new = not csv_path.exists()
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.STEP_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k) for k in self.STEP_FIELDS})
        with open(self.directory / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key in ("loss", "triplet", "alignment", "consistency", "lr"):
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def evaluation(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.directory / "eval_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for mode, metrics in row["metrics"].items():
                for key in METRIC_KEYS:
                    self.writer.add_scalar(f"{row['split']}/{mode}/{key}", metrics[key], row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(directory: Path, select_mode: str) -> Path | None:
    """``curves.png``: training loss per step and val mR per epoch."""
    steps = read_jsonl(directory / "train_log.jsonl")
    evals = [r for r in read_jsonl(directory / "eval_log.jsonl") if r["split"] == "val"]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, mr_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="total")
    for part in ("triplet", "alignment", "consistency"):
        loss_axis.plot([r["step"] for r in steps], [r[part] for r in steps], label=part, alpha=0.7)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    loss_axis.set_yscale("log")
    loss_axis.legend()
    modes = sorted({mode for r in evals for mode in r["metrics"] if not mode.startswith("mscmat_s")})
    for mode in modes:
        points = [(r["epoch"], r["metrics"][mode]["mR"]) for r in evals if mode in r["metrics"]]
        style = "-o" if mode == select_mode else "--."
        mr_axis.plot([p[0] for p in points], [p[1] for p in points], style, label=mode)
    mr_axis.set_xlabel("epoch")
    mr_axis.set_ylabel("val mR (%)")
    if modes:
        mr_axis.legend()
    figure.tight_layout()
    path = directory / "curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------- the training
def _progress(config: TrainConfig, info: msa_dist.DistributedInfo):
    if config.progress and info.is_main:
        from tqdm.auto import tqdm

        return tqdm
    return None


def _evaluate(model: Any, split: RetrievalSplit, config: TrainConfig, device: torch.device, progress: Any) -> dict:
    return evaluate_model(
        model,
        split,
        modes=config.eval_modes,
        fusion_weight=config.fusion_weight,
        device=device,
        batch_size=config.eval_batch_size,
        chunk_size=config.eval_chunk_size,
        autocast_dtype=PRECISIONS[config.precision] if device.type == "cuda" else None,
        progress=(lambda it, **kw: progress(it, leave=False, **kw)) if progress else None,
    )


def train(config: TrainConfig, info: msa_dist.DistributedInfo | None = None) -> dict[str, Any]:
    """Run one training (one seed). Returns ``{"status", "best", "test", "output_dir", "steps"}``.

    ``status`` is ``"finished"`` or ``"stopped"`` (``max_steps`` reached; resume with ``resume="auto"``).
    """
    from msa.losses import msa_loss
    from msa.model import create_model

    info = info or msa_dist.DistributedInfo()
    output_dir = Path(config.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    if info.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (output_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    msa_dist.barrier()
    seed_everything(config.seed, config.deterministic)
    device = resolve_device(config.device, info)
    progress = _progress(config, info)

    splits = prepare_splits(config, progress=None)
    train_split = splits["train"]
    model_overrides = dict(config.model_overrides)
    if config.preset is not None:
        model_overrides["preset"] = config.preset
    model = create_model(config.model, **model_overrides).to(device)
    preset = model.config.preset
    # Same initial weights on every rank (DDP also broadcasts rank 0's), different dropout streams.
    torch.manual_seed(config.seed + 1_000_003 * info.rank)

    augment = [a for a in config.augment if a != "timm"]
    transform = model.image_transform(train="timm" in config.augment)
    dataset = CaptionPairDataset(train_split, transform, build_augmentation(augment), seed=config.seed)
    sampler = EpochSampler(
        len(dataset), config.batch_size, seed=config.seed, rank=info.rank, world_size=info.world_size
    )
    steps_per_epoch = sampler.batches_per_epoch()
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} training captions are fewer than one batch of {config.batch_size} x {info.world_size}"
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

    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or name.endswith("logit_scale") else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=tuple(config.betas),
    )
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    autocast_dtype = PRECISIONS[config.precision]

    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_mR": -1.0, "best_epoch": -1}
    resume_dir = None
    if config.resume == "auto":
        resume_dir = checkpoint_dir / "last" if (checkpoint_dir / "last" / "training_state.pt").exists() else None
    elif config.resume:
        resume_dir = Path(config.resume)
    if resume_dir is not None:
        saved = load_training_state(resume_dir)
        from safetensors.torch import load_file

        model.load_checkpoint_state(load_file(str(resume_dir / "model" / "model.safetensors")), str(resume_dir))
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = saved["state"]
        set_rng_state(saved["rng"][info.rank] if info.rank < len(saved["rng"]) else saved["rng"][0])
        logger.info("resumed from %s at epoch %d, step %d", resume_dir, state["epoch"], state["step"])

    train_module: torch.nn.Module = GlobalBatchModel(model)
    if info.enabled:
        if config.sync_bn:
            train_module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(train_module)
        train_module = torch.nn.parallel.DistributedDataParallel(
            train_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    log = RunLog(output_dir, info.is_main, config.tensorboard, state["step"] if resume_dir is not None else None)

    def checkpoint(name: str) -> None:
        rngs = [None] * info.world_size
        if info.enabled:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if info.is_main:
            training_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rngs,
                "state": dict(state),
                "config": dataclasses.asdict(config),
            }
            save_checkpoint(checkpoint_dir / name, model, training_state)
        msa_dist.barrier()

    status = "finished"
    epoch_bar = progress(total=config.epochs, initial=state["epoch"], desc="epochs") if progress else None
    while state["epoch"] < config.epochs:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, start_batch=state["batch_in_epoch"])
        dataset.set_epoch(epoch)
        model.train()
        batches = loader
        if progress:
            batches = progress(loader, desc=f"epoch {epoch}", leave=False, total=len(sampler) // config.batch_size)
        tick = time.perf_counter()
        for batch in batches:
            tokens = model.tokenize(batch["captions"])
            images = batch["images"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                output, image_ids = train_module(
                    images,
                    tokens["input_ids"].to(device),
                    tokens["attention_mask"].to(device),
                    batch["image_ids"].to(device),
                )
            # The loss in float32 whatever the autocast dtype (softmax/KL of the score matrices).
            output = dataclasses.replace(
                output,
                image_embeds=output.image_embeds.float(),
                text_embeds=output.text_embeds.float(),
                scale_scores=[s.float() for s in output.scale_scores],
            )
            losses = msa_loss(output, preset, image_ids=image_ids)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses.total).backward()
            if config.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state["step"] += 1
            state["batch_in_epoch"] += 1
            elapsed = time.perf_counter() - tick
            tick = time.perf_counter()
            row = {
                "step": state["step"],
                "epoch": epoch,
                "loss": losses.total.item(),
                "triplet": losses.triplet.item(),
                "alignment": losses.alignment.item(),
                "consistency": losses.consistency.item(),
                "lr": lr,
                "images_per_s": images.shape[0] * info.world_size / max(elapsed, 1e-9),
            }
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"non-finite loss {row['loss']} at step {state['step']} (epoch {epoch})")
            log.step(row)
            if progress and state["step"] % max(1, config.log_every) == 0:
                batches.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
            if config.save_every_steps and state["step"] % config.save_every_steps == 0:
                checkpoint("last")
            if config.max_steps is not None and state["step"] >= config.max_steps:
                status = "stopped"
                break
        if status == "stopped" and state["batch_in_epoch"] < steps_per_epoch:
            checkpoint("last")
            break
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        if "val" in splits and (state["epoch"] % config.eval_every == 0 or state["epoch"] == config.epochs):
            if info.is_main:
                metrics = _evaluate(model, splits["val"], config, device, progress)
                log.evaluation({"split": "val", "epoch": state["epoch"], "step": state["step"], "metrics": metrics})
                selected = metrics[config.select_mode]["mR"]
                if selected > state["best_mR"]:
                    state["best_mR"], state["best_epoch"] = selected, state["epoch"]
                    save_checkpoint(checkpoint_dir / "best", model, {"state": dict(state)})
            if info.enabled:
                shared = [state["best_mR"], state["best_epoch"]]
                torch.distributed.broadcast_object_list(shared, src=0)
                state["best_mR"], state["best_epoch"] = shared
        checkpoint("last")
        if epoch_bar is not None:
            epoch_bar.update(1)
        if status == "stopped":
            break
    if epoch_bar is not None:
        epoch_bar.close()

    result: dict[str, Any] = {"status": status, "output_dir": str(output_dir), "steps": state["step"]}
    result["best"] = {"epoch": state["best_epoch"], "val_mR": state["best_mR"], "select_mode": config.select_mode}
    if status == "finished" and info.is_main:
        best_dir = checkpoint_dir / "best"
        if not (best_dir / "model").exists():
            # No val split: the last weights are the result.
            save_checkpoint(best_dir, model, {"state": dict(state)})
        if config.test and "test" in splits:
            from msa.model import MSAModel

            best_model = MSAModel.from_pretrained(best_dir / "model").to(device)
            test_metrics = _evaluate(best_model, splits["test"], config, device, progress)
            log.evaluation(
                {"split": "test", "epoch": state["best_epoch"], "step": state["step"], "metrics": test_metrics}
            )
            result["test"] = test_metrics
        write_results(output_dir, config, result)
        plot_curves(output_dir, config.select_mode)
    log.close()
    msa_dist.barrier()
    return result


def write_results(output_dir: Path, config: TrainConfig, result: dict[str, Any]) -> None:
    """``results.json`` and ``results.md`` (test metrics of the best checkpoint, one row per scoring mode)."""
    (output_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# {config.model} on {config.dataset} (preset {config.preset or 'model default'}, seed {config.seed})",
        "",
        f"Best epoch {result['best']['epoch']} by val mR ({result['best']['select_mode']} scoring): "
        f"{result['best']['val_mR']:.2f}",
        "",
    ]
    if "test" in result:
        lines += ["Test split, best checkpoint:", "", metrics_table(result["test"]), ""]
    (output_dir / "results.md").write_text("\n".join(lines))


def summarize_seeds(results: dict[int, dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and sample standard deviation over seeds of every test metric, per scoring mode."""
    modes = sorted({mode for r in results.values() for mode in r.get("test", {})})
    summary: dict[str, dict[str, tuple[float, float]]] = {}
    for mode in modes:
        summary[mode] = {}
        for key in (*METRIC_KEYS, "i2t_medr", "t2i_medr"):
            values = [r["test"][mode][key] for r in results.values() if mode in r.get("test", {})]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[mode][key] = (statistics.fmean(values), std)
    return summary


def run(config: TrainConfig) -> dict[str, Any]:
    """Train once, or once per seed of ``config.seeds`` (each in ``output_dir/seed_<s>``) with a mean ± std table."""
    info = msa_dist.init_distributed()
    if not config.seeds:
        return train(config, info)
    results = {}
    for seed in config.seeds:
        seed_config = dataclasses.replace(
            config, seed=seed, seeds=None, output_dir=str(Path(config.output_dir) / f"seed_{seed}")
        )
        results[seed] = train(seed_config, info)
    summary = summarize_seeds(results)
    if info.is_main:
        output_dir = Path(config.output_dir)
        table = metrics_table(summary, title="scoring (mean ± std)")
        text = (
            f"# {config.model} on {config.dataset}, seeds {config.seeds}\n\nTest split, best checkpoint per seed:\n\n"
        )
        (output_dir / "results.md").write_text(text + table + "\n")
        (output_dir / "results.json").write_text(
            json.dumps({"seeds": {str(k): v for k, v in results.items()}, "summary": summary}, indent=2) + "\n"
        )
    return {"seeds": results, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from_args(argv)
    result = run(config)
    if int(os.environ.get("RANK", "0")) == 0:
        if "summary" in result:
            print(metrics_table(result["summary"], title="scoring (mean ± std)"))
        elif "test" in result:
            print(metrics_table(result["test"]))
        else:
            print(f"{result['status']} after {result['steps']} steps; output in {result['output_dir']}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
