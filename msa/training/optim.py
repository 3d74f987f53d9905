"""Optimiser and learning-rate schedule of a training run."""

from __future__ import annotations

import math

import torch

from msa.training.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases, norms and the logit scale are not decayed."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or name.endswith("logit_scale") else decay).append(parameter)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=tuple(config.betas),
    )


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
