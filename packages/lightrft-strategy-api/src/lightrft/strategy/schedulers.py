"""Learning-rate schedules in plain torch (no transformers dependency)."""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULERS = ("cosine_with_min_lr", "constant_with_warmup", "linear")


def _factor(step: int, *, kind: str, warmup: int, total: int, min_lr_ratio: float) -> float:
    if step < warmup:
        return float(step + 1) / float(max(1, warmup))
    if kind == "constant_with_warmup":
        return 1.0
    progress = min(1.0, float(step - warmup) / float(max(1, total - warmup)))
    if kind == "linear":
        return max(min_lr_ratio, 1.0 - progress * (1.0 - min_lr_ratio))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def create_scheduler(
    optimizer: Optimizer,
    kind: str,
    max_steps: int,
    warmup_ratio: float = 0.0,
    min_lr_ratio: float = 0.1,
) -> LambdaLR:
    """Returns a LambdaLR of ``kind`` over ``max_steps`` optimizer steps with linear warmup."""
    if kind not in SCHEDULERS:
        raise ValueError(f"lr_scheduler={kind!r} is invalid: valid are {', '.join(SCHEDULERS)}")
    if max_steps <= 0:
        raise ValueError(f"max_steps={max_steps} is invalid: it must be > 0")
    warmup = math.ceil(max_steps * warmup_ratio)
    fn = partial(_factor, kind=kind, warmup=warmup, total=max_steps, min_lr_ratio=min_lr_ratio)
    return LambdaLR(optimizer, fn)
