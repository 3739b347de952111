import pytest
import torch

from lightrft.strategy import InferenceEngine, SamplingParams, get_fake_strategy
from lightrft.testing import make_tiny_llama

pytest.importorskip("transformers")


def _greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_weights_flow_from_the_strategy_into_generation():
    strategy = get_fake_strategy({"train_batch_size": 2, "micro_train_batch_size": 2, "bf16": False})
    trained = make_tiny_llama(seed=1)
    engine = strategy.setup_inference_engine(model=make_tiny_llama(seed=2), engine_type="hf")
    assert isinstance(engine, InferenceEngine)
    sp = SamplingParams(max_new_tokens=5, temperature=0.0)
    before = engine.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=sp)[0].output_token_ids
    strategy.prepare((trained, strategy.create_optimizer(trained), None))
    strategy.update_engine_weights(trained, bucket_bytes=1 << 14)
    after = strategy.gather_and_generate(prompt_token_ids=[[1, 2, 3]], sampling_params=sp)[0]
    assert after.output_token_ids == _greedy(trained, [1, 2, 3], 5)[3:]
    assert after.output_token_ids != before  # different seeds, different greedy continuations


def test_weight_rows_read_back_the_pushed_weights_in_the_engine_dtype():
    strategy = get_fake_strategy({"train_batch_size": 2, "micro_train_batch_size": 2, "bf16": True})
    trained = make_tiny_llama(seed=1)
    engine = strategy.setup_inference_engine(model=make_tiny_llama(seed=2), engine_type="hf")
    strategy.prepare((trained, strategy.create_optimizer(trained), None))
    strategy.update_engine_weights(trained)
    name = "model.layers.0.self_attn.o_proj.weight"
    rows = engine.weight_rows(name, 2)
    want = dict(trained.named_parameters())[name].detach()[:2].to(torch.bfloat16)
    assert rows.dtype == torch.bfloat16 and rows.device.type == "cpu" and rows.shape == want.shape
    assert torch.equal(rows, want)  # the push rounds once to bf16: bitwise the cast master
    with pytest.raises(KeyError, match="no parameter 'model.nope'"):
        engine.weight_rows("model.nope", 2)


def test_sampling_n_logprobs_and_stop():
    engine = __import__("lightrft.engines", fromlist=["HFEngine"]).HFEngine(model=make_tiny_llama(seed=3))
    out = engine.generate(
        prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(6, 1.0, n=3, seed=0, logprobs=True)
    )
    assert len(out) == 3 and all(len(o.output_token_ids) == 6 for o in out)
    assert all(len(o.logprobs) == 6 and max(o.logprobs) <= 0 for o in out)
    first = engine.generate(prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(6, 0.0))[
        0
    ].output_token_ids[0]
    stopped = engine.generate(
        prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(6, 0.0, stop_token_ids=[first])
    )
    assert stopped[0].output_token_ids == [first] and stopped[0].finish_reason == "stop"


def test_sleep_levels():
    from lightrft.engines import HFEngine

    model = make_tiny_llama(seed=4)
    engine = HFEngine(model=model)
    sp = SamplingParams(4, 0.0)
    ref = engine.generate(prompt_token_ids=[[1]], sampling_params=sp)[0].output_token_ids
    engine.sleep(1)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(prompt_token_ids=[[1]])
    engine.wake_up()
    assert engine.generate(prompt_token_ids=[[1]], sampling_params=sp)[0].output_token_ids == ref
    engine.sleep(2)
    engine.wake_up()
    with pytest.raises(RuntimeError, match="freed"):
        engine.generate(prompt_token_ids=[[1]])
    engine.update_weights([[(n, p.detach()) for n, p in model.named_parameters()]])
    assert engine.generate(prompt_token_ids=[[1]], sampling_params=sp)[0].output_token_ids == ref
    with pytest.raises(KeyError, match="'bogus'"):
        engine.update_weights([[("bogus", torch.zeros(1))]])


def test_unknown_and_uninstalled_engines_are_explained():
    strategy = get_fake_strategy({"train_batch_size": 2, "micro_train_batch_size": 2})
    with pytest.raises(ImportError, match=r"lightrft-engines\[vllm\]"):
        strategy.setup_inference_engine(model=make_tiny_llama(), engine_type="vllm")
    with pytest.raises(ValueError, match="engine_type='nope'.*'hf'"):
        strategy.setup_inference_engine(model=make_tiny_llama(), engine_type="nope")
