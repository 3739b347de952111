"""Engine settings written once (StrategyConfig's rules) and used by the hf engine too, one
meaning per sleep level on every engine, and the vLLM process rule (one sleep-mode engine per
process: reuse or a clear refusal) against a stand-in of ``vllm.LLM``."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

from lightrft.engines import HFEngine, _common, _vllm_process
from lightrft.strategy import SamplingParams, get_fake_strategy
from lightrft.testing import make_lora_like, make_tiny_llama, rank_threads

pytest.importorskip("transformers")

CFG = {"train_batch_size": 1, "micro_train_batch_size": 1, "seed": 3}
LEVEL_2_ERROR = r"wakeup_inference_engine\(\): the '(hf|fake)' engine discarded its weights \(sleep level 2\)"


# ------------------------------------------------------------------ hf follows the shared rules
@pytest.mark.parametrize(
    "cfg,dtype",
    [({"engine_dtype": "float16"}, torch.float16), ({"bf16": False}, torch.float32), ({}, torch.bfloat16)],
)
def test_hf_engine_dtype_follows_engine_dtype(cfg, dtype):
    strategy = get_fake_strategy({**CFG, **cfg})
    engine = strategy.setup_inference_engine(model=make_tiny_llama(seed=0), engine_type="hf")
    assert {p.dtype for p in engine.model.parameters()} == {dtype} and engine.weight_dtype == dtype


def test_hf_engine_max_len_refuses_and_stops_like_the_server_engines():
    strategy = get_fake_strategy({**CFG, "bf16": False, "engine_max_model_len": 12})
    engine = strategy.setup_inference_engine(model=make_tiny_llama(seed=0), engine_type="hf")
    assert engine.max_model_len == 12
    with pytest.raises(ValueError, match=r"prompt 1 has 12 tokens.*max_model_len=12"):
        engine.generate(prompt_token_ids=[[1, 2], [3] * 12], sampling_params=SamplingParams(4, 0.0))
    out = engine.generate(prompt_token_ids=[[1] * 9], sampling_params=SamplingParams(8, 0.0))[0]
    assert len(out.output_token_ids) == 3  # 9 + 3 = 12: generation stops at the engine's length
    lightrft = get_fake_strategy({**CFG, "prompt_max_len": 20, "generate_max_len": 5})
    assert (
        lightrft.setup_inference_engine(model=make_tiny_llama(seed=0), engine_type="hf").max_model_len == 25
    )
    # Neither given: the model's max_position_embeddings (make_tiny_llama: 128).
    assert (
        get_fake_strategy(CFG).setup_inference_engine(model=make_tiny_llama(), engine_type="hf").max_model_len
        == 128
    )


def test_hf_engine_unseeded_sampling_uses_the_group_seed_and_resumes_with_the_rng_state():
    sp = SamplingParams(6, 1.0, n=2)

    def sample(seed: int, rng_seed: int = 1234) -> list[list[int]]:
        strategy = get_fake_strategy({**CFG, "bf16": False, "seed": seed})
        engine = strategy.setup_inference_engine(model=make_tiny_llama(seed=0), engine_type="hf")
        torch.manual_seed(rng_seed)
        before = torch.get_rng_state()
        outs = [o.output_token_ids for o in engine.generate(prompt_token_ids=[[5, 6]], sampling_params=sp)]
        torch.set_rng_state(before)
        torch.randint(0, 2**31 - 1, (1,))  # generation took exactly one draw of the global RNG
        return outs, torch.get_rng_state()

    (a, state_a), (b, _) = sample(3), sample(3)
    assert a == b  # the same RNG state (a resumed run) samples alike
    strategy = get_fake_strategy({**CFG, "bf16": False, "seed": 3})
    engine = strategy.setup_inference_engine(model=make_tiny_llama(seed=0), engine_type="hf")
    torch.manual_seed(1234)
    engine.generate(prompt_token_ids=[[5, 6]], sampling_params=sp)
    assert torch.equal(torch.get_rng_state(), state_a)
    assert sample(3)[0] != sample(4)[0]  # another engine group (seed) samples differently


def test_hf_engine_level_2_keeps_the_buffers_a_push_cannot_restore():
    model = make_tiny_llama(seed=5)
    strategy = get_fake_strategy({**CFG, "bf16": False})
    engine = strategy.setup_inference_engine(model=model, engine_type="hf")
    sp = SamplingParams(6, 0.0, logprobs=True)
    ref = engine.generate(prompt_token_ids=[[3, 4, 5]], sampling_params=sp)[0]
    buffers = {n: b.clone() for n, b in engine.model.named_buffers()}
    assert buffers  # the rotary table
    strategy.maybe_sleep_inference_engine(2)
    strategy.update_engine_weights(model)
    for n, b in engine.model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    got = engine.generate(prompt_token_ids=[[3, 4, 5]], sampling_params=sp)[0]
    assert got.output_token_ids == ref.output_token_ids and got.logprobs == ref.logprobs


def test_every_engine_needs_a_model_or_a_path_in_the_same_words():
    with pytest.raises(ValueError, match=r"HFEngine needs model= .* or model_path="):
        HFEngine(strategy=get_fake_strategy(CFG))
    with pytest.raises(ValueError, match=r"VLLMEngine needs model= .* or model_path="):
        _common.require_model("VLLMEngine", None, None)


# ------------------------------------------------------------------ sleep levels, one meaning
@pytest.mark.parametrize("engine_type", ["hf", "fake"])
def test_level_2_needs_a_push_and_level_1_does_not_on_every_in_process_engine(engine_type):
    strategy = get_fake_strategy({**CFG, "bf16": False})  # engine_sleep_level: the default, 2
    model = make_tiny_llama(seed=1)
    strategy.setup_inference_engine(model=model, engine_type=engine_type)
    strategy.update_engine_weights(model)  # FakeEngine starts from zeros
    sp = SamplingParams(4, 0.0)
    ref = strategy.gather_and_generate(prompt_token_ids=[[1, 2]], sampling_params=sp, sleep_engine=False)
    strategy.maybe_sleep_inference_engine()
    with pytest.raises(RuntimeError, match=LEVEL_2_ERROR):
        strategy.wakeup_inference_engine()
    strategy.update_engine_weights(model)
    assert (
        strategy.gather_and_generate(prompt_token_ids=[[1, 2]], sampling_params=sp, sleep_engine=False) == ref
    )
    strategy.maybe_sleep_inference_engine(1)
    strategy.wakeup_inference_engine()  # a host copy: wake alone restores
    assert (
        strategy.gather_and_generate(prompt_token_ids=[[1, 2]], sampling_params=sp, sleep_engine=False) == ref
    )


# ------------------------------------------------------------------ PEFT names, one mapping
def test_engine_weight_names_are_what_the_merged_stream_yields():
    with rank_threads():  # both merges with one thread count, set here (not by the shell)
        actor, merged = make_lora_like(make_tiny_llama(seed=2))
    names = _common.engine_weight_names(actor)
    assert names == {n for n, _ in merged.named_parameters()}
    stream = [[(n, p.detach()) for n, p in actor.named_parameters()]]
    with rank_threads():
        pushed = dict(x for b in _common.merge_peft_stream(stream, _common.lora_scalings(actor)) for x in b)
    assert set(pushed) == names
    for n, p in merged.named_parameters():
        # Bitwise by construction: both sides compute W + scale * (B @ A) in float32 on the same
        # tensors (a scalar product commutes exactly), the matmul with the same thread count.
        assert torch.equal(pushed[n], p.detach()), n
    plain = make_tiny_llama(seed=2)
    assert _common.engine_weight_names(plain) == {n for n, _ in plain.named_parameters()}


# ------------------------------------------------------------------ vLLM: one sleep-mode engine
class StandInLLM:
    """A stand-in for ``vllm.LLM`` (not vLLM): counts constructions, records sleep / wake /
    shutdown and rpc calls, and has the attributes VLLMEngine reads."""

    built: list[StandInLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        type(self).built.append(self)
        self.kwargs = kwargs
        self.calls: list[tuple[str, Any]] = []
        config = types.SimpleNamespace(max_model_len=kwargs.get("max_model_len") or 128, dtype=torch.float32)
        self.llm_engine = types.SimpleNamespace(model_config=config, engine_core=None)
        self.loaded: set[str] = set()

    def collective_rpc(self, name: str, args: tuple = ()) -> list[Any]:
        self.calls.append(("rpc", name))
        if name == "lrft_load_weights":
            self.loaded.update(n for n, _ in args[0])
        return [None]

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: Any = None) -> None:
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache", None))


@pytest.fixture
def stand_in_vllm(monkeypatch):
    from lightrft.engines import _vllm_compat as compat

    StandInLLM.built = []
    shut: list[Any] = []
    fake = types.SimpleNamespace(LLM=StandInLLM, __version__="0.26.0")
    monkeypatch.setattr(compat, "import_vllm", lambda: fake)
    monkeypatch.setattr(compat, "check_version", lambda v: (0, 26))
    monkeypatch.setattr(compat, "on_cpu", lambda: False)
    monkeypatch.setattr(compat, "sleep_supported", lambda: True)
    monkeypatch.setattr(compat, "filter_llm_kwargs", lambda kw: kw)
    monkeypatch.setattr(
        compat,
        "shutdown",
        lambda llm, keep_default_group: (shut.append(llm), llm.calls.append(("shutdown", None))),
    )
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    yield shut
    _vllm_process.release()
    _vllm_process._live = None


def test_a_second_sleep_mode_vllm_engine_reuses_the_process_engine(stand_in_vllm):
    strategy = get_fake_strategy({**CFG, "engine_type": "vllm", "bf16": False})
    first = strategy.setup_inference_engine(model=make_tiny_llama(seed=1))
    assert len(StandInLLM.built) == 1 and not first.reused
    llm = StandInLLM.built[0]
    second = strategy.setup_inference_engine(model=make_tiny_llama(seed=2))  # shuts the first down
    assert len(StandInLLM.built) == 1 and second.reused and second.llm is llm  # no second vllm.LLM
    assert first.closed and stand_in_vllm == []  # parked, not destroyed
    events = [c for c in llm.calls if c[0] in ("sleep", "wake_up")]
    assert events == [("sleep", 2), ("wake_up", ["weights", "kv_cache"])]  # park at level 2, wake
    names = {n for n, _ in make_tiny_llama().named_parameters()}
    assert llm.loaded == names and not second.needs_weight_push  # the new model's weights went in
    strategy.engine_lifecycle.shutdown()
    _vllm_process.release()  # what the process's exit does
    assert stand_in_vllm == [llm]


def test_a_sleeping_engine_is_mapped_back_before_it_is_destroyed(stand_in_vllm):
    """vLLM frees a sleeping allocation with cuMemUnmap on an address its sleep unmapped (H200,
    2026-12-03: ``CUDA Error: invalid argument at cumem_allocator.cpp:235`` at the exit of the
    multimodal run, whose engine was parked asleep). Every destruction of a sleeping engine wakes
    it first, so each free meets a mapped address."""
    strategy = get_fake_strategy({**CFG, "engine_type": "vllm", "bf16": False})
    strategy.setup_inference_engine(model=make_tiny_llama(seed=1))
    llm = StandInLLM.built[0]
    strategy.maybe_sleep_inference_engine(2)
    strategy.engine_lifecycle.shutdown()  # parked: asleep at level 2, not destroyed
    assert stand_in_vllm == [] and llm.calls[-1] == ("sleep", 2)
    _vllm_process.release()  # what the process's exit does
    tail = [c for c in llm.calls if c[0] in ("sleep", "wake_up", "shutdown")][-3:]
    assert tail == [("sleep", 2), ("wake_up", ["kv_cache", "weights"]), ("shutdown", None)]


def test_other_settings_are_refused_saying_what_works(stand_in_vllm):
    strategy = get_fake_strategy({**CFG, "engine_type": "vllm", "bf16": False})
    strategy.setup_inference_engine(model=make_tiny_llama(seed=1))
    strategy.engine_lifecycle.shutdown()
    other = get_fake_strategy({**CFG, "engine_type": "vllm", "bf16": False, "engine_max_model_len": 64})
    with pytest.raises(RuntimeError) as caught:
        other.setup_inference_engine(model=make_tiny_llama(seed=1, hidden_size=128))
    msg = str(caught.value)
    assert "allows one sleep-mode engine per process" in msg and "What works" in msg
    assert "max_model_len: 128 -> 64" in msg and "config.hidden_size: 64 -> 128" in msg
    assert "enable_engine_sleep=False" in msg
    assert len(StandInLLM.built) == 1  # nothing was built
    # Without sleep mode the second engine is an ordinary one.
    plain = get_fake_strategy({**CFG, "engine_type": "vllm", "bf16": False, "enable_engine_sleep": False})
    plain.setup_inference_engine(model=make_tiny_llama(seed=1, hidden_size=128))
    assert len(StandInLLM.built) == 2
    plain.engine_lifecycle.shutdown()
    # The parked engine still serves an engine of its own settings.
    again = strategy.setup_inference_engine(model=make_tiny_llama(seed=3))
    assert again.reused and again.llm is StandInLLM.built[0]
    strategy.engine_lifecycle.shutdown()


def test_a_live_sleep_mode_engine_blocks_a_second_one(stand_in_vllm):
    from lightrft.engines.vllm_engine import VLLMEngine

    strategy = get_fake_strategy({**CFG, "engine_type": "vllm", "bf16": False})
    first = VLLMEngine(strategy=strategy, model=make_tiny_llama(seed=1))
    with pytest.raises(RuntimeError, match="still running: shut it down first"):
        VLLMEngine(strategy=strategy, model=make_tiny_llama(seed=1))
    first.shutdown()
    assert VLLMEngine(strategy=strategy, model=make_tiny_llama(seed=1)).reused


# ------------------------------------------------------------------ PEFT: merged once, then rounded
class HoldingLLM(StandInLLM):
    """The stand-in with the engine's dtype from its ``dtype=`` argument, holding what it loads
    as vLLM's worker does (``lrft_load_weights`` casts each tensor to the model's dtype), and
    recording the dtypes that arrived."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.llm_engine.model_config.dtype = getattr(torch, kwargs["dtype"])
        self.held: dict[str, torch.Tensor] = {}
        self.arrived: set[torch.dtype] = set()

    def collective_rpc(self, name: str, args: tuple = ()) -> list[Any]:
        if name == "lrft_load_weights":
            dtype = self.llm_engine.model_config.dtype
            for n, t in args[0]:
                self.arrived.add(t.dtype)
                self.held[n] = t.detach().to(dtype).clone()
        return super().collective_rpc(name, args)


def test_a_lora_actor_pushed_into_a_bf16_vllm_engine_holds_the_merged_model_rounded_once(
    stand_in_vllm, monkeypatch
):
    """Issue 18 item 3, the H200 failure of 2026-12-03 (engine checksum 67,679.14 against the merged
    model's 67,678.08 after a LoRA push): the strategy cast the base weights and the LoRA factors to
    the engine's bf16 before the engine merged them, so a push held other weights than the merged
    model and than an engine built from the same actor. Now a PEFT actor's weights come in its own
    precision and are rounded once, after the merge."""
    from lightrft.engines import _vllm_compat as compat

    monkeypatch.setattr(
        compat, "import_vllm", lambda: types.SimpleNamespace(LLM=HoldingLLM, __version__="0.26.0")
    )
    strategy = get_fake_strategy({**CFG, "engine_type": "vllm", "bf16": True})
    with rank_threads():  # the reference merge and the engine's with one thread count, set here
        actor, merged = make_lora_like(make_tiny_llama(seed=5))
        # Bitwise by construction: both sides compute W + scale * (B @ A) in float32 from the same
        # float32 tensors (a scalar product commutes exactly) and round the result once to bf16.
        want = {n: p.detach().to(torch.bfloat16) for n, p in merged.named_parameters()}
        engine = strategy.setup_inference_engine(model=actor)
        llm = engine.llm
        built = dict(llm.held)
        strategy.maybe_sleep_inference_engine(2)  # the stand-in discards nothing: compare what loads
        llm.held.clear()
        strategy.update_engine_weights(actor)
    assert not engine.needs_weight_push and set(llm.held) == set(want) == set(built)
    off = sorted(n for n in want if not torch.equal(llm.held[n], want[n]))
    assert off == [], f"pushed weights differ from the merged model's in {off}"
    assert all(torch.equal(built[n], want[n]) for n in want)  # the engine built from the actor too
    assert llm.arrived == {torch.float32}  # the actor's precision: nothing rounded before the merge
    # The same actor's LoRA factors rounded to bf16 first would have moved the q/v weights (the bug):
    # the check above can fail.
    lora = {n: p.detach() for n, p in actor.named_parameters()}
    base = lora["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    a = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    b = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    scale = actor.peft_config["default"].lora_alpha / actor.peft_config["default"].r
    bf = torch.bfloat16
    with rank_threads():
        rounded_first = (base.to(bf).float() + (b.to(bf).float() @ a.to(bf).float()) * scale).to(bf)
    assert not torch.equal(rounded_first, want["model.layers.0.self_attn.q_proj.weight"])
    strategy.engine_lifecycle.shutdown()
    # A plain model's push: on one rank its masters arrive uncast too (the engine casts_on_copy:
    # its copy plan rounds them), with several ranks in the engine's dtype (cast before gathering).
    plain = get_fake_strategy({**CFG, "engine_type": "vllm", "bf16": True})
    engine = plain.setup_inference_engine(model=make_tiny_llama(seed=5))
    assert engine.reused and engine.weight_dtype == torch.bfloat16 and engine.casts_on_copy
    engine.llm.arrived.clear()
    plain.update_engine_weights(make_tiny_llama(seed=6))
    assert engine.llm.arrived == {torch.float32}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(plain), "world_size", property(lambda self: 2))
        assert plain.engine_lifecycle.push_dtype() == torch.bfloat16
    plain.engine_lifecycle.shutdown()
