"""Everything that differs between SGLang 0.5.x releases, in one place (checked against the 0.5.12,
0.5.16, 0.5.21 and 0.5.23 wheels).

:class:`SGLangRuntime` is the part of the ``sglang`` package the engine uses: building an
``Engine``, the ``ServerArgs`` field names, serializing one tensor-parallel rank's flattened weight
bucket, and the version. :func:`load_runtime` imports the real one; tests pass a double.

Version facts this module encodes:

- ``release_memory_occupation`` / ``resume_memory_occupation`` tags: ``weights`` and ``kv_cache``
  everywhere, ``cuda_graph`` from 0.5.5 (:func:`memory_tags`).
- ``Engine.begin_weight_update`` / ``end_weight_update`` exist from 0.5.21 (sglang PR #28001); from
  then on ``update_weights_from_tensor`` outside such a session returns ``(False, "must run between
  begin_weight_update() and end_weight_update()")`` without raising (:func:`has_update_session`).
- ``monkey_patch_torch_reductions`` lives in ``sglang.srt.utils.patch_torch`` (0.5.3+) and
  ``sglang.srt.patch_torch`` before; ``FlattenedTensorBucket`` in ``sglang.srt.weight_sync.tensor_bucket``
  and ``MultiprocessingSerializer`` in ``sglang.srt.utils`` in every 0.5.x.
- Prefill CUDA graphs (:func:`prefill_graph_args`). 0.5.12 captures prefill with torch.compile
  piecewise graphs (``disable_piecewise_cuda_graph``); 0.5.16+ has per-phase backends and makes
  ``breakable`` the prefill default on CUDA (sglang PR #29458). Breakable capture refuses
  the memory saver outright when the saver also owns graph memory
  (``SGLANG_MEMORY_SAVER_CUDA_GRAPH``: "Breakable CUDA graph is not compatible with memory saver
  mode", ``breakable_cuda_graph_backend.py`` in 0.5.16 to 0.5.23); without that variable, capture
  under ``enable_memory_saver`` failed on the H100 machine with ``CUBLAS_STATUS_EXECUTION_FAILED``
  (SGLang 0.5.16, torch 2.11). Breakable prefill graphs also alias captured inputs across batch
  buckets (sglang issue #37606, fix in PR #37448, open in 0.5.23), and the piecewise backend crashes
  with illegal memory accesses on recent torch (NeMo-RL, which disables it for the same reason). So
  with the memory saver on, prefill runs eagerly; decode keeps its CUDA graphs. A caller who passes
  one of these arguments keeps it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

#: The SGLang releases this engine supports (the lower bound of ``lightrft-engines[sglang]``).
MIN_VERSION = (0, 5, 12)
#: The newest release whose sources this module was checked against.
NEWEST_CHECKED = (0, 5, 23)

INSTALL_HINT = "`uv add 'lightrft-engines[sglang]'` (or `pip install 'lightrft-engines[sglang]'`)"


def parse_version(text: str) -> tuple[int, int, int]:
    """``"0.5.15.post1"`` -> ``(0, 5, 15)``; raises on anything that does not start with x.y.z."""
    m = re.match(r"^\s*(\d+)\.(\d+)\.(\d+)", text)
    if m is None:
        raise ValueError(f"cannot read an SGLang version from {text!r}: expected 'X.Y.Z...'")
    return int(m[1]), int(m[2]), int(m[3])


def version_text(v: Sequence[int]) -> str:
    return ".".join(str(x) for x in v)


def memory_tags(version: Sequence[int]) -> list[str]:
    """The tags ``release_memory_occupation`` knows in this version: weights, KV cache and, from
    0.5.5, CUDA graphs."""
    tags = ["weights", "kv_cache"]
    if tuple(version) >= (0, 5, 5):
        tags.append("cuda_graph")
    return tags


def has_update_session(engine: Any) -> bool:
    """Whether weight updates must run inside ``begin_weight_update`` / ``end_weight_update``
    (SGLang 0.5.21+; the methods do not exist before)."""
    return callable(getattr(engine, "begin_weight_update", None)) and callable(
        getattr(engine, "end_weight_update", None)
    )


def result_ok(result: Any) -> tuple[bool, str]:
    """``(success, message)`` from what an SGLang control call returned: a ``(bool, str)`` tuple
    (weight updates, sessions), an object with ``success`` (``flush_cache``), a bool, or None
    (release / resume return nothing and raise on failure)."""
    if result is None:
        return True, ""
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        return result[0], str(result[1]) if len(result) > 1 else ""
    success = getattr(result, "success", None)
    if success is not None:  # FlushCacheReqOutput and the like
        return bool(success), str(getattr(result, "message", "") or "")
    if isinstance(result, bool):
        return result, ""
    return True, ""


def prefill_graph_args(
    server_fields: frozenset[str], enable_memory_saver: bool, user_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``Engine`` arguments that turn prefill CUDA graphs off when the memory saver is on (see
    the module docstring for why), in the spelling this version has; empty when the saver is off,
    when the caller chose a prefill graph setting, or when the version has neither knob."""
    chosen = {"cuda_graph_backend_prefill", "disable_prefill_cuda_graph", "cuda_graph_config"}
    chosen |= {"disable_piecewise_cuda_graph", "enforce_piecewise_cuda_graph", "disable_cuda_graph"}
    if not enable_memory_saver or chosen & set(user_kwargs):
        return {}
    if "cuda_graph_backend_prefill" in server_fields:  # 0.5.16+
        return {"cuda_graph_backend_prefill": "disabled"}
    if "disable_piecewise_cuda_graph" in server_fields:  # 0.5.12 - 0.5.15
        return {"disable_piecewise_cuda_graph": True}
    return {}


def eager_args(server_fields: frozenset[str]) -> dict[str, Any]:
    """``Engine`` arguments for no CUDA graphs at all (``engine_enforce_eager``)."""
    out: dict[str, Any] = {"disable_cuda_graph": True}
    if "cuda_graph_backend_prefill" in server_fields:
        out["cuda_graph_backend_prefill"] = "disabled"
    elif "disable_piecewise_cuda_graph" in server_fields:
        out["disable_piecewise_cuda_graph"] = True
    return out


def decode_graph_batch_args(server_fields: frozenset[str], max_bs: int) -> dict[str, Any]:
    """The ``Engine`` argument that caps the decode CUDA-graph batch sizes captured at start
    (fewer graphs: a faster start): ``cuda_graph_max_bs_decode`` from 0.5.16, ``cuda_graph_max_bs``
    before."""
    for name in ("cuda_graph_max_bs_decode", "cuda_graph_max_bs"):
        if name in server_fields:
            return {name: max_bs}
    return {}


@dataclasses.dataclass(frozen=True)
class BucketEntry:
    """Where one tensor lies in a flattened bucket (bytes ``start:end`` of a uint8 buffer)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    end: int


class SGLangRuntime:
    """The real ``sglang`` package behind the calls the engine makes. Import it with
    :func:`load_runtime`."""

    def __init__(self, sglang: Any) -> None:
        self.sglang = sglang
        self.version = parse_version(getattr(sglang, "__version__", "0.0.0"))
        from sglang.srt.server_args import ServerArgs

        self.server_fields = _record_fields(ServerArgs)

    def create_engine(self, **server_args: Any) -> Any:
        """``sglang.Engine(**server_args)`` (starts the scheduler processes)."""
        from sglang.srt.entrypoints.engine import Engine

        return Engine(**server_args)

    def prepare_sender(self) -> None:
        """Patches torch's CUDA tensor reductions so IPC handles name the GPU by UUID (the sender
        side of ``update_weights_from_tensor``; SGLang patches its receivers itself)."""
        try:
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        except ImportError:  # before 0.5.3
            from sglang.srt.patch_torch import monkey_patch_torch_reductions  # type: ignore[no-redef]
        monkey_patch_torch_reductions()

    def serialize_bucket(self, flat: torch.Tensor, entries: Sequence[BucketEntry]) -> Any:
        """One rank's payload for ``update_weights_from_tensor(load_format="flattened_bucket")``:
        the uint8 buffer (a CUDA IPC handle when on the GPU) and SGLang's own metadata records
        (its receivers unpickle only sglang and torch classes), base64 text."""
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

        metadata = [
            FlattenedTensorMetadata(
                name=e.name,
                shape=torch.Size(e.shape),
                dtype=e.dtype,
                start_idx=e.start,
                end_idx=e.end,
                numel=e.end - e.start,
            )
            for e in entries
        ]
        return MultiprocessingSerializer.serialize(
            {"flattened_tensor": flat, "metadata": metadata}, output_str=True
        )


def load_runtime() -> SGLangRuntime:
    """Imports SGLang; a missing or too old installation raises an ImportError naming the extra."""
    try:
        import sglang
    except ImportError as e:
        raise ImportError(
            f"engine_type='sglang' needs SGLang {version_text(MIN_VERSION)} or newer: install {INSTALL_HINT}"
        ) from e
    runtime = SGLangRuntime(sglang)
    if runtime.version < MIN_VERSION:
        raise ImportError(
            f"SGLang {version_text(runtime.version)} is installed; engine_type='sglang' needs "
            f"{version_text(MIN_VERSION)} or newer: install {INSTALL_HINT}"
        )
    return runtime


def _record_fields(cls: Any) -> frozenset[str]:
    """Field names of ``ServerArgs``: a dataclass up to 0.5.20, a msgspec Struct from 0.5.21."""
    names = getattr(cls, "__struct_fields__", None)
    if names:
        return frozenset(names)
    if dataclasses.is_dataclass(cls):
        return frozenset(f.name for f in dataclasses.fields(cls))
    return frozenset(getattr(cls, "__annotations__", {}))
