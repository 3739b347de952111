"""The live push (``lightrft.engines._sglang_live``) on CPU: the scheduler-side loader against a
model with a fused projection and a narrower dtype, the sender's choice of map or replay, and the
SGLang engine sending live parameters in one call (the recording double of
``test_sglang_engine.py`` runs the loader on the tensors themselves, as SGLang does after
opening their CUDA IPC handles). The CUDA side (IPC, the stream syncs) runs in
``benchmarks/engine_sync_bench.py --engine sglang`` and the soak."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the double, also under --import-mode=importlib

from test_sglang_engine import FIELDS_0_5_16, _greedy, _setup, _strategy  # noqa: E402

from lightrft.engines import _sglang_live as live_push  # noqa: E402
from lightrft.strategy import SamplingParams  # noqa: E402
from lightrft.testing import make_tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> live_push.LiveState:
    state = live_push.LiveState()
    monkeypatch.setattr(live_push, "LIVE_STATE", state)
    return state


class FusedModel(torch.nn.Module):
    """An engine-side model: q, k and v land in one bf16 ``qkv`` by narrowed copies (SGLang's
    ``QKVParallelLinear``), ``o`` in its own bf16 weight."""

    def __init__(self, h: int = 8) -> None:
        super().__init__()
        self.h = h
        self.qkv = torch.nn.Parameter(torch.zeros(3 * h, h, dtype=torch.bfloat16))
        self.o = torch.nn.Parameter(torch.zeros(h, h, dtype=torch.bfloat16))
        self.loads = 0

    @torch.no_grad()
    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.loads += 1
        for name, t in named:
            if name == "o":
                self.o.copy_(t)
            else:
                i = "qkv".index(name)
                self.qkv.narrow(0, i * self.h, self.h).copy_(t)


def masters(seed: int, h: int = 8) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(n, torch.randn(h, h, generator=g)) for n in ("q", "k", "v", "o")]


def expected(named: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    d = dict(named)
    return torch.cat([d["q"], d["k"], d["v"]]).to(torch.bfloat16), d["o"].to(torch.bfloat16)


def assert_holds(model: FusedModel, named: list[tuple[str, torch.Tensor]]) -> None:
    qkv, o = expected(named)
    assert torch.equal(model.qkv, qkv) and torch.equal(model.o, o)  # bitwise: one rounding each


def test_a_map_then_replays_read_the_live_tensors_current_values(
    fresh_state: live_push.LiveState, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger=live_push.__name__)
    monkeypatch.setattr(live_push.logger, "propagate", True)  # as SGLang's log config may leave it
    model, sender, named = FusedModel(), live_push.LiveSender(), masters(0)
    first = sender.message(named)
    assert first[0][0].startswith("lightrft-live-map:") and [n for n, _ in first[1:]] == ["q", "k", "v", "o"]
    live_push.load_live(model, first)
    sender.sent(first)
    assert_holds(model, named)
    assert model.loads == 1 and fresh_state.maps == 1
    for step in range(3):  # an optimizer step writes the masters in place; each push is a replay
        with torch.no_grad():
            for _, t in named:
                t.mul_(1.5).add_(0.25 * (step + 1))
        message = sender.message(named)
        assert [n for n, _ in message] == ["lightrft-live-replay:" + first[0][0].split(":", 1)[1]]
        assert message[0][1] is named[0][1]  # a mapped tensor carries it (see the last test)
        live_push.load_live(model, message)
        sender.sent(message)
        assert_holds(model, named)
    assert model.loads == 1  # load_weights ran once, when the plan was recorded
    assert fresh_state.replays == 3 and fresh_state.plans[id(model)].stats["replayed"] == 3 * 4
    said = [r.getMessage() for r in caplog.records if "lightrft live push" in r.getMessage()]
    assert said[0] == (  # the map and the first three replays, in the scheduler's log
        "lightrft live push, map of 4 tensors: plan {'recorded': 4, 'replayed': 0, 'loaded': 0}, "
        "0 names refused, disabled=False"
    )
    assert len(said) == 4
    for k, line in enumerate(said[1:], 1):
        head, tail = line.split(" ms here) of 4 tensors: ")
        assert head.startswith(f"lightrft live push, replay {k} (") and float(head.rsplit("(", 1)[1]) >= 0
        assert (
            tail
            == f"plan {{'recorded': 4, 'replayed': {4 * k}, 'loaded': 0}}, 0 names refused, disabled=False"
        )


def test_moved_storages_are_mapped_again_and_an_unsent_map_is_never_replayed(
    fresh_state: live_push.LiveState,
) -> None:
    model, sender, named = FusedModel(), live_push.LiveSender(), masters(1)
    first = sender.message(named)
    live_push.load_live(model, first)
    sender.sent(first)
    # The sender's k is a new tensor (new storage): a new map under a new token, every tensor again.
    named[1] = ("k", torch.randn(8, 8))
    second = sender.message(named)
    assert second[0][0].startswith("lightrft-live-map:") and second[0][0] != first[0][0]
    assert len(second) == 5
    # That call failed (sent() not called): the next push maps again rather than replaying a map
    # the scheduler may not hold.
    third = sender.message(named)
    assert third[0][0].startswith("lightrft-live-map:")
    live_push.load_live(model, third)
    sender.sent(third)
    held = fresh_state.mapped[id(model)].tensors
    assert [t for _, t in held][1] is named[1][1]  # the old k is not held any more
    with torch.no_grad():
        named[1][1].fill_(2.0)
    replay = sender.message(named)
    live_push.load_live(model, replay)
    assert_holds(model, named)
    # A changed shape or dtype over the same names is a new map too.
    named[3] = ("o", named[3][1].to(torch.float64))
    assert sender.message(named)[0][0].startswith("lightrft-live-map:")


def test_a_replay_the_scheduler_cannot_serve_raises_naming_both_maps(
    fresh_state: live_push.LiveState,
) -> None:
    # Raising ends SGLang's scheduler, which the engine reports as EngineDiedError on every rank:
    # loud, never stale weights in silence.
    model, sender, named = FusedModel(), live_push.LiveSender(), masters(2)
    with pytest.raises(LookupError, match="a replay of map 'abc', but this scheduler holds None"):
        live_push.load_live(model, [("lightrft-live-replay:abc", named[0][1])])
    first = sender.message(named)
    live_push.load_live(model, first)
    sender.sent(first)
    token = first[0][0].split(":", 1)[1]
    with pytest.raises(LookupError, match=f"holds '{token}'"):
        live_push.load_live(model, [("lightrft-live-replay:abc", named[0][1])])
    with pytest.raises(ValueError, match="not a live-push message"):
        live_push.load_live(model, [("model.embed_tokens.weight", named[0][1])])
    with pytest.raises(ValueError, match="empty message"):
        live_push.load_live(model, [])
    # Release: the scheduler drops the mapped tensors; the sender maps again next time.
    release = sender.release_message()
    assert release is not None and release[0][0] == "lightrft-live-release:" + token
    assert release[0][1] is named[0][1]
    live_push.load_live(model, release)
    assert id(model) not in fresh_state.mapped
    assert sender.release_message() is None
    assert sender.message(named)[0][0].startswith("lightrft-live-map:")
    with pytest.raises(LookupError):
        live_push.load_live(model, [("lightrft-live-replay:" + token, named[0][1])])


# ------------------------------------------------------------------ through the engine
def _live_setup(**overrides: Any) -> tuple[Any, Any, Any, Any]:
    strategy = _strategy(**overrides)
    actor = make_tiny_llama(seed=4)
    engine, double = _setup(strategy, make_tiny_llama(seed=0))
    engine.live_loader = True  # what a CUDA engine of one rank decides at its start
    double.calls.clear()
    return strategy, actor, engine, double


def _pushes(double: Any) -> list[Any]:
    return [c[1] for c in double.calls if c[0] == "update_weights_from_tensor"]


def test_live_parameters_go_in_one_call_mapped_once_then_replayed() -> None:
    strategy, actor, engine, double = _live_setup()
    names = [n for n, _ in actor.named_parameters()]
    bucket_bytes = 1 << 14  # many buckets: the flattened path would make one call for each
    assert len(list(strategy.iter_weight_buckets(actor, bucket_bytes))) > 3
    strategy.update_engine_weights(actor, bucket_bytes)
    assert len(_pushes(double)) == 1 and double.live_messages[0][1:] == names
    assert double.live_messages[0][0].startswith("lightrft-live-map:")
    assert double.payload_dtypes == {torch.float32}  # the actor's own tensors: nothing cast on the way
    engine_params = dict(double.model.named_parameters())
    sp = SamplingParams(4, 0.0)
    for step in range(2):  # a training step changes the parameters in place
        with torch.no_grad():
            for p in actor.parameters():
                p.mul_(0.9).add_(0.01 * (step + 1))
        double.calls.clear()
        strategy.update_engine_weights(actor, bucket_bytes)
        assert len(_pushes(double)) == 1 and len(double.live_messages[-1]) == 1
        assert double.live_messages[-1][0].startswith("lightrft-live-replay:")
        for name, p in actor.named_parameters():
            assert torch.equal(engine_params[name], p), name
        out = engine.generate(prompt_token_ids=[[1, 2]], sampling_params=sp)[0]
        assert out.output_token_ids == _greedy(actor, [1, 2], 4)[0]
    assert not engine.needs_weight_push


def test_tensors_over_no_live_storage_are_flattened_beside_the_live_ones() -> None:
    strategy, actor, engine, double = _live_setup()
    params = list(actor.named_parameters())
    half = len(params) // 2
    live = {p.untyped_storage().data_ptr() for _, p in params[:half]}
    copies = [(n, p.detach().clone()) for n, p in params[half:]]  # e.g. ZeRO-3's gathered buffers
    engine.update_weights([[(n, p.detach()) for n, p in params[:half]], copies], live_storages=live)
    calls = _pushes(double)
    assert len(calls) == 2 and len(double.live_messages) == 1  # one flattened bucket, one live call
    assert double.live_messages[0][1:] == [n for n, _ in params[:half]]
    engine_params = dict(double.model.named_parameters())
    for name, p in params:
        assert torch.equal(engine_params[name], p), name
    # Without live_storages (or without a live loader) everything is flattened, as before.
    double.calls.clear()
    engine.update_weights([[(n, p.detach()) for n, p in params]])
    assert len(_pushes(double)) == 1 and len(double.live_messages) == 1


def test_shutdown_releases_the_mapped_parameters_first() -> None:
    strategy, actor, engine, double = _live_setup()
    strategy.update_engine_weights(actor)
    token = double.live_messages[0][0].split(":", 1)[1]
    strategy.engine_lifecycle.shutdown()
    assert double.live_messages[-1] == ["lightrft-live-release:" + token]
    assert [c[0] for c in double.calls[-2:]] == ["update_weights_from_tensor", "shutdown"]


def test_the_live_loader_is_registered_only_for_a_cuda_engine_of_one_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    strategy = _strategy()
    fields = FIELDS_0_5_16 | {"custom_weight_loader"}
    engine, _ = _setup(strategy, make_tiny_llama(seed=0), fields=fields)
    assert engine.live_loader is False  # a CPU engine: no CUDA IPC
    engine.device = torch.device("cuda", 0)  # _server_args reads the device only
    args = engine._server_args(make_tiny_llama(seed=0), None, {"custom_weight_loader": ["pkg.mine"]})
    assert engine.live_loader is True and args["custom_weight_loader"] == ["pkg.mine", live_push.LOADER]
    monkeypatch.setenv("LIGHTRFT_SGLANG_LIVE_PUSH", "0")
    args = engine._server_args(make_tiny_llama(seed=0), None, {})
    assert engine.live_loader is False and "custom_weight_loader" not in args
    monkeypatch.delenv("LIGHTRFT_SGLANG_LIVE_PUSH")
    engine.runtime.server_fields = FIELDS_0_5_16  # a release without the option
    assert "custom_weight_loader" not in engine._server_args(make_tiny_llama(seed=0), None, {})
    engine.runtime.server_fields = fields
    engine.group_ranks = [0, 1]  # two ranks share the engine: their shards are not its weights
    assert "custom_weight_loader" not in engine._server_args(make_tiny_llama(seed=0), None, {})
    assert engine.live_loader is False


def test_every_message_carries_mapped_tensors_only() -> None:
    # SGLang's serializer patches torch's tensor reducer for CUDA tensors only (it rewrites the
    # device argument of a CUDA tensor's reduction): a message with any other tensor fails to
    # pickle. On the H200 (2026-12-04) a 0-element CPU carrier stopped the first push with
    # IndexError. So the map's head, each replay and the release carry one of the mapped tensors,
    # which are the parameters' own (CUDA there), and nothing else.
    sender, named = live_push.LiveSender(), masters(3)
    mapped = {id(t) for _, t in named}
    first = sender.message(named)
    assert [id(t) for _, t in first] == [id(named[0][1])] + [id(t) for _, t in named]
    sender.sent(first)
    replay, release = sender.message(named), sender.release_message()
    assert release is not None
    for message in (replay, release):
        assert len(message) == 1 and all(id(t) in mapped for _, t in message)
    assert sender.release_message() is None  # released once; the carrier is let go with the map


def test_a_failed_release_at_shutdown_is_said_and_the_engine_still_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy, actor, engine, double = _live_setup()
    strategy.update_engine_weights(actor)
    real = double.update_weights_from_tensor

    def refuse(**kw: Any) -> Any:
        if kw["named_tensors"][0][0].startswith("lightrft-live-release:"):
            raise IndexError("tuple index out of range")
        return real(**kw)

    double.update_weights_from_tensor = refuse
    with caplog.at_level(logging.WARNING):
        strategy.engine_lifecycle.shutdown()
    assert double.shut  # stopped all the same
    said = [r.getMessage() for r in caplog.records if "release at shutdown failed" in r.getMessage()]
    assert said == [
        "SGLang live push: the release at shutdown failed (IndexError: tuple index out of range); "
        "stopping the engine releases the mapped parameters instead"
    ]


def test_the_prefix_cache_never_outlives_a_push_and_costs_no_call_of_its_own() -> None:
    """The prefix cache holds KV of the old weights (NeMo-RL PR #4018: never reset across
    refits). Awake, the live call itself flushes it in the scheduler (``flush_cache=True``) and no
    ``flush_cache`` round trip follows; between sleep and wake the KV cache's release flushed it
    and the push makes no flush at all. Either way the next generation reads no stale prefix (the
    double refuses one)."""
    strategy, actor, engine, double = _live_setup(enable_engine_sleep=True, engine_sleep_level=2)
    sp = SamplingParams(4, 0.0)
    strategy.update_engine_weights(actor)  # awake: the map
    assert _pushes(double) == [{"n": len(list(actor.parameters())) + 1, "flush": True}]
    assert "flush_cache" not in [c[0] for c in double.calls]
    assert (
        engine.generate(prompt_token_ids=[[1, 2]], sampling_params=sp)[0].output_token_ids
        == _greedy(actor, [1, 2], 4)[0]
    )
    for step in range(2):  # the RL loop: sleep, train, push (a replay), wake
        strategy.maybe_sleep_inference_engine()
        with torch.no_grad():
            for p in actor.parameters():
                p.mul_(0.9).add_(0.01 * (step + 1))
        double.calls.clear()
        strategy.update_engine_weights(actor)
        assert [c[0] for c in double.calls] == [
            "resume_memory_occupation",
            "update_weights_from_tensor",
            "resume_memory_occupation",
        ]
        assert _pushes(double) == [{"n": 1, "flush": False}]  # the release flushed, nothing ran since
        out = engine.generate(prompt_token_ids=[[1, 2]], sampling_params=sp)[0]
        assert out.output_token_ids == _greedy(actor, [1, 2], 4)[0]


def test_the_double_refuses_a_generation_over_a_stale_prefix_cache() -> None:
    """The check above can fail: an awake engine updated without a flush (what a push that
    skipped it would leave) refuses to generate, until a flush."""
    strategy, actor, engine, double = _live_setup()
    strategy.update_engine_weights(actor)
    ok = double.update_weights_from_tensor(
        live_push.LiveSender().message([(n, p.detach()) for n, p in actor.named_parameters()]),
        load_format=live_push.LOADER,
        flush_cache=False,
    )
    assert ok == (True, "Success") and double.stale_prefix_cache
    with pytest.raises(RuntimeError, match="prefix cache of the old weights"):
        engine.generate(prompt_token_ids=[[1, 2]], sampling_params=SamplingParams(4, 0.0))
    double.flush_cache()
    assert engine.generate(prompt_token_ids=[[1, 2]], sampling_params=SamplingParams(4, 0.0))
