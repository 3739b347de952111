"""Learning-rate schedules in plain torch (no transformers dependency)."""

from __future__ import annotations

import math
import warnings
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


class ScheduleLR(LambdaLR):
    """A :class:`~torch.optim.lr_scheduler.LambdaLR` over ``max_steps`` optimizer steps that warns,
    once, when it is stepped past ``max_steps``: the schedule has ended there and the learning rate
    stays at its last value, which usually means ``max_steps`` was computed wrong."""

    def __init__(self, optimizer: Optimizer, lr_lambda: partial, max_steps: int) -> None:
        self.max_steps = max_steps
        self.warned_past_max_steps = False
        super().__init__(optimizer, lr_lambda)

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        """Advances the schedule by one optimizer step (warns once past ``max_steps``)."""
        if epoch is None:
            super().step()
        else:  # deprecated in torch, still accepted
            super().step(epoch)
        if self.last_epoch > self.max_steps and not self.warned_past_max_steps:
            self.warned_past_max_steps = True
            warnings.warn(
                f"the learning-rate scheduler was stepped past max_steps={self.max_steps} (this is "
                f"step {self.last_epoch}): the schedule has ended and the learning rate stays at "
                f"{self.get_last_lr()[0]:.3g}. Pass the real number of optimizer steps as max_steps "
                "(prepare_models_and_optimizers / create_scheduler). Warned once per scheduler.",
                UserWarning,
                stacklevel=2,
            )


def create_scheduler(
    optimizer: Optimizer,
    kind: str,
    max_steps: int,
    warmup_ratio: float = 0.0,
    min_lr_ratio: float = 0.1,
) -> LambdaLR:
    """Returns a :class:`ScheduleLR` (a LambdaLR) of ``kind`` over ``max_steps`` optimizer steps
    with linear warmup; it warns once when stepped past ``max_steps``."""
    if kind not in SCHEDULERS:
        raise ValueError(f"lr_scheduler={kind!r} is invalid: valid are {', '.join(SCHEDULERS)}")
    if max_steps <= 0:
        raise ValueError(f"max_steps={max_steps} is invalid: it must be > 0")
    warmup = math.ceil(max_steps * warmup_ratio)
    fn = partial(_factor, kind=kind, warmup=warmup, total=max_steps, min_lr_ratio=min_lr_ratio)
    return ScheduleLR(optimizer, fn, max_steps)
