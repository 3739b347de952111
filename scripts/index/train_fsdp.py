"""What a new user of `uv add lightrft-fsdp` runs: FSDP2 training on 2 ranks (gloo on CPU), started
with `torchrun --nproc-per-node 2 train_fsdp.py`. It checks its own numbers and exits 1 on a miss."""

import json

import torch
import torch.nn.functional as F
from torch import nn

from lightrft.strategy import get_strategy

torch.set_num_threads(1)
STEPS, GLOBAL_BATCH, MICRO = 12, 8, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """One global batch, fitted every step (so the loss falls step after step)."""
    x = torch.randn(GLOBAL_BATCH, 4, generator=torch.Generator().manual_seed(1000))
    return x, torch.sin(x.sum(-1, keepdim=True))


strategy = get_strategy(
    {
        "strategy": "fsdp",
        "bf16": False,
        "train_batch_size": GLOBAL_BATCH,
        "micro_train_batch_size": MICRO,
        "actor_learning_rate": 3e-2,
        "max_norm": 0,
        "seed": 0,
    }
)
rank, world = strategy.get_rank(), strategy.world_size
(model, optim, sched), *_ = strategy.prepare_models_and_optimizers(
    make_model(), None, None, None, max_steps=STEPS
)
losses, norms = [], []
for _ in range(STEPS):
    x, y = batch()
    mine = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)  # this rank's rows
    step_loss = 0.0
    for start in range(mine.start, mine.stop, MICRO):
        loss = F.mse_loss(model(x[start : start + MICRO]), y[start : start + MICRO])
        strategy.backward(loss, model, optim)
        norm = strategy.optimizer_step(optim, model, sched)
        step_loss += float(loss) / strategy.accumulated_gradient
    norms.append(norm)
    losses.append(strategy.all_reduce(step_loss, "mean"))

# The first step's gradient norm against plain torch on the whole global batch: accumulation over
# 2 micro-steps x 2 ranks averages 4 micro-batch gradients of equal size, which is the full batch's
# mean-loss gradient. fp32, ~100 parameters: the summation orders differ by a few ulps (1e-7
# relative each), far inside 1e-5.
reference = make_model()
x, y = batch()
F.mse_loss(reference(x), y).backward()
ref_norm = float(torch.cat([p.grad.flatten() for p in reference.parameters()]).norm())
report = {
    "rank": rank,
    "world": world,
    "accumulation": strategy.accumulated_gradient,
    "losses": losses,
    "norm0": norms[0],
    "ref_norm0": ref_norm,
    "backend": type(strategy).__name__,
}
print(json.dumps(report), flush=True)
problems = []
if (world, strategy.accumulated_gradient, report["backend"]) != (2, 2, "FSDPV2Strategy"):
    problems.append(f"world {world}, accumulation {strategy.accumulated_gradient}, {report['backend']}")
if None in norms or abs(norms[0] - ref_norm) > 1e-5 * ref_norm:
    problems.append(f"first gradient norm {norms[0]} != plain torch {ref_norm}")
if not losses[-1] < 0.5 * losses[0]:
    problems.append(f"the loss did not halve: {losses}")
strategy.shutdown()
if problems:
    print(f"rank {rank}: " + "; ".join(problems), flush=True)
    raise SystemExit(1)
if rank == 0:
    print(
        f"ok: FSDP2 on {world} ranks, loss {losses[0]:.4f} -> {losses[-1]:.4f}, norm {norms[0]:.6f} = {ref_norm:.6f}"
    )
