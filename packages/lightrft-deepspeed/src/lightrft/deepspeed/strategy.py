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
from lightrft.strategy.utils import HostScalar
from lightrft.strategy.weights import clean_param_name, plan_buckets, sync_dtype

from . import config as ds_config

_ENGINE_TYPES = ("DeepSpeedEngine", "DeepSpeedHybridEngine", "PipelineEngine")
_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
_MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
"""Rank 0's module weights in a ZeRO 0-2 checkpoint."""
_GATHER_BUCKET_BYTES = 256 << 20
"""Parameters gathered at once by save_model / load_model / EMA under ZeRO-3."""


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            "DeepspeedStrategy needs DeepSpeed: `uv add lightrft-deepspeed` (or `pip install deepspeed`)"
        ) from e
    return deepspeed


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


def _is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _full_numel(p: torch.Tensor) -> int:
    return int(p.ds_numel) if _is_zero3_param(p) else p.numel()  # pyright: ignore[reportAttributeAccessIssue]


def _gathered(
    params: list[nn.Parameter], modifier_rank: int | None = None
) -> contextlib.AbstractContextManager[Any]:
    """Gathers ZeRO-3 partitioned ``params`` (a no-op for ordinary ones); with ``modifier_rank``
    the values written there are broadcast and re-partitioned at exit."""
    zero3 = [p for p in params if _is_zero3_param(p)]
    if not zero3:
        return contextlib.nullcontext()
    deepspeed = _import_deepspeed()
    return deepspeed.zero.GatheredParameters(zero3, modifier_rank=modifier_rank)


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

    def shutdown(self) -> None:
        """Destroys every engine this strategy built, then the process group it created."""
        for engine in self._engines:
            with contextlib.suppress(Exception):
                engine.destroy()
        self._engines.clear()
        self._train_states.clear()
        super().shutdown()

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
        _capture_norm_on_host(engine.optimizer)
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
            return _read_norm(engine)
        # ZeRO-0 in fp32 runs the client optimizer bare: DeepSpeed clips but neither returns
        # the norm nor skips a non-finite one. Gradients are all-reduced by now (boundary).
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = _grad_norm(params)
        with _skip_if(engine.optimizer, not math.isfinite(norm), params):
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

    # The portable layout from DeepSpeed: full fp32 weights and Adam moments per parameter name,
    # gathered (saving) or scattered (loading) one parameter at a time through DeepSpeed's public
    # fragment API (deepspeed.utils.safe_{get,set}_full_{fp32_param,optimizer_state}; collective
    # under ZeRO), in the format of torch's get_state_dict so FSDP and Fake read it (and this
    # reads theirs). The API needs Adam state to exist: _ensure_adam_state creates it first.
    def _zero_groups(self, engine: Any) -> list[list[nn.Parameter]]:
        """The trained parameters by optimizer param group (ZeRO-3 sub-groups merged back into
        the param group they belong to)."""
        opt = engine.optimizer
        if self.stage == 3 and hasattr(opt, "fp16_groups"):
            groups: list[list[nn.Parameter]] = [[] for _ in opt.optimizer.param_groups]
            for sub, params in enumerate(opt.fp16_groups):
                groups[opt.sub_group_to_group_id[sub]].extend(params)
            return groups
        bit16 = getattr(opt, "bit16_groups", None)
        if bit16 is None or self.stage == 0:
            raise NotImplementedError(
                f"layout='portable' with DeepSpeed needs ZeRO stage 1, 2 or 3 (zero_stage={self.stage}); "
                "save with layout='native' or train with zero_stage 1, 2 or 3"
            )
        return bit16

    def _save_portable(self, model: Any, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict_saver import save

        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        engine = self._engine_of(model)
        names = {id(p): clean_param_name(n) for n, p in engine.module.named_parameters()}
        groups = self._zero_groups(engine)
        _ensure_adam_state(engine.optimizer)
        step = _adam_step(engine.optimizer)
        model_sd: dict[str, torch.Tensor] = {}
        optim_state: dict[str, dict[str, torch.Tensor]] = {}
        for group in groups:
            for p in group:
                name = names[id(p)]
                model_sd[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
                optim_state[name] = {
                    key: safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
                    for key in _ADAM_KEYS
                }
                optim_state[name]["step"] = torch.tensor(step)
        param_groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in group]}
            for g, group in zip(engine.optimizer.optimizer.param_groups, groups)
        ]
        state = {"model": model_sd, "optimizer": {"state": optim_state, "param_groups": param_groups}}
        save(state, checkpoint_id=str(path / portable.PORTABLE_DIR), no_dist=self.world_size == 1)

    def _load_portable(
        self,
        model: Any,
        path: Path,
        *,
        load_module_strict: bool,
        load_optimizer_states: bool,
        load_lr_scheduler_states: bool,
    ) -> None:
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import load

        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        engine = self._engine_of(model)
        names = {id(p): clean_param_name(n) for n, p in engine.module.named_parameters()}
        params = [p for group in self._zero_groups(engine) for p in group]
        shapes = {names[id(p)]: tuple(p.ds_shape) if _is_zero3_param(p) else tuple(p.shape) for p in params}
        state: dict[str, Any] = {"model": {n: torch.empty(s) for n, s in shapes.items()}}
        if load_optimizer_states:
            state["optimizer"] = {
                "state": {
                    n: {"exp_avg": torch.empty(s), "exp_avg_sq": torch.empty(s), "step": torch.tensor(0.0)}
                    for n, s in shapes.items()
                }
            }
        load(
            state,
            checkpoint_id=str(path / portable.PORTABLE_DIR),
            planner=DefaultLoadPlanner(allow_partial_load=not load_module_strict),
            no_dist=self.world_size == 1,
        )
        if load_optimizer_states:
            _ensure_adam_state(engine.optimizer)
        for p in params:
            name = names[id(p)]
            full = state["model"][name]
            with _gathered([p], modifier_rank=0):
                p.data.copy_(full.to(p.dtype).view_as(p.data))
            safe_set_full_fp32_param(p, full.to(self.device))
            if load_optimizer_states:
                for key in _ADAM_KEYS:
                    safe_set_full_optimizer_state(
                        p, state["optimizer"]["state"][name][key].to(self.device), key
                    )
        if load_optimizer_states:
            steps = {float(v["step"]) for v in state["optimizer"]["state"].values()}
            if len(steps) > 1:
                raise ValueError(
                    f"the portable checkpoint's Adam step counts differ between parameters ({sorted(steps)}); "
                    "DeepSpeed keeps one step count per flat partition, so they must be equal"
                )
            _set_adam_step(engine.optimizer, steps.pop() if steps else 0.0)
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


_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _hp_partitions(zero_optimizer: Any) -> list[torch.Tensor]:
    """The flat fp32 partitions ZeRO's base optimizer steps (its Adam state is keyed by them):
    ZeRO-1/2 ``single_partition_of_fp32_groups``, ZeRO-3 ``fp32_partitioned_groups_flat`` (which
    ZeRO-3 puts into the base optimizer's param groups only for the duration of a step)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        flat = getattr(zero_optimizer, attr, None)
        if flat is not None:
            return list(flat)
    raise NotImplementedError(f"{type(zero_optimizer).__name__} is not a ZeRO-1/2/3 optimizer")


def _ensure_adam_state(zero_optimizer: Any) -> None:
    """Gives every flat partition the Adam state its first step would create (zero moments, step
    0), where it has none yet: ZeRO creates optimizer state lazily, in its first ``step``, and the
    fragment API reads and writes only existing state. Zero moments at step 0 are exactly Adam's
    starting point, so this changes no result. ZeRO-1/2 then re-link each parameter to its
    fragments of the state: DeepSpeed links them once, right after the first param group's first
    step, when the other groups have no state yet, and those links stay empty (so does a link
    made before any state existed, or before a native load replaced the state tensors)."""
    base = zero_optimizer.optimizer
    for flat in _hp_partitions(zero_optimizer):
        st = base.state[flat]
        if not all(k in st for k in _ADAM_KEYS):
            st.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
            for key in _ADAM_KEYS:
                st.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2; a native load may also have replaced the state tensors
        zero_optimizer._hp_optimizer_states_linked = False
        link()


def _adam_step(zero_optimizer: Any) -> float:
    """The step count of the Adam under ZeRO (the same for every flat partition): in the param
    groups for optimizers that keep it there (DeepSpeed's FusedAdam), else in the state."""
    base = zero_optimizer.optimizer
    for group in base.param_groups:
        if "step" in group:
            return float(group["step"])
    for flat in _hp_partitions(zero_optimizer):
        if "step" in base.state.get(flat, {}):
            return float(base.state[flat]["step"])
    return 0.0


def _set_adam_step(zero_optimizer: Any, step: float) -> None:
    """Sets the step count where :func:`_adam_step` reads it (keeping its type: tensor or int)."""
    base = zero_optimizer.optimizer
    for group in base.param_groups:
        if "step" in group:
            group["step"] = int(step) if isinstance(group["step"], int) else step
    for flat in _hp_partitions(zero_optimizer):
        st = base.state[flat]
        if torch.is_tensor(st.get("step")):
            st["step"] = torch.tensor(step, dtype=st["step"].dtype, device=st["step"].device)
        elif "step" in st:
            st["step"] = int(step) if isinstance(st["step"], int) else step


def _deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes its optimizer-state files pickle (besides tensors and containers)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_load(path: str, map_location: Any = None) -> Any:
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


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


class _NormOnHost:
    """Descriptor of ``_global_grad_norm`` on DeepSpeed's optimizer: when DeepSpeed stores the
    norm (right after computing it, before the optimizer kernels), it is copied to pinned host
    memory in stream order and an event recorded. ``optimizer_step`` then waits for that event
    only, not for the whole step: a plain ``float(norm)`` after ``engine.step()`` would drain the
    GPU queue and leave the GPU idle while the next forward is launched (~5% at ZeRO-2)."""

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get("_global_grad_norm")

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__["_global_grad_norm"] = value
        if torch.is_tensor(value) and value.is_cuda and value.numel() == 1:
            obj.__dict__["_lightrft_norm_event"] = (value, HostScalar(value))
        else:
            obj.__dict__["_lightrft_norm_event"] = None


_NORM_CLASSES: dict[type, type] = {}


def _capture_norm_on_host(optimizer: Any) -> None:
    """Gives DeepSpeed's optimizer object a subclass (same name) whose ``_global_grad_norm`` is
    a :class:`_NormOnHost`; the optimizer is otherwise unchanged."""
    if optimizer is None or not hasattr(optimizer, "_global_grad_norm") or not torch.cuda.is_available():
        return
    cls = type(optimizer)
    if isinstance(cls.__dict__.get("_global_grad_norm"), _NormOnHost):
        return
    if cls not in _NORM_CLASSES:
        _NORM_CLASSES[cls] = type(cls.__name__, (cls,), {"_global_grad_norm": _NormOnHost()})
    current = optimizer.__dict__.pop("_global_grad_norm", None)
    optimizer.__class__ = _NORM_CLASSES[cls]
    optimizer._global_grad_norm = current


def _read_norm(engine: Any) -> float:
    """The norm of the step that just ran, as a float (the same on every rank)."""
    value = engine.get_global_grad_norm()
    if value is None:
        return math.nan
    captured = getattr(engine.optimizer, "__dict__", {}).get("_lightrft_norm_event")
    if captured is not None and captured[0] is value:
        return float(captured[1])
    return float(value)


@contextlib.contextmanager
def _skip_if(optimizer: Optimizer, skip: bool, params: list[nn.Parameter]) -> Iterator[None]:
    """Makes ``engine.step()`` a counted skip for a bare client optimizer: its ``step`` does
    nothing and ``overflow`` tells DeepSpeed to count the skip and leave the LR scheduler alone.
    Gradients are zeroed (DeepSpeed clips them before stepping and cannot clip no gradients)."""
    optimizer.overflow = skip  # type: ignore[attr-defined]
    if not skip:
        yield
        return
    for p in params:
        p.grad.zero_()  # type: ignore[union-attr]
    optimizer.step = _no_step  # type: ignore[method-assign]
    try:
        yield
    finally:
        del optimizer.step
        optimizer.overflow = False  # type: ignore[attr-defined]


def _no_step(*args: Any, **kwargs: Any) -> None:
    return None


def _grad_norm(params: list[nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, 2.0))
