import math

import pytest
import torch

from lightrft.strategy import bucket_named_tensors, clean_param_name, plan_buckets
from lightrft.strategy.schedulers import create_scheduler


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("module.layers.0.weight", "layers.0.weight"),
        ("_orig_mod.lm_head.weight", "lm_head.weight"),
        ("model.layers.1._checkpoint_wrapped_module.mlp.up.weight", "model.layers.1.mlp.up.weight"),
        ("_fsdp_wrapped_module.embed.weight", "embed.weight"),
        ("model.module_list.0.weight", "model.module_list.0.weight"),
    ],
)
def test_clean_param_name(raw, clean):
    assert clean_param_name(raw) == clean


def test_buckets_are_bounded_complete_and_ordered():
    tensors = [(f"p{i}", torch.full((n,), float(i))) for i, n in enumerate([10, 200, 30, 30, 5, 1000, 1])]
    buckets = list(bucket_named_tensors(iter(tensors), bucket_bytes=256))
    names = [n for b in buckets for n, _ in b]
    assert names == [n for n, _ in tensors]
    for b in buckets:
        size = sum(t.numel() * 4 for _, t in b)
        assert size <= 256 or len(b) == 1  # only a lone oversized tensor may exceed the budget
    # bytes: 40 | 800 | 120+120 | 20 (240+20 > 256) | 4000 | 4
    assert [len(b) for b in buckets] == [1, 1, 2, 1, 1, 1]
    assert plan_buckets([("a", 100), ("b", 100), ("c", 100)], 200) == [["a", "b"], ["c"]]
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        list(bucket_named_tensors(iter(tensors), 0))


def test_bucketing_is_lazy():
    pulled = []

    def gen():
        for i in range(4):
            pulled.append(i)
            yield f"p{i}", torch.zeros(64)  # 256 bytes each

    it = bucket_named_tensors(gen(), bucket_bytes=256)
    next(it)
    assert pulled == [0, 1]  # the second tensor is pulled to know the first bucket is full


def _lrs(kind, steps=10, warmup=0.2, min_ratio=0.1):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = create_scheduler(opt, kind, steps, warmup, min_ratio)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


def test_cosine_with_min_lr():
    lrs = _lrs("cosine_with_min_lr")
    assert lrs[:2] == [0.5, 1.0]  # two warmup steps
    # Exact: the schedule is a few float64 operations in Python (no threads, no reductions), and
    # each expected value is the same operations on the same doubles (0.1 + 0.9 * 1.0 is 1.0;
    # 0.9 * 0.5 and math.pi * 7 / 8 are exact scalings, so the order of the products is the
    # library's rounding for rounding; the base lr is 1.0).
    assert lrs[2] == 1.0
    assert lrs[-1] == 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8))
    assert min(lrs[2:]) >= 0.1


def test_constant_and_linear():
    assert _lrs("constant_with_warmup")[2:] == [1.0] * 8
    lin = _lrs("linear", min_ratio=0.0)
    assert lin[2] == 1.0 and lin[-1] == 1 - 7 / 8  # 0.125: every operation exact in float64
    with pytest.raises(ValueError, match="lr_scheduler='bogus'"):
        _lrs("bogus")
