"""``lightrft-ckpt``: look into, check and convert LightRFT checkpoints without a GPU or a process group.

- ``lightrft-ckpt inspect PATH``: step, backend, world size, libraries, files, the model's tensors
  (name, shape, dtype) and the manifest check (sizes; ``--checksums`` for the full check).
- ``lightrft-ckpt verify PATH [--all] [--sizes-only]``: the full check (every checksum); exit status
  1 and the reason when a checkpoint is damaged.
- ``lightrft-ckpt convert PATH --to hf OUT [--hf-config DIR]``: the model weights of a native
  Fake, FSDP (DCP) or DeepSpeed (ZeRO 0-3) checkpoint as a Hugging Face safetensors directory.
- ``lightrft-ckpt convert PATH --to portable OUT``: a native FSDP or DeepSpeed (ZeRO 1-3)
  checkpoint as the portable layout, loadable by every backend at any world size. FSDP's DCP files
  are already keyed by parameter name (renamed, not rewritten); DeepSpeed's partitions are merged
  per parameter by DeepSpeed's ``ds_to_universal`` (needs lightrft-deepspeed installed).

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
from typing import Any

import torch

from . import checkpoint as ckpt
from . import integrity
from .integrity import CheckpointError
from .weights import clean_param_name

FAKE_STATE = "fake_state.pt"
DCP_DIR = "dcp"
DS_MODEL_STATES = "mp_rank_00_model_states.pt"
LIGHTRFT_PREFIX = "lightrft_"
"""LightRFT's own files in a checkpoint (per-rank state, client state), whatever the backend."""
_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip


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


def _dcp_model_tensors(path: Path, load: bool) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path / DCP_DIR)).read_metadata()
    keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    if not load:
        out = {}
        for k in keys:
            md = meta.state_dict_metadata[k]
            size = getattr(md, "size", None)
            dtype = getattr(getattr(md, "properties", None), "dtype", None)
            out[k[len("model.") :]] = (tuple(size) if size is not None else (), dtype)
        return out
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    loaded = _load_state_dict_from_keys(set(keys), checkpoint_id=str(path / DCP_DIR))
    model = loaded.get("model", loaded)
    return {k[len("model.") :] if k.startswith("model.") else k: v for k, v in model.items()}


def model_tensors(path: str | Path, manifest: dict[str, Any], load: bool = True) -> dict[str, Any]:
    """The model weights of a native checkpoint, keyed by clean parameter name: tensors with
    ``load``, else ``(shape, dtype)`` read from metadata or memory-mapped files."""
    path = Path(path)
    backend = manifest.get("backend")
    if backend == "fsdp":
        raw = _dcp_model_tensors(path, load)
    elif backend == "fake":
        raw = torch.load(path / FAKE_STATE, weights_only=True, mmap=True)["model"]
    elif backend == "deepspeed" and manifest.get("zero_stage") != 3:
        raw = torch.load(path / DS_MODEL_STATES, weights_only=False, mmap=True)["module"]
    elif backend == "deepspeed":
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as e:
            raise ImportError("reading a ZeRO-3 checkpoint needs DeepSpeed: `pip install deepspeed`") from e
        raw = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has backend={backend!r}; lightrft-ckpt reads 'fake', 'fsdp' and 'deepspeed'",
            path=str(path),
        )
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


def _deepspeed_writer() -> Any:
    try:
        from lightrft.deepspeed.convert import write_portable
    except ImportError as e:
        raise ImportError(
            "converting a DeepSpeed checkpoint needs lightrft-deepspeed (and DeepSpeed): "
            "`uv add lightrft-deepspeed`"
        ) from e
    return write_portable


def _to_portable(path: Path, manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    from .portable import PORTABLE_DIR, SCHEDULER_FILE

    backend = manifest.get("backend")
    if manifest.get("layout") == "portable":
        raise CheckpointError(f"checkpoint {str(path)!r} has the portable layout already", path=str(path))
    if backend not in ("fsdp", "deepspeed"):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has backend={backend!r}; offline conversion to the portable layout reads "
            "native 'fsdp' and 'deepspeed' checkpoints",
            path=str(path),
        )
    if backend == "deepspeed" and manifest.get("zero_stage") not in (1, 2, 3):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has zero_stage={manifest.get('zero_stage')!r}; offline conversion of a "
            "DeepSpeed checkpoint to the portable layout reads ZeRO stages 1, 2 and 3 (their optimizer "
            "partitions); convert --to hf takes the weights of any stage",
            path=str(path),
        )
    if out.exists():
        raise FileExistsError(f"{str(out)!r} exists: convert writes a new checkpoint directory")
    staging = out.parent / f"{ckpt.TMP_PREFIX}{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    if backend == "fsdp":
        # FSDP's DCP files are keyed by parameter name already: renamed, not rewritten.
        shutil.copytree(path, staging, ignore=shutil.ignore_patterns(integrity.MANIFEST))
        os.replace(staging / DCP_DIR, staging / PORTABLE_DIR)
        if (staging / "lr_scheduler.pt").is_file():
            os.replace(staging / "lr_scheduler.pt", staging / SCHEDULER_FILE)
    else:
        # DeepSpeed's partitions are merged per parameter (its ds_to_universal); LightRFT's own
        # files (per-rank RNG / dataloader / train state, client state) are copied as they are.
        # DeepSpeed logs (and its converter prints) on stdout, which is this command's report.
        with contextlib.redirect_stdout(sys.stderr):
            write_portable = _deepspeed_writer()
            staging.mkdir(parents=True)
            for rel in integrity.list_files(path):
                if rel.startswith(LIGHTRFT_PREFIX):
                    shutil.copy2(path / rel, staging / rel)
            try:
                write_portable(path, staging)
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
