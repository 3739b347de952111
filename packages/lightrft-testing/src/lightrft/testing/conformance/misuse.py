"""Bad calls raise clear errors, and a failed save leaves the previous checkpoint intact."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightrft.strategy import StrategyBase
from lightrft.strategy.checkpoint import LATEST

from ..harness import build, shared_tmpdir
from ..models import causal_lm_loss
from .spec import Capability, tiny_model


def measure(strategy: StrategyBase) -> dict[str, Any]:
    found: dict[str, str] = {}

    def expect(name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            found[name] = "no error"
        except Exception as e:  # the test asserts on type and message
            found[name] = f"{type(e).__name__}: {e}"

    model, optim, sched = build(strategy, tiny_model())
    stray = tiny_model(0)
    expect(
        "backward_unprepared",
        lambda: strategy.backward(causal_lm_loss(stray, torch.zeros(2, 4, dtype=torch.long)), stray, None),
    )
    expect("prepare_bad_tuple", lambda: strategy.prepare((model, optim)))
    with shared_tmpdir(strategy, "bad") as bad:
        expect("bad_tag", lambda: strategy.save_ckpt(model, bad, tag="../escape"))
    with shared_tmpdir(strategy, "misuse") as root:
        expect("missing_ckpt", lambda: strategy.load_ckpt(model, root / "nothing"))
        strategy.save_ckpt(model, root, tag="good")
        expect(
            "bad_client_state",
            lambda: strategy.save_ckpt(model, root, tag="worse", client_state={"fn": object()}),
        )
        strategy.barrier()
        listing = sorted(p.name for p in root.iterdir())
        latest = (root / LATEST).read_text().strip()
    return {"errors": found, "listing_after_failed_save": listing, "latest": latest}


def test_misuse_errors(suite: Any) -> None:
    for r in suite.results("misuse"):
        e = r["errors"]
        assert e["backward_unprepared"].startswith("ValueError") and "prepare" in e["backward_unprepared"]
        assert e["prepare_bad_tuple"].startswith("ValueError") and "length 2" in e["prepare_bad_tuple"]
        assert e["bad_tag"].startswith("ValueError") and "../escape" in e["bad_tag"]
        assert e["missing_ckpt"].startswith("FileNotFoundError")
        assert e["bad_client_state"].startswith("ValueError") and "'fn'" in e["bad_client_state"]
        # The failed save neither published a checkpoint nor moved `latest`.
        assert [n for n in r["listing_after_failed_save"] if not n.startswith(".")] == ["good", "latest"]
        assert r["latest"] == "good"


CAPABILITY = Capability("misuse", measure, (test_misuse_errors,))
