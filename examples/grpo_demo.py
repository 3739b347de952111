"""A GRPO loop written once against the Strategy API; the backend is one flag.

The policy is a tiny causal LM; the reward is the share of generated tokens equal to a target
token, so a working loop drives the mean reward from chance (1/vocab) towards 1. Every part of
the API takes part: prepare_models_and_optimizers (actor + frozen reference), the rollout engine
(generate, weight sync, sleep/wake), backward / optimizer_step with accumulation, collectives,
save_ckpt and save_model.

    uv run python examples/grpo_demo.py --strategy fake
    uv run torchrun --standalone --nproc-per-node 2 examples/grpo_demo.py --strategy fsdp
    uv run torchrun --standalone --nproc-per-node 2 examples/grpo_demo.py --strategy deepspeed --zero_stage 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from lightrft.strategy import SamplingParams, get_strategy
from lightrft.strategy.config import StrategyConfig
from lightrft.testing import TinyConfig, make_tiny_model

TARGET = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--prompts_per_rank", type=int, default=4)
    parser.add_argument("--group_size", type=int, default=8, help="samples per prompt (the GRPO group)")
    parser.add_argument("--new_tokens", type=int, default=6)
    parser.add_argument("--kl_coef", type=float, default=0.01)
    parser.add_argument("--save_dir", default=None, help="checkpoint / model directory (default: a temp dir)")
    StrategyConfig.add_arguments(parser)
    parser.set_defaults(
        strategy="fake", bf16=False, actor_learning_rate=3e-3, micro_train_batch_size=8, max_norm=1.0,
        lr_warmup_ratio=0.0, lr_scheduler="constant_with_warmup", engine_type="fake", zero_stage=2,
    )  # fmt: skip
    args = parser.parse_args()
    # One optimizer step per iteration: the global batch is every rollout of every rank.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.train_batch_size = args.prompts_per_rank * args.group_size * world
    args.rollout_batch_size = args.train_batch_size
    args.micro_rollout_batch_size = args.micro_train_batch_size
    return args


def sequence_logprobs(model, seqs: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Sum of log-probabilities of the generated tokens of each sequence."""
    out = model(seqs)
    logits = (out if torch.is_tensor(out) else out.logits).float()[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, seqs[:, 1:, None]).squeeze(-1)
    return logp[:, prompt_len - 1 :].sum(-1)


def main() -> None:
    args = parse_args()
    strategy = get_strategy(args)
    rank = strategy.get_rank()
    model_cfg = TinyConfig(vocab_size=16, hidden_size=32, num_layers=2)
    actor, reference = make_tiny_model(0, model_cfg), make_tiny_model(0, model_cfg)
    (actor, optim, sched), _, _, reference = strategy.prepare_models_and_optimizers(
        actor, None, None, reference, args, max_steps=args.iterations
    )
    engine_model = make_tiny_model(0, model_cfg)
    strategy.setup_inference_engine(model=engine_model)
    strategy.update_engine_weights(actor)
    save_dir = args.save_dir or strategy.broadcast_object(
        tempfile.mkdtemp(prefix="grpo-demo-") if strategy.is_rank_0() else None
    )
    strategy.print(
        f"GRPO demo: strategy={strategy.config.backend} world_size={strategy.world_size} "
        f"accumulation={strategy.accumulated_gradient} engine={strategy.config.engine_type}"
    )
    g = torch.Generator().manual_seed(1000 + rank)
    first = last = 0.0
    for it in range(args.iterations):
        t0 = time.time()
        prompts = torch.randint(0, model_cfg.vocab_size, (args.prompts_per_rank, 2), generator=g).tolist()
        sp = SamplingParams(
            max_new_tokens=args.new_tokens, temperature=1.0, n=args.group_size, seed=it * 100 + rank
        )
        outputs = strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=sp)
        strategy.maybe_sleep_inference_engine()  # the engine's memory goes back to training
        seqs = torch.tensor([o.prompt_token_ids + o.output_token_ids for o in outputs])
        rewards = (seqs[:, 2:] == TARGET).float().mean(-1)
        grouped = rewards.view(-1, args.group_size)
        adv = ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-4)).view(-1)
        norm = None
        for start in range(0, len(seqs), args.micro_train_batch_size):
            mb = seqs[start : start + args.micro_train_batch_size].to(strategy.device)
            logp = sequence_logprobs(actor, mb, 2)
            with torch.no_grad():
                ref_logp = sequence_logprobs(reference, mb, 2)
            kl = logp - ref_logp
            loss = (
                -(adv[start : start + len(mb)].to(logp.device) * logp).mean() + args.kl_coef * (kl**2).mean()
            )
            strategy.backward(loss, actor, optim)
            norm = strategy.optimizer_step(optim, actor, sched) or norm
        strategy.update_engine_weights(actor)  # wakes the engine and pushes the new policy
        mean_reward = strategy.all_reduce(float(rewards.mean()), "mean")
        first = mean_reward if it == 0 else first
        last = mean_reward
        strategy.print(
            f"iter {it:3d}  reward {mean_reward:.3f}  grad_norm {norm:.3f}  {time.time() - t0:.2f}s"
        )
    ckpt = strategy.save_ckpt(actor, os.path.join(save_dir, "checkpoints"), client_state={"reward": last})
    strategy.save_model(actor, os.path.join(save_dir, "model"))
    strategy.print(
        f"reward {first:.3f} -> {last:.3f}; checkpoint {ckpt}; model {os.path.join(save_dir, 'model')}"
    )
    strategy.print(f"skipped steps (non-finite norm): {strategy.skipped_steps}")
    strategy.shutdown()
    if last <= first:
        raise SystemExit("the reward did not improve")


if __name__ == "__main__":
    main()
