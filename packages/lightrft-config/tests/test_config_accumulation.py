"""accumulation_steps: train_batch_size / (micro_train_batch_size x dp), dp = world_size // sp_size."""

from __future__ import annotations

from typing import Any

import pytest

from lightrft.config import ConfigError, StrategyConfig


@pytest.mark.parametrize(
    ("train", "micro", "sp", "world", "steps"),
    [
        (128, 1, 1, 1, 128),
        (128, 1, 1, 8, 16),
        (128, 2, 2, 8, 16),  # dp = 4
        (128, 4, 1, 32, 1),
        (96, 4, 3, 6, 12),  # dp = 2
        (512, 8, 8, 64, 8),  # dp = 8
    ],
)
def test_accumulation_steps(train: int, micro: int, sp: int, world: int, steps: int) -> None:
    config = StrategyConfig(train_batch_size=train, micro_train_batch_size=micro, sp_size=sp)
    assert config.accumulation_steps(world) == steps


def test_not_divisible_names_every_number() -> None:
    config = StrategyConfig(train_batch_size=96, micro_train_batch_size=4)
    with pytest.raises(ConfigError) as caught:
        config.accumulation_steps(5)
    assert str(caught.value) == (
        "StrategyConfig.train_batch_size=96 is invalid: not a multiple of micro_train_batch_size=4 x dp=5 = 20"
        " (world_size=5, sp_size=1) (valid: a multiple of 20, e.g. 80 or 100)"
    )
    assert caught.value.errors[0]["field"] == "train_batch_size"


def test_zero_steps_is_an_error() -> None:
    config = StrategyConfig(train_batch_size=128, micro_train_batch_size=4, sp_size=2)
    with pytest.raises(ConfigError) as caught:
        config.accumulation_steps(128)  # dp = 64, one step would need 256 samples
    message = str(caught.value)
    assert "train_batch_size=128" in message
    assert "micro_train_batch_size=4 x dp=64 = 256" in message
    assert "world_size=128, sp_size=2" in message
    assert "e.g. 256" in message


def test_world_size_must_be_a_multiple_of_sp_size() -> None:
    with pytest.raises(ConfigError) as caught:
        StrategyConfig(sp_size=4).accumulation_steps(6)
    assert str(caught.value) == (
        "StrategyConfig.world_size=6 is invalid: not a multiple of sp_size=4 (valid: a multiple of sp_size, e.g. 4 or 8)"
    )


@pytest.mark.parametrize("world", [0, -8, True, 2.0, "8"])
def test_world_size_must_be_a_positive_integer(world: Any) -> None:
    with pytest.raises(
        ConfigError, match=rf"^StrategyConfig.world_size={world!r} is invalid: must be a positive integer"
    ):
        StrategyConfig().accumulation_steps(world)
