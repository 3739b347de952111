"""DeepSpeed's ZeRO state, read and written per parameter name: the portable checkpoint layout.

Full fp32 weights and Adam moments per parameter name, gathered (saving) or scattered (loading)
one parameter at a time through DeepSpeed's public fragment API
(``deepspeed.utils.safe_{get,set}_full_{fp32_param,optimizer_state}``; collective under ZeRO), in
the format of torch's ``get_state_dict`` so FSDP and Fake read it (and this reads theirs). The API
needs Adam state to exist: :func:`ensure_adam_state` creates it first. DeepSpeed's own files load
through :func:`weights_only_load` (its classes allowlisted), here and in :mod:`.convert`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightrft.strategy import portable
from lightrft.strategy.weights import clean_param_name


def import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            "DeepspeedStrategy needs DeepSpeed: `uv add lightrft-deepspeed` (or `pip install deepspeed`)"
        ) from e
    return deepspeed


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    return int(p.ds_numel) if is_zero3_param(p) else p.numel()  # pyright: ignore[reportAttributeAccessIssue]


def gathered(
    params: list[nn.Parameter], modifier_rank: int | None = None
) -> contextlib.AbstractContextManager[Any]:
    """Gathers ZeRO-3 partitioned ``params`` (a no-op for ordinary ones); with ``modifier_rank``
    the values written there are broadcast and re-partitioned at exit."""
    zero3 = [p for p in params if is_zero3_param(p)]
    if not zero3:
        return contextlib.nullcontext()
    deepspeed = import_deepspeed()
    return deepspeed.zero.GatheredParameters(zero3, modifier_rank=modifier_rank)


ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def hp_partitions(zero_optimizer: Any) -> list[torch.Tensor]:
    """The flat fp32 partitions ZeRO's base optimizer steps (its Adam state is keyed by them):
    ZeRO-1/2 ``single_partition_of_fp32_groups``, ZeRO-3 ``fp32_partitioned_groups_flat`` (which
    ZeRO-3 puts into the base optimizer's param groups only for the duration of a step)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        flat = getattr(zero_optimizer, attr, None)
        if flat is not None:
            return list(flat)
    raise NotImplementedError(f"{type(zero_optimizer).__name__} is not a ZeRO-1/2/3 optimizer")


def ensure_adam_state(zero_optimizer: Any) -> None:
    """Gives every flat partition the Adam state its first step would create (zero moments, step
    0), where it has none yet: ZeRO creates optimizer state lazily, in its first ``step``, and the
    fragment API reads and writes only existing state. Zero moments at step 0 are exactly Adam's
    starting point, so this changes no result. ZeRO-1/2 then re-link each parameter to its
    fragments of the state: DeepSpeed links them once, right after the first param group's first
    step, when the other groups have no state yet, and those links stay empty (so does a link
    made before any state existed, or before a native load replaced the state tensors)."""
    base = zero_optimizer.optimizer
    for flat in hp_partitions(zero_optimizer):
        st = base.state[flat]
        if not all(k in st for k in ADAM_KEYS):
            st.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
            for key in ADAM_KEYS:
                st.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2; a native load may also have replaced the state tensors
        zero_optimizer._hp_optimizer_states_linked = False
        link()


def adam_step(zero_optimizer: Any) -> float:
    """The step count of the Adam under ZeRO (the same for every flat partition): in the param
    groups for optimizers that keep it there (DeepSpeed's FusedAdam), else in the state."""
    base = zero_optimizer.optimizer
    for group in base.param_groups:
        if "step" in group:
            return float(group["step"])
    for flat in hp_partitions(zero_optimizer):
        if "step" in base.state.get(flat, {}):
            return float(base.state[flat]["step"])
    return 0.0


def set_adam_step(zero_optimizer: Any, step: float) -> None:
    """Sets the step count where :func:`adam_step` reads it (keeping its type: tensor or int)."""
    base = zero_optimizer.optimizer
    for group in base.param_groups:
        if "step" in group:
            group["step"] = int(step) if isinstance(group["step"], int) else step
    for flat in hp_partitions(zero_optimizer):
        st = base.state[flat]
        if torch.is_tensor(st.get("step")):
            st["step"] = torch.tensor(step, dtype=st["step"].dtype, device=st["step"].device)
        elif "step" in st:
            st["step"] = int(step) if isinstance(st["step"], int) else step


def deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes its optimizer-state files pickle (besides tensors and containers)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_load(path: str, map_location: Any = None) -> Any:
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def zero_groups(engine: Any, stage: int) -> list[list[nn.Parameter]]:
    """The trained parameters by optimizer param group (ZeRO-3 sub-groups merged back into
    the param group they belong to)."""
    opt = engine.optimizer
    if stage == 3 and hasattr(opt, "fp16_groups"):
        groups: list[list[nn.Parameter]] = [[] for _ in opt.optimizer.param_groups]
        for sub, params in enumerate(opt.fp16_groups):
            groups[opt.sub_group_to_group_id[sub]].extend(params)
        return groups
    bit16 = getattr(opt, "bit16_groups", None)
    if bit16 is None or stage == 0:
        raise NotImplementedError(
            f"layout='portable' with DeepSpeed needs ZeRO stage 1, 2 or 3 (zero_stage={stage}); "
            "save with layout='native' or train with zero_stage 1, 2 or 3"
        )
    return bit16


def save_portable(engine: Any, stage: int, path: Path, *, no_dist: bool) -> None:
    """Writes the engine's full fp32 weights and Adam moments (per parameter name) as the
    portable layout under ``path`` (collective under ZeRO unless ``no_dist``)."""
    from torch.distributed.checkpoint.state_dict_saver import save

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    names = {id(p): clean_param_name(n) for n, p in engine.module.named_parameters()}
    groups = zero_groups(engine, stage)
    ensure_adam_state(engine.optimizer)
    step = adam_step(engine.optimizer)
    model_sd: dict[str, torch.Tensor] = {}
    optim_state: dict[str, dict[str, torch.Tensor]] = {}
    for group in groups:
        for p in group:
            name = names[id(p)]
            model_sd[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
            optim_state[name] = {
                key: safe_get_full_optimizer_state(p, key).detach().float().cpu().clone() for key in ADAM_KEYS
            }
            optim_state[name]["step"] = torch.tensor(step)
    param_groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in group]}
        for g, group in zip(engine.optimizer.optimizer.param_groups, groups)
    ]
    state = {"model": model_sd, "optimizer": {"state": optim_state, "param_groups": param_groups}}
    save(state, checkpoint_id=str(path / portable.PORTABLE_DIR), no_dist=no_dist)


def load_portable(
    engine: Any,
    stage: int,
    path: Path,
    *,
    strict: bool,
    with_optimizer: bool,
    device: torch.device,
    no_dist: bool,
) -> None:
    """Reads the portable layout under ``path`` into the engine's weights, fp32 master copies and
    (``with_optimizer``) Adam moments and step, one parameter at a time."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import load

    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    names = {id(p): clean_param_name(n) for n, p in engine.module.named_parameters()}
    params = [p for group in zero_groups(engine, stage) for p in group]
    shapes = {names[id(p)]: tuple(p.ds_shape) if is_zero3_param(p) else tuple(p.shape) for p in params}
    state: dict[str, Any] = {"model": {n: torch.empty(s) for n, s in shapes.items()}}
    if with_optimizer:
        state["optimizer"] = {
            "state": {
                n: {"exp_avg": torch.empty(s), "exp_avg_sq": torch.empty(s), "step": torch.tensor(0.0)}
                for n, s in shapes.items()
            }
        }
    load(
        state,
        checkpoint_id=str(path / portable.PORTABLE_DIR),
        planner=DefaultLoadPlanner(allow_partial_load=not strict),
        no_dist=no_dist,
    )
    if with_optimizer:
        ensure_adam_state(engine.optimizer)
    for p in params:
        name = names[id(p)]
        full = state["model"][name]
        with gathered([p], modifier_rank=0):
            p.data.copy_(full.to(p.dtype).view_as(p.data))
        safe_set_full_fp32_param(p, full.to(device))
        if with_optimizer:
            for key in ADAM_KEYS:
                safe_set_full_optimizer_state(p, state["optimizer"]["state"][name][key].to(device), key)
    if with_optimizer:
        steps = {float(v["step"]) for v in state["optimizer"]["state"].values()}
        if len(steps) > 1:
            raise ValueError(
                f"the portable checkpoint's Adam step counts differ between parameters ({sorted(steps)}); "
                "DeepSpeed keeps one step count per flat partition, so they must be equal"
            )
        set_adam_step(engine.optimizer, steps.pop() if steps else 0.0)
