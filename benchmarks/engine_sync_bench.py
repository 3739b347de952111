"""Weight sync into a colocated vLLM engine, sleep / wake and generation speed, on GPUs.

Run under torchrun on the GPU machine (see scripts/gpu-vllm.sh):

    torchrun --nproc-per-node 2 benchmarks/engine_sync_bench.py --strategy fsdp --out $OUT/fsdp.json

In one run it measures, for a Llama of about 1B parameters (``--layers``/``--hidden`` to change it):

- ``bucketed``: ``strategy.update_engine_weights(actor)`` (full-parameter buckets of
  ``weight_sync_bucket_mb`` in the engine's dtype, gathered per bucket, replayed into the
  workers through the recorded copy plan);
- ``load_weights``: the same buckets through vLLM's ``load_weights`` every time (the plan off);
  the parameters must be bitwise the same as after the plan's push;
- ``per_param``: one tensor per push through ``load_weights`` (what OpenRLHF and LightRFT do);
- ``bound``: the engine's bytes over the all-gather bandwidth measured in this run, plus one
  device copy;
- sleep level 1 / 2 and wake times, the device memory each frees, outputs identical after wake;
- generation tokens/s of vLLM against the ``hf`` engine on the same prompts.

It also checks what it measures: sleep frees >= 90 % of the engine's memory (what it took at
setup), and outputs are identical after wake (level 1) and after wake + push (level 2). The common
greedy prefix with the ``hf`` engine is reported. Rank 0 prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist


def _sync() -> None:
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def _timed(fn: Any, repeat: int = 1) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync()
    return (time.perf_counter() - t0) / repeat


def _used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def allgather_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes of the gathered tensor per second, measured with all_gather_into_tensor."""
    world = dist.get_world_size()
    shard = torch.empty(nbytes // world // 2, dtype=torch.bfloat16, device="cuda")
    full = torch.empty(shard.numel() * world, dtype=torch.bfloat16, device="cuda")
    dist.all_gather_into_tensor(full, shard)
    t = _timed(lambda: dist.all_gather_into_tensor(full, shard), repeat=5)
    return full.numel() * 2 / t


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    t = _timed(lambda: b.copy_(a), repeat=5)
    return nbytes / t


def build_llama(layers: int, hidden: int, vocab: int, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875) // 256 * 256,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["fsdp", "deepspeed"], default="fsdp")
    ap.add_argument("--engine_tp_size", type=int, default=1)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bucket_mb", type=int, default=512)
    ap.add_argument("--mem_util", type=float, default=0.35)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--hf_prompts", type=int, default=4, help="0: no hf comparison")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from lightrft.strategy import SamplingParams, get_strategy
    from lightrft.strategy.weights import tensor_nbytes

    strategy = get_strategy(
        {
            "strategy": a.strategy,
            "zero_stage": 3,
            "train_batch_size": 2 * int(os.environ.get("WORLD_SIZE", 1)),
            "micro_train_batch_size": 2,
            "bf16": True,
            "engine_type": "vllm",
            "engine_tp_size": a.engine_tp_size,
            "engine_mem_util": a.mem_util,
            "engine_max_model_len": 512,
            "engine_enforce_eager": True,
            "weight_sync_bucket_mb": a.bucket_mb,
            "enable_engine_sleep": True,
        }
    )
    rank = strategy.get_rank()
    res: dict[str, Any] = {"strategy": a.strategy, "engine_tp_size": a.engine_tp_size}
    actor = build_llama(a.layers, a.hidden, a.vocab, seed=1)
    engine_model = build_llama(a.layers, a.hidden, a.vocab, seed=1)
    res["params_b"] = sum(p.numel() for p in actor.parameters()) / 1e9
    actor = strategy.prepare_model(actor)
    # torch AdamW for both backends: the step only has to change the weights, and DeepSpeed's
    # FusedAdam would JIT-build for a minute first.
    optim = torch.optim.AdamW([p for p in actor.parameters() if p.requires_grad], lr=1e-4)
    actor, optim, _ = strategy.prepare((actor, optim, None))

    _sync()
    before_engine = _used()
    t0 = time.perf_counter()
    strategy.setup_inference_engine(model=engine_model)
    res["engine_start_s"] = time.perf_counter() - t0
    _sync()
    engine_total = _used() - before_engine
    res["engine_total_gib"] = engine_total / 2**30
    hf_ref_model = engine_model  # kept for the hf comparison below
    g = torch.Generator().manual_seed(7 + rank // a.engine_tp_size)
    prompts = [torch.randint(10, a.vocab, (64,), generator=g).tolist() for _ in range(a.prompts)]
    greedy = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.0)

    # One training step so that the pushed weights differ from the initial ones.
    ids = torch.randint(10, a.vocab, (2, 128), generator=g).cuda()
    for _ in range(strategy.accumulated_gradient):
        strategy.backward(actor(input_ids=ids, labels=ids).loss, actor, optim)
        strategy.optimizer_step(optim, actor, None)

    engine = strategy.engine_lifecycle.engine
    # The bytes the engine holds (its dtype): what any sync must gather and copy at least once.
    total_bytes = sum(
        tensor_nbytes(t) for b in strategy.iter_weight_buckets(actor, dtype=engine.weight_dtype) for _, t in b
    )
    res["weight_gib"] = total_bytes / 2**30
    ag_bw, cp_bw = allgather_bandwidth(), copy_bandwidth()
    res["allgather_gbps"], res["copy_gbps"] = ag_bw / 1e9, cp_bw / 1e9
    res["bound_s"] = total_bytes / ag_bw + total_bytes / cp_bw
    strategy.update_engine_weights(actor)  # warm-up: records the copy plan
    res["bucketed_s"] = _timed(lambda: strategy.update_engine_weights(actor), repeat=5)
    checksum_plan = engine.param_checksum()
    # The same buckets through vLLM's load_weights every time: the plan must give the same bits.
    engine.set_copy_plan(False)
    res["load_weights_s"] = _timed(lambda: strategy.update_engine_weights(actor), repeat=3)
    res["plan_equals_load_weights"] = engine.param_checksum() == checksum_plan
    # The peers: one full tensor per push, each through load_weights.
    res["per_param_s"] = _timed(lambda: strategy.update_engine_weights(actor, bucket_bytes=1))
    stats = engine.set_copy_plan(True)
    res["plan_replayed"], res["plan_loaded"] = stats.get("replayed", 0), stats.get("loaded", 0)
    res["bucketed_over_bound"] = res["bucketed_s"] / res["bound_s"]
    res["per_param_over_bucketed"] = res["per_param_s"] / res["bucketed_s"]

    def gen(sp: SamplingParams = greedy, ps: list[list[int]] = prompts) -> list[list[int]]:
        return [
            o.output_token_ids
            for o in strategy.gather_and_generate(prompt_token_ids=ps, sampling_params=sp, sleep_engine=False)
        ]

    awake = gen()
    t = _timed(lambda: gen())
    res["vllm_tok_s"] = len(prompts) * a.new_tokens / t

    # Sleep level 1 and 2: memory freed, times, identical outputs after wake (and push for level 2).
    base = _used()
    for level in (1, 2):
        _sync()
        t0 = time.perf_counter()
        strategy.maybe_sleep_inference_engine(level=level)
        _sync()
        res[f"sleep{level}_s"] = time.perf_counter() - t0
        freed = base - _used()
        res[f"sleep{level}_freed_gib"] = freed / 2**30
        t0 = time.perf_counter()
        if level == 1:
            strategy.wakeup_inference_engine()
        else:
            strategy.update_engine_weights(actor)  # wake weights -> push -> empty cache -> wake kv
        _sync()
        res[f"wake{level}_s"] = time.perf_counter() - t0
        res[f"identical_after_wake{level}"] = gen() == awake
    res["sleep_fraction_freed"] = res["sleep1_freed_gib"] * 2**30 / engine_total if engine_total > 0 else 0.0
    strategy.engine_lifecycle.shutdown()
    torch.cuda.empty_cache()

    if a.hf_prompts > 0:
        # hf engine on the same trained weights: reference outputs and tokens/s.
        strategy.setup_inference_engine(model=hf_ref_model, engine_type="hf")
        strategy.update_engine_weights(actor)
        hf_sp = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.0)
        sub = prompts[: a.hf_prompts]
        _sync()
        t0 = time.perf_counter()
        hf_out = gen(hf_sp, sub)
        _sync()
        res["hf_tok_s"] = len(sub) * a.new_tokens / (time.perf_counter() - t0)
        # Reported, not gated: in bf16 a random model's near-ties make kernels pick different argmaxes.
        prefix = [
            next((i for i, (x, y) in enumerate(zip(h, v)) if x != y), len(h)) for h, v in zip(hf_out, awake)
        ]
        res["vllm_hf_common_prefix_frac"] = sum(prefix) / (len(prefix) * a.new_tokens)
        strategy.engine_lifecycle.shutdown()

    all_res = strategy.all_gather_object(res)
    if rank == 0:
        keys = [k for k in res if isinstance(res[k], (int, float, bool))]
        print(f"{'metric':<28}" + "".join(f"rank{r:<10}" for r in range(len(all_res))))
        for k in keys:
            print(f"{k:<28}" + "".join(f"{_fmt(r[k]):<14}" for r in all_res))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(all_res, f, indent=2)
    ok = (
        res["identical_after_wake1"]
        and res["identical_after_wake2"]
        and res["sleep_fraction_freed"] >= 0.9
        and res["plan_equals_load_weights"]
    )
    strategy.shutdown()
    if not ok:
        raise SystemExit(f"rank {rank}: check failed: {json.dumps(res)}")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
