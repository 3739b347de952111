"""DeepSpeed configuration dictionaries generated from a :class:`StrategyConfig`.

Pure functions over plain dicts (DeepSpeed is not imported), so the mapping is unit-testable.

``StrategyConfig.deepspeed_config`` (a user dict) is deep-merged over the generated dict, so any key
DeepSpeed knows may be added or tuned (bucket sizes, ``steps_per_print``, ...). Keys that the
strategy derives from a StrategyConfig field are *locked*: a user value that differs from the
generated one is a :class:`ConfigError` naming both values (e.g.
``deepspeed_config['zero_optimization']['stage']=2 ... conflicts with zero_stage=3``), because
the two sources would otherwise silently disagree.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightrft.config import ConfigError, Problem, StrategyConfig, format_value, problem

__all__ = ["eval_config", "eval_stage", "train_config"]

Path = tuple[str, ...]

_STEPS_PER_PRINT = 1_000_000_000  # DeepSpeed's own progress log: off, the training loop logs


@dataclass(frozen=True)
class _Lock:
    """A generated key that comes from StrategyConfig and may not be overridden with another value."""

    path: Path
    value: Any
    source: str
    """What the value comes from, as the message shows it: ``zero_stage=3``."""


def eval_stage(train_stage: int) -> int:
    """ZeRO stage of frozen (reference, reward) models: 3 when training shards parameters, else 0."""
    return 3 if train_stage == 3 else 0


def _batch_keys(config: StrategyConfig, world_size: int) -> tuple[dict[str, Any], list[_Lock]]:
    accum = config.accumulation_steps(world_size)
    dp = world_size // config.sp_size
    # DeepSpeed sees every rank as data-parallel (sequence parallelism is outside it), so its
    # global batch counts each sample once per sequence-parallel rank.
    global_batch = config.train_batch_size * config.sp_size
    keys = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": config.micro_train_batch_size,
        "gradient_accumulation_steps": accum,
    }
    locks = [
        _Lock(("train_batch_size",), global_batch, _src_batch(config)),
        _Lock(("train_micro_batch_size_per_gpu",), config.micro_train_batch_size,
              f"micro_train_batch_size={config.micro_train_batch_size}"),
        _Lock(("gradient_accumulation_steps",), accum,
              f"train_batch_size={config.train_batch_size} / (micro_train_batch_size="
              f"{config.micro_train_batch_size} x dp={dp}) = {accum}"),
    ]  # fmt: skip
    return keys, locks


def _src_batch(config: StrategyConfig) -> str:
    if config.sp_size == 1:
        return f"train_batch_size={config.train_batch_size}"
    return f"train_batch_size={config.train_batch_size} x sp_size={config.sp_size}"


def _precision(config: StrategyConfig) -> tuple[dict[str, Any], list[_Lock]]:
    keys: dict[str, Any] = {"bf16": {"enabled": config.bf16}, "fp16": {"enabled": False}}
    locks = [
        _Lock(("bf16", "enabled"), config.bf16, f"bf16={config.bf16}"),
        _Lock(("fp16", "enabled"), False, f"bf16={config.bf16} (fp16 training is not a StrategyConfig mode)"),
    ]
    if config.bf16:
        # DeepSpeed's bf16 ZeRO-1/2 optimizer skips a step with a non-finite gradient norm only
        # when this is on; the strategy promises that skip on every backend.
        keys["bf16"]["check_grad_overflow"] = True
        locks.append(_Lock(("bf16", "check_grad_overflow"), True, "the skip of non-finite gradient norms"))
    return keys, locks


def _param_offload_check(config: StrategyConfig, param_offload: bool, stage: int) -> list[Problem]:
    if param_offload and stage != 3:
        return [
            problem(
                "param_offload",
                param_offload,
                f"parameter offload needs ZeRO-3, got zero_stage={stage}",
                "param_offload=False, or zero_stage=3",
            )
        ]
    return []


def train_config(config: StrategyConfig, world_size: int, *, param_offload: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a trained model (actor, critic) on ``world_size`` ranks.

    ``param_offload`` (ZeRO-3 only) keeps partitioned parameters in CPU memory.
    Raises ConfigError when ``config.deepspeed_config`` conflicts with a StrategyConfig field.
    """
    stage = config.zero_stage
    problems = _param_offload_check(config, param_offload, stage)
    if config.adam_offload and stage == 0:
        problems.append(
            problem(
                "adam_offload",
                True,
                "optimizer offload needs ZeRO (zero_stage >= 1), got zero_stage=0",
                "adam_offload=False, or zero_stage 1, 2 or 3",
            )
        )
    if problems:
        raise ConfigError(problems)

    zero: dict[str, Any] = {
        "stage": stage,
        "offload_optimizer": {"device": "cpu" if config.adam_offload else "none"},
        "compute_grad_norm": True,
    }
    locks = [
        _Lock(("zero_optimization", "stage"), stage, f"zero_stage={stage}"),
        _Lock(("zero_optimization", "offload_optimizer", "device"), zero["offload_optimizer"]["device"],
              f"adam_offload={config.adam_offload}"),
        _Lock(("zero_optimization", "compute_grad_norm"), True, "the gradient norm optimizer_step returns"),
    ]  # fmt: skip
    if config.overlap_comm is not None:  # None: DeepSpeed's default for the stage
        zero["overlap_comm"] = config.overlap_comm
        locks.append(
            _Lock(
                ("zero_optimization", "overlap_comm"),
                config.overlap_comm,
                f"overlap_comm={config.overlap_comm}",
            )
        )
    if config.adam_offload:
        zero["offload_optimizer"]["pin_memory"] = True
    if stage >= 2 or config.overlap_comm:
        zero["contiguous_gradients"] = True
    if stage == 3:
        zero["offload_param"] = {"device": "cpu" if param_offload else "none"}
        zero["reduce_scatter"] = True
        # ZeRO++ hierarchical partitioning: a secondary copy of the parameters sharded within
        # groups of `zpg` ranks (one node), so forward/backward all-gathers stay intra-node.
        zero["zero_hpz_partition_size"] = config.zpg
        zero["zero_quantized_weights"] = False
        zero["zero_quantized_gradients"] = False
        locks += [
            _Lock(("zero_optimization", "offload_param", "device"), zero["offload_param"]["device"],
                  f"param_offload={param_offload}"),
            _Lock(("zero_optimization", "zero_hpz_partition_size"), config.zpg, f"zpg={config.zpg}"),
        ]  # fmt: skip
    else:
        locks.append(_Lock(("zero_optimization", "zero_hpz_partition_size"), 1, f"zpg={config.zpg}"))

    out, base_locks = _base_config(config, world_size, zero)
    out["gradient_clipping"] = config.max_norm
    locks += base_locks
    locks.append(_Lock(("gradient_clipping",), config.max_norm, f"max_norm={config.max_norm}"))
    if config.grad_accum_dtype is not None:
        out["data_types"] = {"grad_accum_dtype": config.grad_accum_dtype}
        locks.append(_Lock(("data_types", "grad_accum_dtype"), config.grad_accum_dtype,
                           f"grad_accum_dtype={config.grad_accum_dtype!r}"))  # fmt: skip
    return _apply_user(out, config.deepspeed_config, locks)


def eval_config(
    config: StrategyConfig, world_size: int, *, stage: int | None = None, param_offload: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config of a frozen model (reference, reward): no optimizer, the training
    precision, ZeRO-3 when training uses ZeRO-3 (else 0) unless ``stage`` is given.

    The user's ``deepspeed_config`` applies too, except its optimizer-related ZeRO keys (they
    describe the trained models)."""
    stage = eval_stage(config.zero_stage) if stage is None else stage
    problems = _param_offload_check(config, param_offload, stage)
    if problems:
        raise ConfigError(problems)
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["offload_param"] = {"device": "cpu" if param_offload else "none"}
        zero["zero_hpz_partition_size"] = config.zpg
    out, locks = _base_config(config, world_size, zero)
    user = copy.deepcopy(config.deepspeed_config) if config.deepspeed_config else None
    if user is not None:
        user.pop("optimizer", None)
        user.pop("scheduler", None)
        user.pop("gradient_clipping", None)
        user.pop("data_types", None)
        if isinstance(user.get("zero_optimization"), dict):
            for key in ("stage", "offload_optimizer", "offload_param", "overlap_comm", "compute_grad_norm",
                        "zero_hpz_partition_size"):  # fmt: skip
                user["zero_optimization"].pop(key, None)
    return _apply_user(out, user, locks)


def _base_config(
    config: StrategyConfig, world_size: int, zero: dict[str, Any]
) -> tuple[dict[str, Any], list[_Lock]]:
    """What train and eval configs share: batch sizes, logging, precision and the ZeRO section."""
    batch, batch_locks = _batch_keys(config, world_size)
    precision, precision_locks = _precision(config)
    out: dict[str, Any] = {
        **batch,
        "steps_per_print": _STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        "prescale_gradients": False,
        **precision,
        "zero_optimization": zero,
    }
    return out, batch_locks + precision_locks


# --------------------------------------------------------------------------- merging
_MISSING = object()


def _get(d: Mapping[str, Any], path: Path) -> Any:
    cur: Any = d
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return _MISSING
        cur = cur[key]
    return cur


def _same(user: Any, generated: Any) -> bool:
    if isinstance(generated, bool) or isinstance(user, bool):
        return type(user) is type(generated) and user == generated
    if isinstance(generated, (int, float)) and isinstance(user, (int, float)):
        return float(user) == float(generated)
    if isinstance(generated, str) and isinstance(user, str):
        return user.lower() == generated.lower()
    if generated == "none" and user is None:
        return True
    return user == generated


def _path_text(path: Path) -> str:
    return "deepspeed_config" + "".join(f"[{k!r}]" for k in path)


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_user(
    generated: dict[str, Any], user: Mapping[str, Any] | None, locks: list[_Lock]
) -> dict[str, Any]:
    if not user:
        return generated
    if not isinstance(user, Mapping):
        raise ConfigError([problem("deepspeed_config", user, "must be a dict (JSON object)")])
    problems: list[Problem] = []
    for key in ("optimizer", "scheduler"):
        if key in user:
            problems.append(
                problem(
                    f"deepspeed_config[{key!r}]",
                    user[key],
                    f"the strategy builds the {key} (create_optimizer / create_scheduler, from "
                    "adam_betas, adam_eps, l2, learning rates, lr_scheduler, lr_warmup_ratio, min_lr_ratio)",
                    f"leave {key!r} out of deepspeed_config",
                )
            )
    for lock in locks:
        value = _get(user, lock.path)
        if value is not _MISSING and not _same(value, lock.value):
            problems.append(
                problem(
                    _path_text(lock.path),
                    value,
                    f"conflicts with {lock.source}, which sets it to {format_value(lock.value)}",
                    f"{format_value(lock.value)} or leave the key out; change the StrategyConfig field instead",
                )
            )
    if problems:
        raise ConfigError(problems)
    return _deep_merge(generated, user)
