"""The conformance suite is closed: a backend's subclass cannot silently override or delete a
standard test; exceptions go through ``expected_failures`` (strict xfails naming standard tests)."""

from __future__ import annotations

import pytest

from lightrft.testing.conformance import StrategyConformanceSuite
from lightrft.testing.conformance.suite import STANDARD_TESTS, override_problems

A_TEST = STANDARD_TESTS[0]


def test_the_standard_tests_are_every_check_of_every_capability() -> None:
    from lightrft.testing.conformance import CAPABILITIES

    assert list(STANDARD_TESTS) == [c.__name__ for cap in CAPABILITIES for c in cap.tests]
    assert len(STANDARD_TESTS) == len(set(STANDARD_TESTS)) > 10
    assert all(name.startswith("test_") for name in STANDARD_TESTS)


def test_overriding_a_standard_test_is_refused_when_the_class_is_made() -> None:
    with pytest.raises(TypeError, match=rf"{A_TEST} is overridden or deleted.*expected_failures"):
        type("TestPasses", (StrategyConformanceSuite,), {A_TEST: lambda self: None})


def test_deleting_a_standard_test_by_setting_it_to_none_is_refused() -> None:
    with pytest.raises(TypeError, match=rf"{A_TEST} is overridden or deleted"):
        type("TestFewer", (StrategyConformanceSuite,), {A_TEST: None})


def test_the_guard_itself_and_the_xfail_fixture_cannot_be_overridden() -> None:
    for name in ("test_no_overrides_DO_NOT_OVERRIDE", "_declared_xfail"):
        with pytest.raises(TypeError, match=rf"{name} is overridden or deleted"):
            type("TestSilent", (StrategyConformanceSuite,), {name: lambda self: None})


def test_expected_failures_must_name_standard_tests() -> None:
    with pytest.raises(TypeError, match=r"expected_failures names 'test_typo', which are not standard tests"):
        type("TestTypo", (StrategyConformanceSuite,), {"expected_failures": {"test_typo": "why"}})
    ok = type("TestDeclared", (StrategyConformanceSuite,), {"expected_failures": {A_TEST: "a reason"}})
    assert override_problems(ok) == []


def test_a_subclass_of_a_subclass_is_checked_too_and_a_later_patch_is_caught() -> None:
    base = type("TestBackend", (StrategyConformanceSuite,), {"strategy_name": "fake"})
    with pytest.raises(TypeError, match=A_TEST):
        type("TestBackendVariant", (base,), {A_TEST: lambda self: None})
    # Patched after the class was made: the guard test (run on every subclass) reports it.
    patched = type("TestPatched", (StrategyConformanceSuite,), {})
    setattr(patched, A_TEST, lambda self: None)
    assert [p.split(" ")[0] for p in override_problems(patched)] == [A_TEST]
    with pytest.raises(AssertionError):
        patched().test_no_overrides_DO_NOT_OVERRIDE()
