"""JSON and YAML: exact round trips, files, and bad documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightrft.config import ConfigError, StrategyConfig


def _custom() -> StrategyConfig:
    return StrategyConfig.from_args(
        {
            "fsdp": True,
            "seed": 0,
            "adam_betas": (0.8, 0.999),
            "actor_learning_rate": 5e-7,
            "critic_learning_rate": 9e-6,
            "no_split_modules": ["LlamaDecoderLayer"],
            "deepspeed_config": {"zero_optimization": {"stage": 3}, "steps_per_print": 10},
            "grad_accum_dtype": "fp32",
            "fsdp_shard_size": 8,
            "lr_scheduler": "linear",
            # extras: kept and written back
            "pretrain": "Qwen/Qwen2.5-0.5B",
            "n_samples_per_prompt": 8,
            "stop": ["</s>", "\n\n"],
            "generation": {"temperature": 0.7, "top_p": None},
            "flag": "yes",  # a YAML 1.1 boolean word: must come back as the string
        }
    )


@pytest.mark.parametrize("config", [StrategyConfig(), _custom()], ids=["defaults", "custom"])
def test_json_round_trip_is_exact(config: StrategyConfig) -> None:
    loaded = StrategyConfig.from_json(config.to_json())
    assert loaded == config
    assert loaded.model_extra == config.model_extra
    assert isinstance(loaded.adam_betas, tuple)
    assert loaded.backend == config.backend


@pytest.mark.parametrize("config", [StrategyConfig(), _custom()], ids=["defaults", "custom"])
def test_yaml_round_trip_is_exact(config: StrategyConfig) -> None:
    loaded = StrategyConfig.from_yaml(config.to_yaml())
    assert loaded == config
    assert loaded.model_extra == config.model_extra
    assert isinstance(loaded.adam_betas, tuple)
    assert loaded.get_extra_arg("flag") == config.get_extra_arg("flag")  # "yes" stays a string


def test_fsdp_config_survives_the_round_trip_without_conflict() -> None:
    config = StrategyConfig(fsdp=True)
    data = config.to_dict()
    assert data["strategy"] == "fsdp" and data["fsdp"] is True
    assert StrategyConfig.from_json(config.to_json()).backend == "fsdp"


def test_to_dict_is_json_safe_and_includes_extras() -> None:
    config = StrategyConfig.from_args(
        {"pretrain": "gpt2", "path": Path("/data/x"), "pair": (1, 2), "obj": object()}
    )
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["adam_betas"] == [0.9, 0.95]
    assert data["pretrain"] == "gpt2"
    assert data["path"] == "/data/x"
    assert data["pair"] == [1, 2]  # extra tuples are written as lists (JSON has no tuple)
    assert data["obj"].startswith("<object object")  # unknown objects are written as their str()
    assert list(data)[: len(StrategyConfig.model_fields)] == list(StrategyConfig.model_fields)


def test_files_with_str_and_path(tmp_path: Path) -> None:
    config = _custom()
    json_path, yaml_path = tmp_path / "config.json", tmp_path / "run" / "config.yaml"  # parent is created
    text = config.to_json(json_path)
    assert json_path.read_text() == text
    config.to_yaml(str(yaml_path))
    assert StrategyConfig.from_json(json_path) == config
    assert StrategyConfig.from_json(str(json_path)) == config
    assert StrategyConfig.from_yaml(yaml_path) == config
    assert StrategyConfig.from_yaml(str(yaml_path)) == config


def test_file_without_known_suffix_is_read_when_it_exists(tmp_path: Path) -> None:
    path = tmp_path / "run_config"
    path.write_text("seed: 5\n")
    assert StrategyConfig.from_yaml(str(path)).seed == 5


def test_missing_file_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"cannot read file .*nope\.yaml"):
        StrategyConfig.from_yaml(str(missing))
    with pytest.raises(ConfigError, match=r"cannot read file .*nope\.yaml"):
        StrategyConfig.from_json(missing)


def test_invalid_json_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"from_json: the text is not valid JSON") as caught:
        StrategyConfig.from_json('{"seed": 3,}')
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)


def test_invalid_yaml_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"from_yaml: the text is not valid YAML"):
        StrategyConfig.from_yaml("seed: [1, 2\nzero_stage: 3\n")


def test_yaml_is_loaded_safely() -> None:
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        StrategyConfig.from_yaml("seed: !!python/object/apply:os.system ['echo pwned']\n")


@pytest.mark.parametrize(("loader", "text"), [("from_json", "[1, 2]"), ("from_yaml", "- 1\n- 2\n")])
def test_document_must_be_a_mapping(loader: str, text: str) -> None:
    with pytest.raises(ConfigError, match=r"holds list \[1, 2\], not a mapping"):
        getattr(StrategyConfig, loader)(text)


def test_empty_yaml_gives_defaults() -> None:
    assert StrategyConfig.from_yaml("") == StrategyConfig()


def test_invalid_values_in_documents_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^StrategyConfig.zero_stage=5 is invalid"):
        StrategyConfig.from_yaml("zero_stage: 5\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"^StrategyConfig.seed=None is invalid"):
        StrategyConfig.from_json('{"seed": null}')  # explicit null in a file is not "unset"
    with pytest.raises(ConfigError, match=r"^StrategyConfig.train_batch_size=10 is invalid"):
        StrategyConfig.from_json('{"train_batch_size": 10, "micro_train_batch_size": 4}')
