"""The training application (``msa-train``), apart from the library it trains: settings (:mod:`.config`),
checkpoints and resume (:mod:`.checkpoint`), logs and results (:mod:`.run_log`), optimiser (:mod:`.optim`), the
loop (:mod:`.loop`) and the entry point (:mod:`.main`)."""

from msa.training.checkpoint import load_training_state, recover_checkpoint, save_checkpoint
from msa.training.config import TrainConfig, UsageError, build_parser, config_from_args, load_config
from msa.training.loop import prepare_splits, train
from msa.training.main import main, run
from msa.training.optim import build_optimizer, make_scheduler
from msa.training.run_log import RunLog, read_jsonl, summarize_seeds, write_results

__all__ = [
    "RunLog",
    "TrainConfig",
    "UsageError",
    "build_optimizer",
    "build_parser",
    "config_from_args",
    "load_config",
    "load_training_state",
    "main",
    "make_scheduler",
    "prepare_splits",
    "read_jsonl",
    "recover_checkpoint",
    "run",
    "save_checkpoint",
    "summarize_seeds",
    "train",
    "write_results",
]
