"""``lightrft-ckpt``: look into, check and convert LightRFT checkpoints without a GPU or a process group.

- ``lightrft-ckpt inspect PATH``: step, backend, world size, libraries, files, the model's tensors
  (name, shape, dtype) and the manifest check (sizes; ``--checksums`` for the full check).
- ``lightrft-ckpt verify PATH [--all] [--sizes-only]``: the full check (every checksum); exit status
  1 and the reason when a checkpoint is damaged.
- ``lightrft-ckpt convert PATH --to hf OUT [--hf-config DIR]``: the model weights of a
  checkpoint as a Hugging Face safetensors directory.
- ``lightrft-ckpt convert PATH --to portable OUT``: a native checkpoint as the portable layout,
  loadable by every backend at any world size.

The command knows no backend: the manifest's ``backend`` names the strategy class (found through
the ``lightrft.strategies`` entry points), whose offline hooks read its native files
(``read_checkpoint_tensors``) and convert them (``convert_checkpoint_to_portable``).

``PATH`` is a checkpoint directory, or a save directory (its ``latest`` checkpoint, or every one
with ``verify --all``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from . import checkpoint as ckpt
from . import integrity, portable, registry
from .base import StrategyBase
from .integrity import CheckpointError
from .weights import clean_param_name

_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip
LIGHTRFT_PREFIX = "lightrft_"
"""LightRFT's own files in a checkpoint (per-rank state, client state, scheduler), whatever the backend."""


def _checkpoint_dirs(path: Path, every: bool) -> list[Path]:
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r}: no such directory")
    if (path / integrity.MANIFEST).is_file() or not (path / ckpt.LATEST).is_file() and not every:
        return [path]
    if every:
        found = ckpt.list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"{str(path)!r} holds no checkpoint directories")
        return found
    return [ckpt.resolve_checkpoint(path, None)]


def strategy_class(path: Path, manifest: dict[str, Any]) -> type[StrategyBase]:
    """The strategy class that wrote the checkpoint at ``path``, found through the registry from
    the manifest's ``backend`` (entry point group ``lightrft.strategies``)."""
    backend = manifest.get("backend")
    try:
        return cast("type[StrategyBase]", registry.load_strategy_class(str(backend)))
    except ImportError as e:
        dist = registry.KNOWN_STRATEGIES.get(str(backend), "the distribution that registers it")
        raise ImportError(
            f"checkpoint {str(path)!r} has backend={backend!r}; reading it needs {dist}: {e}"
        ) from e
    except ValueError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has backend={backend!r}, which no installed distribution "
            f"registers as a strategy ({e})",
            path=str(path),
        ) from e


def converts_offline(cls: type[StrategyBase]) -> bool:
    """Whether the strategy class ``cls`` converts its native checkpoints to the portable layout."""
    hook = StrategyBase.convert_checkpoint_to_portable.__func__  # type: ignore[attr-defined]
    return cls.convert_checkpoint_to_portable.__func__ is not hook  # type: ignore[attr-defined]


def _offline_converters() -> list[str]:
    """The installed strategies that convert their native checkpoints offline."""
    names = []
    for name in registry.available(registry.STRATEGY_GROUP):
        try:
            cls = registry.load_strategy_class(name)
        except ImportError:  # installed, but its own dependencies are not: it cannot convert here
            continue
        if isinstance(cls, type) and issubclass(cls, StrategyBase) and converts_offline(cls):
            names.append(name)
    return names


def model_tensors(path: str | Path, manifest: dict[str, Any], load: bool = True) -> dict[str, Any]:
    """The model weights of a checkpoint, keyed by clean parameter name: tensors with ``load``,
    else ``(shape, dtype)`` read from metadata or memory-mapped files. A native checkpoint is read
    by its backend's strategy class (:meth:`StrategyBase.read_checkpoint_tensors`)."""
    path = Path(path)
    if manifest.get("layout") == "portable":
        raw = portable.read_model_tensors(path / portable.PORTABLE_DIR, load)
    else:
        raw = strategy_class(path, manifest).read_checkpoint_tensors(path, manifest, load)
    out: dict[str, Any] = {}
    for name, t in raw.items():
        if load or not torch.is_tensor(t):
            out[clean_param_name(name)] = t
        else:
            out[clean_param_name(name)] = (tuple(t.shape), t.dtype)
    return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def cmd_inspect(args: argparse.Namespace) -> int:
    path = _checkpoint_dirs(Path(args.path), every=False)[0]
    manifest = integrity.read_manifest(path)
    print(f"checkpoint: {path}")
    for key in ("tag", "step", "backend", "zero_stage", "world_size", "layout", "created", "algorithm"):
        if key in manifest:
            print(f"  {key}: {manifest[key]}")
    print(f"  train_state: {manifest.get('train_state')}")
    print("  libraries: " + ", ".join(f"{k} {v}" for k, v in manifest.get("libraries", {}).items()))
    files = manifest["files"]
    print(f"files ({len(files)}, {_human(sum(f['size'] for f in files.values()))}):")
    for rel, entry in files.items():
        print(f"  {rel}  {_human(entry['size'])}")
    try:
        integrity.check_files(path, manifest, checksums=args.checksums)
        print(
            f"manifest check: OK ({'sizes and checksums' if args.checksums else 'sizes; --checksums for all'})"
        )
        status = 0
    except CheckpointError as e:
        print(f"manifest check: FAILED: {e}")
        status = 1
    tensors = model_tensors(path, manifest, load=False)
    total = 0
    print(f"model tensors ({len(tensors)}):")
    for name, info in tensors.items():
        shape, dtype = info if isinstance(info, tuple) else (tuple(info.shape), info.dtype)
        numel = 1
        for d in shape:
            numel *= d
        total += numel
        print(f"  {name}  {list(shape)}  {str(dtype).replace('torch.', '')}")
    print(f"  total parameters: {total:,}")
    return status


def cmd_verify(args: argparse.Namespace) -> int:
    status = 0
    for path in _checkpoint_dirs(Path(args.path), every=args.all):
        try:
            m = integrity.verify_checkpoint(path, checksums=not args.sizes_only)
            print(f"OK {path} (step {m.get('step')}, {len(m['files'])} files, {m['algorithm']})")
        except CheckpointError as e:
            print(f"FAILED {e}")
            status = 1
    return status


def _to_portable(path: Path, manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    if manifest.get("layout") == "portable":
        raise CheckpointError(f"checkpoint {str(path)!r} has the portable layout already", path=str(path))
    cls = strategy_class(path, manifest)
    if not converts_offline(cls):
        found = _offline_converters()
        raise CheckpointError(
            f"checkpoint {str(path)!r} has backend={manifest.get('backend')!r}, whose strategy "
            f"{cls.__name__} has no offline conversion to the portable layout; the installed "
            f"backends that convert: {', '.join(map(repr, found)) or 'none'}",
            path=str(path),
        )
    if out.exists():
        raise FileExistsError(f"{str(out)!r} exists: convert writes a new checkpoint directory")
    staging = out.parent / f"{ckpt.TMP_PREFIX}{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        # LightRFT's own files (per-rank RNG / dataloader / train state, client state, scheduler)
        # are copied as they are; the backend writes the model and optimizer state. Backends'
        # libraries log (DeepSpeed's converter prints) on stdout, which is this command's report.
        for rel in integrity.list_files(path):
            if rel.startswith(LIGHTRFT_PREFIX):
                shutil.copy2(path / rel, staging / rel)
        with contextlib.redirect_stdout(sys.stderr):
            cls.convert_checkpoint_to_portable(path, manifest, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    algorithm = manifest["algorithm"]
    files = {
        rel: {"size": (staging / rel).stat().st_size, "hash": integrity.file_digest(staging / rel, algorithm)}
        for rel in integrity.list_files(staging)
    }
    info = {
        k: v for k, v in manifest.items() if k not in ("files", "algorithm", "manifest_sha256", "created")
    }
    info.update(layout="portable", tag=out.name, converted_from=str(path))
    for key in ("format", "format_version"):
        info.pop(key, None)
    integrity.write_manifest(staging, integrity.build_manifest(files, algorithm, **info))
    os.replace(staging, out)
    return {"from": str(path), "to": str(out), "layout": "portable", "files": len(files)}


def cmd_convert(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    path = _checkpoint_dirs(Path(args.path), every=False)[0]
    manifest = integrity.verify_checkpoint(path, checksums=not args.no_verify)
    out = Path(args.out)
    if args.to == "portable":
        print(json.dumps(_to_portable(path, manifest, out)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().contiguous().clone()
        for k, v in model_tensors(path, manifest).items()
        if torch.is_tensor(v)
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    copied = []
    if args.hf_config:
        for name in _HF_FILES:
            src = Path(args.hf_config) / name
            if src.is_file():
                shutil.copy2(src, out / name)
                copied.append(name)
    print(json.dumps({"from": str(path), "to": str(out), "tensors": len(tensors), "copied": copied}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``lightrft-ckpt`` argument parser."""
    parser = argparse.ArgumentParser(prog="lightrft-ckpt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="step, backend, world size, files, tensors and the manifest check")
    p.add_argument("path")
    p.add_argument("--checksums", action="store_true", help="also compare every checksum (reads every byte)")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("verify", help="check every file against the manifest; exit 1 when damaged")
    p.add_argument("path")
    p.add_argument("--all", action="store_true", help="every checkpoint of a save directory")
    p.add_argument("--sizes-only", action="store_true", help="skip the checksums (a stat per file)")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser(
        "convert",
        help="a native checkpoint's model weights as a Hugging Face safetensors directory (--to hf), or the "
        "whole checkpoint in the portable layout (--to portable: FSDP, DeepSpeed ZeRO 1-3)",
    )
    p.add_argument("path")
    p.add_argument("--to", choices=["hf", "portable"], required=True, help="target format")
    p.add_argument("out", help="output directory")
    p.add_argument(
        "--hf-config", help="a Hugging Face model directory whose config and tokenizer files to copy"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the checksums before converting")
    p.set_defaults(fn=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightrft-ckpt``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (CheckpointError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"lightrft-ckpt {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
