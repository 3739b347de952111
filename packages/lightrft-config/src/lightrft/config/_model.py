"""StrategyConfig: every parameter of a LightRFT training strategy, typed, documented and validated."""

from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from . import _cli, _documents
from ._cli import ParserT
from ._errors import ConfigError, Problem, format_value, one_problem, problem
from ._hints import describe_valid, is_optional
from ._sources import values_from_object

__all__ = ["StrategyConfig"]

NAME_PATTERN = r"^[a-z][a-z0-9_.-]*$"
"""Backend and engine names: lowercase identifiers, as registered under entry points."""

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


def _bool_or_path(value: Any) -> Any:
    """A bool (LightRFT's form), a str (model name or path) or None; anything else is refused here,
    before pydantic would try each member of the union (and report each)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ValueError(f"expected a bool, a model name or path, or None; got {type(value).__name__}")


_OWNER = "StrategyConfig"


class StrategyConfig(BaseModel):
    """Configuration of a LightRFT training strategy and its generation engine.

    Build it from whatever the training script has (`StrategyConfig.from_args(args)`), from a file
    (`from_yaml` / `from_json`) or directly. Invalid values raise `ConfigError`, at construction and
    on assignment. Unknown keys are kept and read back with `get_extra_arg`.
    """

    model_config = ConfigDict(
        extra="allow",
        validate_assignment=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )

    # ----------------------------------------------------------------- backend selection
    strategy: str = Field(default="deepspeed", pattern=NAME_PATTERN)
    """Training backend: "deepspeed", "fsdp", "fake" or any name registered under the `lightrft.strategies` entry point. When not given, `fsdp=True` selects "fsdp"."""

    fsdp: bool = False
    """Legacy switch for FSDP. With `strategy` not given it selects "fsdp"; with another `strategy` it is an error."""

    # ----------------------------------------------------------------- reproducibility and batching
    seed: int = Field(default=42, ge=0)
    """Random seed of Python, NumPy and torch on every rank."""

    max_norm: float = Field(default=1.0, ge=0.0)
    """Global L2 norm at which gradients are clipped; 0 disables clipping."""

    micro_train_batch_size: int = Field(default=1, gt=0)
    """Samples per rank in one forward/backward micro-step."""

    train_batch_size: int = Field(default=128, gt=0)
    """Samples per optimizer step across all data-parallel ranks; a multiple of micro_train_batch_size x dp."""

    micro_rollout_batch_size: int = Field(default=8, gt=0)
    """Prompts per rank in one generation micro-batch."""

    rollout_batch_size: int = Field(default=512, gt=0)
    """Prompts per rollout across all ranks; a multiple of micro_rollout_batch_size."""

    # ----------------------------------------------------------------- precision and memory
    bf16: bool = True
    """Train in bfloat16 (parameters and activations); false trains in float32."""

    zero_stage: int = Field(default=2, ge=0, le=3)
    """DeepSpeed ZeRO stage: 0 (off), 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters)."""

    fsdp_cpu_offload: bool = False
    """FSDP2: keep sharded parameters and optimizer states in CPU memory."""

    fsdp_shard_size: int | None = Field(default=None, gt=0)
    """FSDP2 hybrid sharding: ranks per shard group (world = replicate x shard); None shards over all ranks."""

    fsdp_reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (saves memory, re-gathers in backward)."""

    no_split_modules: list[str] = Field(default_factory=list)
    """Extra module class names to wrap as FSDP units, beyond the model's `_no_split_modules`."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""

    adam_offload: bool = False
    """DeepSpeed: keep Adam optimizer states in CPU memory."""

    zpg: int = Field(default=1, ge=1)
    """ZeRO++ hierarchical partition size; values > 1 need zero_stage 3 (checked when the backend
    is deepspeed: other backends do not read it)."""

    grad_accum_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """DeepSpeed dtype of accumulated gradients; None lets DeepSpeed choose."""

    overlap_comm: bool | None = None
    """DeepSpeed: overlap gradient reduction with the backward pass; None keeps DeepSpeed's own
    default (on at ZeRO-3, off below)."""

    deepspeed_config: dict[str, Any] | None = None
    """User DeepSpeed config whose keys override the generated one (on the CLI: a JSON object)."""

    # ----------------------------------------------------------------- generation engine
    engine_type: str = Field(default="hf", pattern=NAME_PATTERN)
    """Generation engine: "hf", "vllm", "sglang", "fake" or any name registered under the `lightrft.engines` entry point."""

    engine_tp_size: int = Field(default=1, gt=0)
    """Tensor-parallel size of the generation engine."""

    enable_engine_sleep: bool = True
    """Release the engine's GPU memory (weights, KV cache) while training runs. vLLM's sleep mode
    (and SGLang's memory saver) cannot free memory that the CUDA caching allocator holds in
    expandable segments: with sleep on, `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` is refused
    when the engine starts (`check_engine_allocator`)."""

    engine_mem_util: float = Field(default=0.5, gt=0.0, le=1.0)
    """Fraction of GPU memory the engine may use (vLLM gpu_memory_utilization, SGLang mem_fraction_static)."""

    weight_sync_bucket_mb: int = Field(default=512, gt=0)
    """Byte budget of one train-to-engine weight-sync bucket, in MiB."""

    engine_sleep_level: Literal[1, 2] = 2
    """Level of `maybe_sleep_inference_engine` (one meaning on every engine):
    2 (default, the RL fast path) keeps no copy of the weights anywhere: no host copy, no pinned
    memory, so the loop must push them (`update_engine_weights`) before the next generation, and
    `wakeup_inference_engine()` without a push raises. 1 keeps a host copy: wake alone restores the
    weights, for loops that generate again without pushing (evaluation). SGLang keeps that copy only
    when started for it (`enable_weights_cpu_backup`, set from this field when the engine starts)."""

    engine_max_model_len: int | None = Field(default=None, gt=0)
    """Longest prompt plus completion the engine serves (vLLM max_model_len, SGLang context_length,
    hf `max_length` check); None: `prompt_max_len + generate_max_len` when both are given
    (LightRFT's args), else the model's `max_position_embeddings` (`engine_max_len`)."""

    engine_enforce_eager: bool = False
    """Run the engine without CUDA graphs (vLLM enforce_eager, SGLang disable_cuda_graph): slower
    decoding, faster start and less memory."""

    engine_enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (reset after every weight update)."""

    engine_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Engine weights and activations, on every engine (hf, vllm, sglang); "auto" follows training
    (bfloat16 with `bf16`, else float32): `engine_dtype_name`."""

    # ----------------------------------------------------------------- distributed layout
    local_rank: int = Field(default=-1, ge=-1)
    """Local rank given by the launcher; -1 reads it from the environment (LOCAL_RANK)."""

    sp_size: int = Field(default=1, gt=0)
    """Sequence-parallel size; data-parallel size is world_size // sp_size."""

    # ----------------------------------------------------------------- optimizer and schedule
    actor_learning_rate: float = Field(default=1e-6, gt=0.0)
    """Peak learning rate of the actor (policy) model."""

    critic_learning_rate: float = Field(default=9e-6, gt=0.0)
    """Peak learning rate of the critic (value) model."""

    adam_betas: tuple[Beta, Beta] = (0.9, 0.95)
    """Adam beta1 and beta2, each in [0, 1)."""

    adam_eps: float = Field(default=1e-8, gt=0.0)
    """Adam epsilon added to the denominator."""

    l2: float = Field(default=0.0, ge=0.0)
    """Weight decay (decoupled, AdamW)."""

    lr_warmup_ratio: float = Field(default=0.03, ge=0.0, le=1.0)
    """Fraction of total steps spent warming the learning rate up from 0."""

    lr_scheduler: Literal["cosine_with_min_lr", "constant_with_warmup", "linear"] = "cosine_with_min_lr"
    """Learning-rate schedule after warmup."""

    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Floor of the cosine schedule as a fraction of the peak learning rate."""

    critic_pretrain: Annotated[bool | str | None, BeforeValidator(_bool_or_path)] = None
    """Model name or path the critic starts from, or a bool as LightRFT has it (False: no critic
    pretraining); None when there is no critic."""

    # ----------------------------------------------------------------- checkpoints
    max_ckpt_num: int = Field(default=3, gt=0)
    """Checkpoint directories kept; older ones are deleted."""

    max_ckpt_mem: float = Field(default=1e8, gt=0.0)
    """Disk budget of all kept checkpoints, in GB."""

    # ================================================================= construction
    if not TYPE_CHECKING:
        # Hidden from type checkers so they keep the typed keyword signature pydantic synthesizes.

        def __init__(self, /, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as exc:
                raise _config_error(exc) from exc
            _warn_near_misses(self)

        def __setattr__(self, name: str, value: Any) -> None:
            # pydantic has already written the new value when a model validator (cross-field rule)
            # rejects it; put the old state back so a failed assignment changes nothing.
            saved = (dict(self.__dict__), set(self.__pydantic_fields_set__), _copy_extra(self))
            try:
                super().__setattr__(name, value)
            except ValidationError as exc:
                object.__setattr__(self, "__dict__", saved[0])
                object.__setattr__(self, "__pydantic_fields_set__", saved[1])
                object.__setattr__(self, "__pydantic_extra__", saved[2])
                raise _config_error(exc) from exc

    @model_validator(mode="after")
    def _check_cross_field_rules(self) -> StrategyConfig:
        # An unset `strategy` follows the legacy switch, also when `fsdp` is assigned later.
        if "strategy" not in self.model_fields_set:
            # object.__setattr__: a plain write, not a validated assignment that would re-enter here.
            object.__setattr__(self, "strategy", "fsdp" if self.fsdp else _default("strategy"))
        problems: list[Problem] = []
        if self.fsdp and self.strategy != "fsdp":
            problems.append(
                problem(
                    "fsdp",
                    self.fsdp,
                    f"the legacy switch fsdp=True conflicts with strategy={self.strategy!r}",
                    "fsdp=False with this strategy, or strategy='fsdp'",
                )
            )
        problems += _check_multiple(self, "train_batch_size", "micro_train_batch_size")
        problems += _check_multiple(self, "rollout_batch_size", "micro_rollout_batch_size")
        if self.zpg > 1 and self.zero_stage != 3 and self.backend == "deepspeed":
            problems.append(
                problem(
                    "zpg",
                    self.zpg,
                    f"ZeRO++ hierarchical partitioning (zpg > 1) needs zero_stage=3, got zero_stage={self.zero_stage}",
                    "zpg=1, or zero_stage=3",
                )
            )
        if problems:
            raise ConfigError(problems)  # a ValueError: pydantic wraps it, _config_error unwraps it
        return self

    # ================================================================= derived values
    @property
    def backend(self) -> str:
        """Name of the training backend to build, after the legacy `fsdp` switch is applied."""
        return "fsdp" if self.fsdp else self.strategy

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step: train_batch_size // (micro_train_batch_size x dp).

        dp = world_size // sp_size. Raises ConfigError when world_size is not a positive multiple of
        sp_size, or when train_batch_size is not a positive multiple of micro_train_batch_size x dp.
        """
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
            raise one_problem("world_size", world_size, "must be a positive integer", "1, 2, 3, ...")
        if world_size % self.sp_size:
            raise one_problem(
                "world_size",
                world_size,
                f"not a multiple of sp_size={self.sp_size}",
                f"a multiple of sp_size, e.g. {_neighbours(world_size, self.sp_size)}",
            )
        dp = world_size // self.sp_size
        per_step = self.micro_train_batch_size * dp
        if self.train_batch_size % per_step:
            raise one_problem(
                "train_batch_size",
                self.train_batch_size,
                f"not a multiple of micro_train_batch_size={self.micro_train_batch_size} x dp={dp} = {per_step}"
                f" (world_size={world_size}, sp_size={self.sp_size})",
                f"a multiple of {per_step}, e.g. {_neighbours(self.train_batch_size, per_step)}",
            )
        return self.train_batch_size // per_step

    # ----------------------------------------------------------------- engine settings
    # One rule per engine setting, used by every engine (hf, vllm, sglang).
    def engine_dtype_name(self) -> Literal["bfloat16", "float16", "float32"]:
        """The engine's dtype: `engine_dtype`, or with "auto" bfloat16 when `bf16`, else float32."""
        if self.engine_dtype != "auto":
            return self.engine_dtype
        return "bfloat16" if self.bf16 else "float32"

    def engine_max_len(self, max_position_embeddings: int | None = None) -> int | None:
        """Longest prompt plus completion the engine serves: `engine_max_model_len`, else LightRFT's
        `prompt_max_len + generate_max_len` (extra args) when both are given, else the model's
        `max_position_embeddings` (None when unknown: the engine's own default)."""
        if self.engine_max_model_len is not None:
            return int(self.engine_max_model_len)
        p, g = self.get_extra_arg("prompt_max_len"), self.get_extra_arg("generate_max_len")
        if p is not None and g is not None:
            return int(p) + int(g)
        return int(max_position_embeddings) if max_position_embeddings is not None else None

    def engine_seed(self, rank: int) -> int:
        """Sampling seed of the engine that `rank` belongs to: `seed + rank // engine_tp_size`. The
        ranks of one tensor-parallel group share an engine and must sample alike; data-parallel
        engines sample differently."""
        return self.seed + int(rank) // self.engine_tp_size

    def check_engine_allocator(self, engine: str, environ: Mapping[str, str] | None = None) -> None:
        """Refuses `PYTORCH_CUDA_ALLOC_CONF` / `PYTORCH_ALLOC_CONF` with `expandable_segments:True`
        when `enable_engine_sleep` is on (see that field): a RuntimeError naming the variable, its
        value and both ways out. An environment problem, not a config value, hence not ConfigError."""
        if not self.enable_engine_sleep:
            return
        env = os.environ if environ is None else environ
        for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
            if re.search(r"expandable_segments\s*:\s*true", env.get(var, ""), re.IGNORECASE):
                raise RuntimeError(
                    f"{var}={env[var]!r} has expandable_segments:True, which stops the {engine} "
                    "engine's sleep from freeing memory (and SGLang's memory saver from starting). "
                    f"Unset it for this run, or set {_OWNER}.enable_engine_sleep=False."
                )

    def get_extra_arg(self, name: str, default: Any = None) -> Any:
        """Value of an unknown key kept from the input (or of a declared field), else `default`."""
        if name in type(self).model_fields:
            return getattr(self, name)
        extra = self.model_extra or {}
        return extra.get(name, default)

    # ================================================================= from other objects
    @classmethod
    def from_args(cls, obj: Any, *, defaults: Mapping[str, Any] | None = None) -> StrategyConfig:
        """Build a config from a StrategyConfig (copied), a Mapping, an argparse.Namespace or any object.

        Attribute objects are read with vars(); dataclass instances with dataclasses.asdict; other
        objects also through their public non-callable attributes. A None value of a field that does
        not accept None means "not given" (argparse's default) and is dropped. Unknown keys are kept.
        ``defaults`` fill the fields ``obj`` does not give (a default ``strategy`` yields to the
        legacy ``fsdp=True`` switch).
        """
        if isinstance(obj, cls):
            if not defaults:
                try:
                    return obj.model_copy(deep=True)
                except Exception:  # an extra value that refuses deep copy (a lock, a handle)
                    return obj.model_copy()
            given = set(obj.model_fields_set)
            values = {k: v for k, v in obj.model_dump().items() if k in given}
            values.update(obj.model_extra or {})
        else:
            values = values_from_object(obj, owner=_OWNER)
        fields = cls.model_fields
        values = {
            key: value
            for key, value in values.items()
            if not (value is None and key in fields and not is_optional(fields[key].annotation))
        }
        for key, value in (defaults or {}).items():
            if key == "strategy" and values.get("fsdp") is True:
                continue
            values.setdefault(key, value)
        return cls._validated(values)

    @classmethod
    def _validated(cls, values: dict[str, Any]) -> StrategyConfig:
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise _config_error(exc) from exc

    # ================================================================= documents
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field and every kept extra.

        Tuples become lists (read back as tuples for declared fields); extra values pydantic cannot
        serialize become their str().
        """
        data = pydantic_core.to_jsonable_python(self, serialize_unknown=True)
        if not isinstance(data, dict):  # pragma: no cover - a model always serializes to a dict
            raise TypeError(f"{_OWNER} serialized to {type(data).__name__}")
        return data

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """JSON text of `to_dict()`; also written to `path` when given."""
        text = _documents.dump_json(self.to_dict())
        if path is not None:
            _documents.write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> StrategyConfig:
        """Config from JSON text, or from a file when given a path (a one-line str naming a file)."""
        return cls._validated(_documents.load_json(text_or_path, owner=_OWNER))

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """YAML text of `to_dict()`; also written to `path` when given."""
        text = _documents.dump_yaml(self.to_dict())
        if path is not None:
            _documents.write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike[str]) -> StrategyConfig:
        """Config from YAML text (yaml.safe_load), or from a file when given a path."""
        return cls._validated(_documents.load_yaml(text_or_path, owner=_OWNER))

    # ================================================================= command line
    @classmethod
    def add_arguments(cls, parser: ParserT, prefix: str = "--") -> ParserT:
        """Add one `<prefix><field>` option per field (dest = field name); options already defined are kept.

        Bools get `--x/--no-x`, pairs take two values, lists any number, deepspeed_config a JSON object,
        Literal fields their choices. `StrategyConfig.from_args(parser.parse_args(...))` reads them back.
        """
        return _cli.add_field_arguments(
            parser,
            cls.model_fields,
            prefix=prefix,
            unset_defaults={"strategy": f"{_default('strategy')}, or fsdp with {prefix}fsdp"},
            group_title=f"{cls.__name__} options",
        )


def _default(name: str) -> Any:
    return StrategyConfig.model_fields[name].get_default(call_default_factory=True)


def _valid_hint(name: str) -> str | None:
    if name in _VALID_HINTS:
        return _VALID_HINTS[name]
    info = StrategyConfig.model_fields.get(name)
    return describe_valid(info) if info is not None else None


_VALID_HINTS = {
    "strategy": "'deepspeed', 'fsdp', 'fake' or another registered lowercase name matching " + NAME_PATTERN,
    "engine_type": "'hf', 'vllm', 'sglang', 'fake' or another registered lowercase name matching "
    + NAME_PATTERN,
    "zero_stage": "0, 1, 2 or 3",
    "adam_betas": "two numbers, each >= 0 and < 1",
    "no_split_modules": "a list of module class names",
    "deepspeed_config": "a mapping of DeepSpeed config keys, or None",
    "critic_pretrain": "a model name or path (str), a bool (LightRFT's form) or None",
}


def _config_error(exc: ValidationError) -> ConfigError:
    return ConfigError.from_validation_error(exc, owner=_OWNER, describe_valid=_valid_hint)


#: (unknown key, field) pairs already warned about: a config is copied often (``from_args``).
_NEAR_MISSES_SAID: set[tuple[str, str]] = set()
#: How alike an unknown key and a field must be (difflib's ratio) to be taken for a misspelling:
#: one swapped, missing or extra letter in a name of ten or more (``zero_stgae``: 0.9).
NEAR_MISS_CUTOFF = 0.85
#: Shorter keys are left alone: between short names one letter is a different word (``tp_size``,
#: an engine's tensor parallelism, is not ``sp_size``).
NEAR_MISS_MIN_LEN = 8


def _warn_near_misses(config: StrategyConfig) -> None:
    """Unknown keys are kept (training scripts pass their whole argparse namespace), so a
    misspelt field would configure nothing in silence: warn, once per key, when one is that close
    to a field."""
    fields = list(type(config).model_fields)
    for key, value in (config.model_extra or {}).items():
        if len(key) < NEAR_MISS_MIN_LEN:
            continue
        match = difflib.get_close_matches(key, fields, n=1, cutoff=NEAR_MISS_CUTOFF)
        if match and (key, match[0]) not in _NEAR_MISSES_SAID:
            _NEAR_MISSES_SAID.add((key, match[0]))
            warnings.warn(
                f"StrategyConfig: {key}={format_value(value)} is not a field, so it configures nothing "
                f"(it is kept for get_extra_arg); did you mean {match[0]}?",
                UserWarning,
                stacklevel=4,
            )


def _copy_extra(model: BaseModel) -> dict[str, Any] | None:
    extra = model.__pydantic_extra__
    return None if extra is None else dict(extra)


def _check_multiple(config: StrategyConfig, total_name: str, micro_name: str) -> list[Problem]:
    total, micro = getattr(config, total_name), getattr(config, micro_name)
    if total < micro:
        reason = f"smaller than {micro_name}={micro}"
    elif total % micro:
        reason = f"not a multiple of {micro_name}={micro}"
    else:
        return []
    return [
        problem(total_name, total, reason, f"a multiple of {micro_name}, e.g. {_neighbours(total, micro)}")
    ]


def _neighbours(value: int, step: int) -> str:
    """The positive multiples of `step` nearest to `value`, as examples of what would be valid."""
    below = (value // step) * step
    candidates = [m for m in (below, below + step) if m > 0]
    return " or ".join(str(m) for m in candidates)
