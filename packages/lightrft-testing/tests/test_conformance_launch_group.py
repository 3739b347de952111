"""``launch_group``: the conformance suites of one module that share it (and strategy, world size,
launch environment) are measured in one launch, one configuration after the other; their results
are each configuration's own."""

from __future__ import annotations

from typing import Any

from lightrft.testing.conformance import StrategyConformanceSuite, run_check_sets, run_checks


def _suite(name: str, module: str = "tests_launch_group_a", **attrs: Any) -> type:
    return type(name, (StrategyConformanceSuite,), {"__module__": module, **attrs})


def test_members_are_the_modules_suites_of_the_group_in_the_order_they_were_made() -> None:
    base = {"strategy_name": "deepspeed", "world_size": 2, "launch_group": "g"}
    one = _suite("TestOne", **base, config_overrides={"zero_stage": 1})
    two = _suite("TestTwo", **base, config_overrides={"zero_stage": 2})
    _suite("TestElsewhere", module="tests_launch_group_b", **base, config_overrides={"zero_stage": 3})
    _suite("TestOtherGroup", **{**base, "launch_group": "h"}, config_overrides={"zero_stage": 3})
    _suite("TestFourRanks", **{**base, "world_size": 4}, config_overrides={"zero_stage": 3})
    _suite("TestOtherEnv", **base, launch_env={"X": "1"}, config_overrides={"zero_stage": 3})
    same_config = _suite("TestSameConfig", **base, config_overrides={"zero_stage": 2})
    assert one.launch_members() == two.launch_members() == [one, two]
    # A second suite of an existing configuration reads that configuration's results.
    assert same_config.launch_members() == [one, two]
    alone = _suite("TestAlone", strategy_name="deepspeed", world_size=2)
    assert alone.launch_members() == [alone]


def test_one_process_fake_suites_never_share_a_launch() -> None:
    fake = _suite("TestFake", module="tests_launch_group_c", launch_group="g")
    assert fake.launch_members() == [fake]


def test_check_sets_give_each_configuration_the_results_of_its_own_run() -> None:
    runs = [
        {"strategy_name": "fake", "config": {"max_norm": 0.5}},
        {"strategy_name": "fake", "config": {"max_norm": 0.1}},
    ]
    together = run_check_sets(runs)
    assert len(together) == 2
    for got in together:
        assert all(r["ok"] for r in got.values()), {k: r.get("error") for k, r in got.items()}
    # The second configuration, measured after the first in the same process, as if alone.
    alone = run_checks(runs[1]["strategy_name"], runs[1]["config"])
    assert sorted(together[1]) == sorted(alone)
    for key in ("losses", "norms"):
        assert together[1]["parity"]["result"][key] == alone["parity"]["result"][key]
    assert together[1]["parity"]["result"]["params"].equal(alone["parity"]["result"]["params"])
    # The two clipping thresholds really differ: the sets are not one run repeated.
    assert together[0]["parity"]["result"]["params"].ne(together[1]["parity"]["result"]["params"]).any()
