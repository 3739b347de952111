import pytest

import lightrft.strategy.registry as registry
from lightrft.strategy import StrategyConfig, get_strategy, register_strategy


def test_unknown_strategy_lists_available(monkeypatch):
    monkeypatch.setattr(registry, "_entry_points", lambda group: {})
    with pytest.raises(ValueError) as e:
        registry.load_strategy_class("nope")
    msg = str(e.value)
    assert "StrategyConfig.strategy='nope'" in msg and "'deepspeed'" in msg and "'fsdp'" in msg
    assert "first-party strategies:" in msg and "strategys" not in msg


def test_known_but_missing_backend_names_the_distribution(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(registry, "_entry_points", lambda group: {})
    monkeypatch.setattr(registry, "distribution", not_installed)
    with pytest.raises(ImportError, match=r"lightrft-deepspeed.*uv add lightrft-deepspeed"):
        registry.load_strategy_class("deepspeed")


def test_get_strategy_picks_by_name_and_legacy_flag(monkeypatch):
    seen = []

    class Dummy:
        def __init__(self, config, args=None):
            self.config, self.args = config, args

        def setup_distributed(self):
            seen.append(self.config.backend)

    monkeypatch.setitem(registry._registered[registry.STRATEGY_GROUP], "fsdp", Dummy)
    register_strategy("mine", Dummy)
    s = get_strategy({"fsdp": True, "my_extra": 5})
    assert seen == ["fsdp"] and s.config.get_extra_arg("my_extra") == 5
    s = get_strategy(StrategyConfig(strategy="mine"))
    assert seen[-1] == "mine" and isinstance(s, Dummy)


def test_fake_is_found_through_its_entry_point():
    s = get_strategy({"strategy": "fake", "train_batch_size": 4, "micro_train_batch_size": 2})
    assert type(s).__name__ == "FakeStrategy" and s.accumulated_gradient == 2


def test_get_fake_strategy_without_testing_package(monkeypatch):
    import sys

    from lightrft.strategy import get_fake_strategy

    # The class comes from the registered entry point (lightrft.testing.fake): hide both modules.
    monkeypatch.setitem(sys.modules, "lightrft.testing", None)
    monkeypatch.setitem(sys.modules, "lightrft.testing.fake", None)
    with pytest.raises(ImportError, match="lightrft-testing"):
        get_fake_strategy()
