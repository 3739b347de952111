"""Moving optimizer states between the accelerator and host memory between training phases.

A colocated rollout engine needs the GPU memory the Adam moments take while it generates; they
go to (pinned) host memory after the optimizer step and come back before the next one.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer


def _move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # ``Tensor.to`` keeps a DTensor's placement and moves its local shard; a non-blocking copy to
    # the host lands in pinned memory, which makes the copy back fast. Callers synchronise.
    return t if t.device == device else t.to(device, non_blocking=True)


def _nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _step_on_param_device(optimizer: Optimizer) -> bool:
    # Fused and capturable Adam keep their step counters next to the parameters; the others on CPU.
    return bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))


@torch.no_grad()
def offload_optimizer_states(optimizer: Optimizer) -> int:
    """Moves every state tensor of ``optimizer`` to host memory (pinned when it comes from CUDA);
    returns the bytes moved off the accelerator."""
    cpu = torch.device("cpu")
    moved = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.device.type != "cpu":
                moved += _nbytes(value)
                state[key] = _move(value, cpu)
    if moved and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return moved


@torch.no_grad()
def reload_optimizer_states(optimizer: Optimizer) -> int:
    """Moves the state tensors back next to their parameters; returns the bytes moved."""
    step_follows = _step_on_param_device(optimizer)
    moved = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            device = p.device
            for key, value in state.items():
                if not torch.is_tensor(value) or value.device == device:
                    continue
                if key == "step" and not step_follows:
                    continue
                moved += _nbytes(value)
                state[key] = _move(value, device)
    if moved and torch.cuda.is_available():
        torch.cuda.synchronize()
    return moved
