"""Checkpoint manifests: what a finished checkpoint holds, and the check that it still holds it.

``manifest.json`` is the last file written into a checkpoint, before the directory is renamed into
place: a checkpoint without one never finished. It lists every file with its size and checksum,
and records the step, the backend, the world size and the library versions that wrote it.

Checksums are streamed (8 MiB reads, constant memory). The default algorithm is XXH3-128
(``xxhash``, about 10x the speed of SHA-256 on one core; it catches the accidental damage a
checkpoint meets: truncation, torn writes, bit rot; it is not meant against an adversary). Without
``xxhash`` installed, SHA-256 from the standard library is used; the manifest records which.
The work is spread over ranks: at save each rank hashes the files it wrote (it has them in its page
cache) and rank 0 merges; at load the files are split over the ranks by size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "lightrft-checkpoint"
FORMAT_VERSION = 1
ALGORITHMS = ("xxh3_128", "sha256")
_CHUNK = 8 << 20

# Which rank wrote a file, read from the names the writers give them: DCP shards
# (``__<rank>_<n>.distcp``), DeepSpeed ZeRO partitions (``zero_pp_rank_<rank>_...``, ZeRO-3 model
# states too) and LightRFT's per-rank state. Anything else is written by rank 0.
_WRITER_PATTERNS = (
    re.compile(r"(?:^|/)__(\d+)_\d+\.distcp$"),
    re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_"),
    re.compile(r"(?:^|/)lightrft_rank(\d+)\.pt$"),
)


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded (missing, truncated or corrupted files, a missing or
    damaged manifest, or one written by a backend / world size that cannot read it).

    The message names the checkpoint, the file, what is wrong and the last good checkpoint to load
    instead (``tag=...``); the attributes carry the same for programs."""

    def __init__(
        self, message: str, *, path: str | None = None, file: str | None = None, last_good: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        """The checkpoint directory."""
        self.file = file
        """The damaged file, relative to ``path`` (None when the problem is not one file's)."""
        self.last_good = last_good
        """The tag of the newest other checkpoint whose files check out, or None."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (str(self), self.path, self.file, self.last_good))


def _rebuild_error(
    message: str, path: str | None, file: str | None, last_good: str | None
) -> CheckpointError:
    return CheckpointError(message, path=path, file=file, last_good=last_good)


# ------------------------------------------------------------------------------------ hashing
def default_algorithm() -> str:
    """``xxh3_128`` when ``xxhash`` is installed, else ``sha256``."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "sha256"
    return "xxh3_128"


def _hasher(algorithm: str) -> Any:
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "xxh3_128":
        try:
            import xxhash
        except ImportError as e:
            raise CheckpointError(
                "this checkpoint's manifest uses xxh3_128 checksums, which need xxhash: "
                "`pip install xxhash` (or `pip install lightrft-strategy-api[fast-hash]`)"
            ) from e
        return xxhash.xxh3_128()
    raise ValueError(f"algorithm={algorithm!r} is invalid: valid are {', '.join(ALGORITHMS)}")


def file_digest(path: str | os.PathLike, algorithm: str, *, fsync: bool = False) -> str:
    """The hex checksum of one file, read in 8 MiB chunks; ``fsync`` also flushes it to disk."""
    h = _hasher(algorithm)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def writer_rank(relpath: str) -> int:
    """The rank that wrote ``relpath`` (from its name; 0 for files without a rank in their name)."""
    for pattern in _WRITER_PATTERNS:
        m = pattern.search(relpath)
        if m:
            return int(m.group(1))
    return 0


def list_files(root: str | os.PathLike) -> list[str]:
    """Every file under ``root`` (relative POSIX paths, sorted), the manifest excepted."""
    base = Path(root)
    return sorted(
        p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def hash_own_files(
    root: str | os.PathLike, rank: int, world_size: int, algorithm: str, *, fsync: bool = True
) -> dict[str, dict[str, Any]]:
    """Size and checksum of the files of ``root`` that ``rank`` wrote (see :func:`writer_rank`)."""
    base = Path(root)
    out: dict[str, dict[str, Any]] = {}
    for rel in list_files(base):
        if writer_rank(rel) % world_size == rank:
            p = base / rel
            out[rel] = {"size": p.stat().st_size, "hash": file_digest(p, algorithm, fsync=fsync)}
    return out


# ----------------------------------------------------------------------------------- manifest
def library_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Installed versions of python, torch (with its build tag, e.g. ``+cu128``), the LightRFT
    packages and ``extra`` distributions."""
    import torch

    out = {"python": sys.version.split()[0], "torch": str(torch.__version__)}
    for dist in ("lightrft-config", "lightrft-strategy-api", *extra):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _canonical(d: dict[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def build_manifest(files: dict[str, dict[str, Any]], algorithm: str, **info: Any) -> dict[str, Any]:
    """The manifest of ``files`` (``{relpath: {"size", "hash"}}``) plus ``info`` (step, backend,
    world_size, layout, libraries...). It carries a checksum of itself: an edited or damaged
    manifest is caught even when it is still valid JSON."""
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
        "algorithm": algorithm,
        "files": dict(sorted(files.items())),
    }
    body["manifest_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
    return body


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Writes ``root/manifest.json`` atomically and durably (temporary file, fsync, rename, fsync
    of the directory)."""
    base = Path(root)
    tmp = base / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    final = base / MANIFEST
    os.replace(tmp, final)
    fsync_dir(base)
    return final


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes renames and new entries in ``path`` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path``; CheckpointError if it is missing or damaged."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no {MANIFEST}: its save did not finish (the manifest is written "
            "last) or the file was removed",
            path=str(path),
            file=MANIFEST,
        )
    raw = file.read_bytes()
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {MANIFEST} is not valid JSON ({len(raw)} bytes: truncated or "
            f"corrupted: {e})",
            path=str(path),
            file=MANIFEST,
        ) from None
    recorded = manifest.pop("manifest_sha256", None)
    if recorded != hashlib.sha256(_canonical(manifest)).hexdigest():
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {MANIFEST} is corrupted (its own checksum does not match its content)",
            path=str(path),
            file=MANIFEST,
        )
    manifest["manifest_sha256"] = recorded
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {MANIFEST} has format={manifest.get('format')!r} "
            f"version={manifest.get('format_version')!r}; this LightRFT reads {FORMAT!r} version {FORMAT_VERSION}",
            path=str(path),
            file=MANIFEST,
        )
    return manifest


# ------------------------------------------------------------------------------- verification
def share_of_files(files: dict[str, dict[str, Any]], rank: int, world_size: int) -> list[str]:
    """The files ``rank`` hashes at load: largest first, each to the least loaded rank, so every
    rank reads about the same number of bytes (the same split on every rank)."""
    loads = [0] * world_size
    mine: list[str] = []
    for rel in sorted(files, key=lambda r: (-int(files[r]["size"]), r)):
        target = min(range(world_size), key=lambda i: (loads[i], i))
        loads[target] += int(files[rel]["size"])
        if target == rank:
            mine.append(rel)
    return mine


def check_files(
    path: str | os.PathLike,
    manifest: dict[str, Any],
    *,
    checksums: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Checks that every file of the manifest exists with its size (all of them, on every rank:
    a stat each) and, with ``checksums``, this rank's share of the checksums. Raises CheckpointError
    naming the first bad file."""
    path = Path(path)
    files: dict[str, dict[str, Any]] = manifest["files"]
    for rel, entry in files.items():
        p = path / rel
        if not p.is_file():
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {rel} is missing (the manifest lists it, {entry['size']} bytes)",
                path=str(path),
                file=rel,
            )
        size = p.stat().st_size
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "longer than written"
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {rel} is {what}: {size} bytes, the manifest records {entry['size']}",
                path=str(path),
                file=rel,
            )
    if not checksums:
        return
    algorithm = manifest["algorithm"]
    for rel in share_of_files(files, rank, world_size):
        digest = file_digest(path / rel, algorithm)
        if digest != files[rel]["hash"]:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {rel} is corrupted: its {algorithm} checksum is {digest}, "
                f"the manifest records {files[rel]['hash']} (same size, different content)",
                path=str(path),
                file=rel,
            )


def verify_checkpoint(
    path: str | os.PathLike, *, checksums: bool = True, rank: int = 0, world_size: int = 1
) -> dict[str, Any]:
    """Reads the manifest and checks the files (this rank's share of checksums); returns the
    manifest. Raises CheckpointError. With the defaults, one process checks everything."""
    manifest = read_manifest(path)
    check_files(path, manifest, checksums=checksums, rank=rank, world_size=world_size)
    return manifest


def last_good(root: str | os.PathLike, exclude: str | None, candidates: list[Path]) -> str | None:
    """The newest of ``candidates`` (oldest first, as ``checkpoint.list_checkpoints`` gives them),
    other than ``exclude``, whose manifest reads and whose files have their recorded sizes
    (checksums are not computed: this runs while reporting an error)."""
    for cand in reversed(candidates):
        if cand.name == exclude:
            continue
        try:
            verify_checkpoint(cand, checksums=False)
        except CheckpointError:
            continue
        return cand.name
    return None


def with_suggestion(err: CheckpointError, root: str | os.PathLike, candidates: list[Path]) -> CheckpointError:
    """``err`` with the last good checkpoint of ``root`` to load instead appended to its message."""
    bad = Path(err.path).name if err.path else None
    good = last_good(root, bad, candidates)
    hint = (
        f"; load the last good checkpoint instead: tag={good!r}"
        if good
        else f"; no other checkpoint in {str(root)!r} passes verification"
    )
    return CheckpointError(f"{err}{hint}", path=err.path, file=err.file, last_good=good)


def agree(failure: BaseException | None, all_gather_object: Callable[[Any], list[Any]]) -> None:
    """Collective: if any rank failed, every rank raises the failure of the lowest failing rank
    (same type when it is a CheckpointError or FileNotFoundError, the same message)."""
    mine = None
    if failure is not None:
        kind = "FileNotFoundError" if isinstance(failure, FileNotFoundError) else "CheckpointError"
        mine = (kind, str(failure), getattr(failure, "path", None), getattr(failure, "file", None))
        mine = (*mine, getattr(failure, "last_good", None))
    results = all_gather_object(mine)
    for rank, res in enumerate(results):
        if res is None:
            continue
        kind, message, path, file, good = res
        if len(results) > 1:
            message = f"{message} (reported by rank {rank} of {len(results)})"
        if kind == "FileNotFoundError":
            raise FileNotFoundError(message) from failure
        raise CheckpointError(message, path=path, file=file, last_good=good) from failure
