"""``lightrft-demo --multimodal``: GRPO on a tiny vision-language policy with a toy visual task.

Each prompt is an image of one colour (red, green, blue or yellow; a little noise, so no two are
equal) and the words "name the colour :"; the policy answers with one token and the reward is 1
when that token is the colour's name. The engine samples among the four colour names only (the
other tokens are suppressed), so a policy that ignores the image scores 1/4 on average and one
that reads it scores 1: the mean reward rises from about 0.25 towards 1 when the image reaches
the policy through training, the weight push (vision tower included) and multimodal generation.

Every rollout goes through ``strategy.gather_and_generate`` in LightRFT's form (texts and token
ids, flat images with ``images_num``); the policy is ``lightrft.testing.make_tiny_vlm`` (Gemma 3:
SigLIP vision tower + Gemma 3 decoder, ~0.2 M parameters), trained by any strategy; the rollout
engine is the embedded ``hf`` engine. Writes ``multimodal_metrics.jsonl`` (one line per step) in
``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_multimodal"]

METRICS = "multimodal_metrics.jsonl"
COLOURS = ("red", "green", "blue", "yellow")


def _colour_tokens(tokenizer: Any) -> list[int]:
    ids = [tokenizer.encode(" " + c) for c in COLOURS]
    if any(len(i) != 1 for i in ids):
        raise RuntimeError(f"the demo tokenizer must encode each colour as one token; got {ids}")
    return [i[0] for i in ids]


def _answer_logprobs(
    actor: Any,
    processor: Any,
    prompt: str,
    images: list[Any],
    tokens: torch.Tensor,
    allowed: list[int],
    device: Any,
) -> torch.Tensor:
    """log p(token | image, prompt) under the policy as the engine samples it (the distribution
    renormalised over the ``allowed`` tokens), one per (image, token) pair."""
    batch = processor(text=[prompt] * len(images), images=[[im] for im in images], return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    out = actor(**batch)
    logits = (out if torch.is_tensor(out) else out.logits)[:, -1].float()[:, allowed]
    index = torch.tensor([allowed.index(int(t)) for t in tokens], device=logits.device)
    return torch.log_softmax(logits, -1).gather(-1, index[:, None]).squeeze(-1)


def run_multimodal(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Trains ``args.iterations`` GRPO steps on the colour task; returns rank 0's per-step records
    (``step``, ``reward`` (mean over the step's samples), ``loss``, ``seconds``)."""
    from lightrft.strategy import SamplingParams, get_strategy
    from lightrft.testing import IMAGE_PLACEHOLDER, make_color_image, make_tiny_vlm

    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.engine_type = "hf"
    args.train_batch_size = args.prompts_per_rank * args.group_size * world
    args.micro_train_batch_size = args.prompts_per_rank * args.group_size
    strategy = get_strategy(args)
    rank, rank0 = strategy.get_rank(), strategy.is_rank_0()
    model, processor = make_tiny_vlm(seed=strategy.seed)
    engine_model = __import__("copy").deepcopy(model)
    actor = strategy.prepare_model(model, is_training=True)
    optim = strategy.create_optimizer(actor, lr=args.mm_lr, betas=(0.9, 0.95), weight_decay=0.0)
    actor, optim, _ = strategy.prepare((actor, optim, None))
    strategy.setup_inference_engine(model=engine_model, tokenizer=processor)
    tok = processor.tokenizer
    allowed = _colour_tokens(tok)
    suppress = [i for i in range(len(tok)) if i not in allowed]
    prompt = f"{IMAGE_PLACEHOLDER} name the colour :"
    prompt_ids = tok.encode(prompt)
    out = Path(args.output_dir)
    records: list[dict[str, Any]] = []
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS).write_text("")
        print(
            f"lightrft-demo --multimodal: strategy={strategy.config.backend} engine=hf world_size={world} "
            f"{args.iterations} steps, {args.prompts_per_rank} images x {args.group_size} samples per rank",
            flush=True,
        )
    for step in range(args.iterations):
        t0 = time.monotonic()
        g = torch.Generator().manual_seed(strategy.seed * 1000 + step * world + rank)
        colours = [int(c) for c in torch.randint(0, len(COLOURS), (args.prompts_per_rank,), generator=g)]
        images = [
            make_color_image(COLOURS[c], seed=int(torch.randint(0, 2**31, (1,), generator=g)))
            for c in colours
        ]
        sp = SamplingParams(
            max_new_tokens=1,
            temperature=1.0,
            n=args.group_size,
            seed=strategy.seed * 7919 + step * world + rank,
            extra={"suppress_tokens": suppress},
        )
        outs = strategy.gather_and_generate(
            sp,
            all_prompt_token_ids=[prompt_ids] * len(images),
            all_prompts=[prompt] * len(images),
            all_images=images,
            sleep_engine=False,
            images_num=[1] * len(images),
        )
        answers = torch.tensor([o.output_token_ids[0] for o in outs])
        targets = torch.tensor([allowed[c] for c in colours]).repeat_interleave(args.group_size)
        rewards = (answers == targets).float().view(len(images), args.group_size)
        adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
        logp = _answer_logprobs(
            actor,
            processor,
            prompt,
            [im for im in images for _ in range(args.group_size)],
            answers,
            allowed,
            strategy.device,
        )
        loss = -(adv.flatten().to(logp.device) * logp).mean()
        strategy.backward(loss, actor, optim)
        strategy.optimizer_step(optim, actor, None)
        strategy.update_engine_weights(actor)
        reward = float(strategy.all_reduce(rewards.mean().to(strategy.device), op="mean"))
        record = {
            "step": step + 1,
            "reward": reward,
            "loss": float(loss.detach()),
            "seconds": time.monotonic() - t0,
        }
        if rank0:
            records.append(record)
            with (out / METRICS).open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"step {step + 1:3d}/{args.iterations}  reward {reward:.3f}  loss {record['loss']:+.4f}",
                flush=True,
            )
    strategy.engine_lifecycle.shutdown()
    return records
