import pytest
import torch

from lightrft.strategy import InferenceEngine, SamplingParams
from lightrft.testing import FakeEngine, make_tiny_model


def _weights(seed):
    return [(n, p.detach().clone()) for n, p in make_tiny_model(seed).named_parameters()]


def test_is_an_inference_engine_and_starts_empty():
    engine = FakeEngine(model=make_tiny_model(0))
    assert isinstance(engine, InferenceEngine)
    assert all(float(p.abs().sum()) == 0 for p in engine.model.parameters())


def test_generation_follows_pushed_weights():
    engine = FakeEngine(model=make_tiny_model(0))
    prompts = [[1, 2, 3]]
    engine.update_weights([_weights(5)])
    a = engine.generate(
        prompt_token_ids=prompts, sampling_params=SamplingParams(max_new_tokens=6, temperature=0.0)
    )
    engine.update_weights([_weights(6)])
    b = engine.generate(
        prompt_token_ids=prompts, sampling_params=SamplingParams(max_new_tokens=6, temperature=0.0)
    )
    ref = make_tiny_model(5)
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(ref(torch.tensor([ids]))[0, -1].argmax()))
    assert a[0].output_token_ids == ids[3:]
    assert b[0].output_token_ids != a[0].output_token_ids
    assert engine.updates == 2 and engine.buckets_received == 2


def test_sampling_is_seeded_and_stops():
    engine = FakeEngine(model=make_tiny_model(0), zero_init=False)
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, n=2, logprobs=True)
    a = engine.generate(prompt_token_ids=[[1]], sampling_params=sp)
    b = engine.generate(prompt_token_ids=[[1]], sampling_params=sp)
    assert [o.output_token_ids for o in a] == [o.output_token_ids for o in b] and len(a) == 2
    assert all(len(o.logprobs) == len(o.output_token_ids) and max(o.logprobs) <= 0 for o in a)
    first = a[0].output_token_ids[0]
    stopped = engine.generate(
        prompt_token_ids=[[1]], sampling_params=SamplingParams(8, 1.0, seed=3, stop_token_ids=[first])
    )
    assert stopped[0].output_token_ids == [first] and stopped[0].finish_reason == "stop"


def test_bad_weights_are_named():
    engine = FakeEngine(model=make_tiny_model(0))
    with pytest.raises(KeyError, match="'nope'"):
        engine.update_weights([[("nope", torch.zeros(1))]])
    with pytest.raises(ValueError, match=r"'lm_head.weight' has shape \(2, 2\)"):
        engine.update_weights([[("lm_head.weight", torch.zeros(2, 2))]])


def test_sleep_levels_and_shutdown():
    engine = FakeEngine(model=make_tiny_model(0))
    engine.update_weights([_weights(1)])
    engine.sleep(1)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(prompt_token_ids=[[1]])
    engine.wake_up()
    assert engine.generate(prompt_token_ids=[[1]])
    engine.sleep(2)
    engine.wake_up()
    with pytest.raises(RuntimeError, match="discarded"):
        engine.generate(prompt_token_ids=[[1]])
    engine.update_weights([_weights(1)])
    assert engine.generate(prompt_token_ids=[[1]])
    with pytest.raises(ValueError, match="level=3"):
        engine.sleep(3)
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate(prompt_token_ids=[[1]])
