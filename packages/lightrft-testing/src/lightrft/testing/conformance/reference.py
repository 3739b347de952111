"""A hand-written single-process training loop: the independent reference for FakeStrategy.

It shares no code with the strategies: plain AdamW, manual gradient accumulation, torch's
clip_grad_norm_ and the warmup + cosine-to-minimum schedule written out again.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..models import causal_lm_loss, make_batches, make_tiny_model
from ..tolerance import PARITY_ADAM_EPS
from .spec import DATA_SEED, MODEL_SEED, STEPS


def reference_training(cfg: dict[str, Any], max_steps: int = 10) -> dict[str, Any]:
    torch.manual_seed(cfg["seed"])
    model = make_tiny_model(MODEL_SEED)
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (no_decay if isinstance(module, nn.LayerNorm) or name == "bias" else decay).append(p)
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["l2"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["actor_learning_rate"],
        betas=(0.9, 0.95),
        eps=PARITY_ADAM_EPS,  # the suite's parity run's (parity.measure)
    )
    warmup = math.ceil(max_steps * cfg["lr_warmup_ratio"])

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / (max_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_factor)
    micro, total = cfg["micro_train_batch_size"], cfg["train_batch_size"]
    accum = total // micro
    losses, norms = [], []
    for batch in make_batches(DATA_SEED, STEPS, total):
        micro_losses = []
        for i in range(accum):
            loss = causal_lm_loss(model, batch[i * micro : (i + 1) * micro])
            (loss / accum).backward()
            micro_losses.append(loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_norm"])))
        optim.step()
        optim.zero_grad()
        sched.step()
        losses.append(float(torch.stack(micro_losses).mean()))
    params = torch.cat([p.detach().reshape(-1) for _, p in sorted(model.named_parameters())])
    return {"losses": losses, "norms": norms, "params": params}
