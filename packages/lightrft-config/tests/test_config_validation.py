"""Field constraints, cross-field rules and the ConfigError message format."""

from __future__ import annotations

import math
import pickle
import re
from typing import Any

import pydantic
import pytest

from lightrft.config import ConfigError, StrategyConfig

# (field, bad value, the start of the message line, a fragment of what the line says is valid)
INVALID: list[tuple[str, Any, str, str]] = [
    (
        "strategy",
        "Deep Speed",
        "StrategyConfig.strategy='Deep Speed' is invalid",
        "'deepspeed', 'fsdp', 'fake'",
    ),
    ("strategy", "", "StrategyConfig.strategy='' is invalid", "registered lowercase name"),
    ("strategy", 3, "StrategyConfig.strategy=3 is invalid", "'deepspeed'"),
    ("fsdp", "maybe", "StrategyConfig.fsdp='maybe' is invalid", "true or false"),
    ("seed", -1, "StrategyConfig.seed=-1 is invalid", "an integer >= 0"),
    ("seed", "abc", "StrategyConfig.seed='abc' is invalid", "an integer >= 0"),
    ("seed", 1.5, "StrategyConfig.seed=1.5 is invalid", "an integer >= 0"),
    ("max_norm", -0.5, "StrategyConfig.max_norm=-0.5 is invalid", "a number >= 0"),
    ("max_norm", math.inf, "StrategyConfig.max_norm=inf is invalid", "a number >= 0"),
    ("micro_train_batch_size", 0, "StrategyConfig.micro_train_batch_size=0 is invalid", "an integer > 0"),
    ("train_batch_size", -8, "StrategyConfig.train_batch_size=-8 is invalid", "an integer > 0"),
    ("micro_rollout_batch_size", 0, "StrategyConfig.micro_rollout_batch_size=0 is invalid", "an integer > 0"),
    ("rollout_batch_size", 0, "StrategyConfig.rollout_batch_size=0 is invalid", "an integer > 0"),
    ("bf16", "perhaps", "StrategyConfig.bf16='perhaps' is invalid", "true or false"),
    ("zero_stage", 5, "StrategyConfig.zero_stage=5 is invalid", "0, 1, 2 or 3"),
    ("zero_stage", -1, "StrategyConfig.zero_stage=-1 is invalid", "0, 1, 2 or 3"),
    ("fsdp_shard_size", 0, "StrategyConfig.fsdp_shard_size=0 is invalid", "an integer > 0 or None"),
    ("no_split_modules", "Block", "StrategyConfig.no_split_modules='Block' is invalid", "module class names"),
    (
        "no_split_modules",
        ["Block", 7],
        "StrategyConfig.no_split_modules[1]=7 is invalid",
        "module class names",
    ),
    ("zpg", 0, "StrategyConfig.zpg=0 is invalid", "an integer >= 1"),
    (
        "grad_accum_dtype",
        "fp8",
        "StrategyConfig.grad_accum_dtype='fp8' is invalid",
        "'fp32', 'bf16', 'fp16' or None",
    ),
    (
        "deepspeed_config",
        "zero3.json",
        "StrategyConfig.deepspeed_config='zero3.json' is invalid",
        "a mapping",
    ),
    ("engine_type", "vLLM", "StrategyConfig.engine_type='vLLM' is invalid", "'hf', 'vllm', 'sglang', 'fake'"),
    ("engine_tp_size", 0, "StrategyConfig.engine_tp_size=0 is invalid", "an integer > 0"),
    ("engine_mem_util", 0.0, "StrategyConfig.engine_mem_util=0.0 is invalid", "a number > 0 and <= 1"),
    ("engine_mem_util", 1.5, "StrategyConfig.engine_mem_util=1.5 is invalid", "a number > 0 and <= 1"),
    ("weight_sync_bucket_mb", 0, "StrategyConfig.weight_sync_bucket_mb=0 is invalid", "an integer > 0"),
    ("local_rank", -2, "StrategyConfig.local_rank=-2 is invalid", "an integer >= -1"),
    ("sp_size", 0, "StrategyConfig.sp_size=0 is invalid", "an integer > 0"),
    ("actor_learning_rate", 0.0, "StrategyConfig.actor_learning_rate=0.0 is invalid", "a number > 0"),
    ("critic_learning_rate", -1e-5, "StrategyConfig.critic_learning_rate=-1e-05 is invalid", "a number > 0"),
    ("adam_betas", (0.9, 1.0), "StrategyConfig.adam_betas[1]=1.0 is invalid", "each >= 0 and < 1"),
    ("adam_betas", (-0.1, 0.9), "StrategyConfig.adam_betas[0]=-0.1 is invalid", "each >= 0 and < 1"),
    ("adam_betas", [0.9], "StrategyConfig.adam_betas=[0.9] is invalid: item [1] is missing", "two numbers"),
    ("adam_eps", 0.0, "StrategyConfig.adam_eps=0.0 is invalid", "a number > 0"),
    ("l2", -0.1, "StrategyConfig.l2=-0.1 is invalid", "a number >= 0"),
    ("lr_warmup_ratio", 1.5, "StrategyConfig.lr_warmup_ratio=1.5 is invalid", "a number >= 0 and <= 1"),
    ("lr_scheduler", "cosine", "StrategyConfig.lr_scheduler='cosine' is invalid", "'constant_with_warmup'"),
    ("min_lr_ratio", -0.1, "StrategyConfig.min_lr_ratio=-0.1 is invalid", "a number >= 0 and <= 1"),
    (
        "critic_pretrain",
        123,
        "StrategyConfig.critic_pretrain=123 is invalid",
        "a bool (LightRFT's form) or None",
    ),
    ("max_ckpt_num", 0, "StrategyConfig.max_ckpt_num=0 is invalid", "an integer > 0"),
    ("max_ckpt_mem", 0.0, "StrategyConfig.max_ckpt_mem=0.0 is invalid", "a number > 0"),
    ("max_ckpt_mem", math.nan, "StrategyConfig.max_ckpt_mem=nan is invalid", "a number > 0"),
]


def _ids(case: tuple[str, Any, str, str]) -> str:
    return f"{case[0]}={case[1]!r}"


@pytest.mark.parametrize(("field", "value", "line_start", "valid"), INVALID, ids=[_ids(c) for c in INVALID])
def test_invalid_value_is_reported_with_field_value_and_what_is_valid(
    field: str, value: Any, line_start: str, valid: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        StrategyConfig(**{field: value})
    message = str(caught.value)
    assert message.startswith(line_start)
    assert valid in message.split(" (valid: ", 1)[1]
    assert len(message.splitlines()) == 1
    (error,) = caught.value.errors
    assert error["field"] is not None and error["field"].startswith(field)
    assert error["message"] == message


@pytest.mark.parametrize(("field", "value", "line_start", "valid"), INVALID, ids=[_ids(c) for c in INVALID])
def test_from_args_reports_the_same_problem(field: str, value: Any, line_start: str, valid: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(line_start)):
        StrategyConfig.from_args({field: value})


def test_zero_stage_message_matches_documented_format() -> None:
    with pytest.raises(ConfigError) as caught:
        StrategyConfig(zero_stage=5)
    assert str(caught.value) == (
        "StrategyConfig.zero_stage=5 is invalid: Input should be less than or equal to 3 (valid: 0, 1, 2 or 3)"
    )
    assert caught.value.errors == [
        {
            "field": "zero_stage",
            "value": 5,
            "message": str(caught.value),
            "reason": "Input should be less than or equal to 3",
            "valid": "0, 1, 2 or 3",
        }
    ]


def test_config_error_is_a_value_error_caused_by_pydantic() -> None:
    with pytest.raises(ValueError) as caught:
        StrategyConfig(seed=-3)
    assert isinstance(caught.value, ConfigError)
    assert isinstance(caught.value.__cause__, pydantic.ValidationError)


def test_every_problem_gets_its_own_line() -> None:
    with pytest.raises(ConfigError) as caught:
        StrategyConfig(seed=-1, zero_stage=9, engine_type="Bad Name")
    lines = str(caught.value).splitlines()
    assert [line.split(" is invalid")[0] for line in lines] == [
        "StrategyConfig.seed=-1",
        "StrategyConfig.zero_stage=9",
        "StrategyConfig.engine_type='Bad Name'",
    ]
    assert [e["field"] for e in caught.value.errors] == ["seed", "zero_stage", "engine_type"]
    assert [e["value"] for e in caught.value.errors] == [-1, 9, "Bad Name"]


def test_config_error_survives_pickling() -> None:
    with pytest.raises(ConfigError) as caught:
        StrategyConfig(zero_stage=5, seed=-1)
    restored = pickle.loads(pickle.dumps(caught.value))
    assert str(restored) == str(caught.value)
    assert restored.errors == caught.value.errors


def test_config_error_from_plain_text() -> None:
    error = ConfigError("something is off")
    assert str(error) == "something is off"
    assert error.errors[0]["field"] is None
    assert error.errors[0]["message"] == "something is off"


def test_defaults() -> None:
    config = StrategyConfig()
    assert config.strategy == "deepspeed"
    assert config.backend == "deepspeed"
    assert (config.seed, config.max_norm, config.zero_stage) == (42, 1.0, 2)
    assert (config.micro_train_batch_size, config.train_batch_size) == (1, 128)
    assert (config.micro_rollout_batch_size, config.rollout_batch_size) == (8, 512)
    assert config.adam_betas == (0.9, 0.95)
    assert config.no_split_modules == []
    assert config.engine_type == "hf" and config.engine_mem_util == 0.5
    assert config.weight_sync_bucket_mb == 512
    assert config.lr_scheduler == "cosine_with_min_lr"
    assert config.max_ckpt_mem == 1e8
    assert config.grad_accum_dtype is None and config.deepspeed_config is None


def test_every_field_is_documented() -> None:
    for name, info in StrategyConfig.model_fields.items():
        assert info.description, f"{name} has no attribute docstring"
    assert "0 disables clipping" in (StrategyConfig.model_fields["max_norm"].description or "")


def test_lax_inputs_are_coerced() -> None:
    config = StrategyConfig.from_args({"seed": "7", "bf16": "false", "adam_betas": [0.5, 0.6], "max_norm": 2})
    assert config.seed == 7
    assert config.bf16 is False
    assert config.adam_betas == (0.5, 0.6)
    assert isinstance(config.max_norm, float)


def test_registered_names_beyond_the_known_ones_are_accepted() -> None:
    config = StrategyConfig(strategy="my_backend.v2", engine_type="my-engine")
    assert config.backend == "my_backend.v2"
    assert config.engine_type == "my-engine"


# ----------------------------------------------------------------------------- cross-field rules


def test_train_batch_size_must_be_a_multiple_of_micro_train_batch_size() -> None:
    with pytest.raises(ConfigError) as caught:
        StrategyConfig(train_batch_size=100, micro_train_batch_size=3)
    assert str(caught.value) == (
        "StrategyConfig.train_batch_size=100 is invalid: not a multiple of micro_train_batch_size=3"
        " (valid: a multiple of micro_train_batch_size, e.g. 99 or 102)"
    )
    assert caught.value.errors[0]["field"] == "train_batch_size"
    assert caught.value.errors[0]["value"] == 100


def test_train_batch_size_must_not_be_smaller_than_micro_train_batch_size() -> None:
    with pytest.raises(
        ConfigError, match=r"train_batch_size=4 is invalid: smaller than micro_train_batch_size=8"
    ):
        StrategyConfig(train_batch_size=4, micro_train_batch_size=8)


def test_rollout_batch_size_must_be_a_multiple_of_micro_rollout_batch_size() -> None:
    with pytest.raises(ConfigError) as caught:
        StrategyConfig(rollout_batch_size=100, micro_rollout_batch_size=8)
    assert str(caught.value).startswith(
        "StrategyConfig.rollout_batch_size=100 is invalid: not a multiple of micro_rollout_batch_size=8"
    )
    assert "e.g. 96 or 104" in str(caught.value)


def test_zpg_above_one_needs_zero_stage_3() -> None:
    with pytest.raises(ConfigError) as caught:
        StrategyConfig(zpg=2, zero_stage=2)
    message = str(caught.value)
    assert message.startswith("StrategyConfig.zpg=2 is invalid")
    assert "zero_stage=2" in message and "zero_stage=3" in message
    assert StrategyConfig(zpg=8, zero_stage=3).zpg == 8
    # Only DeepSpeed reads zpg: other backends accept what LightRFT scripts pass.
    assert StrategyConfig(zpg=2, zero_stage=2, strategy="fake").zpg == 2
    assert StrategyConfig(zpg=2, zero_stage=2, fsdp=True).zpg == 2


def test_fsdp_flag_conflicting_with_explicit_strategy_names_both() -> None:
    with pytest.raises(ConfigError) as caught:
        StrategyConfig(fsdp=True, strategy="deepspeed")
    message = str(caught.value)
    assert message.startswith("StrategyConfig.fsdp=True is invalid")
    assert "strategy='deepspeed'" in message
    assert caught.value.errors[0]["field"] == "fsdp"


def test_several_cross_field_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as caught:
        StrategyConfig(
            fsdp=True, strategy="fake", train_batch_size=10, micro_train_batch_size=4,
            rollout_batch_size=10, micro_rollout_batch_size=4,
        )  # fmt: skip
    assert [e["field"] for e in caught.value.errors] == ["fsdp", "train_batch_size", "rollout_batch_size"]
    assert len(str(caught.value).splitlines()) == 3


# ----------------------------------------------------------------------------- legacy fsdp switch


def test_fsdp_flag_selects_fsdp_when_strategy_not_given() -> None:
    config = StrategyConfig(fsdp=True)
    assert config.strategy == "fsdp"
    assert config.backend == "fsdp"


def test_fsdp_flag_agrees_with_explicit_fsdp_strategy() -> None:
    assert StrategyConfig(fsdp=True, strategy="fsdp").backend == "fsdp"
    assert StrategyConfig(strategy="fsdp").backend == "fsdp"
    assert StrategyConfig(strategy="fake").backend == "fake"


def test_fsdp_flag_assigned_later_follows_the_same_rule() -> None:
    config = StrategyConfig()
    config.fsdp = True
    assert config.backend == "fsdp"
    config.fsdp = False
    assert config.backend == "deepspeed"

    explicit = StrategyConfig(strategy="deepspeed")
    with pytest.raises(ConfigError, match=r"fsdp=True is invalid.*strategy='deepspeed'"):
        explicit.fsdp = True
    assert explicit.fsdp is False
    assert explicit.backend == "deepspeed"


# ----------------------------------------------------------------------------- assignment


def test_assignment_is_validated_and_a_failure_changes_nothing() -> None:
    config = StrategyConfig()
    with pytest.raises(ConfigError) as caught:
        config.zero_stage = 7
    assert str(caught.value).startswith("StrategyConfig.zero_stage=7 is invalid")
    assert isinstance(caught.value.__cause__, pydantic.ValidationError)
    assert config.zero_stage == 2

    with pytest.raises(
        ConfigError, match=r"train_batch_size=128 is invalid: not a multiple of micro_train_batch_size=100"
    ):
        # 100 passes the field check; the cross-field rule (128 % 100) rejects it afterwards.
        config.micro_train_batch_size = 100
    assert config.micro_train_batch_size == 1
    assert "micro_train_batch_size" not in config.model_fields_set
    assert config == StrategyConfig()


def test_valid_assignment_applies() -> None:
    config = StrategyConfig()
    config.micro_train_batch_size = 4
    config.adam_betas = [0.8, 0.99]  # type: ignore[assignment]
    setattr(config, "my_extra", "kept")  # noqa: B010 - extras are assignable; a type checker cannot know them
    assert config.micro_train_batch_size == 4
    assert config.adam_betas == (0.8, 0.99)
    assert config.get_extra_arg("my_extra") == "kept"
