"""EngineLifecycle through StrategyBase's engine methods, called the way LightRFT code calls them
(``setup_inference_engine(args, engine_type=..., actor=...)``, ``gather_and_generate(sampling_params,
all_prompt_token_ids=..., sleep_engine=True)``, ``engine_generate_local(...)``) and this project's way."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightrft.strategy import EngineNotSetUpWarning, SamplingParams, get_fake_strategy
from lightrft.strategy.engine import as_sampling_params, lightrft_multi_modal_inputs
from lightrft.testing import FakeEngine, make_tiny_model
from lightrft.testing.models import make_batches

PROMPTS = [[1, 2, 3], [4, 5]]


def _strategy(**kw):
    cfg = {"train_batch_size": 2, "micro_train_batch_size": 2, "bf16": False, "seed": 7, **kw}
    return get_fake_strategy(cfg)


def _trained(strategy):
    model = make_tiny_model(3)
    optim = strategy.create_optimizer(model, lr=1e-2)
    model, optim, _ = strategy.prepare((model, optim, None))
    for batch in make_batches(0, 1, 2, vocab_size=64):
        logits = model(batch)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), batch[:, 1:].reshape(-1))
        strategy.backward(loss, model, optim)
        strategy.optimizer_step(optim, model, None)
    return model


def _greedy(model, prompts, n):
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            out.append(ids[len(p) :])
    return out


def _vllm_like(max_tokens=4, **kw):
    """What a LightRFT call site passes: an object with vllm.SamplingParams' field names."""
    base = dict(
        max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=-1, n=1, stop_token_ids=[], seed=None
    )
    base["logprobs"] = kw.pop("logprobs", None)
    return SimpleNamespace(**{**base, **kw})


def test_lightrft_call_sites_setup_with_actor_gather_and_sleep():
    # Generates again after sleeping, with no push between: the loop level 1 is for (a host copy).
    # At the default level 2 that second generation raises (the level-2 test below).
    strategy = _strategy(engine_sleep_level=1)
    actor = _trained(strategy)
    args = SimpleNamespace(pretrain=None)
    engine = strategy.setup_inference_engine(args, engine_type="fake", actor=actor)
    assert isinstance(engine, FakeEngine) and strategy.inference_engine is engine
    assert engine.updates == 1  # the actor's weights were pushed at setup (FakeEngine starts at zero)
    outs = strategy.gather_and_generate(_vllm_like(4), all_prompt_token_ids=PROMPTS, sleep_engine=True)
    assert [o.output_token_ids for o in outs] == _greedy(actor, PROMPTS, 4)
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    assert engine.is_sleeping and strategy.engine_lifecycle.is_sleeping  # enable_engine_sleep=True
    # engine_generate_local(sampling_params, prompt_token_ids, multi_modal_inputs) wakes it again.
    local = strategy.engine_generate_local(_vllm_like(4), PROMPTS, None)
    assert [o.output_token_ids for o in local] == _greedy(actor, PROMPTS, 4)
    assert not engine.is_sleeping
    assert strategy.gather_and_generate(_vllm_like(), all_prompt_token_ids=[]) == []
    assert strategy.engine_generate_local(_vllm_like(), [], None) == []


def test_this_projects_keywords_still_work_and_sleep_engine_false_keeps_it_awake():
    strategy = _strategy()
    actor = _trained(strategy)
    engine = strategy.setup_inference_engine(model=make_tiny_model(3), engine_type="fake")
    strategy.update_engine_weights(actor)
    outs = strategy.gather_and_generate(
        prompt_token_ids=PROMPTS,
        sampling_params=SamplingParams(max_new_tokens=3, temperature=0.0),
        sleep_engine=False,
    )
    assert [o.output_token_ids for o in outs] == _greedy(actor, PROMPTS, 3)
    assert not engine.is_sleeping


def test_sleep_state_is_read_from_the_engine_not_copied():
    strategy = _strategy()
    engine = strategy.setup_inference_engine(model=make_tiny_model(0), engine_type="fake")
    engine.sleep(1)  # behind the strategy's back
    assert strategy.engine_lifecycle.is_sleeping
    assert strategy.maybe_sleep_inference_engine() is True
    engine.wake_up()
    assert strategy.engine_lifecycle.is_sleeping is False


def test_update_engine_weights_without_engine_warns_and_pushes_nothing():
    strategy = _strategy()
    actor = _trained(strategy)
    with pytest.warns(EngineNotSetUpWarning, match="before setup_inference_engine"):
        strategy.update_engine_weights(actor)
    assert strategy.inference_engine is None


def test_level2_sleep_cannot_be_woken_without_a_push_and_push_restores_in_order():
    strategy = _strategy(engine_sleep_level=2)
    actor = _trained(strategy)
    engine = strategy.setup_inference_engine(model=make_tiny_model(3), engine_type="fake")
    strategy.update_engine_weights(actor)
    resets = engine.prefix_cache_resets
    assert strategy.maybe_sleep_inference_engine() is True and engine.needs_weight_push
    with pytest.raises(RuntimeError, match="update_engine_weights"):
        strategy.wakeup_inference_engine()
    with pytest.raises(RuntimeError, match="update_engine_weights"):
        strategy.gather_and_generate(_vllm_like(), all_prompt_token_ids=PROMPTS)
    strategy.update_engine_weights(actor)
    assert not engine.is_sleeping and not engine.needs_weight_push
    assert engine.prefix_cache_resets == resets + 1
    outs = strategy.gather_and_generate(_vllm_like(4), all_prompt_token_ids=PROMPTS, sleep_engine=False)
    assert [o.output_token_ids for o in outs] == _greedy(actor, PROMPTS, 4)


def test_enable_engine_sleep_false_never_sleeps():
    strategy = _strategy(enable_engine_sleep=False)
    engine = strategy.setup_inference_engine(model=make_tiny_model(0), engine_type="fake")
    assert strategy.maybe_sleep_inference_engine(level=2) is False and not engine.is_sleeping
    with pytest.raises(ValueError, match="level=3 is invalid"):
        strategy.maybe_sleep_inference_engine(level=3)


def test_positional_prompts_in_sampling_params_slot_is_a_clear_error():
    strategy = _strategy()
    strategy.setup_inference_engine(model=make_tiny_model(0), engine_type="fake")
    with pytest.raises(TypeError, match="first positional argument is sampling_params"):
        strategy.gather_and_generate(PROMPTS)


def test_engine_missing_protocol_members_is_refused():
    from lightrft.strategy import register_engine

    class Half:
        def __init__(self, **_):
            pass

        def generate(self, **_):
            return []

        def shutdown(self):
            pass

    register_engine("half-engine", Half)
    strategy = _strategy()
    with pytest.raises(TypeError, match=r"lacks \['update_weights', 'sleep', 'wake_up'"):
        strategy.setup_inference_engine(model=make_tiny_model(0), engine_type="half-engine")
    assert strategy.inference_engine is None


def test_no_engine_errors_name_setup():
    strategy = _strategy()
    with pytest.raises(RuntimeError, match="setup_inference_engine"):
        strategy.gather_and_generate(_vllm_like(), all_prompt_token_ids=PROMPTS)
    assert strategy.maybe_sleep_inference_engine() is False


def test_sampling_params_conversion():
    sp = as_sampling_params(
        _vllm_like(7, temperature=0.5, n=3, stop_token_ids=[2], seed=5, logprobs=0, top_k=0)
    )
    assert (sp.max_new_tokens, sp.temperature, sp.n, sp.stop_token_ids, sp.seed, sp.logprobs, sp.top_k) == (
        7,
        0.5,
        3,
        [2],
        5,
        True,
        -1,
    )
    assert as_sampling_params({"max_new_tokens": 2}).max_new_tokens == 2
    with pytest.raises(ValueError, match=r"\['max_tokens'\] are unknown"):
        as_sampling_params({"max_tokens": 2})
    with pytest.raises(TypeError, match="sampling_params must be"):
        as_sampling_params(3)


def test_lightrft_multimodal_arguments_become_one_dict_per_prompt():
    nested = lightrft_multi_modal_inputs(3, [["a", "b"], None, ["c"]])
    assert nested == [{"image": ["a", "b"]}, None, {"image": ["c"]}]
    flat = lightrft_multi_modal_inputs(2, ["a", "b", "c"], images_num=[1, 2], all_videos=None)
    assert flat == [{"image": ["a"]}, {"image": ["b", "c"]}]
    assert lightrft_multi_modal_inputs(2, [None, None]) is None
    with pytest.raises(ValueError, match="3 image/video entries for 2 prompts"):
        lightrft_multi_modal_inputs(2, ["a", "b", "c"])


@pytest.mark.parametrize(
    ("casts_on_copy", "world", "expected"),
    [(True, 1, None), (False, 1, torch.bfloat16), (True, 2, torch.bfloat16), (False, 2, torch.bfloat16)],
)
def test_push_dtype_is_the_masters_own_only_for_a_casting_engine_on_one_rank(
    monkeypatch, casts_on_copy, world, expected
):
    # One rank and an engine that rounds in its own copy: the strategy sends its masters uncast
    # (a cast first would write and read one more copy of the weights). Several ranks: cast
    # before gathering, so the collective moves the engine's bytes.
    strategy = _strategy()
    actor = _trained(strategy)
    engine = strategy.setup_inference_engine(SimpleNamespace(pretrain=None), engine_type="fake", actor=actor)
    engine.weight_dtype, engine.casts_on_copy = torch.bfloat16, casts_on_copy
    asked = []
    real = strategy.iter_weight_buckets

    def recording(model, bucket_bytes=None, *, dtype=None, transient=False):
        asked.append((dtype, transient))
        return real(model, bucket_bytes, dtype=dtype, transient=transient)

    monkeypatch.setattr(strategy, "iter_weight_buckets", recording)
    monkeypatch.setattr(type(strategy), "world_size", property(lambda self: world))
    assert strategy.engine_lifecycle.push_dtype() is expected
    strategy.update_engine_weights(actor)
    assert asked == [(expected, False)]


def test_an_engine_that_maps_live_weights_is_told_the_parameters_storages(monkeypatch):
    # The one engine that keeps a mapping of pushed tensors across pushes (SGLang's live push)
    # learns which of them are the parameters themselves; every other engine is called as before.
    from lightrft.strategy.weights import live_storages

    strategy = _strategy()
    actor = _trained(strategy)
    engine = strategy.setup_inference_engine(SimpleNamespace(pretrain=None), engine_type="fake", actor=actor)
    seen = []
    real = engine.update_weights

    def recording(buckets, **kw):
        seen.append(kw)
        return real(buckets)

    monkeypatch.setattr(engine, "update_weights", recording)
    strategy.update_engine_weights(actor)
    assert seen == [{}]
    engine.maps_live_weights = True
    strategy.update_engine_weights(actor)
    expected = {p.untyped_storage().data_ptr() for p in actor.parameters()}
    assert seen[1] == {"live_storages": expected} and live_storages(actor) == expected
    assert live_storages(object()) == frozenset()  # not a module: nothing is live
