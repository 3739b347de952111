"""from_args on every kind of object a training script may hold, and get_extra_arg."""

from __future__ import annotations

import argparse
import dataclasses
import threading
import types
import warnings
from typing import Any

import pytest

from lightrft.config import ConfigError, StrategyConfig


def test_from_dict_keeps_unknown_keys() -> None:
    config = StrategyConfig.from_args(
        {"seed": 7, "zero_stage": 3, "pretrain": "Qwen/Qwen2.5-0.5B", "n_samples": 4}
    )
    assert config.seed == 7
    assert config.zero_stage == 3
    assert config.model_extra == {"pretrain": "Qwen/Qwen2.5-0.5B", "n_samples": 4}


def test_from_read_only_mapping() -> None:
    config = StrategyConfig.from_args(types.MappingProxyType({"sp_size": 2}))
    assert config.sp_size == 2


def test_from_namespace_drops_none_of_required_fields_and_keeps_optional_none() -> None:
    args = argparse.Namespace(
        seed=None,  # argparse default None: not given
        zero_stage=3,
        critic_pretrain=None,  # Optional field: None is a value
        reward_pretrain=None,  # unknown key: kept as is
        strategy=None,
        fsdp=True,
    )
    config = StrategyConfig.from_args(args)
    assert config.seed == 42
    assert config.zero_stage == 3
    assert config.critic_pretrain is None
    assert "critic_pretrain" in config.model_fields_set
    assert "seed" not in config.model_fields_set
    assert config.get_extra_arg("reward_pretrain", "missing") is None
    assert config.backend == "fsdp"


def test_from_simple_namespace() -> None:
    config = StrategyConfig.from_args(
        types.SimpleNamespace(engine_type="vllm", engine_tp_size=2, prompt_max_len=1024)
    )
    assert (config.engine_type, config.engine_tp_size) == ("vllm", 2)
    assert config.get_extra_arg("prompt_max_len") == 1024


@dataclasses.dataclass
class _Inner:
    temperature: float = 1.0


@dataclasses.dataclass
class _TrainArgs:
    seed: int = 3
    adam_betas: tuple[float, float] = (0.5, 0.75)
    no_split_modules: list[str] = dataclasses.field(default_factory=lambda: ["Block"])
    sampling: _Inner = dataclasses.field(default_factory=_Inner)


def test_from_dataclass_instance() -> None:
    config = StrategyConfig.from_args(_TrainArgs())
    assert config.seed == 3
    assert config.adam_betas == (0.5, 0.75)
    assert config.no_split_modules == ["Block"]
    assert config.get_extra_arg("sampling") == {"temperature": 1.0}  # asdict converts nested dataclasses


@dataclasses.dataclass
class _WithLock:
    seed: int = 9
    lock: Any = dataclasses.field(default_factory=threading.Lock)


def test_from_dataclass_holding_an_uncopyable_value() -> None:
    args = _WithLock()
    config = StrategyConfig.from_args(args)
    assert config.seed == 9
    assert config.get_extra_arg("lock") is args.lock


class _PlainArgs:
    zero_stage = 1  # class-level default, invisible to vars()
    _private = "ignored"

    def __init__(self) -> None:
        self.seed = 11
        self.reward_scale = 0.5

    @property
    def micro_train_batch_size(self) -> int:
        return 2

    @property
    def broken(self) -> int:
        raise RuntimeError("not a setting")

    def method(self) -> int:
        return 0


def test_from_plain_object_reads_instance_class_and_property_attributes() -> None:
    config = StrategyConfig.from_args(_PlainArgs())
    assert config.seed == 11
    assert config.zero_stage == 1
    assert config.micro_train_batch_size == 2
    assert config.model_extra == {"reward_scale": 0.5}


class _SlotsArgs:
    __slots__ = ("seed", "sp_size")

    def __init__(self) -> None:
        self.seed = 5
        self.sp_size = 4


def test_from_object_with_slots() -> None:
    config = StrategyConfig.from_args(_SlotsArgs())
    assert (config.seed, config.sp_size) == (5, 4)


def test_from_strategy_config_returns_an_equal_independent_copy() -> None:
    original = StrategyConfig.from_args({"fsdp": True, "no_split_modules": ["A"], "extra_list": [1, 2]})
    copy = StrategyConfig.from_args(original)
    assert copy == original
    assert copy is not original
    copy.no_split_modules.append("B")
    copy.get_extra_arg("extra_list").append(3)
    assert original.no_split_modules == ["A"]
    assert original.get_extra_arg("extra_list") == [1, 2]
    assert copy.backend == "fsdp"


@pytest.mark.parametrize(
    ("obj", "type_name"),
    [
        ([1, 2], "list"),
        (3, "int"),
        ("seed=3", "str"),
        (None, "NoneType"),
        ((1,), "tuple"),
        (_TrainArgs, "class"),
    ],
)
def test_unsupported_types_are_rejected_naming_the_type(obj: Any, type_name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        StrategyConfig.from_args(obj)
    message = str(caught.value)
    assert message.startswith("StrategyConfig: from_args cannot read a config from")
    assert type_name in message
    assert "argparse.Namespace" in message  # says what would be accepted


def test_mapping_with_non_string_keys_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"non-string key 1"):
        StrategyConfig.from_args({1: "x"})


def test_invalid_values_raise_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^StrategyConfig.zero_stage=4 is invalid"):
        StrategyConfig.from_args(argparse.Namespace(zero_stage=4))


# ----------------------------------------------------------------------------- get_extra_arg


def test_get_extra_arg() -> None:
    config = StrategyConfig.from_args({"pretrain": "gpt2", "seed": 1, "ratio": 0.0})
    assert config.get_extra_arg("pretrain") == "gpt2"
    assert config.get_extra_arg("ratio", 1.0) == 0.0  # a falsy value is still a value
    assert config.get_extra_arg("absent") is None
    assert config.get_extra_arg("absent", "fallback") == "fallback"
    assert config.get_extra_arg("seed") == 1  # declared fields are readable too
    assert config.get_extra_arg("zero_stage", 99) == 2


# ----------------------------------------------------------------------------- misspelt fields
def test_a_misspelt_field_is_kept_and_warned_about_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightrft.config import _model

    monkeypatch.setattr(_model, "_NEAR_MISSES_SAID", set())  # as in a fresh process
    with pytest.warns(UserWarning, match=r"zero_stgae=2 is not a field.*did you mean zero_stage\?") as record:
        config = StrategyConfig.from_args(
            {"zero_stgae": 2, "pretrain": "gpt2", "prompt_max_len": 1024, "tp_size": 2}
        )
    # pretrain and prompt_max_len are like no field; tp_size is one letter from sp_size, but short
    # names that close are other words (an engine's tensor parallelism): no warning for those
    assert len(record) == 1
    assert config.zero_stage == _model.StrategyConfig.model_fields["zero_stage"].default
    assert config.get_extra_arg("zero_stgae") == 2  # kept, as every unknown key is
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same misspelling again (a copy, another config): silent
        StrategyConfig.from_args(config)
        StrategyConfig.from_args({"zero_stgae": 3})
