"""SGLangEngine with real SGLang on 2 GPUs (skipped, with the reason, without 2 GPUs and SGLang).

One ``torchrun`` job runs :func:`sglang_gpu_checks` on 2 ranks: a tensor-parallel-2 engine (one
for both ranks), then a tensor-parallel-1 engine per rank, each colocated with FSDP2 and DeepSpeed
ZeRO-3 training in the same processes, so each engine starts once (SGLang takes about a minute to
start). ``scripts/gpu-sglang.sh`` runs this file on the GPU machine.

SGLang logs at info to stderr and to ``$LIGHTRFT_SGLANG_LOG_DIR`` (scripts/gpu-sglang.sh: ``$OUT/sglang-logs``);
an engine not ready within ``LIGHTRFT_SGLANG_START_TIMEOUT`` (200 s here) fails on every rank with
the last scheduler lines and their Python stacks; ``LIGHTRFT_SGLANG_TEST_TIMEOUT`` (420 s) bounds
the whole torchrun job.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Any

import pytest
import torch

from lightrft.strategy import SamplingParams
from lightrft.testing import make_tiny_llama, run_distributed

#: Names compared with SGLang's own copy (``Engine.get_weights_by_name``: the first rows of a
#: matrix, gathered over TP ranks for row-parallel layers).
CHECKED_WEIGHTS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.1.mlp.gate_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
]
VOCAB = 1024
#: The largest absolute error of a float32 log on [1, 2): CUDA's fast ``__logf`` 2**-21.41, PTX
#: ``lg2.approx`` 2**-22.6 times ln 2 (CUDA C Programming Guide, intrinsic functions; correctly
#: rounded ``logf`` is within half an ulp of log(x) < 1 there: 2**-25). The bound on a log-prob.
LOG_ABS_ERR = 2**-21


def _model(seed: int) -> Any:
    # head_dim 128 (hidden 512, 4 heads), 2 KV heads: SGLang's attention kernels need head_dim >= 64.
    return make_tiny_llama(seed, vocab_size=VOCAB, hidden_size=512, num_layers=4)


def _config(tp: int, strategy: str, **kw: Any) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "engine_type": "sglang",
        "engine_tp_size": tp,
        "enable_engine_sleep": True,
        "engine_sleep_level": 2,
        "engine_mem_util": 0.25,
        "bf16": True,
        "seed": 7,
        "train_batch_size": 4,
        "micro_train_batch_size": 2,
        "actor_learning_rate": 1e-3,
        "lr_warmup_ratio": 0.0,
        **kw,
    }


def _free() -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def _engine_rows(engine: Any, name: str, rows: int = 4) -> torch.Tensor | None:
    """SGLang's copy of the first ``rows`` rows of a weight (first rank of the group only)."""
    if not engine.is_leader:
        return None
    value = engine.engine.get_weights_by_name(name, truncate_size=rows)
    return torch.tensor(value, dtype=torch.float32)


def _weights_match(engine: Any, full: dict[str, torch.Tensor]) -> bool | None:
    """Whether SGLang's weights equal ``full`` (cast to the engine's dtype) exactly."""
    if not engine.is_leader:
        return None
    for name in CHECKED_WEIGHTS:
        got = _engine_rows(engine, name)
        want = full[name][: got.shape[0]].to(engine.dtype).float().cpu()
        if got.shape != want.shape or not torch.equal(got, want):
            return False
    return True


def _full(strategy: Any, model: Any) -> dict[str, torch.Tensor]:
    return {n: t.detach().float().cpu().clone() for b in strategy.iter_weight_buckets(model) for n, t in b}


def _train(strategy: Any, model: Any, steps: int) -> tuple[list[float], Any]:
    """``steps`` optimizer steps on one fixed batch (the loss must fall). DeepSpeed gets a
    ``torch.optim.AdamW`` (its FusedAdam would JIT-compile for a minute first)."""
    model = strategy.prepare_model(model, is_training=True)
    lr = strategy.config.actor_learning_rate
    if strategy.config.backend == "deepspeed":
        optim = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        optim = strategy.create_optimizer(model, lr=lr)
    model, optim, _ = strategy.prepare((model, optim, None))
    g = torch.Generator().manual_seed(3)
    batch = torch.randint(0, VOCAB, (strategy.config.micro_train_batch_size, 32), generator=g).to(
        strategy.device
    )
    losses = []
    for _ in range(steps):
        logits = model(batch).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        strategy.backward(loss, model, optim)
        strategy.optimizer_step(optim, model)
        losses.append(float(loss))
    return losses, model


def _phase(tp: int, trained: dict[str, Any]) -> dict[str, Any]:
    """One engine of tensor-parallel size ``tp`` (per group), colocated with FSDP2 and ZeRO-3."""
    from lightrft.strategy import get_strategy

    out: dict[str, Any] = {"tp": tp}
    fsdp = get_strategy(_config(tp, "fsdp"))  # the process group exists: only the config is new
    rank = fsdp.get_rank()
    model = _model(0)
    # ignore_eos: the random model may pick its eos id (2); every completion is 12 tokens long.
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, n=2, logprobs=True, extra={"ignore_eos": True})
    prompts = [[5, 6, 7, 8], [100, 200]] if rank == 0 else [[9, 10, 11], [300, 301, 302, 303, 304]]

    # ---- start: one engine per TP group, weights pushed from the whole model
    free0 = _free()
    t0 = time.perf_counter()
    # Decode CUDA graphs up to micro_rollout_batch_size (8) x engine_tp_size: the engine's default.
    engine = fsdp.setup_inference_engine(model=model)
    out["start_s"] = time.perf_counter() - t0
    out["engine_bytes"] = free0 - _free()  # this GPU's share of the engine (its scheduler)
    out["version"] = list(engine.version)
    out["leader"] = engine.is_leader
    out["group"] = engine.group_ranks
    if engine.is_leader:
        args = engine.server_args
        keys = ("tp_size", "base_gpu_id", "cuda_graph_backend_prefill", "cuda_graph_max_bs_decode", "dtype")
        out["server_args"] = {k: str(args.get(k)) for k in keys}
        out["log_path"] = str(engine.log_path)
    out["initial_weights_match"] = _weights_match(
        engine, {n: p.detach() for n, p in model.named_parameters()}
    )

    # ---- generation: counts, log-probs, determinism, stop tokens, sampling
    first = fsdp.gather_and_generate(sp, all_prompt_token_ids=prompts, sleep_engine=False)
    again = fsdp.gather_and_generate(sp, all_prompt_token_ids=prompts, sleep_engine=False)
    out["n_outputs"] = len(first)
    out["deterministic"] = [o.output_token_ids for o in first] == [o.output_token_ids for o in again]
    out["n_samples_equal_when_greedy"] = all(
        first[2 * i].output_token_ids == first[2 * i + 1].output_token_ids for i in range(len(prompts))
    )
    out["prompt_ids_kept"] = [o.prompt_token_ids for o in first[::2]] == prompts
    out["lengths"] = [len(o.output_token_ids) for o in first]
    # A log-prob is (x - max) - log(sum exp(x_i - max)): x - max <= 0 exactly, the rounded sum
    # >= 1 (its largest term is exp(0) = 1, and rounding is monotone), so it is <= 0 but for the
    # error of the log near 1: at most LOG_ABS_ERR above 0, whatever the dtype.
    out["logprobs_ok"] = all(
        o.logprobs is not None
        and len(o.logprobs) == len(o.output_token_ids)
        and max(o.logprobs) <= LOG_ABS_ERR
        for o in first
    )
    stop = first[0].output_token_ids[3]
    stopped = fsdp.gather_and_generate(
        SamplingParams(12, 0.0, stop_token_ids=[stop]), all_prompt_token_ids=prompts[:1], sleep_engine=False
    )[0]
    out["stop_ok"] = (
        stopped.output_token_ids[-1] == stop
        and stopped.finish_reason == "stop"
        and stopped.output_token_ids == first[0].output_token_ids[: len(stopped.output_token_ids)]
    )
    sampled = fsdp.gather_and_generate(
        SamplingParams(12, 1.0, n=4), all_prompt_token_ids=prompts[:1], sleep_engine=False
    )
    out["sampled_distinct"] = len({tuple(o.output_token_ids) for o in sampled})

    # ---- perturb, then restore: outputs change, then come back exactly
    g = torch.Generator().manual_seed(11)
    noisy = [[(n, p.detach() + 0.5 * torch.randn(p.shape, generator=g)) for n, p in model.named_parameters()]]
    engine.update_weights(noisy)
    perturbed = fsdp.gather_and_generate(sp, all_prompt_token_ids=prompts, sleep_engine=False)
    out["perturbed_differs"] = [o.output_token_ids for o in perturbed] != [o.output_token_ids for o in first]
    engine.update_weights([list(model.named_parameters())])
    restored = fsdp.gather_and_generate(sp, all_prompt_token_ids=prompts, sleep_engine=False)
    out["restored_identical"] = [o.output_token_ids for o in restored] == [o.output_token_ids for o in first]
    out["restored_logprobs_identical"] = [o.logprobs for o in restored] == [o.logprobs for o in first]

    # ---- release frees the engine's memory; resume + push gives identical outputs
    before = _free()
    t0 = time.perf_counter()
    fsdp.maybe_sleep_inference_engine()
    out["release_s"] = time.perf_counter() - t0
    out["released_bytes"] = _free() - before
    out["needs_push_after_release"] = engine.needs_weight_push
    try:
        fsdp.engine_generate_local(sp, prompt_token_ids=prompts)
        out["generate_refused"] = False
    except RuntimeError as e:
        out["generate_refused"] = "update_engine_weights" in str(e)
    t0 = time.perf_counter()
    fsdp.update_engine_weights(model)
    out["resume_push_s"] = time.perf_counter() - t0
    resumed = fsdp.gather_and_generate(sp, all_prompt_token_ids=prompts, sleep_engine=False)
    out["resumed_identical"] = [o.output_token_ids for o in resumed] == [o.output_token_ids for o in first]
    out["awake_after_push"] = not engine.is_sleeping and not engine.needs_weight_push

    # ---- FSDP2 training colocated: sleep, train, push, generate (sleeps again afterwards)
    fsdp.maybe_sleep_inference_engine()
    if "fsdp" not in trained:
        trained["fsdp_losses"], trained["fsdp"] = _train(fsdp, _model(0), 6)
        trained["zero3_strategy"] = get_strategy(_config(tp, "deepspeed", zero_stage=3))
        trained["zero3_losses"], trained["zero3"] = _train(trained["zero3_strategy"], _model(1), 6)
    out["fsdp_losses"] = trained["fsdp_losses"][:: len(trained["fsdp_losses"]) - 1]
    out["zero3_losses"] = trained["zero3_losses"][:: len(trained["zero3_losses"]) - 1]
    fsdp.update_engine_weights(trained["fsdp"])
    full = _full(fsdp, trained["fsdp"])
    out["fsdp_weights_match"] = _weights_match(engine, full)
    out["fsdp_weights_changed"] = any(
        not torch.equal(full[n], p.detach().float()) for n, p in model.named_parameters()
    )
    after_fsdp = fsdp.gather_and_generate(sp, all_prompt_token_ids=prompts, sleep_engine=True)
    out["fsdp_outputs_changed"] = [o.output_token_ids for o in after_fsdp] != [
        o.output_token_ids for o in first
    ]
    out["asleep_after_generate"] = engine.is_sleeping

    # ---- ZeRO-3 (trained in the same processes): push into the same engine
    ds = trained["zero3_strategy"]
    fsdp.inference_engine = None  # hand the engine over without shutting it down
    ds.inference_engine = engine
    t0 = time.perf_counter()
    ds.update_engine_weights(trained["zero3"])
    out["zero3_resume_push_s"] = time.perf_counter() - t0
    z3 = _full(ds, trained["zero3"])
    out["zero3_weights_match"] = _weights_match(engine, z3)
    out["zero3_differs_from_fsdp"] = not torch.equal(z3["model.norm.weight"], full["model.norm.weight"])
    out["zero3_outputs"] = len(ds.gather_and_generate(sp, all_prompt_token_ids=prompts, sleep_engine=False))
    ds.inference_engine = None
    engine.shutdown()
    return out


def sglang_gpu_checks() -> dict[str, Any]:
    """Runs on 2 ranks with 2 GPUs: a tensor-parallel-2 engine, then one engine per rank. The
    training models (FSDP2 and ZeRO-3) are trained once and pushed into both."""
    trained: dict[str, Any] = {}
    return {"tp2": _phase(2, trained), "tp1": _phase(1, trained)}


def _has_sglang() -> bool:
    return importlib.util.find_spec("sglang") is not None


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    if not _has_sglang():
        pytest.skip("SGLang is not installed (GPU machine: PYTHONPATH=/tmp/ssite, see scripts/gpu-sglang.sh)")
    env = {
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
        # SGLang's log at info on stderr (and in a file), and a start that fails within 200 s with
        # the last scheduler lines and stacks instead of waiting for the whole job's limit.
        "LIGHTRFT_SGLANG_LOG_LEVEL": os.environ.get("LIGHTRFT_SGLANG_LOG_LEVEL", "info"),
        "LIGHTRFT_SGLANG_START_TIMEOUT": os.environ.get("LIGHTRFT_SGLANG_START_TIMEOUT", "200"),
    }
    timeout = int(os.environ.get("LIGHTRFT_SGLANG_TEST_TIMEOUT", "420"))
    return run_distributed(sglang_gpu_checks, 2, env=env, timeout=timeout)


@pytest.fixture(params=["tp2", "tp1"])
def checks(ranks: list[dict[str, Any]], request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return [r[request.param] for r in ranks]


@pytest.mark.gpu(2)
def test_engine_per_tensor_parallel_group(checks: list[dict[str, Any]]) -> None:
    r0, r1 = checks
    tp = r0["tp"]
    assert r0["leader"] and r1["leader"] == (tp == 1)
    if tp == 2:
        assert r0["group"] == r1["group"] == [0, 1]
    else:
        assert (r0["group"], r1["group"]) == ([0], [1])
    assert r0["server_args"]["tp_size"] == str(tp) and r0["server_args"]["base_gpu_id"] == "0"
    if tp == 1:
        assert r1["server_args"]["base_gpu_id"] == "1"
    if tuple(r0["version"]) >= (0, 5, 16):  # the memory saver turns prefill graphs off
        assert r0["server_args"]["cuda_graph_backend_prefill"] == "disabled"
        assert r0["server_args"]["cuda_graph_max_bs_decode"] == str(8 * tp)
    assert r0["server_args"]["dtype"] == "bfloat16"
    assert r0["initial_weights_match"] is True


@pytest.mark.gpu(2)
def test_generation(checks: list[dict[str, Any]]) -> None:
    for r in checks:
        assert r["n_outputs"] == 4 and r["prompt_ids_kept"]
        assert r["deterministic"] and r["n_samples_equal_when_greedy"] and r["logprobs_ok"]
        assert r["lengths"] == [12] * 4
        assert r["stop_ok"]
        assert r["sampled_distinct"] >= 2  # temperature 1 over a 1024-token vocabulary


@pytest.mark.gpu(2)
def test_perturb_then_restore(checks: list[dict[str, Any]]) -> None:
    for r in checks:
        assert r["perturbed_differs"] and r["restored_identical"] and r["restored_logprobs_identical"]


@pytest.mark.gpu(2)
def test_release_frees_the_engine_memory_and_resume_push_restores(checks: list[dict[str, Any]]) -> None:
    for r in checks:
        assert r["engine_bytes"] > 1 << 30, r  # KV cache at engine_mem_util 0.25 of an 80 GB card
        assert r["released_bytes"] >= 0.9 * r["engine_bytes"], (r["released_bytes"], r["engine_bytes"])
        assert r["needs_push_after_release"] and r["generate_refused"]
        assert r["resumed_identical"] and r["awake_after_push"]


@pytest.mark.gpu(2)
def test_colocated_fsdp2_and_zero3_training(checks: list[dict[str, Any]]) -> None:
    r0 = checks[0]
    for r in checks:
        assert r["fsdp_losses"][1] < r["fsdp_losses"][0] and r["zero3_losses"][1] < r["zero3_losses"][0]
        assert r["asleep_after_generate"] and r["zero3_outputs"] == 4
    for r in checks if r0["tp"] == 1 else [r0]:  # each engine's first rank reads SGLang's weights
        assert r["fsdp_weights_match"] is True and r["fsdp_weights_changed"] and r["fsdp_outputs_changed"]
        assert r["zero3_weights_match"] is True and r["zero3_differs_from_fsdp"]
