"""Any combination of packages collects in one pytest run (`pytest packages/lightrft-fsdp
packages/lightrft-deepspeed`), although their tests share file names such as test_conformance.py.

The root pyproject's `--import-mode=importlib` makes that work; .ci/run also collects every
package's tests in one run against the whole workspace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

_CONFTEST = """
import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
"""


def _fake_package(root: Path, name: str) -> None:
    tests = root / "packages" / name / "tests"
    tests.mkdir(parents=True)
    (tests / "conftest.py").write_text(_CONFTEST)
    (tests / f"_{name}_helpers.py").write_text(f"WHO = {name!r}\n")
    (tests / "test_conformance.py").write_text(
        f"from _{name}_helpers import WHO\n\n\ndef test_who():\n    assert WHO == {name!r}\n"
    )


def _pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    # No plugin autoload: the fake packages need none, and the installed ones import torch.
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_same_named_test_modules_of_two_packages_collect_and_run(tmp_path):
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")  # the real pytest options
    _fake_package(tmp_path, "alpha")
    _fake_package(tmp_path, "beta")
    run = _pytest(tmp_path, "-q", "packages/alpha", "packages/beta")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout, run.stdout
    # Control: pytest's default import mode fails on this layout, so the option is what fixes it.
    prepend = _pytest(tmp_path, "-q", "-o", "addopts=", "packages/alpha", "packages/beta")
    assert prepend.returncode != 0 and "import file mismatch" in prepend.stdout, prepend.stdout


def test_helper_modules_imported_by_bare_name_are_unique_across_packages():
    """conftest.py files put their tests directory on sys.path so that tests (and torchrun
    children) import helpers by bare name; two packages with a helper of the same name would
    silently share the first one imported when their tests run together."""
    owners: dict[str, list[str]] = defaultdict(list)
    for helper in sorted(REPO.glob("packages/*/tests/*.py")):
        if helper.name != "conftest.py" and not helper.name.startswith("test_"):
            owners[helper.stem].append(helper.parents[1].name)
    assert owners, "found no helper modules: the glob is wrong"
    clashes = {name: pkgs for name, pkgs in owners.items() if len(pkgs) > 1}
    assert not clashes, f"helper modules with the same name in several packages: {clashes}"
