"""``engine_type`` is checked at ``get_strategy``, and a missing first-party engine names an
installable requirement."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError
from pathlib import Path
from types import SimpleNamespace

import pytest

import lightrft.strategy.registry as registry
from lightrft.strategy import get_fake_strategy, get_strategy, register_engine

REPO = Path(__file__).resolve().parents[3]


class _Dummy:
    built: list[str] = []

    def __init__(self, config, args=None):
        self.config = config
        _Dummy.built.append(config.engine_type)

    def setup_distributed(self):
        pass


@pytest.fixture
def dummy_strategy(monkeypatch):
    _Dummy.built = []
    monkeypatch.setitem(registry._registered[registry.STRATEGY_GROUP], "dummy", _Dummy)
    return _Dummy


def test_unknown_engine_type_fails_at_get_strategy(dummy_strategy):
    with pytest.raises(ValueError) as e:
        get_strategy({"strategy": "dummy", "engine_type": "vlm"})
    msg = str(e.value)
    assert "StrategyConfig.engine_type='vlm'" in msg and "Did you mean 'vllm'?" in msg
    # The installed engines of this environment (lightrft-testing's fake at least) are listed.
    installed = registry.available(registry.ENGINE_GROUP)
    assert "fake" in installed and f"Installed: {', '.join(map(repr, installed))};" in msg
    assert "first-party engines: 'hf', 'vllm', 'sglang', 'fake'" in msg
    assert dummy_strategy.built == []  # nothing was built


def test_unknown_engine_type_fails_at_get_fake_strategy():
    with pytest.raises(ValueError, match=r"engine_type='sglnag'.*Did you mean 'sglang'"):
        get_fake_strategy(engine_type="sglnag")
    with pytest.raises(ValueError, match=r"engine_type='nonsense'"):
        get_fake_strategy({"engine_type": "nonsense"})


def test_known_registered_and_installed_engine_names_pass(dummy_strategy):
    # First-party engines pass even when not installed: training needs no engine, and creating
    # the engine names what to install.
    for name in ("hf", "vllm", "sglang", "fake"):
        get_strategy({"strategy": "dummy", "engine_type": name})
    register_engine("my_engine", object)
    try:
        get_strategy({"strategy": "dummy", "engine_type": "my_engine"})
    finally:
        registry._registered[registry.ENGINE_GROUP].pop("my_engine")
    assert dummy_strategy.built == ["hf", "vllm", "sglang", "fake", "my_engine"]
    assert get_fake_strategy(engine_type="fake").config.engine_type == "fake"


def _no_distributions(monkeypatch):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(registry, "distribution", missing)
    monkeypatch.setattr(registry, "_entry_points", lambda group: {})


def test_missing_engine_distribution_names_an_installable_requirement(monkeypatch):
    _no_distributions(monkeypatch)
    with pytest.raises(ImportError) as e:
        registry.load_engine_class("hf")
    assert "`uv add 'lightrft-engines[hf]'`" in str(e.value) and "not installed" in str(e.value)
    # lightrft-engines declares no vllm / sglang extra: the hint names the engine's own package.
    for name in ("vllm", "sglang"):
        with pytest.raises(ImportError) as e:
            registry.load_engine_class(name)
        assert f"`uv add lightrft-engines {name}`" in str(e.value) and "[" not in str(e.value)
    with pytest.raises(ImportError, match=r"`uv add lightrft-testing`"):
        registry.load_engine_class("fake")


def _fake_engines_distribution(extras, engines):
    eps = [SimpleNamespace(name=n, group=registry.ENGINE_GROUP) for n in engines]
    meta = SimpleNamespace(get_all=lambda key: list(extras) if key == "Provides-Extra" else None)
    return SimpleNamespace(version="9.9.0", metadata=meta, entry_points=eps)


def test_installed_engines_distribution_is_asked_for_its_extras(monkeypatch):
    monkeypatch.setattr(registry, "_entry_points", lambda group: {})
    dist = _fake_engines_distribution(["hf", "vllm"], ["hf"])
    monkeypatch.setattr(registry, "distribution", lambda name: dist)
    assert registry.engine_requirement("vllm") == "'lightrft-engines[vllm]'"
    assert registry.engine_requirement("sglang") == "lightrft-engines sglang"
    # Installed, but without the engine's entry point: an older release. Say so, and what it has.
    with pytest.raises(ImportError) as e:
        registry.load_engine_class("sglang")
    msg = str(e.value)
    assert "not provided by the installed lightrft-engines 9.9.0 (its engines: 'hf')" in msg
    assert "`uv add --upgrade-package lightrft-engines lightrft-engines sglang`" in msg


def _declared_extras(pyproject: Path) -> set[str]:
    # tomllib is 3.11+; the section is simple enough to read line by line.
    section = re.search(
        r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", pyproject.read_text(), re.M | re.S
    )
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*=", section.group(1), re.M)) if section else set()


def test_engine_extras_table_matches_lightrft_engines_pyproject():
    """The hint for an uninstalled lightrft-engines trusts ENGINE_DISTRIBUTION_EXTRAS: it must be
    exactly the extras lightrft-engines declares, so a hint never names a missing extra and names
    a new one as soon as it exists."""
    declared = _declared_extras(REPO / "packages" / "lightrft-engines" / "pyproject.toml")
    assert "hf" in declared
    engine_extras = {extra for extra, _ in registry.ENGINE_EXTRAS.values()}
    assert registry.ENGINE_DISTRIBUTION_EXTRAS == declared & engine_extras, (
        f"lightrft-engines declares the extras {sorted(declared)}: update "
        "lightrft.strategy.registry.ENGINE_DISTRIBUTION_EXTRAS"
    )
