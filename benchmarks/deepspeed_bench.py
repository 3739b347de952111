"""Raw DeepSpeed vs DeepspeedStrategy on the same model, data and settings, in one run.

    torchrun --nproc-per-node=2 benchmarks/deepspeed_bench.py --out "$OUT"

A Llama of ~220M parameters (hidden 1024, 16 layers, 16 heads, intermediate 2816, vocab 32000),
micro-batch 8 x 1024 tokens per GPU, bf16, FusedAdam, gradient clipping 1.0, no accumulation.
For each ZeRO stage (2 and 3) the two variants run in the order raw, strategy, strategy, raw
(ABBA: a drift from run to run, such as the state a destroyed ZeRO-3 engine leaves behind in the
process, cancels out): 3 warm-up steps, then 10 timed steps between two ``cuda.synchronize()``;
the mean over the repetitions of each variant is reported. Peak memory is the peak allocated
during the run above what was allocated before the model was built. "raw" is ``deepspeed.initialize`` with a hand-written config and a
plain ``engine.backward`` / ``engine.step`` loop; "strategy" is the LightRFT three-step protocol
with ``strategy.backward`` / ``strategy.optimizer_step`` (which returns the gradient norm).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

MODEL = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
MICRO_BATCH, SEQ_LEN, WARMUP, STEPS, LR = 8, 1024, 3, 10, 1e-4


def build_model(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**MODEL)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    return model


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(1234 + dist.get_rank())
    return [
        torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH, SEQ_LEN), generator=g, device="cuda")
        for _ in range(n)
    ]


def raw_config(stage: int, world: int) -> dict[str, Any]:
    """What a DeepSpeed user writes by hand (DeepSpeed's defaults for everything else)."""
    return {
        "train_batch_size": MICRO_BATCH * world,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 10)


def run_raw(stage: int, data: list[torch.Tensor]) -> dict[str, Any]:
    import deepspeed

    base = baseline_memory()
    from deepspeed.ops.adam import FusedAdam

    from lightrft.strategy import StrategyBase

    model = build_model()
    groups = StrategyBase.optimizer_grouped_parameters(model, 0.0)
    optim = FusedAdam(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8, adam_w_mode=True)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optim, lr_scheduler=sched, config=raw_config(stage, dist.get_world_size())
    )

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        return loss

    out = timed(step, data, base)
    out["params"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
    engine.destroy()
    return out


def run_strategy(stage: int, data: list[torch.Tensor]) -> dict[str, Any]:
    from lightrft.deepspeed import DeepspeedStrategy

    base = baseline_memory()
    strategy = DeepspeedStrategy(
        {
            "zero_stage": stage,
            "bf16": True,
            "train_batch_size": MICRO_BATCH * dist.get_world_size(),
            "micro_train_batch_size": MICRO_BATCH,
            "max_norm": 1.0,
            "adam_betas": (0.9, 0.95),
            # Same as DeepSpeed's own default, which the raw config relies on: overlap at ZeRO-3.
            "overlap_comm": stage == 3,
            "lr_warmup_ratio": 0.0,
        }
    )
    strategy.setup_distributed()
    # Built like the raw variant (full model on the GPU, partitioned by deepspeed.initialize).
    model = strategy.prepare_model(build_model(), is_training=True)
    optim = strategy.create_optimizer(model, lr=LR, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda)
    engine, optim, sched = strategy.prepare((model, optim, sched))
    norms: list[float] = []

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = engine(input_ids=x, labels=x).loss
        strategy.backward(loss, engine, optim)
        norm = strategy.optimizer_step(optim, engine, sched)
        norms.append(norm if norm is not None else math.nan)
        return loss

    out = timed(step, data, base)
    out["last_norm"] = norms[-1]
    out["optimizer"] = type(engine.basic_optimizer).__name__
    out["params"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
    strategy.shutdown()  # destroys its engines; the process group belongs to this script
    return out


def baseline_memory() -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def timed(step: Any, data: list[torch.Tensor], base: int) -> dict[str, Any]:
    for x in data[:WARMUP]:
        step(x)
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for x in data[WARMUP : WARMUP + STEPS]:
        loss = step(x)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    step_time = torch.tensor([elapsed / STEPS], device="cuda")
    dist.all_reduce(step_time, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    peak = torch.tensor([float(torch.cuda.max_memory_allocated() - base)], device="cuda")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    t = float(step_time)
    return {
        "step_time_s": t,
        "tokens_per_s": MICRO_BATCH * SEQ_LEN * dist.get_world_size() / t,
        "peak_mem_gib": float(peak) / 2**30,
        "final_loss": float(loss.detach()),
        "leftover_gib": base / 2**30,
    }


def mean_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(runs[0])
    for key in ("step_time_s", "peak_mem_gib", "final_loss"):
        out[key] = sum(r[key] for r in runs) / len(runs)
    out["tokens_per_s"] = MICRO_BATCH * SEQ_LEN * dist.get_world_size() / out["step_time_s"]
    return out


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    import deepspeed

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl")
    data = batches(WARMUP + STEPS)
    results: dict[str, Any] = {}
    for stage in [int(s) for s in args.stages.split(",")]:
        runs: dict[str, list[dict[str, Any]]] = {"raw": [], "strategy": []}
        order = ["raw", "strategy", "strategy", "raw"] * (args.reps // 2) + ["raw", "strategy"] * (
            args.reps % 2
        )
        runners = {"raw": run_raw, "strategy": run_strategy}
        for variant in order:
            runs[variant].append(runners[variant](stage, data))
            release()
        best: dict[str, Any] = {v: mean_run(r) for v, r in runs.items()}
        best["ratio_step_time"] = best["strategy"]["step_time_s"] / best["raw"]["step_time_s"]
        best["ratio_peak_mem"] = best["strategy"]["peak_mem_gib"] / best["raw"]["peak_mem_gib"]
        best["all_runs"] = runs
        results[f"zero{stage}"] = best
    if dist.get_rank() == 0:
        meta = {
            "card": torch.cuda.get_device_name(),
            "gpus": dist.get_world_size(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "model": MODEL,
            "micro_batch": MICRO_BATCH,
            "seq_len": SEQ_LEN,
            "warmup": WARMUP,
            "steps": STEPS,
            "reps": args.reps,
            "order": "ABBA (raw, strategy, strategy, raw) per stage; means reported",
        }
        lines = [
            f"# DeepSpeed: raw vs DeepspeedStrategy ({meta['gpus']} x {meta['card']}, torch {meta['torch']}, "
            f"deepspeed {meta['deepspeed']})",
            "",
            "| stage | variant | step time (s) | tokens/s | peak mem above baseline (GiB) | final loss |",
            "|---|---|---|---|---|---|",
        ]
        for key, r in results.items():
            for v in ("raw", "strategy"):
                x = r[v]
                lines.append(
                    f"| {key} | {v} | {x['step_time_s']:.4f} | {x['tokens_per_s']:.0f} | "
                    f"{x['peak_mem_gib']:.2f} | {x['final_loss']:.4f} |"
                )
            lines.append(
                f"| {key} | strategy / raw | {r['ratio_step_time']:.3f} | {1 / r['ratio_step_time']:.3f} | "
                f"{r['ratio_peak_mem']:.3f} | |"
            )
        params = results[next(iter(results))]["raw"]["params"]
        lines += ["", f"Parameters: {params / 1e6:.1f}M; all runs: see deepspeed_bench.json"]
        table = "\n".join(lines)
        print(table, flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "deepspeed_bench.md").write_text(table + "\n")
        (out / "deepspeed_bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
