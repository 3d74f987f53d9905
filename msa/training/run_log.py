"""What a run writes besides checkpoints: per-step and per-evaluation logs, TensorBoard, curves and results.

Output folder: ``train_log.csv`` / ``train_log.jsonl`` (per step), ``eval_log.jsonl`` (per evaluation),
``tensorboard/``, ``curves.png`` (loss and val mR) and ``results.md`` / ``results.json``. Epochs are numbered from 1
everywhere: a step row carries the epoch it belongs to, an evaluation row the epoch just completed.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from msa.evaluation import METRIC_KEYS, metrics_table
from msa.training.config import UsageError

logger = logging.getLogger(__name__)

LOG_FILES = ("train_log.csv", "train_log.jsonl", "eval_log.jsonl")
RESULT_FILES = ("results.md", "results.json", "curves.png")


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
            for name in LOG_FILES + RESULT_FILES:
                (directory / name).unlink(missing_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(directory / "tensorboard"), purge_step=resume_step)
            except ImportError:
                logger.warning("tensorboard is not installed: no TensorBoard events")

    def _truncate(self, step: int) -> None:
        # Rows logged after the checkpoint we resume from would be logged again: drop them (a torn last row too).
        for name in ("train_log.jsonl", "eval_log.jsonl"):
            path = self.directory / name
            if path.exists():
                rows = read_jsonl(path)
                path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
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
    """The records of a JSON-lines log. A torn last line (power loss, full disk) is dropped with a warning; a bad
    line before it raises :class:`UsageError` naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if number == last:
                logger.warning("%s: line %d is incomplete (an interrupted write) and is ignored", path, number + 1)
                break
            raise UsageError(f"{path}: line {number + 1} is not a JSON record ({error})") from error
        rows.append(row)
    return rows


def plot_curves(directory: Path, select_mode: str) -> Path | None:
    """``curves.png``: training loss per step and val mR per epoch; None (with a warning) without matplotlib."""
    steps = read_jsonl(directory / "train_log.jsonl")
    evals = [r for r in read_jsonl(directory / "eval_log.jsonl") if r["split"] == "val"]
    if not steps:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no curves.png (the logs hold the same numbers)")
        return None

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


def write_results(output_dir: Path, result: dict[str, Any]) -> None:
    """``results.json`` and ``results.md``: test metrics of the best checkpoint (one row per scoring mode), images
    skipped per split, and the error if the test evaluation failed."""
    (output_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    run = result["run"]
    best = result["best"]
    lines = [
        f"# {run['model']} on {run['dataset']} (preset {run['preset']}, seed {run['seed']})",
        "",
        f"Best epoch {best['epoch']} of {run['epochs']} by val mR ({best['select_mode']} scoring): "
        f"{best['val_mR']:.2f}",
        "",
    ]
    for split, counts in result.get("skipped", {}).items():
        lines.append(f"Skipped in {split}: " + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())))
    if result.get("skipped"):
        lines.append("")
    if "test" in result:
        lines += ["Test split, best checkpoint:", "", metrics_table(result["test"]), ""]
    if "test_error" in result:
        lines += [f"The test evaluation failed: {result['test_error']}", ""]
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


def format_metrics(metrics: dict[str, dict[str, float]], modes: list[str]) -> str:
    """One line of the main scores, e.g. ``global mR 12.30 (R@1 i2t 5.00 t2i 4.20); mscmat mR ...``."""
    parts = []
    for mode in modes:
        if mode in metrics:
            m = metrics[mode]
            parts.append(f"{mode} mR {m['mR']:.2f} (R@1 i2t {m['i2t_r1']:.2f} t2i {m['t2i_r1']:.2f})")
    return "; ".join(parts)
