"""The conformance suite: subclass :class:`StrategyConformanceSuite` in a strategy package's tests.

One run of every check (in process for one rank, under torchrun for several) serves all tests of
the class; each test asserts on the numbers of one check. The reference is FakeStrategy (itself
checked against a hand-written torch training loop), run in the pytest process on the same seed
and data. A backend may not delete or override a test: an exception must be declared in
``expected_failures`` with a reason, and it is then an ``xfail(strict=True)``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pytest
import torch

from ..distributed import run_distributed
from .checks import BASE_CONFIG, run_checks
from .reference import reference_training

_CACHE: dict[tuple[Any, ...], dict[str, Any]] = {}


def check_results(ranks: list[dict[str, Any]], check: str, where: str = "") -> list[Any]:
    """Every rank's result of ``check`` from ``{check: {"ok", "result" | "error"}}`` per rank;
    fails the test with every failing rank's traceback."""
    per_rank = [r[check] for r in ranks]
    errors = [f"rank {i}:\n{r['error']}" for i, r in enumerate(per_rank) if not r["ok"]]
    if errors:
        on = f" on {where}" if where else ""
        pytest.fail(f"check {check!r} failed{on}:\n" + "\n".join(errors), pytrace=False)
    return [r["result"] for r in per_rank]


class StrategyConformanceSuite:
    """Set ``strategy_name``, ``world_size`` and ``config_overrides`` in a subclass."""

    strategy_name: ClassVar[str] = "fake"
    world_size: ClassVar[int] = 1
    config_overrides: ClassVar[dict[str, Any]] = {}
    #: Tolerance of loss and parameter parity with FakeStrategy (fp32 on CPU by default).
    atol: ClassVar[float] = 1e-5
    rtol: ClassVar[float] = 1e-4
    #: ``{"test_name": "reason"}``: declared, strict expected failures.
    expected_failures: ClassVar[dict[str, str]] = {}
    #: Environment for the torchrun children (e.g. CUDA settings).
    launch_env: ClassVar[dict[str, str]] = {}
    timeout: ClassVar[float] = 900.0

    # ------------------------------------------------------------- plumbing
    @classmethod
    def config(cls) -> dict[str, Any]:
        return {**BASE_CONFIG, **cls.config_overrides}

    @classmethod
    def _key(cls) -> tuple[Any, ...]:
        return (
            cls.strategy_name,
            cls.world_size,
            tuple(sorted((k, repr(v)) for k, v in cls.config().items())),
        )

    @classmethod
    def all_results(cls) -> list[dict[str, Any]]:
        """Every rank's results of every check (computed once per configuration)."""
        key = ("run", *cls._key())
        if key not in _CACHE:
            if cls.world_size == 1 and cls.strategy_name == "fake":
                _CACHE[key] = [run_checks(cls.strategy_name, cls.config_overrides)]  # type: ignore[assignment]
            else:
                _CACHE[key] = run_distributed(  # type: ignore[assignment]
                    run_checks,
                    world_size=cls.world_size,
                    kwargs={"strategy_name": cls.strategy_name, "config": cls.config_overrides},
                    timeout=cls.timeout,
                    env=cls.launch_env,
                )
        return _CACHE[key]  # type: ignore[return-value]

    @classmethod
    def fake_results(cls) -> dict[str, Any]:
        """FakeStrategy on the same configuration, in this process (the parity reference)."""
        key = ("fake", *cls._key()[2:])
        if key not in _CACHE:
            cfg = {k: v for k, v in cls.config_overrides.items() if k not in ("zero_stage", "strategy")}
            cfg["bf16"] = False
            _CACHE[key] = run_checks("fake", cfg, checks=["parity", "accumulation"])
        return _CACHE[key]

    def results(self, check: str) -> list[dict[str, Any]]:
        """The per-rank results of ``check``; fails with every rank's traceback if one failed."""
        return check_results(self.all_results(), check, self.strategy_name)

    @pytest.fixture(autouse=True)
    def _declared_xfail(self, request: pytest.FixtureRequest) -> None:
        reason = self.expected_failures.get(request.node.originalname)
        if reason:
            request.node.add_marker(pytest.mark.xfail(reason=reason, strict=True))

    def _close(self, a: Any, b: Any, what: str) -> None:
        ta, tb = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        assert ta.shape == tb.shape, f"{what}: shapes {tuple(ta.shape)} vs {tuple(tb.shape)}"
        diff = float((ta - tb).abs().max()) if ta.numel() else 0.0
        assert torch.allclose(ta, tb, atol=self.atol, rtol=self.rtol), (
            f"{what}: {self.strategy_name} differs from FakeStrategy by up to {diff:.3g} "
            f"(atol={self.atol}, rtol={self.rtol})"
        )

    # ---------------------------------------------------------------- tests
    def test_accumulation_steps_and_boundaries(self) -> None:
        cfg = self.config()
        acc = cfg["train_batch_size"] // (cfg["micro_train_batch_size"] * self.world_size)
        for r in self.results("accumulation"):
            assert r["accumulated_gradient"] == acc
            assert len(r["returned"]) == acc
            # None between boundaries, the norm (a finite float) at the boundary.
            assert all(v is None for v in r["returned"][:-1]), r["returned"]
            assert isinstance(r["returned"][-1], float) and math.isfinite(r["returned"][-1])
            # Parameters change only at the boundary, which is_accumulation_boundary predicted.
            assert [c["boundary_predicted"] for c in r["changes"]] == [False] * (acc - 1) + [True]
            assert [c["changed"] for c in r["changes"]] == [False] * (acc - 1) + [True]
            assert (r["micro_step"], r["global_step"]) == (acc, 1)

    def test_scheduler_steps_once_per_optimizer_step(self) -> None:
        fake = self.fake_results()["accumulation"]["result"]
        for r in self.results("accumulation"):
            self._close(r["lr_after"], fake["lr_after"], "learning rate after one optimizer step")

    def test_no_gradient_sync_between_boundaries(self) -> None:
        for r in self.results("no_sync"):
            if not r["syncs_only_at_boundary"]:
                pytest.skip(
                    f"{self.strategy_name} declares syncs_only_at_boundary=False (reduces every micro-step)"
                )
            between = [c["reductions"] for c in r["counts"] if not c["boundary"]]
            at = [c["reductions"] for c in r["counts"] if c["boundary"]]
            assert between and all(n == 0 for n in between), (
                f"gradient reductions between boundaries: {r['counts']}"
            )
            if r["world_size"] > 1:
                assert at and all(n > 0 for n in at), f"no gradient reduction at the boundary: {r['counts']}"

    def test_loss_parity_with_fake(self) -> None:
        fake = self.fake_results()["parity"]["result"]
        for r in self.results("parity"):
            self._close(r["losses"], fake["losses"], "global mean loss per step")

    def test_clip_norm_parity_with_fake(self) -> None:
        fake = self.fake_results()["parity"]["result"]
        ranks = self.results("parity")
        for r in ranks:
            self._close(r["norms"], fake["norms"], "gradient norm returned by optimizer_step")
        # The same norm on every rank, and clipping really bit (norm above max_norm) in this run.
        assert all(r["norms"] == ranks[0]["norms"] for r in ranks)
        assert max(ranks[0]["norms"]) > self.config()["max_norm"]

    def test_parameter_parity_with_fake(self) -> None:
        fake = self.fake_results()["parity"]["result"]
        for r in self.results("parity"):
            assert r["names"] == fake["names"]
            self._close(r["params"], fake["params"], "parameters after training")

    def test_fake_matches_hand_written_reference(self) -> None:
        """The reference itself is checked against plain torch, so parity means correctness."""
        fake = self.fake_results()["parity"]["result"]
        ref = reference_training(
            {**BASE_CONFIG, **{k: v for k, v in self.config_overrides.items() if k in BASE_CONFIG}}
        )
        assert torch.allclose(torch.tensor(fake["losses"]), torch.tensor(ref["losses"]), atol=1e-6, rtol=1e-5)
        assert torch.allclose(torch.tensor(fake["norms"]), torch.tensor(ref["norms"]), atol=1e-6, rtol=1e-5)
        assert torch.allclose(fake["params"], ref["params"], atol=1e-6, rtol=1e-5)

    def test_non_finite_norm_skips_step(self) -> None:
        for r in self.results("non_finite"):
            assert math.isfinite(r["first_norm"])
            assert not math.isfinite(r["bad_norm"])
            assert r["unchanged_after_bad"], "a step with a non-finite gradient norm changed the parameters"
            assert r["skipped_steps"] == 1
            assert math.isfinite(r["good_norm"]) and r["changed_after_good"] and r["finite_after_good"]

    def test_checkpoint_resume_bit_for_bit(self) -> None:
        for r in self.results("checkpoint"):
            assert r["path_name"] == "step2"
            assert r["res_losses"] == r["ref_losses"], (r["res_losses"], r["ref_losses"])
            assert r["params_equal"], f"resumed parameters differ by {r['max_param_diff']}"
            assert r["res_lr"] == r["ref_lr"]
            assert r["restored_step"] == 2 and r["ref_step"] == 4

    def test_checkpoint_client_state(self) -> None:
        for r in self.results("checkpoint"):
            c = r["client"]
            assert c["epoch"] == 3 and c["note"] == "hello" and torch.equal(c["tensor"], torch.arange(4))

    def test_checkpoint_rotation_and_latest(self) -> None:
        for r in self.results("checkpoint"):
            assert r["latest"] == "step5"
            assert [n for n in r["listing"] if not n.startswith(".")] == ["latest", "step4", "step5"]
            assert r["tmp_left"] == []

    def test_save_model_is_full_and_loadable(self) -> None:
        ranks = self.results("save_model")
        r0 = ranks[0]
        assert "model.safetensors" in r0["files"] or "model.safetensors.index.json" in r0["files"]
        assert "config.json" in r0["files"]
        assert r0["missing"] == []
        assert r0["max_diff"] == 0.0
        for r in ranks:
            assert r["load_max_diff"] == 0.0

    def test_collectives(self) -> None:
        ranks = self.results("collectives")
        n = ranks[0]["world_size"]
        assert n == self.world_size
        vals = torch.tensor([[float(r + 1), 2.0 * (r + 1)] for r in range(n)])
        for r in ranks:
            assert torch.allclose(r["mean"], vals.mean(0))
            assert torch.allclose(r["sum"], vals.sum(0))
            assert torch.equal(r["max"], vals.max(0).values)
            assert r["scalar_mean"] == pytest.approx((n + 1) / 2)
            assert r["dict_sum"]["a"] == pytest.approx(sum(range(n)))
            assert float(r["dict_sum"]["b"]) == pytest.approx(sum(range(1, n + 1)))
            expected = torch.cat([torch.full((k + 1, 2), float(k)) for k in range(n)])
            assert torch.equal(r["gather"], expected)
            assert r["gather_scalar"] == [10 * k for k in range(n)]
            assert torch.equal(r["gather_0d"], torch.arange(n, dtype=torch.float32))
            assert float(r["int_mean"]) == pytest.approx((n + 1) / 2)

    def test_ema(self) -> None:
        for r in self.results("ema"):
            assert r["moved"] > 1e-4, "training did not move the parameters: the EMA check would be vacuous"
            # fp32 EMA is exact up to rounding; a bf16 EMA is held to the parity tolerance.
            assert r["max_diff"] < (self.atol if self.config()["bf16"] else 1e-6), r["max_diff"]

    def test_weight_sync_to_engine(self) -> None:
        for r in self.results("weight_sync"):
            assert r["names"] == r["expected_names"]
            assert r["max_diff"] == 0.0
            assert r["num_buckets"] > 1
            assert r["multi_tensor_over"] == [], "a bucket of several tensors exceeded bucket_bytes"
            assert max(r["bucket_sizes"]) <= max(r["bucket_bytes"], r["largest"])
            assert r["outputs"] == r["reference"]

    def test_engine_sleep_and_wake(self) -> None:
        for r in self.results("weight_sync"):
            assert r["slept"] is True
            assert "asleep" in r["sleeping_error"]
            assert r["after_wake"] == r["reference"]

    def test_misuse_errors(self) -> None:
        for r in self.results("misuse"):
            e = r["errors"]
            assert e["backward_unprepared"].startswith("ValueError") and "prepare" in e["backward_unprepared"]
            assert e["prepare_bad_tuple"].startswith("ValueError") and "length 2" in e["prepare_bad_tuple"]
            assert e["bad_tag"].startswith("ValueError") and "../escape" in e["bad_tag"]
            assert e["missing_ckpt"].startswith("FileNotFoundError")
            assert e["bad_client_state"].startswith("ValueError") and "'fn'" in e["bad_client_state"]
            # The failed save neither published a checkpoint nor moved `latest`.
            assert [n for n in r["listing_after_failed_save"] if not n.startswith(".")] == ["good", "latest"]
            assert r["latest"] == "good"
