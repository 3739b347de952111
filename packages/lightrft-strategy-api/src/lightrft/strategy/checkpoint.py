"""Checkpoint directories: atomic publication, the ``latest`` marker and rotation.

A checkpoint is written into ``<save_dir>/.tmp-<tag>``; once every rank has finished, the ranks
checksum what they wrote, rank 0 writes ``manifest.json`` (last, see :mod:`.integrity`) and renames
the directory to ``<save_dir>/<tag>``; ``latest`` is replaced (atomically) only after that rename.
Rotation renames a victim out of sight before deleting it. A crash at any point thus leaves every
published checkpoint whole and ``latest`` naming one of them; the stale temporary directories are
removed (or, for a checkpoint caught between the two renames of a re-save, restored) by the next save.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import integrity

LATEST = "latest"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = f"{TMP_PREFIX}old-"
"""A checkpoint being replaced by a re-save of its tag (between the two renames)."""
DELETING_PREFIX = f"{TMP_PREFIX}del-"
"""A checkpoint being deleted by rotation."""
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
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, save_dir / LATEST)
    integrity.fsync_dir(save_dir)


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
    if not path.is_dir() and (root / f"{OLD_PREFIX}{tag}").is_dir():
        # A re-save of this tag was interrupted between its two renames: the old copy is whole.
        path = root / f"{OLD_PREFIX}{tag}"
    if not path.is_dir():
        found = [p.name for p in list_checkpoints(root)]
        raise FileNotFoundError(
            f"checkpoint tag={tag!r} not found in {str(root)!r}; available: {found or 'none'}"
        )
    return path


def replace_dir(staging: Path, final: Path) -> None:
    """Moves ``staging`` to ``final``; an existing ``final`` is swapped out, then deleted."""
    if final.exists():
        old = final.parent / f"{OLD_PREFIX}{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        integrity.fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
        integrity.fsync_dir(final.parent)


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
        # Out of sight first (atomic), then deleted: a crash mid-delete leaves no half checkpoint.
        doomed = root / f"{DELETING_PREFIX}{victim.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(victim, doomed)
        shutil.rmtree(doomed)
        deleted.append(victim)
    return deleted


def prepare_staging(save_dir: str | os.PathLike, tag: str) -> Path:
    """Creates a clean ``.tmp-<tag>`` (rank 0 only; stale ones from a crash are removed)."""
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):
        if not stale.is_dir():
            continue
        if stale.name.startswith(OLD_PREFIX) and not (root / stale.name[len(OLD_PREFIX) :]).exists():
            os.replace(stale, root / stale.name[len(OLD_PREFIX) :])  # a re-save died between renames
        else:
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
    rank: int = 0,
    world_size: int = 1,
    all_gather_object: Callable[[Any], list[Any]] | None = None,
    manifest_info: dict[str, Any] | None = None,
    algorithm: str | None = None,
) -> Path:
    """Runs ``write(staging_dir)`` on every rank between barriers, checksums the files (each rank
    those it wrote), writes the manifest (rank 0, last) and publishes the result.

    ``all_gather_object`` (needed with several ranks) collects the per-rank checksums;
    ``manifest_info`` (step, backend, world size, ...) goes into the manifest."""
    validate_tag(tag)
    if world_size > 1 and all_gather_object is None:
        raise ValueError(f"staged_save with world_size={world_size} needs all_gather_object")
    algorithm = algorithm or integrity.default_algorithm()
    if is_rank_0:
        prepare_staging(save_dir, tag)
    barrier()
    staging = tmp_dir(save_dir, tag)
    write(staging)
    barrier()
    own = integrity.hash_own_files(staging, rank, world_size, algorithm)
    parts = all_gather_object(own) if all_gather_object is not None else [own]
    final = Path(save_dir) / tag
    if is_rank_0:
        files: dict[str, dict[str, Any]] = {}
        for part in parts:
            files.update(part)
        for rel in integrity.list_files(staging):  # written under a name no rank claimed
            if rel not in files:
                p = staging / rel
                files[rel] = {
                    "size": p.stat().st_size,
                    "hash": integrity.file_digest(p, algorithm, fsync=True),
                }
        info = {"tag": tag, "world_size": world_size, **(manifest_info or {})}
        integrity.write_manifest(staging, integrity.build_manifest(files, algorithm, **info))
        publish(save_dir, tag, save_latest=save_latest)
        rotate(save_dir, keep=tag, max_num=max_num, max_mem_gb=max_mem_gb)
    barrier()
    return final
