"""FSDPV2Strategy against hand-written FSDP2 code, same model, same data, one run.

    torchrun --nproc-per-node=2 benchmarks/fsdp_bench.py [--out DIR]

A Llama of about 270M parameters (hidden 1024, 16 layers, 16 heads, intermediate 2816, vocab
32000), micro-batch 8 x 1024 tokens per GPU, bf16 compute with fp32 master weights and fp32
gradient reduction, fused AdamW, global-norm clipping at 1.0; 3 warm-up and 10 timed steps.

Variants, each built from the same seed:
- ``raw``: ``fully_shard`` on each decoder layer and the root, ``clip_grad_norm_``, ``step()``.
- ``raw_units``: also the embeddings and the head as their own units, as the strategy shards.
- ``raw_item``: ``raw`` plus reading the norm as a float before ``step()`` (what a loop that logs
  or skips non-finite norms does; shows what a host sync there costs).
- ``strategy``: ``prepare_model`` / ``create_optimizer`` / ``backward`` / ``optimizer_step``.

Two phases. Alone: each variant by itself, 3 warm-up + 10 timed steps; its peak memory is
``torch.cuda.max_memory_allocated`` (max over ranks) during those steps, reset after setup.
Interleaved: all variants resident, one step of each in turn for 20 rounds (the first variant
rotates), so drift of clocks, power or host load hits every variant alike; the step time
reported is the median over those rounds (each step synchronised at its end, slowest rank).
Tokens/s are global (all ranks).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB = 1024, 16, 16, 2816, 32000
MICRO_BATCH, SEQ = 8, 1024
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:  # a smoke run of the script itself on CPU (gloo), with a tiny model
    HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB, MICRO_BATCH, SEQ = 64, 2, 4, 128, 256, 2, 32
WARMUP, TIMED, INTERLEAVED_ROUNDS = 3, 10, 20
LR, MAX_NORM = 1e-4, 1.0


def build_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        return LlamaForCausalLM(config)


def batches(rank: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g).to(DEVICE) for _ in range(n)]


def raw_setup(model: torch.nn.Module, units: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(DEVICE, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    if units:
        fully_shard(model.model.embed_tokens, mesh=mesh, mp_policy=mp)
        fully_shard(model.lm_head, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    optim = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0, fused=CUDA)
    return model, optim


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def setup_variant(name: str) -> tuple[Callable[[torch.Tensor], None], list[Any]]:
    """Builds the model of variant ``name`` and returns its training step (and what keeps it alive)."""
    model = build_model(seed=0)
    strategy = None
    if name == "strategy":
        from lightrft.fsdp import FSDPV2Strategy

        world = dist.get_world_size()
        strategy = FSDPV2Strategy(
            {
                "bf16": True,
                "micro_train_batch_size": MICRO_BATCH,
                "train_batch_size": MICRO_BATCH * world,
                "max_norm": MAX_NORM,
                "actor_learning_rate": LR,
                "adam_betas": (0.9, 0.95),
                "l2": 0.0,
            }
        )
        strategy.setup_distributed()
        model = strategy.prepare_model(model)
        optim = strategy.create_optimizer(model, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
        model, optim, _ = strategy.prepare((model, optim, None))
    else:
        model, optim = raw_setup(model, units=name == "raw_units")

    def step(ids: torch.Tensor) -> None:
        loss = model(input_ids=ids, labels=ids).loss
        if strategy is not None:
            strategy.backward(loss, model, optim)
            strategy.optimizer_step(optim, model, None)
            return
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        if name == "raw_item":
            float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step, [model, optim, strategy]


def timed(step: Callable[[torch.Tensor], None], ids: torch.Tensor) -> float:
    sync()
    t0 = time.perf_counter()
    step(ids)
    sync()
    return time.perf_counter() - t0


def slowest_rank(values: list[float]) -> list[float]:
    """A step ends when its slowest rank ends: the max over ranks, step by step."""
    t = torch.tensor(values, dtype=torch.float64, device=DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def free_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def run_alone(name: str, data: list[torch.Tensor]) -> dict[str, Any]:
    """Phase 1: the variant alone on the GPUs; its peak memory during training and step times."""
    step, keep = setup_variant(name)
    params = sum(p.numel() for p in keep[0].parameters())
    sync()
    dist.barrier()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times = [timed(step, data[i % len(data)]) for i in range(WARMUP + TIMED)][WARMUP:]
    peak = torch.cuda.max_memory_allocated() if CUDA else 0
    peak = max(slowest_rank([float(peak)]))
    del step, keep
    free_memory()
    return {"times": slowest_rank(times), "peak_bytes": peak, "params": params}


def run_interleaved(names: list[str], data: list[torch.Tensor], rounds: int) -> dict[str, list[float]]:
    """Phase 2: every variant resident at once, one step of each in turn (the starting variant
    rotates), so that drift of clocks, power or host load hits every variant alike."""
    steps = {n: setup_variant(n)[0] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(WARMUP + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t = timed(steps[n], data[r % len(data)])
            if r >= WARMUP:
                times[n].append(t)
    out = {n: slowest_rank(ts) for n, ts in times.items()}
    del steps
    free_memory()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--variants", default="raw,raw_units,raw_item,strategy")
    parser.add_argument("--rounds", type=int, default=INTERLEAVED_ROUNDS)
    args = parser.parse_args()
    if CUDA:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cpu:gloo,cuda:nccl" if CUDA else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    names = args.variants.split(",")
    data = batches(rank, 4)
    alone = {}
    for name in names:
        alone[name] = run_alone(name, data)
    inter = run_interleaved(names, data, args.rounds)
    tokens = MICRO_BATCH * SEQ * world
    rows = {}
    for name in names:
        a, t = alone[name], inter[name]
        rows[name] = {
            "alone_step_s": statistics.fmean(a["times"]),
            "step_s": statistics.median(t),
            "mean_s": statistics.fmean(t),
            "stdev_s": statistics.stdev(t),
            "tokens_per_s": tokens / statistics.median(t),
            "peak_gib": a["peak_bytes"] / 2**30,
            "params": a["params"],
        }
    if rank == 0:
        card = torch.cuda.get_device_name() if CUDA else "CPU (smoke run)"
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            smi = card
        base = rows.get("raw")
        lines = [
            f"# FSDP2 benchmark: {world} x {card}, torch {torch.__version__}",
            f"nvidia-smi: {smi}",
            f"model: Llama {rows[names[0]]['params'] / 1e6:.0f}M params (hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, "
            f"intermediate {INTERMEDIATE}, vocab {VOCAB}); micro-batch {MICRO_BATCH} x {SEQ} tokens per GPU; bf16, fp32 "
            f"reduce; fused AdamW; clip {MAX_NORM}",
            f"step time: median of {args.rounds} interleaved rounds (after {WARMUP} warm-up); alone: mean of "
            f"{TIMED} steps after {WARMUP} warm-up with the variant alone; peak memory: alone",
            "",
            "| variant | step time (s) | mean ± sd (s) | alone (s) | tokens/s | peak mem (GiB) | time / raw | mem / raw |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            t_ratio = r["step_s"] / base["step_s"] if base else float("nan")
            m_ratio = r["peak_gib"] / base["peak_gib"] if base and base["peak_gib"] else float("nan")
            lines.append(
                f"| {name} | {r['step_s']:.4f} | {r['mean_s']:.4f} ± {r['stdev_s']:.4f} | {r['alone_step_s']:.4f} "
                f"| {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {t_ratio:.3f} | {m_ratio:.3f} |"
            )
        if "strategy" in rows and "raw_units" in rows:
            s, u = rows["strategy"], rows["raw_units"]
            lines.append("")
            lines.append(
                f"strategy / raw_units (the same FSDP units as the strategy): time {s['step_s'] / u['step_s']:.3f}, "
                f"memory {s['peak_gib'] / max(u['peak_gib'], 1e-9):.3f}"
            )
        table = "\n".join(lines)
        print(table, flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fsdp_bench.md").write_text(table + "\n")
        (out / "fsdp_bench.json").write_text(
            json.dumps({"card": card, "nvidia_smi": smi, "rows": rows}, indent=2)
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
