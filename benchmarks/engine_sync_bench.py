"""Weight sync, sleep and wake of a colocated engine against their floors, one benchmark for both
engines (``--engine vllm|sglang``) and both sharded backends (``--strategy fsdp|deepspeed``).

One GPU: ``python benchmarks/engine_sync_bench.py --engine vllm --out $OUT``; several:
``torchrun --nproc-per-node 2 benchmarks/engine_sync_bench.py --engine_tp_size 2 ...``. The FSDP
half never imports DeepSpeed. CPU dry run: ``--device cpu`` (vLLM on CPU: no sleep mode; the sleep
rows are then skipped and say so).

Measured in one run, on a Llama of ``--model`` (random weights, the engine in bf16), after one
training step so that the pushed weights differ from the initial ones:

- bandwidths of this run: a device copy (``bw_dev``: bytes read + written per second, 256 MiB),
  the all-gather (several ranks), pinned host <-> device (``bw_d2h`` / ``bw_h2d``);
- ``control_call_s``: the engine's cheapest control round trip (vLLM ``reset_prefix_cache``,
  in-process; SGLang ``flush_cache``, to its scheduler process): the fixed cost of any call;
- ``push_s``: ``strategy.update_engine_weights(actor)`` on an awake engine (median of 5), and
  ``push_fixed_s``: one push of the smallest parameter through the same engine path (the fixed cost
  per push; ``push_fixed_asleep_s`` the same where the RL loop pushes, between a level-2 sleep and
  the KV cache's wake: SGLang flushes no prefix cache there, its release did). Floor: the fp32 master read once and the engine's bf16 weights written once
  (``6 B/param`` for FSDP2; ZeRO-3 gathers its bf16 parameters: ``4 B/param``) over ``bw_dev``,
  plus the all-gather of the bf16 bytes on several ranks, plus ``push_fixed_s``;
- SGLang on one rank (``push_live``): ``push_s`` is the live push (the masters mapped into the
  scheduler once, then one replay call per push: ``lightrft.engines._sglang_live``), and
  ``push_flat_s`` the flattened buckets of the same engine in the same run (``push_flat_fixed_s``
  its one-tensor cost); both must leave the same weights (``flat_same_weights``,
  ``live_same_weights_again``);
- ``per_param_s``: ours with one tensor per bucket; ``peer_per_param_s``: the peers' path reproduced
  here: every parameter gathered alone and loaded with one call, ``model.load_weights([(name, t)])``
  on vLLM's in-process model (TRL's colocate mode, OpenRLHF) or
  ``Engine.update_weights_from_tensor([(name, t)])`` on SGLang (OpenRLHF, verl's per-tensor path),
  checked to leave the same weights as our push;
- sleep and wake at each ``--levels`` (three cycles each: the first and the median of the others),
  each against its floor: the bytes it must move (level 1: the weights, device -> pinned host and
  back; level 2: none) over the matching bandwidth, plus ``control_call_s``; the wake after level 2
  is timed apart from the push that follows it (the engine's ``wake_up`` calls inside
  ``update_engine_weights``);
- ``sleep_fraction_freed``: device memory freed by the sleep call (``mem_get_info`` read right
  before and right after the call, this process's cache emptied first so that only the engine's
  memory moves) over everything the engine holds (what shutting it down returns at the end). It is
  a fraction of a part: a value above 1 is a measurement error and fails the run;
- generation tokens/s of ``--prompts`` greedy requests of ``--new_tokens`` tokens (ignore EOS);
- ``gen_rl_tok_s``: generation in the RL soak's call form, ``--rl_prompts`` prompts x ``--samples``
  samples (``SamplingParams.n``, temperature 1, the engine's log-probs), the batch the engine's
  decode CUDA graphs are sized for (``decode_graph_captured``: what SGLang captured). SGLang also,
  in the same run, through the raw ``sglang.Engine.generate`` with SGLang's own ``n``
  (``gen_rl_raw_n_tok_s``, the path the engine used before: each prompt prefilled alone first),
  and the request states SGLang's TokenizerManager still holds after each path
  (``sglang_req_states_after_ours`` must be 0; ``sglang_req_states_per_raw_n_call``: what SGLang's
  ``n`` leaves behind per call, ``prompts x (n - 1)`` in 0.5.16). ``gen_floor_tok_s``: the batch
  over the time one decode step needs to read the engine's weights once at ``bw_dev`` (a bound,
  prefill and sampling left out).

Checks (non-zero exit): outputs identical after every wake (+ push), the peers' path leaves the
same weights, 0.9 <= sleep_fraction_freed <= 1, SGLang holds no request state after our generations. Writes ``--out``/sync_<engine>_<strategy>.json (or
the ``--out`` file when it ends in .json) and a .log; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _soak import sglang_request_states  # noqa: E402

#: Llama shapes: (layers, hidden, intermediate, heads, kv heads); vocab 32000 except tiny (256).
MODELS = {
    "0.8b": (16, 2048, 5632, 16, 4),
    "1.5b": (30, 2048, 5632, 16, 4),
    "3.5b": (33, 3072, 8192, 24, 8),
    "tiny": (2, 128, 256, 4, 2),  # heads of 32: vLLM's CPU attention has no 16-wide kernel
}
CUDA = False


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _timed(fn: Any, repeat: int = 1) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync()
    return (time.perf_counter() - t0) / repeat


def _median_time(fn: Any, repeat: int) -> float:
    return statistics.median(_timed(fn) for _ in range(repeat))


def _used() -> int:
    """Device memory in use by every process (``mem_get_info``), this process's cache emptied."""
    if not CUDA:
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return total - free


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Device memory traffic (bytes read + bytes written) per second of a large copy."""
    dev = "cuda" if CUDA else "cpu"
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * nbytes / _median_time(lambda: b.copy_(a), 5)


def host_bandwidth(nbytes: int = 256 << 20) -> tuple[float, float]:
    """(device -> pinned host, pinned host -> device) bytes per second."""
    if not CUDA:
        return float("nan"), float("nan")
    d = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    h.copy_(d)
    d2h = nbytes / _median_time(lambda: h.copy_(d, non_blocking=True), 3)
    h2d = nbytes / _median_time(lambda: d.copy_(h, non_blocking=True), 3)
    return d2h, h2d


def allgather_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes of the gathered tensor per second (all_gather_into_tensor); inf on one rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float("inf")
    world = dist.get_world_size()
    dev = "cuda" if CUDA else "cpu"
    shard = torch.empty(nbytes // world // 2, dtype=torch.bfloat16, device=dev)
    full = torch.empty(shard.numel() * world, dtype=torch.bfloat16, device=dev)
    dist.all_gather_into_tensor(full, shard)
    return full.numel() * 2 / _median_time(lambda: dist.all_gather_into_tensor(full, shard), 5)


def build_llama(model: str, seed: int, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, inter, heads, kv = MODELS[model]
    cfg = LlamaConfig(
        vocab_size=256 if model == "tiny" else 32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if CUDA else "cpu"):
        return LlamaForCausalLM(cfg).to(dtype)


def time_wake_calls(engine: Any, into: dict[str, float]) -> None:
    """Adds each ``engine.wake_up`` call's time to ``into['wake_s']`` (the lifecycle calls it)."""
    wake = engine.wake_up

    def wake_up(tags: Any = None) -> None:
        _sync()
        t0 = time.perf_counter()
        wake(tags)
        _sync()
        into["wake_s"] = into.get("wake_s", 0.0) + time.perf_counter() - t0

    engine.wake_up = wake_up


class Peer:
    """The peers' per-parameter push: every parameter gathered alone and loaded with one engine
    call (vLLM: ``load_weights`` on the in-process model, as TRL's colocate mode does; SGLang:
    ``update_weights_from_tensor`` per tensor)."""

    def __init__(self, engine_type: str, engine: Any) -> None:
        self.engine_type, self.engine = engine_type, engine
        if engine_type == "vllm":
            # In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the worker's model object itself.
            self.model = engine.llm.collective_rpc(lambda worker: worker.model_runner.model)[0]

    def push(self, strategy: Any, actor: Any) -> int:
        from lightrft.engines import _sglang_compat as compat

        n = 0
        dtype = self.engine.weight_dtype
        sgl = self.engine.engine if self.engine_type == "sglang" and self.engine.is_leader else None
        session = sgl is not None and compat.has_update_session(sgl)  # SGLang 0.5.21+
        if session:
            sgl.begin_weight_update()
        for bucket in strategy.iter_weight_buckets(actor, bucket_bytes=1, dtype=dtype):
            for name, t in bucket:
                # FSDP's gathered parameters are non-leaf tensors that require grad, which CUDA IPC
                # refuses to send (the peers detach too).
                t = t.detach()
                if self.engine_type == "vllm":
                    self.model.load_weights([(name, t)])
                elif sgl is not None:
                    ok, msg = compat.result_ok(
                        sgl.update_weights_from_tensor(named_tensors=[(name, t)], flush_cache=False)
                    )
                    if not ok:
                        raise RuntimeError(f"SGLang update_weights_from_tensor({name}) failed: {msg}")
                n += 1
        if session:
            sgl.end_weight_update()
        if self.engine_type == "vllm":
            self.engine.llm.reset_prefix_cache()
        elif sgl is not None:
            sgl.flush_cache()
        return n


def engine_fingerprint(engine_type: str, engine: Any) -> Any:
    """What must be equal after two pushes of the same weights: vLLM's parameter checksum;
    SGLang's first rows of a few weights (``get_weights_by_name``)."""
    if engine_type == "vllm":
        return engine.param_checksum()
    if not engine.is_leader:
        return None
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight", "lm_head.weight"]
    return [engine.engine.get_weights_by_name(n, truncate_size=4) for n in names]


def control_call(engine_type: str, engine: Any) -> Any:
    if engine_type == "vllm":
        return lambda: engine.llm.reset_prefix_cache()
    return lambda: engine.engine.flush_cache() if engine.is_leader else None


def rl_generation(
    a: Any, strategy: Any, engine: Any, vocab: int, g: Any, step_read_s: float
) -> dict[str, Any]:
    """Generation in the soak's call form (see the module docstring), ours and, on SGLang, the raw
    ``Engine.generate`` with SGLang's own ``n``; the request states left after each."""
    from lightrft.strategy import SamplingParams

    out: dict[str, Any] = {"decode_graph_captured": getattr(engine, "decode_graph_captured", None)}
    prompts = [torch.randint(10, vocab, (32,), generator=g).tolist() for _ in range(a.rl_prompts)]
    batch = a.rl_prompts * a.samples
    sp = SamplingParams(
        max_new_tokens=a.new_tokens, temperature=1.0, n=a.samples, logprobs=True, extra={"ignore_eos": True}
    )
    tokens = batch * a.new_tokens

    def ours() -> None:
        outs = strategy.gather_and_generate(sp, all_prompt_token_ids=prompts, sleep_engine=False)
        assert sum(len(o.output_token_ids) for o in outs) == tokens, "ignore_eos: every sample is full length"

    ours()  # warm-up
    out["gen_rl_tok_s"] = tokens / _median_time(ours, 3)
    out["gen_floor_tok_s"] = batch / step_read_s  # one decode step reads every weight once
    out["sglang_req_states_after_ours"] = sglang_request_states(engine)
    sgl = engine.engine if a.engine == "sglang" and engine.is_leader else None
    if sgl is not None:
        params = {"max_new_tokens": a.new_tokens, "temperature": 1.0, "n": a.samples, "ignore_eos": True}

        raw_calls = 0

        def raw() -> None:
            nonlocal raw_calls
            raw_calls += 1
            got = sgl.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
            assert sum(len(o["output_ids"]) for o in got) == tokens

        before = sglang_request_states(engine) or 0
        raw()  # warm-up
        out["gen_rl_raw_n_tok_s"] = tokens / _median_time(raw, 3)
        out["sglang_req_states_after_raw_n"] = sglang_request_states(engine)
        out["sglang_req_states_per_raw_n_call"] = (
            (out["sglang_req_states_after_raw_n"] or 0) - before
        ) / raw_calls
        out["gen_rl_ours_over_raw_n"] = out["gen_rl_tok_s"] / out["gen_rl_raw_n_tok_s"]
    elif a.engine == "sglang":
        _median_time(lambda: None, 3)  # the barriers of the leader's three timed raw calls
    return out


def main() -> int:
    global CUDA
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["vllm", "sglang"], default="vllm")
    ap.add_argument("--strategy", choices=["fsdp", "deepspeed"], default="fsdp")
    ap.add_argument("--model", choices=sorted(MODELS), default="0.8b")
    ap.add_argument("--engine_tp_size", type=int, default=1)
    ap.add_argument("--bucket_mb", type=int, default=512)
    ap.add_argument("--mem_util", type=float, default=0.35)
    ap.add_argument("--prompts", type=int, default=64, help="requests of the generation measurement")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--rl_prompts", type=int, default=16, help="prompts of the RL-shaped generation")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt of the RL-shaped generation")
    ap.add_argument("--levels", default="2,1", help="sleep levels to measure (SGLang: level 2 only)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", default="sync-out", help="directory (or a .json file) for the results")
    ap.add_argument("--budget-s", type=float, default=0.0, help="skip what is left after this many seconds")
    a = ap.parse_args()
    CUDA = a.device == "cuda"
    t_start = time.perf_counter()
    levels = [int(x) for x in a.levels.split(",") if x.strip()]
    bad = [x for x in levels if x not in (1, 2)]
    if bad:
        ap.error(f"--levels={a.levels!r} is invalid: give levels among 1 and 2")
    if a.engine == "sglang" and 1 in levels:
        levels = [x for x in levels if x != 1]  # started without the CPU weight backup: level 1 is 2
    out_path = Path(a.out) if a.out.endswith(".json") else Path(a.out) / f"sync_{a.engine}_{a.strategy}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    from lightrft.strategy import SamplingParams, get_strategy
    from lightrft.strategy.weights import tensor_nbytes

    world = int(os.environ.get("WORLD_SIZE", 1))
    strategy = get_strategy(
        {
            "strategy": a.strategy,
            "zero_stage": 3,
            "train_batch_size": 2 * world,
            "micro_train_batch_size": 2,
            "bf16": True,
            "engine_type": a.engine,
            "engine_tp_size": a.engine_tp_size,
            "engine_mem_util": a.mem_util,
            "engine_max_model_len": 512,
            "engine_sleep_level": 2,
            # SGLang captures decode graphs up to this many requests: the larger generation batch.
            "micro_rollout_batch_size": max(a.prompts, a.rl_prompts * a.samples),
            "weight_sync_bucket_mb": a.bucket_mb,
            "enable_engine_sleep": True,
        }
    )
    rank = strategy.get_rank()
    log = open(str(out_path.with_suffix(".log")) if rank == 0 else os.devnull, "a", buffering=1)  # noqa: SIM115

    def say(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)
            log.write(msg + "\n")

    res: dict[str, Any] = {"engine": a.engine, "strategy": a.strategy, "model": a.model, "world": world}
    res["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    skipped: list[str] = []

    def over_budget(what: str) -> bool:
        if a.budget_s and time.perf_counter() - t_start > a.budget_s:
            skipped.append(what)
            say(f"budget spent: {what} skipped")
            return True
        return False

    master_dtype = torch.float32 if a.strategy == "fsdp" else torch.bfloat16
    actor = build_llama(a.model, seed=1, dtype=master_dtype)
    n_params = sum(p.numel() for p in actor.parameters())
    res["params_b"] = n_params / 1e9
    actor = strategy.prepare_model(actor)
    # torch AdamW for both backends (DeepSpeed's FusedAdam would JIT-build for a minute first).
    optim = torch.optim.AdamW([p for p in actor.parameters() if p.requires_grad], lr=1e-4, fused=CUDA)
    actor, optim, _ = strategy.prepare((actor, optim, None))
    g = torch.Generator().manual_seed(3)
    vocab = 256 if a.model == "tiny" else 32000
    ids = torch.randint(10, vocab, (2, 64), generator=g).to("cuda" if CUDA else "cpu")
    for _ in range(strategy.accumulated_gradient):  # one step: the pushed weights are not the init
        strategy.backward(actor(input_ids=ids, labels=ids).loss, actor, optim)
        strategy.optimizer_step(optim, actor, None)

    before_engine = _used()
    t0 = time.perf_counter()
    strategy.setup_inference_engine(actor=actor)  # built from the actor's config; weights pushed
    res["engine_start_s"] = time.perf_counter() - t0
    res["engine_start_gib"] = (_used() - before_engine) / 2**30
    engine = strategy.engine_lifecycle.engine
    if a.engine == "sglang":
        res["sglang"] = ".".join(map(str, engine.version))
        say(f"SGLang log: {engine.log_path}")
    wake_times: dict[str, float] = {}
    time_wake_calls(engine, wake_times)

    # ---------------------------------------------------------------- bandwidths, fixed costs
    engine_bytes = sum(
        tensor_nbytes(t) for b in strategy.iter_weight_buckets(actor, dtype=engine.weight_dtype) for _, t in b
    )
    res["weight_gib"] = engine_bytes / 2**30
    bw_dev, bw_ag = copy_bandwidth(), allgather_bandwidth()
    bw_d2h, bw_h2d = host_bandwidth()
    res.update(bw_dev_gbps=bw_dev / 1e9, bw_allgather_gbps=bw_ag / 1e9, bw_d2h_gbps=bw_d2h / 1e9)
    res["bw_h2d_gbps"] = bw_h2d / 1e9
    call = control_call(a.engine, engine)
    call()
    res["control_call_s"] = _median_time(call, 9)

    # ---------------------------------------------------------------- push
    strategy.update_engine_weights(actor)  # warm-up (vLLM records its copy plan here)
    res["push_s"] = _median_time(lambda: strategy.update_engine_weights(actor), 5)
    reference = engine_fingerprint(a.engine, engine)
    small = min(
        ((n, t) for b in strategy.iter_weight_buckets(actor, dtype=engine.weight_dtype) for n, t in b),
        key=lambda nt: tensor_nbytes(nt[1]),
    )
    engine.update_weights([[small]])
    res["push_fixed_s"] = _median_time(lambda: engine.update_weights([[small]]), 9)
    fixed_kw: dict[str, Any] = {}  # how the loop's own pushes go (SGLang's live path: live_storages)
    if getattr(engine, "live_loader", False):
        # SGLang's live push (the default on one rank) against its flattened buckets, same run.
        res["push_live"] = True
        engine.live_loader = False
        strategy.update_engine_weights(actor)
        res["push_flat_s"] = _median_time(lambda: strategy.update_engine_weights(actor), 5)
        res["flat_same_weights"] = engine_fingerprint(a.engine, engine) == reference
        res["push_flat_fixed_s"] = res["push_fixed_s"]
        engine.live_loader = True
        small_live = {small[1].untyped_storage().data_ptr()}
        fixed_kw["live_storages"] = small_live
        engine.update_weights([[small]], live_storages=small_live)  # maps the one tensor
        res["push_fixed_s"] = _median_time(
            lambda: engine.update_weights([[small]], live_storages=small_live), 9
        )
        strategy.update_engine_weights(actor)  # maps the whole model again: later pushes replay
        res["live_same_weights_again"] = engine_fingerprint(a.engine, engine) == reference
    read_b = n_params * (4 if a.strategy == "fsdp" else 2)  # the master (fp32) or ZeRO-3's bf16 params
    res["push_floor_s"] = (read_b + engine_bytes) / bw_dev + engine_bytes / bw_ag + res["push_fixed_s"]
    res["push_over_floor"] = res["push_s"] / res["push_floor_s"]

    if not over_budget("per-parameter pushes"):
        res["per_param_s"] = _timed(lambda: strategy.update_engine_weights(actor, bucket_bytes=1))
        if a.engine_tp_size == 1:
            peer = Peer(a.engine, engine)
            _sync()
            t0 = time.perf_counter()
            res["peer_calls"] = peer.push(strategy, actor)
            _sync()
            res["peer_per_param_s"] = time.perf_counter() - t0
            res["peer_same_weights"] = engine_fingerprint(a.engine, engine) == reference
            res["peer_over_push"] = res["peer_per_param_s"] / res["push_s"]
        else:
            skipped.append("peer per-parameter path (engine_tp_size > 1)")

    # ---------------------------------------------------------------- generation
    prompts = [torch.randint(10, vocab, (64,), generator=g).tolist() for _ in range(a.prompts)]
    extra = {"ignore_eos": True}
    greedy = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.0, extra=extra)

    def gen() -> list[list[int]]:
        outs = strategy.gather_and_generate(greedy, all_prompt_token_ids=prompts, sleep_engine=False)
        return [o.output_token_ids for o in outs]

    strategy.update_engine_weights(actor)
    awake = gen()
    res["gen_tok_s"] = sum(len(x) for x in awake) / _median_time(gen, 3)
    if not over_budget("RL-shaped generation"):
        res.update(rl_generation(a, strategy, engine, vocab, g, engine_bytes / bw_dev))

    # ---------------------------------------------------------------- sleep / wake
    sleeps = bool(getattr(engine, "_sleep_ok", True)) and CUDA
    if not sleeps:
        skipped.append("sleep / wake (this engine has no sleep mode here)")
    for level in levels if sleeps else []:
        if over_budget(f"sleep level {level}"):
            continue
        rows: dict[str, list[float]] = {"sleep_s": [], "wake_s": [], "freed": [], "back_s": []}
        identical = True
        for _ in range(3):
            used = _used()
            _sync()
            t0 = time.perf_counter()
            strategy.maybe_sleep_inference_engine(level=level)
            _sync()
            rows["sleep_s"].append(time.perf_counter() - t0)
            rows["freed"].append(used - _used())
            wake_times.clear()
            _sync()
            t0 = time.perf_counter()
            if level == 1:
                strategy.wakeup_inference_engine()
            else:
                strategy.update_engine_weights(actor)  # wake weights -> push -> empty cache -> wake kv
            _sync()
            rows["back_s"].append(time.perf_counter() - t0)
            rows["wake_s"].append(wake_times.get("wake_s", 0.0))
            identical = identical and gen() == awake
        moved = engine_bytes if level == 1 else 0
        res[f"sleep{level}_first_s"] = rows["sleep_s"][0]
        res[f"sleep{level}_s"] = statistics.median(rows["sleep_s"][1:])
        res[f"sleep{level}_floor_s"] = (
            moved / bw_d2h + res["control_call_s"] if moved else res["control_call_s"]
        )
        res[f"wake{level}_first_s"] = rows["wake_s"][0]
        res[f"wake{level}_s"] = statistics.median(rows["wake_s"][1:])
        res[f"wake{level}_floor_s"] = (
            moved / bw_h2d + res["control_call_s"] if moved else res["control_call_s"]
        )
        res[f"sleep{level}_freed_gib"] = statistics.median(rows["freed"]) / 2**30
        res[f"identical_after_wake{level}"] = identical
        # Level 2: the whole way back is update_engine_weights (wake weights, push, wake the rest).
        res[f"back{level}_s"] = statistics.median(rows["back_s"][1:])
        res[f"cycle{level}_s"] = res[f"sleep{level}_s"] + res[f"back{level}_s"]
        if level == 2:
            # The fixed cost of a push where the RL loop makes it: weights woken, KV cache still
            # released (SGLang then makes no flush of the prefix cache: the release did it).
            strategy.maybe_sleep_inference_engine(level=2)
            engine.wake_up(tags=["weights"])
            engine.update_weights([[small]], **fixed_kw)
            res["push_fixed_asleep_s"] = _median_time(lambda: engine.update_weights([[small]], **fixed_kw), 9)
            strategy.update_engine_weights(actor)  # every weight again, then the rest woken
            res["identical_after_wake2"] = res["identical_after_wake2"] and gen() == awake

    # ---------------------------------------------------------------- everything the engine holds
    awake_used = _used()
    strategy.engine_lifecycle.shutdown()
    gone, deadline = _used(), time.monotonic() + 15.0
    while CUDA and time.monotonic() < deadline:  # SGLang's schedulers exit after shutdown() returns
        time.sleep(0.5)
        now = _used()
        if now == gone:
            break
        gone = now
    res["engine_total_gib"] = (awake_used - gone) / 2**30
    for level in levels:
        if f"sleep{level}_freed_gib" in res and res["engine_total_gib"] > 0:
            res[f"sleep{level}_fraction_freed"] = res[f"sleep{level}_freed_gib"] / res["engine_total_gib"]
    res["skipped"] = skipped
    res["wall_s"] = time.perf_counter() - t_start

    all_res = strategy.all_gather_object(res)
    failures = check(res, levels if sleeps else [])
    if rank == 0:
        say(table(res, all_res))
        for f in failures:
            say(f"CHECK FAILED: {f}")
        say("PASSED" if not failures else "FAILED")
        with open(out_path, "w") as f:
            json.dump(all_res, f, indent=2)
    strategy.shutdown()
    log.close()
    return 1 if failures else 0


def check(res: dict[str, Any], levels: list[int]) -> list[str]:
    out = []
    for level in levels:
        if f"identical_after_wake{level}" in res and not res[f"identical_after_wake{level}"]:
            out.append(f"outputs differ after wake (level {level})")
        frac = res.get(f"sleep{level}_fraction_freed")
        if frac is not None and not 0.9 <= frac <= 1.0:
            out.append(f"sleep{level}_fraction_freed={frac:.3f} is outside [0.9, 1]")
    if res.get("sglang_req_states_after_ours"):
        out.append(
            f"SGLang holds {res['sglang_req_states_after_ours']} request states after our generations "
            "(host memory grows every call)"
        )
    if res.get("peer_same_weights") is False:
        out.append("the peers' per-parameter push left other weights than ours")
    for k in ("flat_same_weights", "live_same_weights_again"):
        if res.get(k) is False:
            out.append(f"{k}: the live and the flattened SGLang pushes left different weights")
    return out


def table(res: dict[str, Any], all_res: list[dict[str, Any]]) -> str:
    lines = [
        f"{res['engine']} + {res['strategy']}, {res['params_b']:.3g}B params, {res['weight_gib']:.2f} GiB "
        f"engine weights, {res['device']}; bw: device {res['bw_dev_gbps']:.0f} GB/s (read+write), "
        f"d2h {res['bw_d2h_gbps']:.1f} / h2d {res['bw_h2d_gbps']:.1f} GB/s; control call "
        f"{res['control_call_s'] * 1e3:.2f} ms",
        f"{'operation':<24}{'measured ms':>13}{'floor ms':>11}{'ratio':>8}",
    ]

    def row(name: str, key: str, floor_key: str | None) -> None:
        if key not in res:
            return
        m = res[key]
        fl = res.get(floor_key) if floor_key else None
        ratio = f"{m / fl:8.2f}" if fl else f"{'':>8}"
        fl_txt = f"{fl * 1e3:11.2f}" if fl is not None else f"{'':>11}"
        lines.append(f"{name:<24}{m * 1e3:13.2f}{fl_txt}{ratio}")

    row("push (bucketed)", "push_s", "push_floor_s")
    row("push fixed (1 tensor)", "push_fixed_s", None)
    row("push fixed, KV released", "push_fixed_asleep_s", None)
    row("push (flattened, SGLang)", "push_flat_s", "push_floor_s")
    row("push fixed (flattened)", "push_flat_fixed_s", None)
    row("per-param (ours)", "per_param_s", "push_floor_s")
    row("per-param (peer path)", "peer_per_param_s", "push_floor_s")
    for level in (2, 1):
        row(f"sleep level {level}", f"sleep{level}_s", f"sleep{level}_floor_s")
        row(f"sleep level {level} (1st)", f"sleep{level}_first_s", f"sleep{level}_floor_s")
        row(f"wake level {level}", f"wake{level}_s", f"wake{level}_floor_s")
        row(f"wake level {level} (1st)", f"wake{level}_first_s", f"wake{level}_floor_s")
    row("back (lvl 2: wake+push)", "back2_s", None)
    row("sleep+wake+push (lvl 2)", "cycle2_s", None)
    row("sleep+wake (lvl 1)", "cycle1_s", None)
    for k in (
        "gen_tok_s",
        "gen_rl_tok_s",
        "gen_rl_raw_n_tok_s",
        "gen_rl_ours_over_raw_n",
        "gen_floor_tok_s",
        "decode_graph_captured",
        "sglang_req_states_after_ours",
        "sglang_req_states_after_raw_n",
        "sglang_req_states_per_raw_n_call",
        "engine_start_s",
        "engine_total_gib",
        "sleep2_fraction_freed",
        "sleep1_fraction_freed",
    ):
        if res.get(k) is not None:
            lines.append(f"{k:<24}{res[k]:13.4g}")
    for k in (
        "push_live",
        "flat_same_weights",
        "live_same_weights_again",
        "peer_same_weights",
        "identical_after_wake2",
        "identical_after_wake1",
        "skipped",
    ):
        if k in res:
            lines.append(f"{k:<24}{res[k]!s:>13}")
    if len(all_res) > 1:
        lines.append(f"(rank 0 shown; {len(all_res)} ranks in the JSON)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
