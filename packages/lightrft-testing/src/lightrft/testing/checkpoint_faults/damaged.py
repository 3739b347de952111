"""Damaged checkpoints: :func:`damage` truncates, deletes or corrupts one file;
:func:`damage_cases` lists one file of each kind a checkpoint holds (the kinds its backend's
strategy class names, ``checkpoint_file_kinds``, found through the registry from the manifest);
:func:`check_damaged_loads` (on every rank) damages a copy of a good checkpoint in each way and
records what ``load_ckpt`` raised on each rank and whether the model, optimizer, dataloader and
RNG stayed untouched; :func:`damage_problems` says what is wrong with that record.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lightrft.strategy import StrategyBase, get_strategy, integrity
from lightrft.strategy.checkpointer import PORTABLE_FILE_KINDS
from lightrft.strategy.registry import load_strategy_class

from ..conformance.spec import BASE_CONFIG, tiny_model
from ..harness import build, full_params, train
from ..models import make_batches

HOWS = ("truncate", "delete", "corrupt")


def damage(file: str | os.PathLike, how: str) -> None:
    """``truncate``: keep the first half; ``delete``; ``corrupt``: flip one bit in the middle
    (same size, as bit rot or a torn write would)."""
    file = Path(file)
    if how == "truncate":
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        file.unlink()
    elif how == "corrupt":
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0x01
        file.write_bytes(bytes(data))
    else:
        raise ValueError(f"how={how!r} is invalid: valid are {', '.join(HOWS)}")


def file_kinds(path: str | os.PathLike) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The kinds of files the checkpoint at ``path`` holds, ``(kind, glob patterns)``: the
    manifest, then those its backend's strategy class names (found through the registry from the
    manifest's ``backend``: ``checkpoint_file_kinds``), or the portable layout's."""
    manifest = integrity.read_manifest(path)
    if manifest.get("layout") == "portable":
        kinds = PORTABLE_FILE_KINDS
    else:
        kinds = load_strategy_class(manifest["backend"]).checkpoint_file_kinds
    return (("manifest", (integrity.MANIFEST,)), *kinds)


def damage_cases(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(kind, relative path)`` of one file of each kind in the checkpoint at ``path``
    (:func:`file_kinds`; the highest-ranked one where each rank writes its own, so that a rank
    other than 0 finds it)."""
    files = [*integrity.list_files(path), integrity.MANIFEST]
    out = []
    for kind, patterns in file_kinds(path):
        found = sorted(
            (f for f in files if any(fnmatch.fnmatchcase(f, p) for p in patterns)),
            key=lambda r: (integrity.writer_rank(r), r),
        )
        if found:
            out.append((kind, found[-1]))
    return out


def _snapshot(strategy: StrategyBase, model: Any, optim: Any, loader: Any) -> dict[str, Any]:
    params = full_params(strategy, model)
    moments = [
        float(v.float().sum()) if torch.is_tensor(v) else float(v)
        for st in optim.state.values()
        for v in st.values()
        if torch.is_tensor(v) or isinstance(v, (int, float))
    ]
    return {
        "params": torch.cat([params[k].reshape(-1) for k in sorted(params)]),
        "optim": moments,
        "loader": loader.state_dict() if loader is not None else None,
        "rng": torch.get_rng_state(),
    }


def check_damaged_loads(config: dict[str, Any], root: str) -> dict[str, Any]:
    """Every rank: saves ``good1`` and ``good2``, then for each file kind and way of damage, loads a
    damaged copy of ``good2``. Records each error's type and message and whether the state stayed
    untouched; finally loads ``good2`` itself (verification splits the checksums over ranks)."""
    strategy = get_strategy({**BASE_CONFIG, **config})
    model, optim, sched = build(strategy, tiny_model())
    data = [torch.tensor([i]) for i in range(64)]
    loader = strategy.setup_dataloader(data, batch_size=2, shuffle=True)
    batches = make_batches(21, 3, strategy.config.train_batch_size)
    base = Path(root)
    rank0 = strategy.is_rank_0()
    train(strategy, model, optim, sched, batches[:1])
    strategy.save_ckpt(model, base, tag="good1")
    train(strategy, model, optim, sched, batches[1:2])
    it = iter(loader)
    next(it)
    strategy.save_ckpt(model, base, tag="good2")
    # Move on, so that an unintended partial load would show as a change.
    train(strategy, model, optim, sched, batches[2:])
    next(it)
    torch.manual_seed(4321)
    before = _snapshot(strategy, model, optim, loader)
    cases = damage_cases(base / "good2")
    results: list[dict[str, Any]] = []
    for kind, rel in cases:
        for how in HOWS:
            tag = f"bad-{kind}-{how}"
            if rank0:
                shutil.copytree(base / "good2", base / tag)
                damage(base / tag / rel, how)
            strategy.barrier()
            try:
                strategy.load_ckpt(model, base, tag=tag)
                error = {"type": "none", "message": ""}
            except Exception as e:
                error = {
                    "type": type(e).__name__,
                    "message": str(e),
                    "last_good": getattr(e, "last_good", None),
                }
            after = _snapshot(strategy, model, optim, loader)
            results.append(
                {
                    "kind": kind,
                    "file": rel,
                    "how": how,
                    **error,
                    "params_same": bool(torch.equal(before["params"], after["params"])),
                    "optim_same": before["optim"] == after["optim"],
                    "loader_same": before["loader"] == after["loader"],
                    "rng_same": bool(torch.equal(before["rng"], after["rng"])),
                }
            )
            strategy.barrier()
            if rank0:
                shutil.rmtree(base / tag)
            strategy.barrier()
    path, _ = strategy.load_ckpt(model, base)
    loaded = _snapshot(strategy, model, optim, loader)
    return {
        "rank": strategy.get_rank(),
        "cases": results,
        "kinds": [k for k, _ in cases],
        "clean_load": Path(path).name,
        "clean_load_changed_params": not torch.equal(before["params"], loaded["params"]),
    }


# ------------------------------------------------------------------------------ what to expect
def expected_words(kind: str, file: str, how: str) -> list[str]:
    """Words the error for damaging ``file`` (of ``kind``) by ``how`` must contain (any one of)."""
    if kind == "manifest":
        return {
            "delete": ["has no manifest.json"],
            "truncate": ["manifest.json is not valid JSON"],
            "corrupt": ["manifest.json is not valid JSON", "manifest.json is corrupted"],
        }[how]
    return [f"{file} is " + {"delete": "missing", "truncate": "truncated", "corrupt": "corrupted"}[how]]


def damage_problems(per_rank: list[dict[str, Any]], last_good: str = "good2") -> list[str]:
    """What is wrong with the results of :func:`check_damaged_loads` (rank 0 first): an empty
    list when every damaged load failed on every rank with the same CheckpointError naming the
    file, what is wrong and ``tag=<last_good>``, and left the state untouched."""
    problems = []
    for i, case in enumerate(per_rank[0]["cases"]):
        name = f"{case['kind']}/{case['how']} ({case['file']})"
        messages = {r["cases"][i]["message"] for r in per_rank}
        if len(messages) != 1:
            problems.append(f"{name}: ranks disagree: {sorted(messages)}")
        for r in per_rank:
            c = r["cases"][i]
            if c["type"] != "CheckpointError":
                problems.append(f"{name}: rank {r['rank']} raised {c['type']}: {c['message']}")
                continue
            if not any(w in c["message"] for w in expected_words(c["kind"], c["file"], c["how"])):
                problems.append(
                    f"{name}: rank {r['rank']}: message lacks {expected_words(c['kind'], c['file'], c['how'])}: {c['message']}"
                )
            if f"tag={last_good!r}" not in c["message"] or c["last_good"] != last_good:
                problems.append(f"{name}: rank {r['rank']}: no tag={last_good!r} suggested: {c['message']}")
            for what in ("params", "optim", "loader", "rng"):
                if not c[f"{what}_same"]:
                    problems.append(f"{name}: rank {r['rank']}: {what} changed by the failed load")
    return problems
