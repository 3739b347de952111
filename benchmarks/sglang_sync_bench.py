"""Weight sync into a colocated SGLang engine, release / resume and generation speed, on GPUs.

Run under torchrun on the GPU machine (see scripts/gpu-sglang.sh):

    torchrun --nproc-per-node 2 benchmarks/sglang_sync_bench.py --out $OUT/sglang_sync.json

Same model, bound and baseline as ``engine_sync_bench.py`` (the vLLM benchmark, whose helpers this
script imports): a Llama of about 1B parameters in bf16. One SGLang engine (per tensor-parallel
group) serves both training backends of the run, FSDP2 and then DeepSpeed ZeRO-3, so it starts
once. For each backend:

- ``bucketed``: ``strategy.update_engine_weights(actor)`` (flattened buckets of
  ``weight_sync_bucket_mb``, one CUDA IPC payload per tensor-parallel rank, into
  ``update_weights_from_tensor``);
- ``per_param``: the same path with one tensor per push (what OpenRLHF and LightRFT do);
- ``bound``: the bytes over the all-gather bandwidth measured in this run, plus one device copy;
- release (``maybe_sleep_inference_engine``, weights discarded) and resume + push
  (``update_engine_weights``) times, the device memory the release frees (against everything the
  engine held, measured by shutting it down at the end), outputs identical after resume + push;
- generation tokens/s.

It checks what it measures: SGLang's copy of the weights equals the trained ones (bf16, exact)
after each backend's push, the release frees >= 90 % of the engine's memory, and outputs are
identical after resume + push. Rank 0 prints a table and writes ``--out`` (JSON).

SGLang's log: ``LIGHTRFT_SGLANG_LOG_DIR`` / ``LIGHTRFT_SGLANG_LOG_LEVEL`` (scripts/gpu-sglang.sh sets
``$OUT/sglang-logs`` and ``info``); the engine start fails after ``LIGHTRFT_SGLANG_START_TIMEOUT``
seconds with the last scheduler lines and stacks. Decode CUDA graphs are captured up to
``--prompts`` requests (the batch this script generates).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_sync_bench import (  # noqa: E402  (the vLLM benchmark's helpers: same model and bound)
    _fmt,
    _timed,
    _used,
    allgather_bandwidth,
    build_llama,
    copy_bandwidth,
)

CHECKED = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def engine_weights_equal(engine: Any, strategy: Any, actor: Any) -> bool | None:
    """Whether SGLang's copy of a few weights (first rows, ``get_weights_by_name``) equals the
    actor's full weights cast to the engine dtype (None on ranks without an engine)."""
    full = {n: t for b in strategy.iter_weight_buckets(actor) for n, t in b if n in CHECKED}
    if not engine.is_leader:
        return None
    for name in CHECKED:
        got = torch.tensor(engine.engine.get_weights_by_name(name, truncate_size=2), dtype=torch.float32)
        want = full[name][: got.shape[0]].to(engine.dtype).float().cpu()
        if not torch.equal(got, want):
            return False
    return True


def train_step(strategy: Any, actor: Any, optim: Any, vocab: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (2, 128), generator=g).cuda()
    for _ in range(strategy.accumulated_gradient):
        strategy.backward(actor(input_ids=ids, labels=ids).loss, actor, optim)
        strategy.optimizer_step(optim, actor, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine_tp_size", type=int, default=1)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bucket_mb", type=int, default=512)
    ap.add_argument("--mem_util", type=float, default=0.35)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from lightrft.strategy import SamplingParams, get_strategy
    from lightrft.strategy.weights import tensor_nbytes

    world = int(os.environ.get("WORLD_SIZE", 1))
    base_cfg = {
        "train_batch_size": 2 * world,
        "micro_train_batch_size": 2,
        "bf16": True,
        "engine_type": "sglang",
        "engine_tp_size": a.engine_tp_size,
        "engine_mem_util": a.mem_util,
        "engine_max_model_len": 512,
        "engine_sleep_level": 2,
        "weight_sync_bucket_mb": a.bucket_mb,
        "enable_engine_sleep": True,
    }
    strategies = {
        "fsdp": get_strategy({**base_cfg, "strategy": "fsdp"}),
        "deepspeed": get_strategy({**base_cfg, "strategy": "deepspeed", "zero_stage": 3}),
    }
    first = strategies["fsdp"]
    rank = first.get_rank()
    res: dict[str, Any] = {"engine_tp_size": a.engine_tp_size}

    # The engine first, on an empty GPU: its memory is what it takes.
    engine_model = build_llama(a.layers, a.hidden, a.vocab, seed=1)
    res["params_b"] = sum(p.numel() for p in engine_model.parameters()) / 1e9
    from lightrft.engines._sglang_compat import decode_graph_batch_args, load_runtime

    graphs = decode_graph_batch_args(load_runtime().server_fields, a.prompts)
    torch.cuda.empty_cache()
    base_used = _used()
    t0 = time.perf_counter()
    engine = first.setup_inference_engine(model=engine_model, **graphs)
    res["engine_start_s"] = time.perf_counter() - t0
    if engine.is_leader:
        print(f"rank {rank}: SGLang log {engine.log_path}", flush=True)
    res["sglang"] = ".".join(map(str, engine.version))
    del engine_model
    torch.cuda.empty_cache()
    res["engine_start_gib"] = (_used() - base_used) / 2**30

    g = torch.Generator().manual_seed(7 + rank // a.engine_tp_size)
    prompts = [torch.randint(10, a.vocab, (64,), generator=g).tolist() for _ in range(a.prompts)]
    greedy = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.0, extra={"ignore_eos": True})
    ag_bw, cp_bw = allgather_bandwidth(), copy_bandwidth()
    res["allgather_gbps"], res["copy_gbps"] = ag_bw / 1e9, cp_bw / 1e9

    owner = first
    for name, strategy in strategies.items():
        actor = strategy.prepare_model(build_llama(a.layers, a.hidden, a.vocab, seed=1))  # FSDP2 shards here
        if name == "deepspeed":  # torch AdamW: DeepSpeed's FusedAdam would JIT-compile first
            optim = torch.optim.AdamW(actor.parameters(), lr=1e-4)
        else:
            optim = strategy.create_optimizer(actor, lr=1e-4)
        actor, optim, _ = strategy.prepare((actor, optim, None))
        train_step(strategy, actor, optim, a.vocab, seed=3)
        if strategy is not owner:  # hand the engine over without shutting it down
            owner.inference_engine = None
            strategy.inference_engine = engine
            owner = strategy

        total = sum(tensor_nbytes(t) for b in strategy.iter_weight_buckets(actor) for _, t in b)
        res["weight_gib"] = total / 2**30
        res[f"{name}_bound_s"] = total / ag_bw + total / cp_bw
        strategy.update_engine_weights(actor)  # warm-up
        res[f"{name}_bucketed_s"] = _timed(lambda s=strategy, m=actor: s.update_engine_weights(m), repeat=3)
        res[f"{name}_per_param_s"] = _timed(
            lambda s=strategy, m=actor: s.update_engine_weights(m, bucket_bytes=1)
        )
        res[f"{name}_bucketed_over_bound"] = res[f"{name}_bucketed_s"] / res[f"{name}_bound_s"]
        res[f"{name}_per_param_over_bucketed"] = res[f"{name}_per_param_s"] / res[f"{name}_bucketed_s"]
        res[f"{name}_weights_equal"] = engine_weights_equal(engine, strategy, actor)

        def gen(s: Any = strategy) -> list[list[int]]:
            outs = s.gather_and_generate(greedy, all_prompt_token_ids=prompts, sleep_engine=False)
            return [o.output_token_ids for o in outs]

        awake = gen()
        res[f"{name}_tok_s"] = len(prompts) * a.new_tokens / _timed(gen)
        # Release (weights discarded) and resume + push, as an RL step does.
        torch.cuda.empty_cache()  # this process's cached blocks are not the engine's
        used = _used()
        res[f"{name}_release_s"] = _timed(lambda s=strategy: s.maybe_sleep_inference_engine())
        res[f"{name}_released_gib"] = (used - _used()) / 2**30
        res[f"{name}_needs_push_after_release"] = engine.needs_weight_push
        res[f"{name}_resume_push_s"] = _timed(lambda s=strategy, m=actor: s.update_engine_weights(m))
        res[f"{name}_identical_after_resume"] = gen() == awake
        if name == "fsdp":
            del actor, optim  # room for the ZeRO-3 actor
            torch.cuda.empty_cache()

    # Everything the engine holds: what shutting it down returns (released first: the same base).
    torch.cuda.empty_cache()
    used = _used()
    owner.maybe_sleep_inference_engine()
    asleep = _used()
    owner.engine_lifecycle.shutdown()
    torch.cuda.empty_cache()
    engine_total = used - _used()
    res["engine_total_gib"] = engine_total / 2**30
    res["release_fraction_freed"] = (used - asleep) / engine_total if engine_total > 0 else float("nan")

    all_res = first.all_gather_object(res)
    if rank == 0:
        keys = [k for k in res if isinstance(res[k], (int, float, bool, str)) or res[k] is None]
        print(f"{'metric':<34}" + "".join(f"rank{r:<10}" for r in range(len(all_res))))
        for k in keys:
            print(f"{k:<34}" + "".join(f"{_fmt(r[k]):<14}" for r in all_res))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(all_res, f, indent=2)
    ok = all(
        res[f"{n}_identical_after_resume"] and res[f"{n}_weights_equal"] is not False for n in strategies
    )
    ok = ok and res["release_fraction_freed"] >= 0.9
    for s in strategies.values():
        s.shutdown()
    if not ok:
        raise SystemExit(f"rank {rank}: check failed: {json.dumps(res)}")


if __name__ == "__main__":
    main()
