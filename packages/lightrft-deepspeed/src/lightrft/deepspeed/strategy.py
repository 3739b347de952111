"""DeepspeedStrategy: the LightRFT Strategy API over DeepSpeed ZeRO stages 0-3.

DeepSpeed itself is imported lazily (in the methods that need it), so importing this module is
cheap and a missing DeepSpeed fails with a message that says what to install.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightrft.strategy import CheckpointError, portable
from lightrft.strategy.base import StrategyBase, TrainState
from lightrft.strategy.checkpointer import LIGHTRFT_FILE_KINDS
from lightrft.strategy.engine import WeightBucket
from lightrft.strategy.weights import clean_param_name, plan_buckets, sync_dtype

from . import config as ds_config
from . import norms, zero_state
from .zero_state import full_numel as _full_numel
from .zero_state import gathered as _gathered  # a module global here: tests record the gathers
from .zero_state import import_deepspeed as _import_deepspeed
from .zero_state import is_zero3_param as _is_zero3_param
from .zero_state import weights_only_load as _weights_only_load

_ENGINE_TYPES = ("DeepSpeedEngine", "DeepSpeedHybridEngine", "PipelineEngine")
_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
_MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
"""Rank 0's module weights in a ZeRO 0-2 checkpoint."""
_GATHER_BUCKET_BYTES = 256 << 20
"""Parameters gathered at once by save_model / load_model / EMA under ZeRO-3."""


#: Set to 1 to let DeepSpeed build its CPU shared-memory all-reduce op (see :func:`_cpu_comm_op`).
CPU_SHM_OP_ENV = "LIGHTRFT_DEEPSPEED_CPU_SHM_OP"


@contextlib.contextmanager
def _cpu_comm_op() -> Iterator[None]:
    """Around ``deepspeed.init_distributed`` on CPU: DeepSpeed's torch backend JIT-compiles its
    shared-memory all-reduce op (C++, ~40 s on first use in each environment, and a compiler is
    needed). Only ``inference_all_reduce`` (AutoTP inference) uses it; ZeRO training reduces
    through ``torch.distributed``. So it is not built unless ``LIGHTRFT_DEEPSPEED_CPU_SHM_OP=1``.
    No effect on accelerators, or on a DeepSpeed without that op."""
    try:
        comm_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        comm_torch = None
    build = getattr(comm_torch, "build_shm_op", None)
    if build is None or torch.cuda.is_available() or os.environ.get(CPU_SHM_OP_ENV) == "1":
        yield
        return
    comm_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        comm_torch.build_shm_op = build


class DeepspeedStrategy(StrategyBase):
    """DeepSpeed ZeRO 0-3 behind the LightRFT Strategy API.

    Trained models become ``DeepSpeedEngine`` objects in :meth:`prepare` (ZeRO stage
    ``config.zero_stage``); frozen models become evaluation engines at ZeRO-3 when training uses
    ZeRO-3, otherwise ZeRO-0. The DeepSpeed config is generated from the StrategyConfig
    (:mod:`lightrft.deepspeed.config`) and ``config.deepspeed_config`` may add to it.
    """

    name = "deepspeed"
    checkpoint_distributions = ("lightrft-deepspeed", "deepspeed")
    backend_steps_scheduler = True  # engine.step() steps the scheduler given to deepspeed.initialize

    def __init__(self, config: Any = None, *, args: Any = None, **overrides: Any) -> None:
        super().__init__(config, args=args, **overrides)
        self.stage: int = self.config.zero_stage
        self._engines: list[Any] = []

    # ------------------------------------------------------------------ properties
    @property  # type: ignore[override]
    def syncs_only_at_boundary(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        """ZeRO-0/1 all-reduce gradients at accumulation boundaries only; ZeRO-2/3 reduce-scatter
        every micro-step's gradients into their partitions (that is what saves the memory)."""
        return self.stage < 2

    @property
    def param_offload(self) -> bool:
        """ZeRO-3 parameter offload of trained models (extra arg ``param_offload``)."""
        return bool(self.get_extra_arg("param_offload", False))

    @property
    def eval_param_offload(self) -> bool:
        """ZeRO-3 parameter offload of frozen models (extra arg ``ref_reward_offload``)."""
        return bool(self.get_extra_arg("ref_reward_offload", False)) and ds_config.eval_stage(self.stage) == 3

    def get_ds_train_config(self) -> dict[str, Any]:
        """The DeepSpeed config dict of trained models."""
        return ds_config.train_config(self.config, self.world_size, param_offload=self.param_offload)

    def get_ds_eval_config(self) -> dict[str, Any]:
        """The DeepSpeed config dict of frozen models."""
        return ds_config.eval_config(self.config, self.world_size, param_offload=self.eval_param_offload)

    # ------------------------------------------------------------------ distributed
    def setup_distributed(self, timeout: timedelta | None = None) -> None:
        deepspeed = _import_deepspeed()
        self._init_process_group(timeout)
        with _cpu_comm_op():
            deepspeed.init_distributed(
                dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                auto_mpi_discovery=False,
                timeout=timeout or timedelta(minutes=30),
            )
        self._set_accumulation()
        # Validate the generated configs (and the user's deepspeed_config) before any model exists.
        self.get_ds_train_config()
        self.get_ds_eval_config()

    def _close_backend(self) -> None:
        """Destroys every engine this strategy built (ZeRO-3 releases its prefetched parameters and
        hooks), after the inference engine; the base then destroys the group (shutdown, or at exit)."""
        super()._close_backend()
        for engine in self._engines:
            with contextlib.suppress(Exception):
                engine.destroy()
        self._engines.clear()
        self._train_states.clear()

    # ------------------------------------------------------------------ models
    def init_model_context(self, meta_init: bool = False) -> contextlib.AbstractContextManager[Any]:
        """Under ZeRO-3, ``deepspeed.zero.Init``: parameters are partitioned as modules are built.

        With transformers installed, its DeepSpeed integration is switched on for the same span
        (``HfDeepSpeedConfig``), so ``from_pretrained`` inside the context partitions the model and
        loads the checkpoint into the partitions (without it, transformers 5 fills the
        already-partitioned, empty parameters and refuses the size mismatch). transformers' modeling
        code is imported first: zero.Init wraps the ``__init__`` of module classes defined while it
        is active, and transformers' lazily imported classes then fail with a signature mismatch."""
        if self.stage != 3:
            return contextlib.nullcontext()
        return self._zero3_init(self.get_ds_train_config())

    @contextlib.contextmanager
    def _zero3_init(self, ds_config: dict[str, Any]) -> Iterator[None]:
        deepspeed = _import_deepspeed()
        try:
            import transformers.modeling_utils  # noqa: F401
            from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config
        except ImportError:
            hf_config = None
        else:
            hf_config = HfDeepSpeedConfig(ds_config)  # registered while this object lives
        try:
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                yield
        finally:
            if hf_config is not None:
                unset_hf_deepspeed_config()
                del hf_config

    def create_optimizer(self, model: nn.Module, **kwargs: Any) -> Optimizer:
        """AdamW with decay on weights only: DeepSpeedCPUAdam with ``adam_offload``, FusedAdam on
        CUDA, ``torch.optim.AdamW`` on CPU."""
        weight_decay, kwargs = self.optimizer_kwargs(kwargs)
        groups = self.optimizer_grouped_parameters(self.unwrap_model(model), weight_decay)
        if self.config.adam_offload:
            _import_deepspeed()
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        if torch.cuda.is_available():
            _import_deepspeed()
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    def _prepare_train(self, model: nn.Module, optimizer: Optimizer, scheduler: Any) -> tuple[Any, Any, Any]:
        deepspeed = _import_deepspeed()
        enable_checkpointing = getattr(model, "gradient_checkpointing_enable", None)
        if self.config.gradient_checkpointing and callable(enable_checkpointing):
            enable_checkpointing(gradient_checkpointing_kwargs={"use_reentrant": False})
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.get_ds_train_config()
        )
        engine.train()
        norms.capture_norm_on_host(engine.optimizer)
        self._engines.append(engine)
        return engine, ds_optimizer, ds_scheduler

    def _prepare_eval(self, model: nn.Module) -> Any:
        deepspeed = _import_deepspeed()
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=self.get_ds_eval_config())
        engine.eval()
        self._engines.append(engine)
        return engine

    def unwrap_model(self, model: Any) -> nn.Module:
        while type(model).__name__ in _ENGINE_TYPES or _is_deepspeed_engine(model):
            model = model.module
        return super().unwrap_model(model)

    # ------------------------------------------------------------------ training
    def _engine_of(self, model: Any) -> Any:
        if not _is_deepspeed_engine(model):
            raise ValueError(
                f"{type(model).__name__} is not a DeepSpeed engine: pass the model that "
                "strategy.prepare(...) returned"
            )
        return model

    # The step itself (counting, boundary, skipping) is StrategyBase's. DeepSpeed is told the
    # boundary before every backward (``set_gradient_accumulation_boundary``), so its own
    # micro-step counter never decides anything and needs no re-sync after a resume.
    def _backward(self, loss: torch.Tensor, st: TrainState, boundary: bool) -> None:
        """``engine.backward``: scales the loss by 1 / accumulation steps itself."""
        engine = self._engine_of(st.model)
        engine.set_gradient_accumulation_boundary(boundary)
        engine.backward(loss)

    def _accumulate(self, st: TrainState) -> None:
        engine = self._engine_of(st.model)
        engine.set_gradient_accumulation_boundary(False)
        engine.step()  # DeepSpeed's bookkeeping of a micro-step; no update between boundaries

    def _clip_and_step(self, st: TrainState, max_norm: float) -> float:
        """DeepSpeed clips to ``gradient_clipping`` (from ``max_norm``) and steps its scheduler."""
        engine = self._engine_of(st.model)
        engine.set_gradient_accumulation_boundary(True)
        if hasattr(engine.optimizer, "_global_grad_norm"):
            # ZeRO / bf16 optimizers compute the global norm and skip the step themselves when it
            # is not finite (their norm is then inf).
            engine.step()
            return norms.read_norm(engine)
        # ZeRO-0 in fp32 runs the client optimizer bare: DeepSpeed clips but neither returns
        # the norm nor skips a non-finite one. Gradients are all-reduced by now (boundary).
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = norms.grad_norm(params)
        with norms.skip_if(engine.optimizer, not math.isfinite(norm), params):
            engine.step()
        return norm

    @torch.no_grad()
    def moving_average(self, model: Any, model_ema: Any, beta: float = 0.992, device: str = "cpu") -> None:
        """``ema = beta * ema + (1 - beta) * model`` over every trainable parameter, matched by
        name; under ZeRO-3 both sides are gathered a bucket at a time and the EMA re-partitioned."""
        src = self.unwrap_model(model)
        ema_params = dict(self.unwrap_model(model_ema).named_parameters())
        pairs = [(p, ema_params[name]) for name, p in src.named_parameters() if p.requires_grad]
        sizes = [(str(i), _full_numel(p) * p.element_size()) for i, (p, _) in enumerate(pairs)]
        for bucket in plan_buckets(sizes, _GATHER_BUCKET_BYTES):
            chunk = [pairs[int(i)] for i in bucket]
            with _gathered([p for p, _ in chunk]), _gathered([e for _, e in chunk], modifier_rank=0):
                for p, e in chunk:
                    e.data.copy_((beta * e.data.to(p.device) + (1 - beta) * p.data).to(e.device))

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: Any, path: Path) -> None:
        engine = self._engine_of(model)
        engine.save_checkpoint(str(path.parent), tag=path.name, client_state={}, save_latest=False)
        if self.is_rank_0():
            # DeepSpeed copies its offline consolidation scripts next to the checkpoint
            # directories (into save_dir); keep them inside this checkpoint instead.
            for script in _RECOVERY_SCRIPTS:
                if (path.parent / script).is_file():
                    os.replace(path.parent / script, path / script)

    # The portable layout through DeepSpeed's fragment API: lightrft.deepspeed.zero_state.
    def _save_portable(self, model: Any, path: Path) -> None:
        zero_state.save_portable(self._engine_of(model), self.stage, path, no_dist=self.world_size == 1)

    def _load_portable(
        self,
        model: Any,
        path: Path,
        *,
        load_module_strict: bool,
        load_optimizer_states: bool,
        load_lr_scheduler_states: bool,
    ) -> None:
        engine = self._engine_of(model)
        zero_state.load_portable(
            engine,
            self.stage,
            path,
            strict=load_module_strict,
            with_optimizer=load_optimizer_states,
            device=self.device,
            no_dist=self.world_size == 1,
        )
        train = self._train_states.get(id(model))
        if train is not None and load_lr_scheduler_states and portable.load_scheduler(train.scheduler, path):
            for group, lr in zip(engine.optimizer.param_groups, train.scheduler.get_last_lr()):
                group["lr"] = lr

    def _checkpoint_info(self) -> dict[str, Any]:
        return {"zero_stage": self.stage}

    # Offline (lightrft-ckpt, the fault kit): no engine, no process group.
    checkpoint_file_kinds = (
        *LIGHTRFT_FILE_KINDS,
        ("ds_optim_states", ("*optim_states.pt",)),
        ("ds_model_states", ("*model_states.pt",)),
    )

    @classmethod
    def read_checkpoint_tensors(cls, path: Path, manifest: dict[str, Any], load: bool) -> dict[str, Any]:
        """ZeRO 0-2: the module of rank 0's model states; ZeRO-3: the partitions merged by
        DeepSpeed's ``zero_to_fp32``."""
        if manifest.get("zero_stage") != 3:
            return torch.load(path / _MODEL_STATES_FILE, weights_only=False, mmap=True)["module"]
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as e:
            raise ImportError("reading a ZeRO-3 checkpoint needs DeepSpeed: `pip install deepspeed`") from e
        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)

    @classmethod
    def convert_checkpoint_to_portable(cls, path: Path, manifest: dict[str, Any], staging: Path) -> None:
        """The partitions are merged per parameter by DeepSpeed's ``ds_to_universal``
        (:mod:`lightrft.deepspeed.convert`); ZeRO stages 1-3 (stage 0 has no partitions)."""
        if manifest.get("zero_stage") not in (1, 2, 3):
            raise CheckpointError(
                f"checkpoint {str(path)!r} has zero_stage={manifest.get('zero_stage')!r}; offline conversion of a "
                "DeepSpeed checkpoint to the portable layout reads ZeRO stages 1, 2 and 3 (their optimizer "
                "partitions); convert --to hf takes the weights of any stage",
                path=str(path),
            )
        try:
            from .convert import write_portable
        except ImportError as e:
            raise ImportError(
                "converting a DeepSpeed checkpoint needs lightrft-deepspeed (and DeepSpeed): "
                "`uv add lightrft-deepspeed`"
            ) from e
        write_portable(path, staging)

    def _checkpoint_incompatibility(self, manifest: dict[str, Any]) -> str | None:
        problem = super()._checkpoint_incompatibility(manifest)
        if problem is not None:
            return problem
        # DeepSpeed's native files are one partition per rank of one ZeRO stage.
        saved = (manifest.get("world_size"), manifest.get("zero_stage"))
        if saved != (self.world_size, self.stage):
            return (
                f"is a native DeepSpeed checkpoint of world_size={saved[0]} zero_stage={saved[1]}, which "
                f"world_size={self.world_size} zero_stage={self.stage} cannot load; resume with the saved "
                "world size and stage"
            )
        return None

    def _load_checkpoint(
        self,
        model: Any,
        path: Path,
        *,
        load_module_strict: bool,
        load_optimizer_states: bool,
        load_lr_scheduler_states: bool,
    ) -> None:
        engine = self._engine_of(model)
        # DeepSpeed reads its files with torch.load(weights_only=False); route them through
        # weights_only loading with DeepSpeed's own classes allowlisted, so that loading a
        # checkpoint never runs arbitrary pickled code.
        ckpt_engine = engine.checkpoint_engine
        ckpt_engine.load = _weights_only_load
        try:
            loaded, _ = engine.load_checkpoint(
                str(path.parent),
                tag=path.name,
                load_module_strict=load_module_strict,
                load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_lr_scheduler_states,
            )
        finally:
            del ckpt_engine.load  # back to the class's method
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {str(path)!r}")

    # ------------------------------------------------------------------ full weights
    def _full_state_dict(self, model: Any) -> dict[str, torch.Tensor] | None:
        module = self.unwrap_model(model)
        rank0 = self.is_rank_0()
        if not _has_zero3_params(module):
            if not rank0:
                return None
            return {clean_param_name(k): v.detach().cpu().clone() for k, v in module.state_dict().items()}
        keys = list(module.state_dict().keys())
        tensors = _named_tensors(module)
        out: dict[str, torch.Tensor] = {}
        copies: dict[int, torch.Tensor] = {}  # tied parameters: one copy, several names
        for bucket in self._plan(keys, tensors, _GATHER_BUCKET_BYTES):
            params = [tensors[k] for k in bucket]
            with _gathered([p for p in params if isinstance(p, nn.Parameter)]):
                if rank0:
                    for k, t in zip(bucket, params):
                        if id(t) not in copies:
                            copies[id(t)] = t.detach().cpu().clone()
                        out[clean_param_name(k)] = copies[id(t)]
        return out if rank0 else None

    def _load_full_state_dict(self, model: Any, state_dict: dict[str, torch.Tensor], strict: bool) -> None:
        module = self.unwrap_model(model)
        if not _has_zero3_params(module):
            module.load_state_dict(state_dict, strict=strict)
        else:
            expected = {clean_param_name(k): k for k in module.state_dict().keys()}
            missing = [k for k in expected if k not in state_dict]
            unexpected = [k for k in state_dict if k not in expected]
            if strict and (missing or unexpected):
                raise RuntimeError(
                    f"load_model(strict=True) into {type(module).__name__}: missing keys {missing}, "
                    f"unexpected keys {unexpected}"
                )
            tensors = _named_tensors(module)
            present = [expected[k] for k in expected if k in state_dict]
            with torch.no_grad():
                for bucket in self._plan(present, tensors, _GATHER_BUCKET_BYTES):
                    params = [tensors[k] for k in bucket]
                    with _gathered([p for p in params if isinstance(p, nn.Parameter)], modifier_rank=0):
                        for k, t in zip(bucket, params):
                            src = state_dict[clean_param_name(k)]
                            if src.shape != t.shape:
                                raise RuntimeError(
                                    f"load_model: {clean_param_name(k)!r} has shape {tuple(src.shape)} in the "
                                    f"file and {tuple(t.shape)} in the model"
                                )
                            t.data.copy_(src.to(device=t.device, dtype=t.dtype))
        optimizer = getattr(model, "optimizer", None) if _is_deepspeed_engine(model) else None
        if optimizer is not None and hasattr(optimizer, "refresh_fp32_params"):
            # ZeRO / bf16 optimizers step fp32 master copies: take the loaded weights into them.
            optimizer.refresh_fp32_params()

    @staticmethod
    def _plan(
        names: list[str],
        tensors: Mapping[str, torch.Tensor],
        bucket_bytes: int,
        dtype: torch.dtype | None = None,
    ) -> list[list[str]]:
        return plan_buckets(
            ((n, _full_numel(tensors[n]) * sync_dtype(tensors[n], dtype).itemsize) for n in names),
            bucket_bytes,
        )

    def _iter_full_parameters(self, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.unwrap_model(model).named_parameters():
            if _is_zero3_param(p):
                with _gathered([p]):
                    full = p.detach().clone()
                yield name, full
            else:
                yield name, p.detach()

    def iter_weight_buckets(
        self,
        model: Any,
        bucket_bytes: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        transient: bool = False,
    ) -> Iterator[WeightBucket]:
        """Full parameters in buckets of at most ``bucket_bytes`` (one larger tensor alone), in
        ``dtype`` when given. Under ZeRO-3 the buckets are planned from the full sizes
        (``ds_numel``) and each is gathered with one ``GatheredParameters`` and released before the
        next: never the whole model at once. ``transient=True`` hands out the gathered tensors
        themselves while the bucket is gathered (no copy; valid until the next bucket)."""
        module = self.unwrap_model(model)
        if not _has_zero3_params(module):
            return super().iter_weight_buckets(model, bucket_bytes, dtype=dtype, transient=transient)
        size = bucket_bytes or self.config.weight_sync_bucket_mb << 20
        return self._iter_zero3_buckets(module, size, dtype, transient)

    def _iter_zero3_buckets(
        self, module: nn.Module, bucket_bytes: int, dtype: torch.dtype | None, transient: bool
    ) -> Iterator[WeightBucket]:
        named = dict(module.named_parameters())

        def out(p: torch.Tensor) -> torch.Tensor:
            t = p.detach()
            if t.dtype != sync_dtype(t, dtype):
                return t.to(sync_dtype(t, dtype))  # a new tensor: outlives the gather
            return t if transient else t.clone()

        for bucket in self._plan(list(named), named, bucket_bytes, dtype):
            params = [named[n] for n in bucket]
            with _gathered(params):
                tensors = [(clean_param_name(n), out(p)) for n, p in zip(bucket, params)]
                if transient:
                    yield tensors  # consumed while gathered; released when the next is asked for
                    if torch.cuda.is_available() and any(t.is_cuda for _, t in tensors):
                        # The consumer's copies are queued; the gathered buffers may belong to
                        # another stream's pool: let the copies finish before they are freed.
                        torch.cuda.current_stream().synchronize()
            if not transient:
                yield tensors


def _is_deepspeed_engine(model: Any) -> bool:
    if type(model).__name__ in _ENGINE_TYPES:
        return True
    import sys

    engine_mod = sys.modules.get("deepspeed.runtime.engine")
    return engine_mod is not None and isinstance(model, engine_mod.DeepSpeedEngine)


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by (possibly repeated, for tied weights) state-dict name."""
    out: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def _has_zero3_params(module: nn.Module) -> bool:
    return any(_is_zero3_param(p) for p in module.parameters())
