"""CopyPlan: a recorded load_weights replayed as copies gives exactly what load_weights gives.

The model below loads weights the way vLLM's loaders do (fused q/k/v and gate/up projections, a
tensor-parallel shard taken with ``narrow``, a vocabulary padded and zero-filled), so the plan sees
the same kinds of writes; one loader computes a tensor (a transpose made contiguous), which the
plan must refuse and leave to load_weights.
"""

from __future__ import annotations

import torch
from torch import nn

from lightrft.engines._copy_plan import CopyPlan

H, INTER, V, V_PAD, TP, RANK = 8, 12, 10, 16, 2, 1


class VLLMLike(nn.Module):
    """Rank ``RANK`` of a tensor-parallel group of ``TP``: column-parallel fused projections keep
    rows ``[RANK * n / TP, ...)``, row-parallel ones columns, the embedding a padded vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Parameter(torch.zeros(3 * H // TP, H))
        self.gate_up = nn.Parameter(torch.zeros(2 * INTER // TP, H))
        self.down = nn.Parameter(torch.zeros(H, INTER // TP))
        self.embed = nn.Parameter(torch.full((V_PAD, H), 7.0))
        self.odd = nn.Parameter(torch.zeros(H, H))
        self.calls = 0

    @torch.no_grad()
    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        self.calls += 1
        stacked = {
            "q": ("qkv", 0, H),
            "k": ("qkv", 1, H),
            "v": ("qkv", 2, H),
            "gate": ("gate_up", 0, INTER),
            "up": ("gate_up", 1, INTER),
        }
        for name, w in weights:
            if name in stacked:
                target, idx, rows = stacked[name]
                shard = rows // TP
                dst = getattr(self, target).data.narrow(0, idx * shard, shard)
                dst.copy_(w.narrow(0, RANK * shard, shard))
            elif name == "down":
                shard = INTER // TP
                self.down.data.copy_(w.narrow(1, RANK * shard, shard))
            elif name == "embed":
                self.embed.data[: w.shape[0]].copy_(w)
                self.embed.data[w.shape[0] :].fill_(0)
            elif name == "odd":
                self.odd.data.copy_(w.t().contiguous())  # a computed tensor: not replayable
            else:
                raise KeyError(name)
        return {n for n, _ in weights}


def hf_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "q": (H, H),
        "k": (H, H),
        "v": (H, H),
        "gate": (INTER, H),
        "up": (INTER, H),
        "down": (H, INTER),
        "embed": (V, H),
        "odd": (H, H),
    }
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def flat_bucket(weights: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """All tensors as views of one buffer (as a gathered bucket arrives)."""
    total = sum(t.numel() for t in weights.values())
    buf = torch.empty(total)
    out, off = [], 0
    for n, t in weights.items():
        view = buf[off : off + t.numel()].view(t.shape)
        view.copy_(t)
        out.append((n, view))
        off += t.numel()
    return out


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def test_replay_equals_load_weights_and_skips_the_loader():
    reference, model, plan = VLLMLike(), VLLMLike(), CopyPlan()
    for seed in range(3):
        w = hf_weights(seed)
        reference.load_weights(list(w.items()))
        plan.push(model, flat_bucket(w), model.load_weights)
        for k, v in state(reference).items():
            assert torch.equal(state(model)[k], v), (seed, k)
    # Recorded once (7 replayable names + the refused one); after that only 'odd' is loaded.
    assert plan.stats["recorded"] == 8
    assert plan.stats["replayed"] == 2 * 7
    assert plan.stats["loaded"] == 2
    assert plan.refused == {"odd"}
    assert model.calls == 1 + 2  # the recording call, then one call per push for 'odd'


def test_fp32_masters_into_bf16_weights_are_rounded_by_the_replayed_copy(monkeypatch) -> None:
    # The one-rank push sends fp32 masters uncast (casts_on_copy): the recorded copies then cast
    # as they write. Rounding fp32 -> bf16 is round-to-nearest-even in copy_ and in .to() alike,
    # so the weights are bitwise those of loading the bf16-cast tensors.
    bf16 = torch.bfloat16
    reference, model, plan = VLLMLike().to(bf16), VLLMLike().to(bf16), CopyPlan()
    for seed in range(3):
        w = hf_weights(seed)
        reference.load_weights([(n, t.to(bf16)) for n, t in w.items()])
        plan.push(model, flat_bucket(w), model.load_weights)
        for k, v in state(reference).items():
            assert v.dtype == bf16 and torch.equal(state(model)[k], v), (seed, k)
    assert plan.stats["replayed"] == 2 * 7 and plan.refused == {"odd"}
    assert model.calls == 1 + 2

    # The vLLM worker extension takes that path on CUDA (here: a worker whose model is this one).
    from types import SimpleNamespace

    from lightrft.engines import _vllm_compat
    from lightrft.engines._vllm_worker import LightRFTWorkerExtension

    monkeypatch.setattr(_vllm_compat, "on_cpu", lambda: False)
    worker = LightRFTWorkerExtension()
    worker.model_runner = SimpleNamespace(model=VLLMLike().to(bf16))
    seen: list[torch.dtype] = []
    load = worker.model_runner.model.load_weights
    worker.model_runner.model.load_weights = lambda weights: (
        seen.extend(t.dtype for _, t in weights) or load(weights)
    )
    for seed in range(2):
        assert worker.lrft_load_weights(flat_bucket(hf_weights(seed))) == 8
    assert set(seen) == {torch.float32}  # never cast before the loader
    worker.lrft_load_weights(flat_bucket(hf_weights(2)))  # the reference holds seed 2's weights
    for k, v in state(reference).items():
        assert torch.equal(state(worker.model_runner.model)[k], v), k


def test_replay_writes_the_padding_again():
    model, plan = VLLMLike(), CopyPlan()
    plan.push(model, list(hf_weights(0).items()), model.load_weights)
    model.embed.data.fill_(5.0)  # e.g. garbage after a weight-discarding sleep
    plan.push(model, list(hf_weights(1).items()), model.load_weights)
    assert torch.equal(model.embed.data[V:], torch.zeros(V_PAD - V, H))
    assert torch.equal(model.embed.data[:V], hf_weights(1)["embed"])


def test_changed_shape_or_dtype_records_again():
    model, plan = VLLMLike(), CopyPlan()
    w = hf_weights(0)
    plan.push(model, list(w.items()), model.load_weights)
    calls = model.calls
    # Same names, other layout (a strided view): recorded again, not replayed with stale strides.
    q_t = hf_weights(1)["q"].t().contiguous().t()
    plan.push(model, [("q", q_t)], model.load_weights)
    assert model.calls == calls + 1
    expected = VLLMLike()
    expected.load_weights(list(w.items()))
    expected.load_weights([("q", q_t)])
    assert torch.equal(model.qkv.data, expected.qkv.data)
    # Replayed with the new strides from now on.
    plan.push(model, [("q", hf_weights(2)["q"].t().contiguous().t())], model.load_weights)
    assert model.calls == calls + 1
    expected.load_weights([("q", hf_weights(2)["q"].t().contiguous().t())])
    assert torch.equal(model.qkv.data, expected.qkv.data)


def test_bucketing_may_change_between_pushes():
    reference, model, plan = VLLMLike(), VLLMLike(), CopyPlan()
    w0 = list(hf_weights(0).items())
    for i in range(0, len(w0), 3):  # recorded in buckets of 3
        plan.push(model, flat_bucket(dict(w0[i : i + 3])), model.load_weights)
    w1 = hf_weights(1)
    plan.push(model, flat_bucket(w1), model.load_weights)  # replayed as one bucket
    reference.load_weights(list(w1.items()))
    for k, v in state(reference).items():
        assert torch.equal(state(model)[k], v), k


def test_unknown_name_is_an_error_from_the_loader_not_a_silent_skip():
    model, plan = VLLMLike(), CopyPlan()
    try:
        plan.push(model, [("nope", torch.zeros(2))], model.load_weights)
    except KeyError as e:
        assert "nope" in str(e)
    else:
        raise AssertionError("an unknown weight name must reach load_weights and fail there")


class Overlapping(nn.Module):
    """Two weights written into overlapping rows: the later write must win on replay too."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(6, 2))

    @torch.no_grad()
    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        for name, w in weights:
            rows = slice(0, 4) if name == "a" else slice(2, 6)
            self.p.data[rows].copy_(w)


def test_overlapping_writes_keep_their_order():
    model, plan = Overlapping(), CopyPlan()
    plan.push(model, [("a", torch.ones(4, 2)), ("b", torch.full((4, 2), 2.0))], model.load_weights)
    plan.push(model, [("a", torch.full((4, 2), 3.0)), ("b", torch.full((4, 2), 4.0))], model.load_weights)
    assert plan.stats["replayed"] == 2
    assert model.p.data[:, 0].tolist() == [3.0, 3.0, 4.0, 4.0, 4.0, 4.0]


def test_the_replay_schedule_is_built_once_per_names_and_again_after_a_recording(monkeypatch) -> None:
    # The steps of a replay (runs of copies, their targets and source views) depend on the recorded
    # entries only: built at the first replay of a sequence of names, reused by every later one
    # (the per-copy overlap scan ran on every push before), and rebuilt after anything records.
    built: list[tuple[str, ...]] = []
    real = CopyPlan._schedule
    monkeypatch.setattr(CopyPlan, "_schedule", lambda self, names: built.append(names) or real(self, names))
    reference, model, plan = VLLMLike(), VLLMLike(), CopyPlan()
    plan.push(model, list(hf_weights(0).items()), model.load_weights)  # recorded: nothing replayed
    assert built == [] and plan.refused == {"odd"}  # "odd" is loaded every time, never scheduled
    names = tuple(n for n in hf_weights(0) if n != "odd")
    for seed in (1, 2, 3):
        plan.push(model, list(hf_weights(seed).items()), model.load_weights)
    assert built == [names]  # once for three replays
    reference.load_weights(list(hf_weights(3).items()))
    for k, v in state(reference).items():
        assert torch.equal(state(model)[k], v), k
    # "q" in other strides records again (the rest of the push replays first, with its own names)
    q_t = hf_weights(4)["q"].t().contiguous().t()
    plan.push(model, [(n, q_t if n == "q" else t) for n, t in hf_weights(4).items()], model.load_weights)
    assert built == [names, tuple(n for n in names if n != "q")]
    plan.push(model, [(n, q_t if n == "q" else t) for n, t in hf_weights(5).items()], model.load_weights)
    assert built == [names, tuple(n for n in names if n != "q"), names]  # the recording dropped it
    reference.load_weights([(n, q_t if n == "q" else t) for n, t in hf_weights(5).items()])
    for k, v in state(reference).items():
        assert torch.equal(state(model)[k], v), k
