"""The engine settings' rules, written once on StrategyConfig and used by every engine (hf, vllm,
sglang), and the types LightRFT gives some fields."""

from __future__ import annotations

import pytest

from lightrft.config import ConfigError, StrategyConfig


def test_sleep_level_defaults_to_the_fast_path_and_level_1_stays_available():
    assert StrategyConfig().engine_sleep_level == 2
    assert StrategyConfig(engine_sleep_level=1).engine_sleep_level == 1
    with pytest.raises(ConfigError, match="engine_sleep_level=3 is invalid"):
        StrategyConfig(engine_sleep_level=3)


@pytest.mark.parametrize(
    "given,dtype",
    [
        ({}, "bfloat16"),  # auto follows bf16=True
        ({"bf16": False}, "float32"),
        ({"engine_dtype": "float16"}, "float16"),  # an explicit dtype wins over bf16
        ({"bf16": False, "engine_dtype": "bfloat16"}, "bfloat16"),
    ],
)
def test_engine_dtype_name(given, dtype):
    assert StrategyConfig(**given).engine_dtype_name() == dtype


def test_engine_max_len_order():
    # engine_max_model_len, else LightRFT's prompt_max_len + generate_max_len, else the model's.
    assert StrategyConfig(engine_max_model_len=77).engine_max_len(4096) == 77
    lightrft = StrategyConfig.from_args({"prompt_max_len": 100, "generate_max_len": 28})
    assert lightrft.engine_max_len(4096) == 128
    assert StrategyConfig.from_args({"prompt_max_len": 100}).engine_max_len(4096) == 4096
    assert StrategyConfig().engine_max_len(None) is None


def test_engine_seed_is_shared_within_a_tensor_parallel_group():
    cfg = StrategyConfig(seed=10, engine_tp_size=2)
    assert [cfg.engine_seed(r) for r in range(6)] == [10, 10, 11, 11, 12, 12]
    assert [StrategyConfig(seed=3).engine_seed(r) for r in range(3)] == [3, 4, 5]


@pytest.mark.parametrize("var", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_expandable_segments_refused_only_with_sleep(var):
    env = {var: "max_split_size_mb:64,expandable_segments:True"}
    with pytest.raises(
        RuntimeError, match=f"{var}=.*expandable_segments:True.*vllm.*enable_engine_sleep=False"
    ):
        StrategyConfig().check_engine_allocator("vllm", env)
    StrategyConfig(enable_engine_sleep=False).check_engine_allocator("vllm", env)  # no sleep: allowed
    StrategyConfig().check_engine_allocator("vllm", {var: "expandable_segments:False"})
    StrategyConfig().check_engine_allocator("vllm", {})


@pytest.mark.parametrize("value", [False, True, "facebook/opt-350m", None])
def test_critic_pretrain_takes_lightrfts_bool_or_a_path(value):
    assert StrategyConfig(critic_pretrain=value).critic_pretrain == value
    assert StrategyConfig.from_args({"critic_pretrain": value}).critic_pretrain == value


def test_critic_pretrain_rejects_other_types_with_one_line():
    with pytest.raises(ConfigError) as caught:
        StrategyConfig(critic_pretrain=123)
    lines = str(caught.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith("StrategyConfig.critic_pretrain=123 is invalid")
