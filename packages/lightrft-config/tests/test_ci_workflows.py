"""The GitHub workflows cover every workspace package: CI's matrix (each package alone, every
supported Python, highest and lowest-direct versions) and the release (trusted publishing of
each package). A package added to the workspace and forgotten here fails this test."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
WORKFLOWS = REPO / ".github" / "workflows"


def _packages() -> set[str]:
    return {p.parent.name for p in REPO.glob("packages/*/pyproject.toml")}


def _supported_pythons() -> list[str]:
    """3.10 up to the newest Python of the trove classifiers / CI list: requires-python's floor."""
    text = (REPO / "pyproject.toml").read_text()
    floor = re.search(r'requires-python = ">=3\.(\d+)"', text)
    assert floor, "root pyproject.toml has no requires-python"
    return [f"3.{minor}" for minor in range(int(floor.group(1)), 14)]


def _load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as True.
    data["on"] = data.pop(True, data.get("on"))
    return data


def test_ci_matrix_runs_each_package_alone_over_pythons_and_resolutions():
    ci = _load("ci.yml")
    test = ci["jobs"]["test"]
    matrix = test["strategy"]["matrix"]
    assert set(matrix["package"]) == _packages() and len(matrix["package"]) == len(_packages())
    assert matrix["python"] == _supported_pythons() == ["3.10", "3.11", "3.12", "3.13"]
    assert matrix["resolution"] == ["highest", "lowest-direct"]
    assert test["strategy"]["fail-fast"] is False
    run = " ".join(step.get("run", "") for step in test["steps"])
    # The cell is the local script with the matrix values, so it runs the same on a laptop.
    assert re.search(
        r"scripts/test-packages --python \$\{\{ matrix.python \}\}\s+--resolution \$\{\{ matrix.resolution \}\} "
        r"\$\{\{ matrix.package \}\}",
        run,
    ), run
    assert ci["env"]["UV_FROZEN"] == "1"
    assert "pull_request" in ci["on"] and "push" in ci["on"]
    checks = {job: " ".join(s.get("run", "") for s in spec["steps"]) for job, spec in ci["jobs"].items()}
    assert "scripts/check-wheels" in checks["wheels"]
    assert "pytest packages --collect-only" in checks["packages-together"]


def test_release_publishes_each_package_with_trusted_publishing():
    release = _load("release.yml")
    assert set(release["on"]["push"]["tags"]) == {"v*", "lightrft-*-v*"}
    jobs = release["jobs"]
    publish = jobs["publish"]
    assert publish["permissions"] == {"id-token": "write"}  # OIDC only, no token secret
    assert set(publish["needs"]) == {"plan", "check"}  # nothing is published before the wheel check
    steps = " ".join(s.get("run", "") for s in publish["steps"])
    assert (
        "uv build --package ${{ matrix.package }}" in steps
        and "uv publish --trusted-publishing always" in steps
    )
    assert "secrets." not in (WORKFLOWS / "release.yml").read_text()
    assert "scripts/check-wheels" in " ".join(s.get("run", "") for s in jobs["check"]["steps"])
    # The plan step selects packages from the packages/ directory (all of them for a `v*` tag).
    assert "ls packages" in " ".join(s.get("run", "") for s in jobs["plan"]["steps"])


def test_check_wheels_knows_every_package():
    script = (REPO / "scripts" / "check-wheels").read_text()
    listed = set(re.search(r"^all=\(([^)]*)\)", script, re.M).group(1).split())
    assert listed == _packages()
    for pkg in _packages():
        assert f"check[{pkg}]=" in script and f"forbidden[{pkg}]=" in script, pkg
