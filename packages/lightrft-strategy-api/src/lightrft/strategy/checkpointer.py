"""Checkpoint orchestration beside the strategy: what ``save_ckpt`` / ``load_ckpt`` /
``save_model`` / ``load_model`` do whatever the backend.

The :class:`Checkpointer` of a strategy (``strategy.checkpointer``) stages a save (every rank
writes, the ranks checksum, rank 0 writes the manifest last and publishes; rotation), and loads
only after every rank has verified the checkpoint and agreed; LightRFT's own files (per-rank RNG,
dataloader and step state; the client state) are its. The backend supplies the mechanism through
the strategy's hooks: ``_save_checkpoint`` / ``_load_checkpoint`` (native layout),
``_save_portable`` / ``_load_portable``, ``_checkpoint_info`` / ``_checkpoint_incompatibility``,
``_full_state_dict`` / ``_load_full_state_dict`` (Hugging Face files). As
:class:`~lightrft.strategy.engine.EngineLifecycle` is for the engine, so this is for checkpoints;
``StrategyBase``'s public methods delegate to it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import checkpoint as ckpt
from . import integrity, portable
from .hf_io import read_hf_state_dict, write_hf_directory
from .integrity import CheckpointError
from .utils import get_rng_state, set_rng_state

if TYPE_CHECKING:
    from .base import StrategyBase

RANK_STATE = "lightrft_rank{rank:05d}.pt"
CLIENT_STATE = "lightrft_client_state.pt"
LIGHTRFT_FILE_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("rank_state", ("lightrft_rank*",)),
    ("client_state", (CLIENT_STATE,)),
)
"""The files every checkpoint holds, whatever the backend (``checkpoint_file_kinds``' form)."""
PORTABLE_FILE_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dcp_metadata", ("*/.metadata",)),
    ("dcp_shard", ("*.distcp",)),
    *LIGHTRFT_FILE_KINDS,
    ("scheduler", (portable.SCHEDULER_FILE,)),
)
"""The files of a checkpoint in the portable layout (a DCP directory; also FSDP's native one)."""


class Checkpointer:
    """Saves, verifies, loads and rotates the checkpoints of one strategy (call every method on
    every rank); the strategy's hooks write and read the backend's files."""

    def __init__(self, strategy: StrategyBase) -> None:
        self.strategy = strategy

    def save_ckpt(
        self,
        model: Any,
        save_dir: str | os.PathLike,
        tag: str | None,
        *,
        max_num: int | None,
        max_mem: float | None,
        client_state: dict[str, Any] | None,
        save_latest: bool,
        layout: str | None,
    ) -> Path:
        """:meth:`StrategyBase.save_ckpt`: stage, write (the backend's hook and LightRFT's own
        files), checksum, manifest last, publish, rotate."""
        s = self.strategy
        layout = portable.validate_layout(layout or s.get_extra_arg("ckpt_layout", "native"))
        state = s._train_states.get(id(model))
        tag = ckpt.validate_tag(tag or f"global_step{state.global_step if state else 0}")
        client_state = dict(client_state or {})
        _check_weights_only(client_state)
        rank_state = {
            "rng": get_rng_state(),
            "dataloaders": [dl.state_dict() for dl in s._dataloaders],
            "train_state": state.to_dict() if state else None,
            "world_size": s.world_size,
        }

        def write(path: Path) -> None:
            if layout == "portable":
                s._save_portable(model, path)
                if s.is_rank_0() and state is not None:
                    portable.save_scheduler(state.scheduler, path)
            else:
                s._save_checkpoint(model, path)
            torch.save(rank_state, path / RANK_STATE.format(rank=s.get_rank()))
            if s.is_rank_0():
                torch.save(client_state, path / CLIENT_STATE)

        info = {
            "step": state.global_step if state else 0,
            "train_state": state.to_dict() if state else None,
            "backend": s.name,
            "layout": layout,
            "libraries": integrity.library_versions(s.checkpoint_distributions),
            **s._checkpoint_info(),
        }
        return ckpt.staged_save(
            save_dir,
            tag,
            write,
            is_rank_0=s.is_rank_0(),
            barrier=s.barrier,
            max_num=max_num or s.config.max_ckpt_num,
            max_mem_gb=max_mem or s.config.max_ckpt_mem,
            save_latest=save_latest,
            rank=s.get_rank(),
            world_size=s.world_size,
            all_gather_object=s.all_gather_object,
            manifest_info=info,
        )

    def load_ckpt(
        self,
        model: Any,
        load_dir: str | os.PathLike,
        tag: str | None,
        *,
        strict: bool,
        optimizer_states: bool,
        scheduler_states: bool,
        module_only: bool,
        checksums: bool,
    ) -> tuple[str, dict[str, Any]]:
        """:meth:`StrategyBase.load_ckpt`: every rank verifies and reads, the ranks agree, then the
        backend's hook loads and LightRFT's own state is restored."""
        s = self.strategy
        root = Path(load_dir)
        failure: BaseException | None = None
        staged: tuple[Path, str, dict[str, Any], dict[str, Any] | None] | None = None
        try:
            staged = self._read_and_verify(root, tag, checksums, module_only)
        except FileNotFoundError as e:
            failure = e
        except CheckpointError as e:
            failure = integrity.with_suggestion(e, root, ckpt.list_checkpoints(root))
        integrity.agree(failure, s.all_gather_object)
        assert staged is not None
        path, layout, client_state, rank_state = staged
        try:
            load = s._load_portable if layout == "portable" else s._load_checkpoint
            load(
                model,
                path,
                load_module_strict=strict,
                load_optimizer_states=optimizer_states and not module_only,
                load_lr_scheduler_states=scheduler_states and not module_only,
            )
        except Exception as e:
            # Verified files that still fail to load: a key / shape mismatch with this model.
            failure = CheckpointError(
                f"checkpoint {str(path)!r} passed verification but loading it into this {s.name} model failed "
                f"({type(e).__name__}: {e}); the model and optimizer may be partly loaded",
                path=str(path),
            )
            failure.__cause__ = e  # the traceback of what failed travels with the agreed error
        integrity.agree(failure, s.all_gather_object)
        if rank_state is not None:
            if rank_state["world_size"] == s.world_size:
                set_rng_state(rank_state["rng"])
            for dl, dl_state in zip(s._dataloaders, rank_state["dataloaders"]):
                dl.load_state_dict(dl_state)
            if rank_state["train_state"] is not None and id(model) in s._train_states:
                st = s._train_states[id(model)]
                st.load_dict(rank_state["train_state"])
                # Checkpoints are taken at accumulation boundaries; with another world size the
                # number of micro-steps per step changes, so count them afresh from the steps.
                st.micro_step = st.global_step * s.accumulated_gradient
        return str(path), client_state

    def _read_and_verify(
        self, root: Path, tag: str | None, checksums: bool, module_only: bool
    ) -> tuple[Path, str, dict[str, Any], dict[str, Any] | None]:
        """This rank's half of the agreement: resolve, verify, check compatibility, read the small
        files. Touches nothing but reads; raises FileNotFoundError or CheckpointError. Returns the
        path, the layout, the client state and this rank's (or rank 0's) RNG / dataloader state."""
        s = self.strategy
        path = ckpt.resolve_checkpoint(root, tag)
        manifest = integrity.verify_checkpoint(
            path, checksums=checksums, rank=s.get_rank(), world_size=s.world_size
        )
        layout = manifest.get("layout", "native")
        problem = None if layout == "portable" else s._checkpoint_incompatibility(manifest)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} {problem}; a checkpoint saved with layout='portable' loads on "
                "any backend and world size",
                path=str(path),
                file=integrity.MANIFEST,
            )
        client_state = _load_small(path, CLIENT_STATE) if CLIENT_STATE in manifest["files"] else {}
        rank_state = None
        if not module_only:
            own = RANK_STATE.format(rank=s.get_rank())
            rank_file = own if own in manifest["files"] else RANK_STATE.format(rank=0)
            if rank_file in manifest["files"]:
                rank_state = _load_small(path, rank_file)
        return path, layout, client_state, rank_state

    def save_model(
        self, model: Any, output_dir: str | os.PathLike, tokenizer: Any = None, **kwargs: Any
    ) -> None:
        """:meth:`StrategyBase.save_model` (rank 0 writes, every rank gathers)."""
        s = self.strategy
        state_dict = s._full_state_dict(model)
        if s.is_rank_0():
            assert state_dict is not None
            write_hf_directory(s.unwrap_model(model), state_dict, output_dir, tokenizer, **kwargs)
        s.barrier()

    def load_model(self, model: Any, path: str | os.PathLike, strict: bool = True) -> None:
        """:meth:`StrategyBase.load_model`."""
        self.strategy._load_full_state_dict(model, read_hf_state_dict(path), strict=strict)
        self.strategy.barrier()


def _load_small(path: Path, name: str) -> Any:
    """``torch.load(weights_only=True)`` of one of the base's own files; CheckpointError naming it."""
    try:
        return torch.load(path / name, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {name} cannot be read ({type(e).__name__}: {e})",
            path=str(path),
            file=name,
        ) from e


def _check_weights_only(client_state: dict[str, Any]) -> None:
    """Refuses, before anything is written, a client state that ``weights_only`` loading can't read."""
    buf = io.BytesIO()
    torch.save(client_state, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends
        bad = []
        for key, value in client_state.items():
            b = io.BytesIO()
            torch.save({key: value}, b)
            b.seek(0)
            try:
                torch.load(b, weights_only=True)
            except Exception:
                bad.append(f"{key!r} ({type(value).__name__})")
        raise ValueError(
            f"client_state keys {', '.join(bad) or '?'} cannot be loaded with torch.load(weights_only=True); "
            "use tensors, numbers, strings, lists, tuples and dicts of them"
        ) from e
