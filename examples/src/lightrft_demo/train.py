"""The GRPO loop, written once against the Strategy API; the backend and the engine are settings.

The policy is a tiny Llama; the reward is the share of generated tokens that are right (``--task
target``: equal to a target token; ``--task count``: one more than the token before), so a working
loop drives the mean reward from chance (1/vocab) towards 1. Every part of the API takes
part: prepare_models_and_optimizers (actor + frozen reference), the rollout engine (generate, weight
sync, sleep/wake), backward / optimizer_step with accumulation, collectives, save_ckpt / load_ckpt
(resume) and save_model.

Prompts and sampling seeds depend only on (seed, step, rank), so a resumed run draws what the
interrupted one would have drawn.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightrft.config import ConfigError, StrategyConfig
from lightrft.strategy import SamplingParams, get_strategy
from lightrft.testing import make_tiny_llama

from .display import Display, NullDisplay, summary_rows
from .metrics import MetricsLog, plot_reward_curve

__all__ = ["RunResult", "SetupError", "run"]

METRICS = "metrics.jsonl"
PLOT = "reward_curve.png"
CHECKPOINTS = "checkpoints"
MODEL = "model"
CONFIG = "config.yaml"
#: What a previous run leaves in --output-dir.
RUN_FILES = (METRICS, PLOT, CHECKPOINTS, MODEL, CONFIG)
PROMPT_LEN = 2


class SetupError(RuntimeError):
    """The run cannot start (bad configuration, a backend or engine that is not installed, an
    output directory in the way); the message says what to change."""


@dataclass
class RunResult:
    """What a finished run produced (rank 0 has the records; other ranks an empty list)."""

    records: list[dict[str, Any]]
    output_dir: Path
    start_step: int


def sequence_logprobs(
    model: Any, seqs: torch.Tensor, prompt_len: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of log-probabilities of the generated tokens of each sequence (``mask``: 1 for a real
    generated token, 0 for padding after a completion that stopped early)."""
    out = model(seqs)
    logits = (out if torch.is_tensor(out) else out.logits).float()[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, seqs[:, 1:, None]).squeeze(-1)[:, prompt_len - 1 :]
    return (logp * mask).sum(-1) if mask is not None else logp.sum(-1)


def pad_completions(outputs: Any, new_tokens: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + completion per output, right-padded to ``new_tokens`` generated positions, and the
    mask of real generated tokens. Engines stop a completion at its end-of-sequence token (vLLM,
    SGLang), so completions can be shorter than ``new_tokens``."""
    rows, mask = [], []
    for o in outputs:
        gen = list(o.output_token_ids)[:new_tokens]
        pad = new_tokens - len(gen)
        rows.append(list(o.prompt_token_ids) + gen + [pad_id] * pad)
        mask.append([1.0] * len(gen) + [0.0] * pad)
    return torch.tensor(rows), torch.tensor(mask)


def successor(tokens: torch.Tensor, vocab_size: int, eos_token_id: int | None) -> torch.Tensor:
    """The count task's next token: ``t + 1`` modulo the vocabulary, stepping over the end-of-sequence
    id (vLLM and SGLang end a completion there, so a right answer must never be it)."""
    nxt = (tokens + 1) % vocab_size
    if eos_token_id is not None:
        nxt = torch.where(nxt == eos_token_id, (nxt + 1) % vocab_size, nxt)
    return nxt


def count_hits(seqs: torch.Tensor, vocab_size: int, eos_token_id: int | None) -> torch.Tensor:
    """The count task's right positions: a generated token is right when it is the successor of the
    token before it (the prompt's last, for the first one) and has not been generated before in the
    completion. A right count of ``n < vocab_size - 1`` tokens never repeats one, while a short
    cycle (``a, a+1, a, a+1, ...``, which the rule without the repeat clause pays half for) scores
    once per distinct token."""
    gen = seqs[:, PROMPT_LEN:]
    follows = gen == successor(seqs[:, PROMPT_LEN - 1 : -1], vocab_size, eos_token_id)
    n = gen.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)  # earlier[i, j]: j < i
    repeated = ((gen[:, :, None] == gen[:, None, :]) & earlier).any(-1)
    return follows & ~repeated


def task_rewards(
    args: argparse.Namespace, seqs: torch.Tensor, gen_mask: torch.Tensor, eos_token_id: int | None
) -> torch.Tensor:
    """Per sequence, the share of the ``args.new_tokens`` generated positions that are right (a
    completion that stopped early scores its missing positions as misses). ``target``: the token is
    ``args.target_token``; ``count``: ``count_hits``."""
    if args.task == "target":
        hits = seqs[:, PROMPT_LEN:] == args.target_token
    elif args.task == "count":
        hits = count_hits(seqs, args.vocab_size, eos_token_id)
    else:
        raise ValueError(f"task={args.task!r} is invalid: valid tasks are target, count")
    return (hits.float() * gen_mask).sum(-1) / args.new_tokens


def build_policy(args: argparse.Namespace, seed: int) -> Any:
    """The tiny Llama every model of the run starts from (same weights on every rank)."""
    return make_tiny_llama(
        seed, vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers
    )


def _prepare_output_dir(args: argparse.Namespace, out: Path) -> None:
    # Runs on every rank before any rank writes, so all ranks see the same directory state.
    previous = [name for name in RUN_FILES if (out / name).exists()]
    if previous and not (args.resume or args.overwrite):
        raise SetupError(
            f"output_dir={str(out)!r} holds a previous run ({', '.join(previous)}): pass --resume to continue "
            "it, --overwrite to delete it, or another --output-dir"
        )


def _has_checkpoint(ckpt_dir: Path) -> bool:
    return ckpt_dir.is_dir() and any(not p.name.startswith(".") for p in ckpt_dir.iterdir())


def _setup(args: argparse.Namespace) -> Any:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # One optimizer step per iteration: the global batch is every rollout of every rank.
    args.train_batch_size = args.prompts_per_rank * args.group_size * world
    args.rollout_batch_size = args.train_batch_size
    args.micro_rollout_batch_size = args.micro_train_batch_size
    try:
        return get_strategy(args)
    except (ConfigError, ImportError, ValueError) as exc:
        raise SetupError(str(exc)) from exc


def run(args: argparse.Namespace) -> RunResult:
    """Trains ``args.iterations`` GRPO steps (continuing from the last checkpoint with
    ``args.resume``), writing metrics, checkpoints, the reward curve and the final model."""
    started = time.perf_counter()
    out = Path(args.output_dir)
    _prepare_output_dir(args, out)
    strategy = _setup(args)
    rank, rank0 = strategy.get_rank(), strategy.is_rank_0()
    if args.overwrite and rank0:
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    strategy.barrier()
    display = Display() if rank0 else NullDisplay()
    seed = strategy.seed

    actor, reference = build_policy(args, seed), build_policy(args, seed)
    eos_token_id = actor.config.eos_token_id
    (actor, optim, sched), _, _, reference = strategy.prepare_models_and_optimizers(
        actor, None, None, reference, args, max_steps=args.iterations
    )
    ckpt_dir = out / CHECKPOINTS
    start, session = 0, 0
    if args.resume and _has_checkpoint(ckpt_dir):
        path, client_state = strategy.load_ckpt(actor, ckpt_dir)
        start, session = int(client_state["step"]), int(client_state["session"]) + 1
        display.message(f"resumed from {path} at step {start}")
    elif args.resume:
        display.message(f"--resume: no checkpoint in {ckpt_dir} yet, starting at step 0")
    metrics = MetricsLog(out / METRICS)
    records: list[dict[str, Any]] = []
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        records = metrics.restart_at(start)
        _write_config(args, out / CONFIG)
    try:
        strategy.setup_inference_engine(model=build_policy(args, seed))
    except (ImportError, ValueError) as exc:
        raise SetupError(str(exc)) from exc
    strategy.update_engine_weights(actor)  # the engine starts from the (possibly resumed) policy
    display.message(
        f"lightrft-demo: strategy={strategy.config.backend} engine={strategy.config.engine_type} "
        f"world_size={strategy.world_size} accumulation={strategy.accumulated_gradient} "
        f"steps {start + 1}..{args.iterations} -> {out}"
    )
    display.start(total=args.iterations, done=start)
    budget = getattr(args, "time_budget_s", None)
    for it in range(start, args.iterations):
        record = _grpo_step(args, strategy, actor, reference, optim, sched, it, rank, eos_token_id)
        record["session"] = session
        if rank0:
            metrics.append(record)
            records.append(record)
        display.step(record)
        # The slowest rank's clock decides, so every rank stops after the same step.
        out_of_time = (
            budget is not None and strategy.all_reduce(time.perf_counter() - started, "max") > budget
        )
        if (it + 1) % args.save_steps == 0 or it + 1 == args.iterations or out_of_time:
            strategy.save_ckpt(actor, ckpt_dir, client_state={"step": it + 1, "session": session})
        if out_of_time and it + 1 < args.iterations:
            display.message(f"time budget of {budget:g} s reached after step {it + 1} of {args.iterations}")
            break

    strategy.save_model(actor, out / MODEL)
    if rank0 and records:
        plot_reward_curve(records, out / PLOT, title=f"lightrft-demo: {_setup_text(strategy)}")
    display.finish(
        summary_rows(
            records,
            [
                ("setup", _setup_text(strategy)),
                ("skipped steps", f"{strategy.skipped_steps} (non-finite grad norm)"),
                ("metrics", str(out / METRICS)),
                ("reward curve", str(out / PLOT)),
                ("checkpoints", str(ckpt_dir)),
                ("model", str(out / MODEL)),
            ],
        )
    )
    strategy.shutdown()
    return RunResult(records=records, output_dir=out, start_step=start)


def _setup_text(strategy: Any) -> str:
    cfg = strategy.config
    backend = cfg.backend + (f" ZeRO-{cfg.zero_stage}" if cfg.backend == "deepspeed" else "")
    return f"{backend}, engine {cfg.engine_type}, {strategy.world_size} rank(s)"


def _grpo_step(
    args: argparse.Namespace,
    strategy: Any,
    actor: Any,
    reference: Any,
    optim: Any,
    sched: Any,
    it: int,
    rank: int,
    eos_token_id: int | None = None,
) -> dict[str, Any]:
    """One iteration: rollouts, rewards, group-normalised advantages, one optimizer step, weight sync."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(strategy.seed * 1_000_003 + it * 1009 + rank)
    prompts = torch.randint(0, args.vocab_size, (args.prompts_per_rank, PROMPT_LEN), generator=g).tolist()
    sp = SamplingParams(
        max_new_tokens=args.new_tokens,
        temperature=1.0,
        n=args.group_size,
        seed=strategy.seed + it * 100 + rank,
    )
    outputs = strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=sp)
    t_gen = time.perf_counter() - t0
    strategy.maybe_sleep_inference_engine()  # the engine's memory goes back to training
    seqs, gen_mask = pad_completions(outputs, args.new_tokens)
    new_tokens = int(gen_mask.sum())
    rewards = task_rewards(args, seqs, gen_mask, eos_token_id)
    grouped = rewards.view(-1, args.group_size)
    adv = ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-4)).view(-1)

    t1 = time.perf_counter()
    norm, losses, kls = None, [], []
    for start in range(0, len(seqs), args.micro_train_batch_size):
        mb = seqs[start : start + args.micro_train_batch_size].to(strategy.device)
        mb_mask = gen_mask[start : start + args.micro_train_batch_size].to(strategy.device)
        logp = sequence_logprobs(actor, mb, PROMPT_LEN, mb_mask)
        with torch.no_grad():
            ref_logp = sequence_logprobs(reference, mb, PROMPT_LEN, mb_mask)
        kl = logp - ref_logp
        loss = -(adv[start : start + len(mb)].to(logp.device) * logp).mean() + args.kl_coef * (kl**2).mean()
        strategy.backward(loss, actor, optim)
        norm = strategy.optimizer_step(optim, actor, sched) or norm
        losses.append(float(loss.detach()))
        kls.append(float(kl.detach().mean()) / (seqs.shape[1] - PROMPT_LEN))
    t_train = time.perf_counter() - t1

    t2 = time.perf_counter()
    strategy.update_engine_weights(actor)  # wakes the engine and pushes the new policy
    t_sync = time.perf_counter() - t2

    mean = strategy.all_reduce(
        {"reward": float(rewards.mean()), "loss": sum(losses) / len(losses), "kl": sum(kls) / len(kls)},
        "mean",
    )
    total_tokens = strategy.all_reduce(float(new_tokens), "sum")
    slowest = strategy.all_reduce({"gen": t_gen, "sync": t_sync, "train": t_train}, "max")
    return {
        "step": it + 1,
        "reward": mean["reward"],
        "loss": mean["loss"],
        "kl": mean["kl"],
        "grad_norm": float(norm) if norm is not None else None,
        "tokens": int(total_tokens),
        "tokens_per_s": total_tokens / max(slowest["gen"], 1e-9),
        "gen_s": slowest["gen"],
        "train_s": slowest["train"],
        "sync_s": slowest["sync"],
        "iter_s": time.perf_counter() - t0,
        "time": time.time(),
    }


def _write_config(args: argparse.Namespace, path: Path) -> None:
    """The resolved options as a --config document (rerun with ``lightrft-demo --config``)."""
    import yaml

    doc = StrategyConfig.from_args(args).to_dict()
    # Batch sizes follow from the world size at start; run switches are not part of a configuration.
    for key in (
        "config",
        "resume",
        "overwrite",
        "train_batch_size",
        "rollout_batch_size",
        "micro_rollout_batch_size",
    ):
        doc.pop(key, None)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
