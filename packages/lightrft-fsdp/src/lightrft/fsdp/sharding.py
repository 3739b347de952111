"""How a model is sharded: the device mesh, the FSDP units and the order they are applied in.

Small free functions, applied by :meth:`FSDPV2Strategy.prepare_model` in this order (the order
matters, and each step says why):

1. ``to_fp32_master``: trainable weights are kept in fp32 (mixed precision casts a bf16 copy for
   compute), so the optimizer states built on the sharded parameters are fp32 too.
2. ``enable_activation_checkpointing``: wraps the decoder layers *before* sharding, so that the
   recomputed forward runs inside the FSDP unit and re-gathers its parameters.
3. ``apply_fully_shard``: decoder layers, embeddings and the output head bottom-up, then the root.
   A model without known decoder layers (``fallback_blocks``) has its large direct children
   sharded as units instead, and the root takes the rest.
4. ``materialize_meta``: a model built on the meta device gets real (sharded) storage; only this
   rank's shard is ever allocated.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

REPLICATE, SHARD = "replicate", "shard"


def mesh_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_mesh(world_size: int, shard_size: int | None, device_type: str | None = None) -> DeviceMesh:
    """A 1-D mesh over all ranks (full sharding), or a 2-D ``(replicate, shard)`` mesh whose inner
    dimension has ``shard_size`` ranks (hybrid sharding: shard within a group, replicate across)."""
    device_type = device_type or mesh_device_type()
    if shard_size is None or shard_size >= world_size:
        if shard_size is not None and shard_size > world_size:
            raise ValueError(
                f"fsdp_shard_size={shard_size} is invalid for world_size={world_size}: use a divisor of the "
                f"world size ({_divisors(world_size)}) or None to shard over all ranks"
            )
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=(SHARD,))
    if world_size % shard_size:
        raise ValueError(
            f"fsdp_shard_size={shard_size} is invalid for world_size={world_size}: the world must split into "
            f"equal shard groups; use one of {_divisors(world_size)} or None"
        )
    return init_device_mesh(
        device_type, (world_size // shard_size, shard_size), mesh_dim_names=(REPLICATE, SHARD)
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def mixed_precision(bf16: bool) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction (parameters stay fp32), or plain fp32."""
    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def offload_policy(cpu_offload: bool) -> OffloadPolicy:
    # Pinned host memory only helps (and only exists) with a CUDA device to copy to.
    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()


def no_split_class_names(model: nn.Module, extra: Sequence[str] = ()) -> list[str]:
    """The ``_no_split_modules`` of the model and of any submodule (Hugging Face sets it on the
    pretrained class), plus the class names the user configured."""
    names: list[str] = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            if name not in names:
                names.append(name)
    for name in extra:
        if name not in names:
            names.append(name)
    return names


def find_blocks(model: nn.Module, class_names: Sequence[str]) -> list[nn.Module]:
    """Outermost submodules whose class name is in ``class_names`` (a block inside a block is
    part of the outer unit), in module order."""
    wanted = set(class_names)
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or module is model:
            continue
        if type(module).__name__ in wanted:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    return blocks


#: A direct child with at least this many parameters (2**20, 4 MiB in fp32) becomes its own FSDP
#: unit when the model has no known decoder layers. Why this size: a unit costs a fixed number of
#: collectives per step (all-gather in forward and backward, reduce-scatter in backward); below a
#: few MiB those are latency-bound, so a unit buys nothing in memory and costs time, and small
#: children (norms, activations, biases) are better gathered with the root. Above it, one unit per
#: child bounds what is gathered at once to that child, which is what per-layer sharding of an
#: ``nn.Sequential`` of big layers is for. An absolute size, not a fraction of the model: a
#: fraction would turn a Sequential of 200 equal layers into one root-only unit.
MIN_UNIT_PARAMS = 2**20
_warned_fallback: set[str] = set()


def fallback_blocks(model: nn.Module, class_names: Sequence[str]) -> list[nn.Module]:
    """For a model without a submodule of a class in ``class_names``: its direct children with
    at least :data:`MIN_UNIT_PARAMS` parameters, each to be its own unit (the root takes the rest).

    Warns once per model class, naming the children chosen and how to get one unit per layer."""
    blocks = [
        child for child in model.children() if sum(p.numel() for p in child.parameters()) >= MIN_UNIT_PARAMS
    ]
    cls = type(model).__name__
    if cls not in _warned_fallback:
        _warned_fallback.add(cls)
        names = [name for name, child in model.named_children() if any(child is b for b in blocks)]
        units = f"its children {names} (>= {MIN_UNIT_PARAMS} parameters each) as units, " if names else ""
        warnings.warn(
            f"FSDP: {cls} has no submodule of a class in {list(class_names)} (the model's _no_split_modules "
            f"plus StrategyConfig.no_split_modules), so it is sharded with {units}any nn.Embedding as units and "
            "the root holding the rest. For one FSDP unit per layer, set no_split_modules to the layer class "
            "name(s), e.g. no_split_modules=['LlamaDecoderLayer'] (or ['Linear'] for a Sequential of Linear).",
            UserWarning,
            stacklevel=3,
        )
    return blocks


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Module):
            return head
    head = getattr(model, "lm_head", None)
    return head if isinstance(head, nn.Module) else None


def edge_modules(model: nn.Module, blocks: Sequence[nn.Module]) -> list[nn.Module]:
    """Embeddings and the output head outside the blocks, each its own FSDP unit; a weight tied
    between them stays with the root (one parameter can belong to one unit only)."""
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    candidates: list[nn.Module] = [
        m for m in model.modules() if isinstance(m, nn.Embedding) and id(m) not in in_blocks
    ]
    head = _output_head(model)
    if head is not None and id(head) not in in_blocks and head not in candidates:
        candidates.append(head)
    counts: dict[int, int] = {}
    for m in candidates:
        for p in m.parameters():
            counts[id(p)] = counts.get(id(p), 0) + 1
    return [
        m
        for m in candidates
        if all(counts[id(p)] == 1 for p in m.parameters()) and any(True for _ in m.parameters())
    ]


def apply_fully_shard(
    model: nn.Module,
    units: Iterable[nn.Module],
    mesh: DeviceMesh,
    *,
    bf16: bool,
    reshard_after_forward: bool,
    cpu_offload: bool,
) -> FSDPModule:
    """``fully_shard`` on each unit bottom-up, then on the root (which takes what is left: norms,
    tied weights, small heads)."""
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": mixed_precision(bf16),
        "offload_policy": offload_policy(cpu_offload),
        "reshard_after_forward": reshard_after_forward,
    }
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model  # type: ignore[return-value]


def to_fp32_master(model: nn.Module) -> None:
    """Trainable floating-point parameters in fp32: the master weights of mixed precision."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                module._parameters[name] = nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)


def enable_activation_checkpointing(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Recompute each block's activations in backward (non-reentrant, works with FSDP2).

    Hugging Face models use their own switch, which keeps the module tree (and the parameter
    names) unchanged; other models get the blocks' ``forward`` wrapped in place."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if callable(enable) and getattr(model, "supports_gradient_checkpointing", False):
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        inner = block.forward

        def forward(*args: Any, _inner: Any = inner, _block: nn.Module = block, **kwargs: Any) -> Any:
            if not (_block.training and torch.is_grad_enabled()):
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------- meta init
@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Builds modules with their parameters on the meta device and their buffers real.

    Each parameter moves to meta as soon as it is registered, so standard initialisers
    (``reset_parameters``) run on meta for free and no full weight is ever held; buffers computed in
    ``__init__`` (rotary frequencies, position ids) keep their values, which ``to_empty`` after
    sharding could not recreate."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            cls = type(param)
            kwargs = dict(param.__dict__)
            kwargs["requires_grad"] = param.requires_grad
            module._parameters[name] = cls(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def has_meta_parameters(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def materialize_meta(model: nn.Module, param_device: torch.device, buffer_device: torch.device) -> None:
    """Gives meta parameters (already sharded: only the local shard is allocated) real, zeroed
    storage on ``param_device``; real buffers keep their values (``to_empty`` alone would discard
    them) and go to ``buffer_device``, where the forward runs."""
    saved = {
        (id(module), name): buf
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None and not buf.is_meta
    }
    model.to_empty(device=param_device)
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        local.zero_()
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is None:
                continue
            kept = saved.get((id(module), name))
            if kept is not None:
                module._buffers[name] = kept.to(buffer_device)
            else:  # a buffer built on meta has no value to keep
                module._buffers[name] = torch.zeros_like(buf, device=buffer_device)
