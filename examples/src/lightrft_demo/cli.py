"""``lightrft-demo``: options, the ``--config`` document, and torchrun when more than one process runs.

    lightrft-demo                                   # FakeStrategy, one process
    lightrft-demo --strategy fsdp --nproc 2         # starts torchrun with 2 ranks (gloo on CPU)
    lightrft-demo --strategy deepspeed --nproc 2 --zero_stage 3
    lightrft-demo --config run.yaml --resume        # StrategyConfig fields + demo options in YAML
    lightrft-demo --nnodes 2 --node-rank 0 --rdzv-endpoint host0:29400 --nproc 8   # on every node
    lightrft-demo --preset gpu --engine vllm       # one GPU: a harder task that learns over minutes

Precedence: built-in defaults < ``--preset`` < ``--config`` document < command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from lightrft.config import ConfigError, StrategyConfig

__all__ = ["DemoOptionError", "build_parser", "main", "parse_options", "torchrun_command"]

#: StrategyConfig values the demo starts from (a tiny policy learns fast at this learning rate).
STRATEGY_DEFAULTS: dict[str, Any] = {
    "strategy": "fake",
    "engine_type": "hf",
    "bf16": False,
    "actor_learning_rate": 6e-3,
    "micro_train_batch_size": 8,
    "max_norm": 1.0,
    "lr_warmup_ratio": 0.0,
    "lr_scheduler": "constant_with_warmup",
    "zero_stage": 2,
    "max_ckpt_num": 2,
}

#: Named sets of option values (keyed by option dest), applied over the built-in defaults and under
#: ``--config`` and the command line.
PRESETS: dict[str, dict[str, Any]] = {
    # One GPU: the "count" task (16 tokens, each one more than the token before, none repeated)
    # has 31 transitions to learn, each from 1/32 chance, where the one-token "target" task reached
    # reward 1.0 after ~5 of 20 steps on an H200. On CPU (FakeStrategy, hidden 256 x 2 layers, lr
    # 5e-4, fp32) the count task left chance at step ~20 and rose 0.02 per step by step 30; this
    # wider and deeper policy takes a lower learning rate (Adam's step in function space grows with
    # the width) so that the rise spreads over the run. hidden 512: head_dim 128, which both
    # engines' GPU attention kernels take; bf16 as the engines run.
    "gpu": {
        "strategy": "fsdp",
        "engine_type": "vllm",
        "bf16": True,
        "task": "count",
        "vocab_size": 32,
        "hidden_size": 512,
        "num_layers": 4,
        "prompts_per_rank": 16,
        "group_size": 16,
        "new_tokens": 16,
        "micro_train_batch_size": 64,
        "actor_learning_rate": 2e-4,
        "kl_coef": 0.0,
        "iterations": 300,
        "save_steps": 100,
        "engine_mem_util": 0.3,
    },
}

#: What the reward counts (``train.task_rewards``).
TASKS = ("target", "count")

#: Demo options that must be integers >= the given minimum.
_MIN_INT = {
    "iterations": 1,
    "prompts_per_rank": 1,
    "group_size": 2,
    "new_tokens": 1,
    "save_steps": 1,
    "vocab_size": 2,
    "hidden_size": 4,
    "num_layers": 1,
    "nproc": 1,
    "nnodes": 1,
    "node_rank": 0,
}


class DemoOptionError(ValueError):
    """A demo option (command line or ``--config`` document) is invalid."""


def build_parser() -> argparse.ArgumentParser:
    """The parser: demo options, launch options, then one option per StrategyConfig field."""
    parser = argparse.ArgumentParser(
        prog="lightrft-demo",
        description="GRPO on a tiny policy through the LightRFT Strategy API: the reward is the share of "
        "generated tokens equal to --target-token, so it rises from chance towards 1.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo = parser.add_argument_group("demo")
    demo.add_argument("--config", metavar="FILE.yaml", help="YAML: StrategyConfig fields and demo options")
    demo.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="a named set of option values under --config and the command line; "
                      "gpu: FSDP + vLLM on one GPU, the count task, a 4-layer policy, 300 steps")  # fmt: skip
    demo.add_argument("--task", choices=TASKS, default="target",
                      help="target: reward = share of tokens equal to --target-token; count: share of positions i "
                      "holding the prompt's last token + i + 1 (mod --vocab-size, skipping the end-of-sequence "
                      "id) (default: %(default)s)")  # fmt: skip
    demo.add_argument("--time-budget-s", "--time_budget_s", dest="time_budget_s", type=float, default=None,
                      help="stop after the first step that ends later than S seconds after the run started "
                      "(checkpoint, model and curve are written as at the end)")  # fmt: skip
    demo.add_argument(
        "--strategy", help="training backend: fake (one process), fsdp, deepspeed or another registered name"
    )
    demo.add_argument(
        "--engine", dest="engine_type", help="rollout engine: hf, vllm, sglang (StrategyConfig.engine_type)"
    )
    demo.add_argument("--output-dir", "--output_dir", dest="output_dir", default="lightrft-demo-output",
                      help="checkpoints, metrics.jsonl, reward_curve.png, model/ (default: %(default)s)")  # fmt: skip
    demo.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --output-dir"
    )
    demo.add_argument("--overwrite", action="store_true", help="delete a previous run in --output-dir first")
    demo.add_argument("--iterations", type=int, default=25, help="optimizer steps (default: %(default)s)")
    demo.add_argument(
        "--prompts-per-rank", "--prompts_per_rank", dest="prompts_per_rank", type=int, default=4
    )
    demo.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=8,
                      help="samples per prompt, the GRPO group (default: %(default)s)")  # fmt: skip
    demo.add_argument("--new-tokens", "--new_tokens", dest="new_tokens", type=int, default=6)
    demo.add_argument("--kl-coef", "--kl_coef", dest="kl_coef", type=float, default=0.01)
    demo.add_argument("--save-steps", "--save_steps", dest="save_steps", type=int, default=5,
                      help="checkpoint every N steps and at the end (default: %(default)s)")  # fmt: skip
    demo.add_argument("--target-token", "--target_token", dest="target_token", type=int, default=3)
    demo.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=int, default=16)
    demo.add_argument("--hidden-size", "--hidden_size", dest="hidden_size", type=int, default=32,
                      help="policy width; use >= 256 (head_dim 64) with vllm / sglang (default: %(default)s)")  # fmt: skip
    demo.add_argument("--num-layers", "--num_layers", dest="num_layers", type=int, default=2)
    demo.add_argument("--multimodal", action="store_true",
                      help="the visual task instead: a tiny vision-language policy names the colour of an "
                      "image (reward 1 when right; hf engine)")  # fmt: skip
    demo.add_argument("--mm-lr", "--mm_lr", dest="mm_lr", type=float, default=3e-3,
                      help="learning rate of --multimodal (default: %(default)s)")  # fmt: skip

    launch = parser.add_argument_group("launch (torchrun starts when --nproc or --nnodes is above 1)")
    launch.add_argument("--nproc", type=int, default=1, help="processes per node (default: %(default)s)")
    launch.add_argument("--nnodes", type=int, default=1, help="nodes (default: %(default)s)")
    launch.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=None,
                        help="this node's rank (static rendezvous); omit with c10d")  # fmt: skip
    launch.add_argument("--rdzv-backend", "--rdzv_backend", dest="rdzv_backend", default="c10d")
    launch.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint", default=None,
                        help="host:port of the rendezvous, same on every node (needed with --nnodes > 1)")  # fmt: skip
    launch.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id", default="lightrft-demo")
    StrategyConfig.add_arguments(parser)
    parser.set_defaults(**STRATEGY_DEFAULTS)
    return parser


def parse_options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line over the ``--config`` document over the defaults and checks the
    demo options; StrategyConfig fields are checked by StrategyConfig itself."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    document = config_defaults(parser, pre.config) if pre.config else {}
    preset = pre.preset if pre.preset is not None else document.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise DemoOptionError(
                f"preset={preset!r} is invalid: valid presets are {', '.join(sorted(PRESETS))}"
            )
        parser.set_defaults(**PRESETS[preset])
    parser.set_defaults(**document)
    args = parser.parse_args(argv)
    check_options(args)
    return args


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The values of a ``--config`` YAML document, keyed by option dest. StrategyConfig validates its
    fields (errors name the field and what is valid); other keys must be demo or launch options."""
    config = StrategyConfig.from_yaml(path)
    values = {name: getattr(config, name) for name in config.model_fields_set}
    extra = dict(config.model_extra or {})
    known = {a.dest for a in parser._actions} - {"help", "config"}
    unknown = sorted(set(extra) - known)
    if unknown:
        demo_names = sorted(known - set(StrategyConfig.model_fields))
        raise DemoOptionError(
            f"--config {path}: unknown key(s) {', '.join(repr(k) for k in unknown)}: neither StrategyConfig "
            f"fields nor demo options; demo options are {', '.join(demo_names)}"
        )
    values.update(extra)
    return values


def check_options(args: argparse.Namespace) -> None:
    """Raises DemoOptionError naming the option, its value and what is valid."""
    for name, low in _MIN_INT.items():
        value = getattr(args, name)
        if name == "node_rank" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DemoOptionError(f"{name}={value!r} is invalid: it must be an integer >= {low}")
    if args.task not in TASKS:
        raise DemoOptionError(f"task={args.task!r} is invalid: valid tasks are {', '.join(TASKS)}")
    budget = args.time_budget_s
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0
    ):
        raise DemoOptionError(f"time_budget_s={budget!r} is invalid: it must be a number of seconds >= 0")
    if not isinstance(args.kl_coef, (int, float)) or args.kl_coef < 0:
        raise DemoOptionError(f"kl_coef={args.kl_coef!r} is invalid: it must be a number >= 0")
    if args.task == "target" and not 0 <= args.target_token < args.vocab_size:
        raise DemoOptionError(
            f"target_token={args.target_token!r} is invalid: it must be a token id in 0..{args.vocab_size - 1} "
            f"(vocab_size={args.vocab_size})"
        )
    if args.resume and args.overwrite:
        raise DemoOptionError("--resume and --overwrite contradict each other: pass one of them")
    if args.strategy == "fake" and (args.nproc > 1 or args.nnodes > 1):
        raise DemoOptionError(
            f"strategy='fake' runs in one process, so nproc={args.nproc} / nnodes={args.nnodes} is invalid: "
            "use --nproc 1, or --strategy fsdp / deepspeed for several processes"
        )
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise DemoOptionError(
            f"nnodes={args.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node; with the static "
            "backend also --node-rank)"
        )


#: The ranks torchrun starts read the launcher's arguments from here: passed on torchrun's command
#: line, options such as --nproc would be taken (as abbreviations) by torchrun's own parser.
ARGV_ENV = "LIGHTRFT_DEMO_ARGV"


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """The torchrun command that starts ``--nproc`` ranks of this program on this node (they read
    the options from the ``LIGHTRFT_DEMO_ARGV`` environment variable)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
    if args.nnodes == 1 and not args.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += ["--nnodes", str(args.nnodes), "--rdzv-backend", args.rdzv_backend]
        cmd += ["--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id]
        if args.node_rank is not None:
            cmd += ["--node-rank", str(args.node_rank)]
    return cmd + ["-m", "lightrft_demo"]


def _under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightrft-demo``; returns the exit status."""
    if argv is None:
        argv = (
            json.loads(os.environ[ARGV_ENV]) if _under_launcher() and ARGV_ENV in os.environ else sys.argv[1:]
        )
    argv = list(argv)
    try:
        args = parse_options(argv)
    except (DemoOptionError, ConfigError) as exc:
        print(f"lightrft-demo: error: {exc}", file=sys.stderr)
        return 2
    if (args.nproc > 1 or args.nnodes > 1) and not _under_launcher():
        cmd = torchrun_command(args)
        print("lightrft-demo: starting", shlex.join(cmd[2:]), file=sys.stderr, flush=True)
        env = {
            **os.environ,
            ARGV_ENV: json.dumps(argv),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        # Replace this process: signals (Ctrl-C, SIGTERM from a scheduler) reach torchrun directly.
        os.execve(cmd[0], cmd, env)
    # The policy is tiny: one thread per process is the fastest, and more threads spin against each
    # other (and against other jobs) on a shared machine: the defaults took 440 s of wall time and
    # 124 s of CPU with torch's default threads on a loaded 2-core machine, 56 s and 19 s with one.
    # An explicit OMP_NUM_THREADS wins. Set before torch is imported (train imports it).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # vLLM logs at INFO on every weight push (reload time, prefix-cache reset; on CPU also a rotary
    # warning), which breaks the progress display: errors only, unless the user chose a level.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from .train import SetupError, run

    if args.multimodal:
        from .multimodal import run_multimodal

        run_multimodal(args)
        return 0
    try:
        run(args)
    except SetupError as exc:
        print(f"lightrft-demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
