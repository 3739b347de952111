"""Checkpoint directories: atomic publication, the ``latest`` marker and rotation.

A checkpoint is written into ``<save_dir>/.tmp-<tag>`` and renamed to ``<save_dir>/<tag>`` once every
rank has finished; ``latest`` is replaced (atomically) only after that rename. A crash mid-save thus
leaves the previous checkpoint and its ``latest`` marker untouched; the stale temporary directory is
removed by the next save.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

LATEST = "latest"
TMP_PREFIX = ".tmp-"
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def validate_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or tag == LATEST:
        raise ValueError(
            f"checkpoint tag={tag!r} is invalid: use letters, digits, '_', '.', '-' "
            f"(not starting with '.' or '-', no '/'), and not {LATEST!r}"
        )
    return tag


def tmp_dir(save_dir: str | os.PathLike, tag: str) -> Path:
    return Path(save_dir) / f"{TMP_PREFIX}{tag}"


def write_latest(save_dir: str | os.PathLike, tag: str) -> None:
    """Replaces ``<save_dir>/latest`` atomically with ``tag``."""
    save_dir = Path(save_dir)
    tmp = save_dir / f"{TMP_PREFIX}{LATEST}"
    tmp.write_text(tag)
    os.replace(tmp, save_dir / LATEST)


def read_latest(load_dir: str | os.PathLike) -> str | None:
    marker = Path(load_dir) / LATEST
    return marker.read_text().strip() if marker.is_file() else None


def list_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """Published checkpoint directories, oldest first (by modification time, then name)."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(dirs, key=lambda p: (p.stat().st_mtime, p.name))


def dir_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def resolve_checkpoint(load_dir: str | os.PathLike, tag: str | None) -> Path:
    """The directory to load: ``tag`` or the one named by ``latest``; errors list what exists."""
    root = Path(load_dir)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "no such directory"
        raise FileNotFoundError(f"load_dir={str(root)!r}: {what} (resolved: {str(root.resolve())!r})")
    if tag is None:
        tag = read_latest(root)
        if tag is None:
            found = [p.name for p in list_checkpoints(root)]
            raise FileNotFoundError(
                f"load_dir={str(root)!r} has no {LATEST!r} marker; pass tag= one of {found or 'nothing (no checkpoints)'}"
            )
    path = root / validate_tag(tag)
    if not path.is_dir():
        found = [p.name for p in list_checkpoints(root)]
        raise FileNotFoundError(
            f"checkpoint tag={tag!r} not found in {str(root)!r}; available: {found or 'none'}"
        )
    return path


def replace_dir(staging: Path, final: Path) -> None:
    """Moves ``staging`` to ``final``; an existing ``final`` is swapped out, then deleted."""
    if final.exists():
        old = final.parent / f"{TMP_PREFIX}old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


def publish(save_dir: str | os.PathLike, tag: str, save_latest: bool = True) -> Path:
    """Renames the finished temporary directory into place (rank 0 only), then updates ``latest``."""
    root = Path(save_dir)
    final = root / tag
    replace_dir(tmp_dir(root, tag), final)
    if save_latest:
        write_latest(root, tag)
    return final


def rotate(save_dir: str | os.PathLike, keep: str, max_num: int, max_mem_gb: float) -> list[Path]:
    """Deletes the oldest checkpoints until at most ``max_num`` remain and they take at most
    ``max_mem_gb`` GiB; ``keep`` (the newest save) is never deleted. Returns what was deleted."""
    if max_num < 1:
        raise ValueError(f"max_num={max_num} is invalid: it must be >= 1")
    root = Path(save_dir)
    ckpts = [p for p in list_checkpoints(root) if p.name != keep]
    limit = max_mem_gb * (1 << 30)
    total = sum(dir_size_bytes(p) for p in ckpts) + dir_size_bytes(root / keep)
    deleted: list[Path] = []
    while ckpts and (len(ckpts) + 1 > max_num or total > limit):
        victim = ckpts.pop(0)
        total -= dir_size_bytes(victim)
        shutil.rmtree(victim)
        deleted.append(victim)
    return deleted


def prepare_staging(save_dir: str | os.PathLike, tag: str) -> Path:
    """Creates a clean ``.tmp-<tag>`` (rank 0 only; stale ones from a crash are removed)."""
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    staging = tmp_dir(root, tag)
    staging.mkdir()
    return staging


def staged_save(
    save_dir: str | os.PathLike,
    tag: str,
    write: Callable[[Path], None],
    *,
    is_rank_0: bool,
    barrier: Callable[[], None],
    max_num: int,
    max_mem_gb: float,
    save_latest: bool = True,
) -> Path:
    """Runs ``write(staging_dir)`` on every rank between barriers and publishes the result."""
    validate_tag(tag)
    if is_rank_0:
        prepare_staging(save_dir, tag)
    barrier()
    staging = tmp_dir(save_dir, tag)
    write(staging)
    barrier()
    final = Path(save_dir) / tag
    if is_rank_0:
        publish(save_dir, tag, save_latest=save_latest)
        rotate(save_dir, keep=tag, max_num=max_num, max_mem_gb=max_mem_gb)
    barrier()
    return final
