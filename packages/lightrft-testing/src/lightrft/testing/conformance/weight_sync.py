"""Weight sync into an engine in bounded buckets, generation, engine sleep and wake."""

from __future__ import annotations

from typing import Any

import torch

from lightrft.strategy import SamplingParams, StrategyBase

from ..harness import build, full_params, train
from ..models import make_batches
from .spec import DATA_SEED, Capability, tiny_model


def measure(strategy: StrategyBase) -> dict[str, Any]:
    """Pushes trained weights into a FakeEngine in small buckets; the engine must then hold
    exactly the trained weights and generate what a local copy of the model generates."""
    model, optim, sched = build(strategy, tiny_model())
    train(strategy, model, optim, sched, make_batches(DATA_SEED, 1, strategy.config.train_batch_size))
    expected = full_params(strategy, model)
    bucket_bytes = 4096
    largest = max(t.numel() * 4 for t in expected.values())
    buckets = list(strategy.iter_weight_buckets(model, bucket_bytes))
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
    multi_tensor_over = [s for s, b in zip(sizes, buckets) if len(b) > 1 and s > bucket_bytes]
    # In an engine's dtype (sharded backends cast shards before gathering) and transient (each
    # bucket copied before the next is asked for): the same values, cast once.
    in_bf16 = {
        n: t.clone()
        for b in strategy.iter_weight_buckets(model, bucket_bytes, dtype=torch.bfloat16)
        for n, t in b
    }
    transient = {
        n: t.clone()
        for b in strategy.iter_weight_buckets(model, bucket_bytes, dtype=torch.bfloat16, transient=True)
        for n, t in b
    }
    cast_diffs = [
        float((d[k].float() - v.to(torch.bfloat16).float()).abs().max())
        if d[k].dtype == torch.bfloat16
        else -1.0
        for d in (in_bf16, transient)
        for k, v in expected.items()
    ]
    engine = strategy.setup_inference_engine(model=tiny_model(), engine_type="fake")
    strategy.update_engine_weights(model, bucket_bytes=bucket_bytes)
    engine_sd = dict(engine.model.named_parameters())  # type: ignore[attr-defined]
    max_diff = max(float((engine_sd[k].float() - v).abs().max()) for k, v in expected.items())
    # A reference copy of the trained model, generating greedily.
    ref = tiny_model()
    with torch.no_grad():
        for k, p in ref.named_parameters():
            p.copy_(expected[k])
    prompts = [[1, 2, 3], [4 + strategy.get_rank(), 5]]
    sp = SamplingParams(max_new_tokens=5, temperature=0.0)
    outs = strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=sp)
    ref_out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(5):
                ids.append(int(ref(torch.tensor([ids]))[0, -1].argmax()))
            ref_out.append(ids[len(p) :])
    # gather_and_generate put the engine to sleep at the config's level (2 by default: the
    # weights are gone); a push wakes it with them, then level 1 is checked on its own.
    strategy.update_engine_weights(model, bucket_bytes=bucket_bytes)
    slept = strategy.maybe_sleep_inference_engine(level=1)
    sleeping_error = ""
    try:
        engine.generate(prompt_token_ids=prompts, sampling_params=sp)
    except RuntimeError as e:
        sleeping_error = str(e)
    strategy.wakeup_inference_engine()
    after_wake = [o.output_token_ids for o in engine.generate(prompt_token_ids=prompts, sampling_params=sp)]
    engine.shutdown()
    strategy.inference_engine = None
    return {
        "names": sorted(engine.names_received),  # type: ignore[attr-defined]
        "expected_names": sorted(expected),
        "max_diff": max_diff,
        "cast_diffs": cast_diffs,
        "cast_names": [sorted(in_bf16), sorted(transient)],
        "bucket_sizes": sizes,
        "bucket_bytes": bucket_bytes,
        "largest": largest,
        "multi_tensor_over": multi_tensor_over,
        "num_buckets": len(buckets),
        "outputs": [o.output_token_ids for o in outs],
        "reference": ref_out,
        "slept": slept,
        "sleeping_error": sleeping_error,
        "after_wake": after_wake,
    }


def test_weight_sync_to_engine(suite: Any) -> None:
    for r in suite.results("weight_sync"):
        assert r["names"] == r["expected_names"]
        assert r["max_diff"] == 0.0
        # bf16 buckets (plain and transient) hold every weight, cast exactly once (-1: not bf16).
        assert r["cast_names"] == [r["expected_names"]] * 2
        assert max(r["cast_diffs"]) == 0.0 and min(r["cast_diffs"]) == 0.0
        assert r["num_buckets"] > 1
        assert r["multi_tensor_over"] == [], "a bucket of several tensors exceeded bucket_bytes"
        assert max(r["bucket_sizes"]) <= max(r["bucket_bytes"], r["largest"])
        assert r["outputs"] == r["reference"]


def test_engine_sleep_and_wake(suite: Any) -> None:
    for r in suite.results("weight_sync"):
        assert r["slept"] is True
        assert "asleep" in r["sleeping_error"]
        assert r["after_wake"] == r["reference"]


CAPABILITY = Capability("weight_sync", measure, (test_weight_sync_to_engine, test_engine_sleep_and_wake))
