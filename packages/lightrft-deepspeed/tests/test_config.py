"""The DeepSpeed configs generated from StrategyConfig (pure functions, no process group)."""

from __future__ import annotations

from typing import Any

import pytest

from lightrft.config import ConfigError, StrategyConfig
from lightrft.deepspeed import eval_config, eval_stage, train_config


def cfg(**kw: Any) -> StrategyConfig:
    base: dict[str, Any] = {
        "train_batch_size": 16,
        "micro_train_batch_size": 2,
        "bf16": True,
        "max_norm": 1.0,
    }
    return StrategyConfig(**{**base, **kw})


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_precision_clipping_and_batch(stage: int) -> None:
    c = train_config(cfg(zero_stage=stage, max_norm=0.7), world_size=2)
    assert c["zero_optimization"]["stage"] == stage
    assert c["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert c["fp16"] == {"enabled": False}
    assert c["gradient_clipping"] == 0.7
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (
        16,
        2,
        4,
    )
    assert c["zero_optimization"]["offload_optimizer"] == {"device": "none"}
    # overlap_comm=None (the default) leaves DeepSpeed's own per-stage default in force.
    assert "overlap_comm" not in c["zero_optimization"]
    assert (
        train_config(cfg(zero_stage=stage, overlap_comm=False), world_size=2)["zero_optimization"][
            "overlap_comm"
        ]
        is False
    )
    assert ("offload_param" in c["zero_optimization"]) == (stage == 3)
    assert "data_types" not in c and "optimizer" not in c and "scheduler" not in c


def test_fp32_and_sequence_parallel_batch() -> None:
    c = train_config(cfg(bf16=False, sp_size=2, train_batch_size=8), world_size=4)
    assert c["bf16"] == {"enabled": False}
    # DeepSpeed counts every rank as data-parallel: 8 samples x sp 2, over 4 ranks of 2 samples.
    assert (c["train_batch_size"], c["gradient_accumulation_steps"]) == (16, 2)


def test_offload_zpg_grad_accum_dtype_overlap() -> None:
    c = train_config(
        cfg(zero_stage=3, adam_offload=True, zpg=2, grad_accum_dtype="fp32", overlap_comm=True),
        world_size=4,
        param_offload=True,
    )
    z = c["zero_optimization"]
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert z["offload_param"] == {"device": "cpu"}
    assert z["zero_hpz_partition_size"] == 2
    assert z["overlap_comm"] is True and z["contiguous_gradients"] is True
    assert c["data_types"] == {"grad_accum_dtype": "fp32"}
    assert (
        train_config(cfg(zero_stage=2, grad_accum_dtype="bf16"), 2)["data_types"]["grad_accum_dtype"]
        == "bf16"
    )


def test_offload_needs_the_right_stage() -> None:
    with pytest.raises(ConfigError, match=r"adam_offload=True is invalid: .*zero_stage=0"):
        train_config(cfg(zero_stage=0, adam_offload=True), 2)
    with pytest.raises(ConfigError, match=r"param_offload=True is invalid: .*zero_stage=2"):
        train_config(cfg(zero_stage=2), 2, param_offload=True)


def test_user_dict_adds_and_tunes_keys() -> None:
    user = {"zero_optimization": {"reduce_bucket_size": 12345, "stage": 2}, "steps_per_print": 10,
            "gradient_clipping": 1.0}  # fmt: skip
    c = train_config(cfg(zero_stage=2, deepspeed_config=user), 2)
    assert c["zero_optimization"]["reduce_bucket_size"] == 12345
    assert c["zero_optimization"]["stage"] == 2  # same value as zero_stage: no conflict
    assert c["zero_optimization"]["offload_optimizer"] == {"device": "none"}  # deep merge kept it
    assert c["steps_per_print"] == 10


def test_user_dict_conflicts_name_both_values() -> None:
    user = {
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "gradient_clipping": 2.0,
        "bf16": {"enabled": False},
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "Adam"},
    }
    with pytest.raises(ConfigError) as e:
        train_config(cfg(zero_stage=3, deepspeed_config=user), 2)
    msg = str(e.value)
    assert "deepspeed_config['zero_optimization']['stage']=2 is invalid: conflicts with zero_stage=3" in msg
    assert "deepspeed_config['zero_optimization']['offload_optimizer']['device']='cpu'" in msg
    assert "adam_offload=False" in msg
    assert "deepspeed_config['gradient_clipping']=2.0 is invalid: conflicts with max_norm=1.0" in msg
    assert "deepspeed_config['bf16']['enabled']=False is invalid: conflicts with bf16=True" in msg
    assert "conflicts with micro_train_batch_size=2" in msg
    assert "deepspeed_config['optimizer']" in msg
    assert len(e.value.errors) == 6


def test_user_dict_conflicts_with_derived_keys() -> None:
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps'\]=1 .*train_batch_size=16 / "):
        train_config(cfg(deepspeed_config={"gradient_accumulation_steps": 1}), 2)
    with pytest.raises(ConfigError, match=r"grad_accum_dtype'\]='bf16' .*grad_accum_dtype='fp32'"):
        train_config(
            cfg(grad_accum_dtype="fp32", deepspeed_config={"data_types": {"grad_accum_dtype": "bf16"}}), 2
        )
    with pytest.raises(ConfigError, match=r"check_grad_overflow'\]=False"):
        train_config(cfg(deepspeed_config={"bf16": {"check_grad_overflow": False}}), 2)
    # grad_accum_dtype=None lets DeepSpeed (or the user's dict) choose.
    assert train_config(cfg(deepspeed_config={"data_types": {"grad_accum_dtype": "fp32"}}), 2)[
        "data_types"
    ] == {"grad_accum_dtype": "fp32"}


@pytest.mark.parametrize(("train_stage", "expected"), [(0, 0), (1, 0), (2, 0), (3, 3)])
def test_eval_config_stage(train_stage: int, expected: int) -> None:
    assert eval_stage(train_stage) == expected
    user = {"zero_optimization": {"stage": train_stage, "reduce_bucket_size": 7}, "steps_per_print": 3}
    c = eval_config(cfg(zero_stage=train_stage, deepspeed_config=user), 2)
    assert c["zero_optimization"]["stage"] == expected
    assert c["zero_optimization"]["reduce_bucket_size"] == 7 and c["steps_per_print"] == 3
    assert c["bf16"]["enabled"] is True
    assert "gradient_clipping" not in c and "offload_optimizer" not in c["zero_optimization"]
    if expected == 3:
        assert c["zero_optimization"]["offload_param"] == {"device": "none"}
    assert eval_config(cfg(zero_stage=3), 2, param_offload=True)["zero_optimization"]["offload_param"] == {
        "device": "cpu"
    }


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_accepts_generated_configs(stage: int) -> None:
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    c = train_config(cfg(zero_stage=stage, train_batch_size=8, grad_accum_dtype="fp32"), world_size=1)
    parsed = ds_config.DeepSpeedConfig(c)
    assert parsed.zero_optimization_stage == stage
    assert parsed.gradient_accumulation_steps == 4 and parsed.gradient_clipping == 1.0
    assert parsed.bfloat16_config.enabled and parsed.bfloat16_config.check_grad_overflow
    parsed_eval = ds_config.DeepSpeedConfig(
        eval_config(cfg(zero_stage=stage, train_batch_size=8), world_size=1)
    )
    assert parsed_eval.zero_optimization_stage == eval_stage(stage)
