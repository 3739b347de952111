"""lightrft-demo's --preset, --task count and --time-budget-s (the GPU preset's real run is made on a
GPU by scripts/gpu/demo-preset.py; here its options, its reward and a shrunk run on CPU)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from lightrft.config import StrategyConfig
from lightrft_demo import read_metrics
from lightrft_demo.cli import PRESETS, DemoOptionError, parse_options
from lightrft_demo.train import PROMPT_LEN, count_hits, run, successor, task_rewards


def test_gpu_preset_values_are_applied_and_form_a_valid_configuration() -> None:
    args = parse_options(["--preset", "gpu"])
    for name, value in PRESETS["gpu"].items():
        assert getattr(args, name) == value, name
    assert (args.strategy, args.engine_type, args.task, args.bf16) == ("fsdp", "vllm", "count", True)
    # What the demo's _setup derives on one rank, then StrategyConfig's own cross-field checks.
    args.train_batch_size = args.rollout_batch_size = args.prompts_per_rank * args.group_size
    assert args.train_batch_size % args.micro_train_batch_size == 0
    config = StrategyConfig.from_args(args)
    assert (config.backend, config.engine_type, config.engine_mem_util) == ("fsdp", "vllm", 0.3)
    # hidden 512 over make_tiny_llama's 4 heads: head_dim 128, which vLLM's and SGLang's GPU kernels take.
    assert args.hidden_size // 4 == 128


def test_command_line_and_config_document_override_the_preset(tmp_path: Path) -> None:
    args = parse_options(["--preset", "gpu", "--engine", "sglang", "--iterations", "7"])
    assert (args.engine_type, args.iterations, args.hidden_size) == ("sglang", 7, 512)
    doc = tmp_path / "run.yaml"
    doc.write_text("preset: gpu\nnum_layers: 2\n")
    args = parse_options(["--config", str(doc)])
    assert (args.task, args.num_layers, args.vocab_size) == ("count", 2, 32)  # preset < document
    assert parse_options(["--config", str(doc), "--num-layers", "3"]).num_layers == 3  # < command line
    doc.write_text("preset: huge\n")
    with pytest.raises(DemoOptionError, match=r"preset='huge' is invalid: valid presets are gpu"):
        parse_options(["--config", str(doc)])
    for bad in (["--preset", "cpu"], ["--task", "sort"]):  # argparse names the valid choices
        with pytest.raises(SystemExit):
            parse_options(bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--time-budget-s", "-1"], r"time_budget_s=-1.0 is invalid: .* >= 0"),
        (["--task", "count", "--target-token", "99"], None),  # the target is not used by the count task
    ],
)
def test_demo_option_checks(argv: list[str], message: str | None) -> None:
    if message is None:
        assert parse_options(argv).task == "count"
    else:
        with pytest.raises(DemoOptionError, match=message):
            parse_options(argv)


def test_successor_steps_over_the_end_of_sequence_id() -> None:
    tokens = torch.tensor([0, 1, 2, 30, 31])
    assert successor(tokens, 32, eos_token_id=2).tolist() == [1, 3, 3, 31, 0]
    assert successor(tokens, 32, eos_token_id=None).tolist() == [1, 2, 3, 31, 0]
    assert successor(torch.tensor([1]), 32, eos_token_id=0).tolist() == [2]
    assert successor(torch.tensor([31]), 32, eos_token_id=0).tolist() == [1]  # 31 -> 0 is eos -> 1


def test_task_rewards_count_the_right_positions() -> None:
    args = argparse.Namespace(task="count", vocab_size=32, new_tokens=4, target_token=3)
    assert PROMPT_LEN == 2
    seqs = torch.tensor(
        [
            [7, 0, 1, 3, 4, 5],  # counting on from 0: 1, 3 (over eos 2), 4, 5: all 4 right
            [7, 30, 31, 0, 9, 2],  # 31, 0 right (over the wrap), then 9 and 2 wrong
            [7, 30, 31, 9, 10, 11],  # a slip at 9, then 10, 11 count on from it: 3 of 4
            [5, 5, 6, 0, 0, 0],  # stopped after 2 tokens: 6 right, 0 wrong, the rest padding
            [7, 9, 10, 9, 10, 9],  # a 2-cycle: 10 right once, its repeat is not
        ]
    )
    mask = torch.tensor([[1.0] * 4] * 3 + [[1.0, 1.0, 0.0, 0.0], [1.0] * 4])
    assert count_hits(seqs, 32, eos_token_id=2)[4].tolist() == [True, False, False, False]
    assert task_rewards(args, seqs, mask, eos_token_id=2).tolist() == [1.0, 0.5, 0.75, 0.25, 0.25]
    args.task = "target"
    assert task_rewards(args, seqs, mask, eos_token_id=2).tolist() == [0.25, 0.0, 0.0, 0.0, 0.0]


def test_time_budget_stops_after_one_step_and_finishes_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # A budget of 0 s is spent once the first step ends: the run stops there, as at its end.
    argv = ["--iterations", "5", "--save-steps", "4", "--time-budget-s", "0", "--output-dir", str(out)]
    result = run(parse_options(argv))
    assert (
        [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1] == [r["step"] for r in result.records]
    )
    assert sorted(p.name for p in (out / "checkpoints").glob("global_step*")) == ["global_step1"]
    assert (out / "model" / "config.json").is_file()
    assert (out / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_preset_shrunk_to_cpu_learns_the_count_task(tmp_path: Path) -> None:
    # The preset's task and loop on FakeStrategy with a small policy and a high learning rate (the
    # same override scripts/gpu/demo-preset.py --device cpu uses). Measured here: the 5-step means
    # went 0.030 -> 0.119 in 30 steps. At chance (1/32 per token) a sequence's reward (hits / 8) has
    # variance 8 x (1/32) x (31/32) / 64 = 0.0038, so a step's mean over 32 sequences has a standard
    # deviation of 0.011 and a 5-step mean 0.005: a rise of 0.05 is 10 of those, and half the rise seen.
    out = tmp_path / "count"
    argv = ["--preset", "gpu", "--strategy", "fake", "--engine", "hf", "--no-bf16", "--hidden-size", "32",
            "--num-layers", "1", "--prompts-per-rank", "4", "--group-size", "8", "--new-tokens", "8",
            "--micro_train_batch_size", "16", "--actor_learning_rate", "2e-2", "--iterations", "30",
            "--save-steps", "30", "--output-dir", str(out)]  # fmt: skip
    records = run(parse_options(argv)).records
    rewards = [r["reward"] for r in records]
    assert len(rewards) == 30 and all(r["tokens"] <= 4 * 8 * 8 for r in records)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.06 and last > first + 0.05, [round(x, 3) for x in rewards]
