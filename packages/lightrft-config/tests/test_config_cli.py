"""add_arguments -> parse_args -> from_args gives back the same config."""

from __future__ import annotations

import argparse
import json
import typing

import pytest

from lightrft.config import StrategyConfig


def _parser() -> argparse.ArgumentParser:
    return StrategyConfig.add_arguments(argparse.ArgumentParser(prog="train"))


def _argv(config: StrategyConfig) -> list[str]:
    """The command line that describes `config` (every declared field, explicitly)."""
    argv: list[str] = []
    for name, value in config.to_dict().items():
        if name not in StrategyConfig.model_fields or value is None:
            continue
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, list):
            argv += [f"--{name}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{name}", json.dumps(value)]
        else:
            argv += [f"--{name}", str(value)]
    return argv


def test_every_field_gets_an_option() -> None:
    parser = _parser()
    options = {s for action in parser._actions for s in action.option_strings}
    for name in StrategyConfig.model_fields:
        assert f"--{name}" in options


def test_no_arguments_gives_the_defaults() -> None:
    args = _parser().parse_args([])
    assert args.seed == 42 and args.bf16 is True and args.strategy is None
    assert StrategyConfig.from_args(args) == StrategyConfig()


def test_round_trip_of_a_customized_config() -> None:
    config = StrategyConfig(
        strategy="fake",
        seed=0,
        max_norm=0.0,
        micro_train_batch_size=2,
        train_batch_size=64,
        bf16=False,
        zero_stage=3,
        zpg=2,
        fsdp_shard_size=4,
        fsdp_reshard_after_forward=False,
        no_split_modules=["Block", "Attention"],
        gradient_checkpointing=True,
        grad_accum_dtype="fp32",
        deepspeed_config={"steps_per_print": 1, "zero_optimization": {"stage": 3}},
        engine_type="sglang",
        engine_mem_util=0.75,
        adam_betas=(0.8, 0.9),
        actor_learning_rate=5e-7,
        lr_scheduler="constant_with_warmup",
        critic_pretrain="gpt2",
        max_ckpt_mem=12.5,
    )
    argv = _argv(config)
    assert "--no-bf16" in argv and "--no_split_modules" in argv
    parsed = StrategyConfig.from_args(_parser().parse_args(argv))
    assert parsed == config
    assert parsed.adam_betas == (0.8, 0.9)
    assert parsed.deepspeed_config == {"steps_per_print": 1, "zero_optimization": {"stage": 3}}


def test_round_trip_of_the_defaults_written_out() -> None:
    assert StrategyConfig.from_args(_parser().parse_args(_argv(StrategyConfig()))) == StrategyConfig()


def test_legacy_fsdp_flag_on_the_command_line() -> None:
    config = StrategyConfig.from_args(_parser().parse_args(["--fsdp"]))
    assert config.backend == "fsdp"
    assert config == StrategyConfig(fsdp=True)


def test_options_the_script_already_defines_are_kept() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1234, help="the script's own seed")
    parser.add_argument("--fsdp", action="store_true", default=False)  # the seed repo's legacy flag
    parser.add_argument("--zero-stage", dest="zero_stage", type=int, default=3)
    returned = StrategyConfig.add_arguments(parser)
    assert returned is parser
    StrategyConfig.add_arguments(parser)  # adding twice is harmless too
    args = parser.parse_args(["--fsdp"])
    assert args.seed == 1234
    assert args.zero_stage == 3
    config = StrategyConfig.from_args(args)
    assert (config.seed, config.zero_stage, config.backend) == (1234, 3, "fsdp")


def test_prefix() -> None:
    parser = StrategyConfig.add_arguments(argparse.ArgumentParser(), prefix="--strategy.")
    args = parser.parse_args(["--strategy.seed", "5", "--no-strategy.bf16"])
    config = StrategyConfig.from_args(args)
    assert config.seed == 5 and config.bf16 is False


@pytest.mark.parametrize(
    "argv",
    [
        ["--grad_accum_dtype", "fp8"],
        ["--lr_scheduler", "cosine"],
        ["--deepspeed_config", "{not json"],
        ["--deepspeed_config", "[1, 2]"],
        ["--adam_betas", "0.9"],
        ["--seed", "abc"],
    ],
)
def test_bad_command_lines_are_rejected_by_argparse(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_help_shows_docstring_default_and_choices() -> None:
    text = _parser().format_help()
    assert "StrategyConfig options" in text
    assert "0 disables clipping. (default: 1.0)" in " ".join(text.split())
    assert "(default: deepspeed, or fsdp with --fsdp)" in " ".join(text.split())
    assert "{fp32,bf16,fp16}" in text
    assert "--bf16, --no-bf16" in text


def test_option_kinds_follow_field_types() -> None:
    actions = {action.dest: action for action in _parser()._actions}
    assert isinstance(actions["bf16"], argparse.BooleanOptionalAction)
    assert actions["adam_betas"].nargs == 2 and actions["adam_betas"].type is float
    assert actions["no_split_modules"].nargs == "*"
    assert actions["lr_scheduler"].choices == list(
        typing.get_args(StrategyConfig.model_fields["lr_scheduler"].annotation)
    )
    assert actions["zero_stage"].type is int
