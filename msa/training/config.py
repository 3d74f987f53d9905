"""Settings of a training run: :class:`TrainConfig`, its YAML file and the ``msa-train`` argument parser.

Settings come from, in increasing priority: the defaults of :class:`TrainConfig` (the published hyper-parameters:
AdamW, lr 1e-5, weight decay 0.1, batch 32, 60 epochs, no schedule, no augmentation), a YAML file (``--config``) and
command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from msa.configs import PRESETS
from msa.evaluation import SCORING_MODES

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LR_SCHEDULES = ("none", "cosine", "linear", "step")
# Settings a resumed run may change: they decide how the run is executed or reported, not what it computes.
# ``epochs`` is handled apart (only schedules that do not depend on the total length can be extended).
RUNTIME_SETTINGS = frozenset(
    {
        "resume", "output_dir", "device", "backend", "workers", "progress", "tensorboard", "log_every",
        "save_every_steps", "max_steps", "eval_batch_size", "eval_chunk_size", "eval_every", "test",
    }
)  # fmt: skip


class UsageError(ValueError):
    """A mistake in what the user asked for (a setting, a file, a split): ``msa-train`` prints it in one line."""


@dataclass
class TrainConfig:
    """Every setting of a training run (YAML keys and ``--kebab-case`` flags have these names)."""

    # model
    model: str = "msa-resnet50-bert"
    preset: str | None = None  # None: the model config's preset; "paper" / "improved" override it
    model_overrides: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None  # msa.ops backend for this run (a runtime choice, never saved with the weights)
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
    # None: start, but refuse a run folder that holds checkpoints; "auto": continue from output_dir's checkpoint if
    # there is one; "never": start over (the folder's checkpoints and logs are deleted); else a checkpoint folder.
    resume: str | None = None
    save_every_steps: int = 0
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total: partial runs
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UsageError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise UsageError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        unknown = set(self.eval_modes) - set(SCORING_MODES)
        if unknown:
            raise UsageError(f"unknown eval modes {sorted(unknown)}; choose from {SCORING_MODES}")
        per_scale = self.select_mode.startswith("mscmat_s") and "scales" in self.eval_modes
        if self.select_mode not in self.eval_modes and not per_scale:
            raise UsageError(f"select_mode {self.select_mode!r} is not evaluated; eval_modes are {self.eval_modes}")
        for name in ("epochs", "batch_size", "eval_every", "eval_batch_size", "eval_chunk_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (unknown keys raise) with ``overrides`` applied on top.

    Raises:
        UsageError: the file is missing or not YAML, a key is unknown or a value is invalid (the message names them).
    """
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise UsageError(f"cannot read the config file {path}: {error.strerror or error}") from error
        except yaml.YAMLError as error:
            raise UsageError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from error
        if not isinstance(values, dict):
            raise UsageError(f"{path} must hold a mapping of settings, got {type(values).__name__}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        source = f" (from {path})" if path is not None else ""
        raise UsageError(f"unknown training settings {unknown}{source}; known: {sorted(known)}")
    try:
        return TrainConfig(**values)
    except UsageError as error:
        raise UsageError(f"{path}: {error}" if path is not None else str(error)) from error


def _str2bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msa-train", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--config", help="YAML file of TrainConfig settings (flags override it)")
    add("--debug", action="store_true", help="show the full traceback of an error")
    add("--model", help="model name (msa.configs.list_models) or a save_pretrained folder")
    add("--preset", choices=list(PRESETS), help="loss/model preset (default: the model config's)")
    add("--model-override", action="append", metavar="KEY=VALUE", help="MSAConfig field override (YAML value)")
    add("--backend", help="msa.ops backend of this run: auto, reference, cpu, cuda, triton (not saved)")
    add("--dataset", help="rsicd, rsitmd, ucm, sydney, nwpu, karpathy or csv")
    add("--data-root", help="dataset folder as distributed")
    add("--annotations", help="explicit annotation file (JSON or CSV)")
    add("--image-root", help="explicit image folder")
    add("--csv-split", help="split of the rows of a CSV annotation file")
    add("--skip-bad", type=_str2bool, nargs="?", const=True, help="decode every image; skip and count bad ones")
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
    add(
        "--resume",
        help="'auto': continue the run in --output-dir if it has a checkpoint; 'never': start over, deleting its "
        "checkpoints and logs; or a checkpoint folder. Without it a run folder holding checkpoints is refused",
    )
    add("--save-every-steps", type=int, help="also write checkpoints/last every N steps")
    add("--max-steps", type=int, help="stop after this many steps in total (a checkpoint is written)")
    add("--log-every", type=int, help="log every N steps")
    add("--tensorboard", type=_str2bool, nargs="?", const=True, help="write TensorBoard events")
    add("--progress", type=_str2bool, nargs="?", const=True, help="show progress bars (on a terminal only)")
    return parser


def config_from_args(argv: list[str] | None = None, args: dict[str, Any] | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of a command line (or of ``args``, the parsed flags without ``debug``)."""
    if args is None:
        args = vars(build_parser().parse_args(argv))
        args.pop("debug")
    args = dict(args)
    path = args.pop("config")
    overrides = args.pop("model_override") or []
    if overrides:
        import yaml

        model_overrides = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"--model-override expects KEY=VALUE, got {item!r}")
            model_overrides[key] = yaml.safe_load(value)
        base = load_config(path).model_overrides if path else {}
        args["model_overrides"] = {**base, **model_overrides}
    return load_config(path, **args)


def changed_settings(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """``"name: saved -> now"`` for every setting of ``config`` that a resumed run cannot honour.

    The backend inside ``model_overrides`` is a runtime choice like ``backend``; settings unknown to one side (a
    checkpoint from another version) are not compared.
    """
    current = dataclasses.asdict(config)
    changes = []
    for name in sorted(set(saved) & set(current) - RUNTIME_SETTINGS):
        before, now = saved[name], current[name]
        if name == "model_overrides":
            before = {k: v for k, v in (before or {}).items() if k != "backend"}
            now = {k: v for k, v in now.items() if k != "backend"}
        if name == "epochs" and saved.get("lr_schedule") == config.lr_schedule in ("none", "step"):
            continue  # these schedules do not depend on the run's length: more (or fewer) epochs are honoured
        if _normalised(before) != _normalised(now):
            changes.append(f"{name}: {before!r} -> {now!r}")
    return changes


def _normalised(value: Any) -> Any:
    # YAML and argparse give lists where a checkpoint may hold tuples, ints where it holds floats (1 vs 1.0).
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
