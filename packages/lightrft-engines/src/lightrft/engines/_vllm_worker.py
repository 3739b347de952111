"""The worker extension mixed into every vLLM worker (``worker_extension_cls``). Its methods are
called through ``LLM.collective_rpc``; they are prefixed ``lrft_`` so they never clash with the
worker's own methods. In-process (``external_launcher`` or ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
the tensors arrive by reference: no serialisation, no copy."""

from __future__ import annotations

from typing import Any

import torch

from . import _vllm_compat as compat
from ._copy_plan import CopyPlan


class LightRFTWorkerExtension:
    """Weight loading and inspection inside a vLLM worker."""

    def lrft_load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        """Loads the bucket: on CUDA through a :class:`CopyPlan` (``load_weights`` recorded once,
        then replayed as plain copies), the tensors in the dtype they came in, so the copy into
        the weights is also the cast (an fp32 master is read once and the engine's dtype written
        once; ``VLLMEngine.casts_on_copy``); on CPU, and with the plan off, cast to the model's
        dtype first and loaded by the backend. Returns the number of tensors loaded."""
        model = compat.model_of(self)
        ref = next(model.parameters())
        if "_lrft_on_cpu" not in self.__dict__:  # once per worker, not per bucket
            self.__dict__["_lrft_on_cpu"] = compat.on_cpu()
        if self.__dict__["_lrft_on_cpu"] or not self.__dict__.get("_lrft_use_plan", True):
            cast = [(n, t.detach().to(device=ref.device, dtype=ref.dtype)) for n, t in bucket]
            compat.load_weights(self, cast)
            return len(cast)
        moved = [(n, t.detach().to(device=ref.device)) for n, t in bucket]
        plan = self.__dict__.setdefault("_lrft_plan", CopyPlan())
        plan.push(model, moved, lambda weights: compat.load_weights(self, weights))
        return len(moved)

    def lrft_set_copy_plan(self, enabled: bool) -> dict[str, int]:
        """Turns the copy plan on or off (off: every push goes through ``load_weights``; the
        benchmark compares both). Returns the plan's counters so far."""
        self.__dict__["_lrft_use_plan"] = bool(enabled)
        plan = self.__dict__.get("_lrft_plan")
        return dict(plan.stats) if plan is not None else {}

    def lrft_finish_update(self) -> None:
        """Ends one update (the CPU backend reloads and repacks here)."""
        compat.finish_update(self)

    def lrft_param_checksum(self) -> float:
        """A float sum over every parameter of this worker's shard (tests: did weights change)."""
        model: Any = compat.model_of(self)
        return float(sum(p.detach().float().sum() for p in model.parameters()))

    def lrft_param_rows(self, name: str, rows: int) -> Any:
        """The first ``rows`` rows of this worker's parameter ``name``, copied to the host."""
        model: Any = compat.model_of(self)
        params = dict(model.named_parameters())
        if name not in params:
            raise KeyError(f"lrft_param_rows: no parameter {name!r}; the worker has {sorted(params)[:5]}...")
        param = params[name]
        if param.numel() == 0:  # vLLM's CPU backend moves linear weights into its packed kernels
            raise ValueError(
                f"lrft_param_rows: vLLM's parameter {name!r} holds no data here (its backend keeps "
                "the weight packed elsewhere); read one it keeps as loaded, e.g. model.embed_tokens.weight"
            )
        return param.detach()[:rows].to("cpu", copy=True)
