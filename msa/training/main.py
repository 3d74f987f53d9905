"""Train MSA on a retrieval dataset: ``msa-train --config configs/rsicd_paper.yaml`` or ``python -m msa.train``.

Multi-GPU: ``torchrun --nproc-per-node 8 -m msa.train --config ...``; the score matrices then span the global batch
(features all-gathered with the local gradient kept, see :mod:`msa.distributed`).

Settings come from, in increasing priority: the defaults of TrainConfig (the published hyper-parameters: AdamW,
lr 1e-5, weight decay 0.1, batch 32, 60 epochs, no schedule, no augmentation), a YAML file (``--config``) and
command-line flags. The output folder receives ``config.yaml``, ``train_log.csv`` / ``train_log.jsonl`` (per step),
``eval_log.jsonl`` (per evaluation), TensorBoard events, ``checkpoints/last`` (exact resume: ``--resume auto``) and
``checkpoints/best`` (best val mR), ``results.md`` / ``results.json`` (test metrics of the best checkpoint, every
scoring mode, images skipped) and ``curves.png`` (loss and val mR).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from msa import distributed as msa_dist
from msa.data import AnnotationError, ImageLoadError
from msa.evaluation import metrics_table
from msa.training.config import TrainConfig, UsageError, build_parser, config_from_args
from msa.training.loop import train
from msa.training.run_log import summarize_seeds

logger = logging.getLogger(__name__)

# Mistakes in what was asked (settings, files, splits, images): one line and exit status 2, as argparse does.
USER_ERRORS = (UsageError, AnnotationError, ImageLoadError, FileNotFoundError)


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
        preset = next(iter(results.values()))["run"]["preset"]
        text = (
            f"# {config.model} on {config.dataset} (preset {preset}), seeds {config.seeds}\n\n"
            "Test split, best checkpoint per seed:\n\n"
        )
        (output_dir / "results.md").write_text(text + table + "\n")
        (output_dir / "results.json").write_text(
            json.dumps({"seeds": {str(k): v for k, v in results.items()}, "summary": summary}, indent=2) + "\n"
        )
    return {"seeds": results, "summary": summary}


def report(result: dict[str, Any]) -> str:
    """What ``msa-train`` prints at the end: images skipped per split and the test table (or where the run is)."""
    single = next(iter(result["seeds"].values())) if "seeds" in result else result
    lines = []
    for split, counts in single.get("skipped", {}).items():
        lines.append(f"skipped in {split}: " + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())))
    if "summary" in result:
        lines.append(metrics_table(result["summary"], title="scoring (mean ± std)"))
    elif "test" in result:
        lines.append(metrics_table(result["test"]))
    else:
        lines.append(f"{result['status']} after {result['steps']} steps; output in {result['output_dir']}")
    return "\n".join(lines)


def _logging_to_console() -> contextlib.AbstractContextManager:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if sys.stderr.isatty():
        # Log lines printed above the progress bars instead of through them.
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()
    return contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser(__doc__).parse_args(argv))
    debug = args.pop("debug")
    try:
        with _logging_to_console():
            config = config_from_args(args=args)
            result = run(config)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"msa-train: error: {error}", file=sys.stderr)
        return 2
    finally:
        msa_dist.destroy_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(report(result))
    return 0
