"""StrategyBase: the one interface an RLHF loop uses, whatever the distributed backend.

Backends implement the abstract methods (sharding, optimizer steps, checkpoint I/O, gathering full
weights); everything that does not depend on the backend (the training step, collectives,
printing, dataloaders, schedulers) is written once here, and the facade over the two objects
beside the strategy: checkpoints (:class:`~lightrft.strategy.checkpointer.Checkpointer`) and the
rollout engine (:class:`~lightrft.strategy.engine.EngineLifecycle`).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from lightrft.config import StrategyConfig

from . import comm, portable, teardown
from .checkpointer import CLIENT_STATE, LIGHTRFT_FILE_KINDS, RANK_STATE, Checkpointer
from .data import ResumableDataLoader, ResumableDistributedSampler
from .engine import (
    EngineLifecycle,
    GenerationOutput,
    InferenceEngine,
    WeightBucket,
    lightrft_multi_modal_inputs,
)
from .integrity import CheckpointError
from .schedulers import create_scheduler
from .utils import free_port, set_seed
from .weights import bucket_named_tensors, cast_named_tensors, clean_param_name

__all__ = ["CLIENT_STATE", "RANK_STATE", "StrategyBase", "TrainState"]  # the file names: re-exported
_NO_DECAY_MODULES = ("Norm",)


@dataclass
class TrainState:
    """Bookkeeping of one model prepared for training."""

    model: Any
    optimizer: Any
    scheduler: Any
    micro_step: int = 0
    """Micro-steps (backward passes) taken since the start."""
    global_step: int = 0
    """Accumulation boundaries reached (optimizer steps, skipped ones included)."""
    skipped_steps: int = 0
    """Boundaries whose gradient norm was not finite: the optimizer did not step."""

    def to_dict(self) -> dict[str, int]:
        return {
            "micro_step": self.micro_step,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
        }

    def load_dict(self, d: dict[str, int]) -> None:
        self.micro_step, self.global_step, self.skipped_steps = (
            int(d["micro_step"]),
            int(d["global_step"]),
            int(d["skipped_steps"]),
        )


class StrategyBase(ABC):
    """Base class of every training strategy (DeepSpeed, FSDP2, Fake, ...)."""

    name: ClassVar[str] = "base"
    #: Whether gradients are all-reduced only at accumulation boundaries (no sync on other
    #: micro-steps). DeepSpeed ZeRO-2/3 reduce-scatter on every micro-step by design.
    syncs_only_at_boundary: ClassVar[bool] = True

    #: LightRFT's positional constructor arguments, in order: ``Strategy(seed, max_norm,
    #: micro_train_batch_size, train_batch_size, args=args)``.
    positional_fields: ClassVar[tuple[str, ...]] = (
        "seed",
        "max_norm",
        "micro_train_batch_size",
        "train_batch_size",
    )
    #: Whether ``engine.step()``-style backends step the LR scheduler themselves (DeepSpeed does,
    #: inside its engine); otherwise the base steps it after a successful update.
    backend_steps_scheduler: ClassVar[bool] = False

    def __init__(self, *positional: Any, config: Any = None, args: Any = None, **overrides: Any) -> None:
        """``Strategy(config)``, ``Strategy(args=args)`` or LightRFT's ``Strategy(seed, max_norm,
        micro_train_batch_size, train_batch_size, args=args)``.

        The configuration is ``config`` (a StrategyConfig, dict, Namespace or any object) or, without
        it, ``args``; values given explicitly (positionally or as keywords) go on top of it."""
        if positional and not _is_number(positional[0]):
            if config is not None:
                raise TypeError(f"{type(self).__name__}() got the config both positionally and as config=")
            config, positional = positional[0], positional[1:]
        if len(positional) > len(self.positional_fields):
            raise TypeError(
                f"{type(self).__name__}() takes at most {len(self.positional_fields)} positional values "
                f"({', '.join(self.positional_fields)}); got {len(positional)}"
            )
        explicit = dict(zip(self.positional_fields, positional))
        clash = sorted(set(explicit) & set(overrides))
        if clash:
            raise TypeError(
                f"{type(self).__name__}() got {', '.join(clash)} both positionally and as keywords"
            )
        explicit.update(overrides)
        source = config if config is not None else args
        # Built directly (``FakeStrategy(args=...)``) from args that name no backend, the config
        # says which backend this is (backend-specific checks, e.g. DeepSpeed's zpg, follow it).
        defaults = {"strategy": self.name} if self.name != StrategyBase.name else {}
        cfg = StrategyConfig.from_args(source if source is not None else {}, defaults=defaults)
        if explicit:
            cfg = StrategyConfig.from_args({**cfg.model_dump(), **(cfg.model_extra or {}), **explicit})
        self.config: StrategyConfig = cfg
        #: The object the strategy was built from (LightRFT code reads ``strategy.args.<name>``).
        self.args = args if args is not None else source
        self.accumulated_gradient = 1
        self._train_states: dict[int, TrainState] = {}
        self._dataloaders: list[ResumableDataLoader] = []
        self._owns_process_group = False

    # The seed's attribute names, read from the config (one source of truth).
    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def max_norm(self) -> float:
        return self.config.max_norm

    @property
    def micro_train_batch_size(self) -> int:
        return self.config.micro_train_batch_size

    @property
    def train_batch_size(self) -> int:
        return self.config.train_batch_size

    @property
    def bf16(self) -> bool:
        return self.config.bf16

    # ------------------------------------------------------------------ config
    def get_extra_arg(self, name: str, default: Any = None) -> Any:
        """An argument outside StrategyConfig's fields, kept from the args the strategy was built from."""
        return self.config.get_extra_arg(name, default)

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    # ------------------------------------------------------------- distributed
    @abstractmethod
    def setup_distributed(self, timeout: timedelta | None = None) -> None:
        """Initialises the process group (if needed), seeds, and computes accumulation steps."""

    def _init_process_group(self, timeout: timedelta | None = None) -> None:
        """Starts torch.distributed from the torchrun environment (or alone, with world size 1)."""
        set_seed(self.seed)
        if dist.is_initialized():
            teardown.register(self, created_group=False)  # its engines are shut down at exit
            return
        if "RANK" not in os.environ:
            # One process without a launcher: a group of one, so that meshes and collectives work.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        local_rank = int(os.environ.get("LOCAL_RANK", max(self.config.local_rank, 0)))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, timeout=timeout or timedelta(minutes=30))
        self._owns_process_group = True
        # At interpreter exit, engines, backend objects and the group are closed in order, also in
        # a script that never calls shutdown() (see teardown: otherwise a rank can abort at exit).
        teardown.register(self, created_group=True)

    def _set_accumulation(self) -> None:
        self.accumulated_gradient = self.config.accumulation_steps(self.world_size)

    @property
    def world_size(self) -> int:
        return comm.world_size()

    @property
    def dp_size(self) -> int:
        return self.world_size // self.config.sp_size

    def get_rank(self) -> int:
        return comm.rank()

    def is_rank_0(self) -> bool:
        return self.get_rank() == 0

    def barrier(self) -> None:
        if comm.is_distributed():
            dist.barrier()

    def print(self, *msg: Any) -> None:
        if self.is_rank_0():
            print(*msg, flush=True)

    # Collectives run on the strategy's device: CUDA under NCCL, CPU with gloo (the process group
    # is "cpu:gloo,cuda:nccl" when CUDA exists, so either device is served).
    def all_reduce(self, data: Any, op: str = "mean") -> Any:
        """Mean / sum / max / min over ranks of a tensor, a python number or a dict of them."""
        return comm.all_reduce(data, op, device=self.device)

    def all_gather(self, data: Any) -> Any:
        """Every rank's ``data``: tensors concatenated on dim 0, numbers as a list, dicts per key."""
        return comm.all_gather(data, device=self.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return comm.all_gather_object(obj)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return comm.broadcast_object(obj, src)

    def _close_backend(self) -> None:
        """Shuts down what this strategy built over the process group (the engine; backends add
        theirs), before the group goes: by :meth:`shutdown`, and at exit when nobody called it."""
        self.engine_lifecycle.shutdown()

    def shutdown(self) -> None:
        """Shuts the engine down and destroys the process group this strategy created (after a
        barrier), letting its communication threads settle."""
        self._close_backend()
        if self._owns_process_group and dist.is_initialized():
            teardown.close_process_group(barrier=True)
            self._owns_process_group = False

    # ------------------------------------------------------- models, optimizers
    def init_model_context(self, meta_init: bool = False) -> contextlib.AbstractContextManager[Any]:
        """Context in which to build models (ZeRO-3 ``zero.Init``, meta device for FSDP)."""
        return contextlib.nullcontext()

    def prepare_model(self, model: nn.Module, is_training: bool = True) -> nn.Module:
        """Step 1 of 3: backends that shard before the optimizer exists (FSDP2) do it here."""
        return model

    @abstractmethod
    def create_optimizer(self, model: nn.Module, **kwargs: Any) -> Optimizer:
        """Step 2 of 3: ``lr``, ``betas``, ``weight_decay``, ``eps``; no decay on biases and norms."""

    def optimizer_kwargs(self, kwargs: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """``create_optimizer``'s keywords with the config's defaults filled in, as
        ``(weight_decay, the rest)``: ``l2``, ``actor_learning_rate``, ``adam_betas``, ``adam_eps``."""
        kwargs = dict(kwargs)
        weight_decay = kwargs.pop("weight_decay", self.config.l2)
        kwargs.setdefault("lr", self.config.actor_learning_rate)
        kwargs.setdefault("betas", tuple(self.config.adam_betas))
        kwargs.setdefault("eps", self.config.adam_eps)
        return weight_decay, kwargs

    def create_scheduler(
        self,
        optimizer: Optimizer,
        max_steps: int,
        kind: str | None = None,
        warmup_ratio: float | None = None,
        min_lr_ratio: float | None = None,
    ) -> Any:
        """A learning-rate schedule (``config.lr_scheduler`` by default) over ``max_steps``."""
        return create_scheduler(
            optimizer,
            kind or self.config.lr_scheduler,
            max_steps,
            self.config.lr_warmup_ratio if warmup_ratio is None else warmup_ratio,
            self.config.min_lr_ratio if min_lr_ratio is None else min_lr_ratio,
        )

    @staticmethod
    def optimizer_grouped_parameters(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Two groups: decayed weights, and biases / normalisation weights without decay."""
        no_decay: set[int] = set()
        for module in model.modules():
            norm = any(tag in type(module).__name__ for tag in _NO_DECAY_MODULES)
            for pname, p in module.named_parameters(recurse=False):
                if norm or pname.endswith("bias"):
                    no_decay.add(id(p))
        decay_params = [p for p in model.parameters() if p.requires_grad and id(p) not in no_decay]
        other = [p for p in model.parameters() if p.requires_grad and id(p) in no_decay]
        groups = [{"params": decay_params, "weight_decay": weight_decay}]
        if other:
            groups.append({"params": other, "weight_decay": 0.0})
        return groups

    def prepare(self, *items: Any, is_rlhf: bool = False) -> Any:
        """Step 3 of 3. Each item is a ``(model, optimizer, scheduler)`` triple (training) or a
        model (frozen, evaluation mode). Returns them in the same shape; one item comes back alone.
        ``is_rlhf`` is accepted for LightRFT call sites and changes nothing."""
        if not items:
            raise ValueError("prepare() needs at least one model or (model, optimizer, scheduler) triple")
        out: list[Any] = []
        for item in items:
            if isinstance(item, (tuple, list)):
                if len(item) != 3:
                    raise ValueError(
                        f"prepare() takes (model, optimizer, scheduler) triples; got a {type(item).__name__} "
                        f"of length {len(item)}"
                    )
                model, optimizer, scheduler = item
                if model is None:
                    out.append((None, None, None))
                    continue
                if optimizer is None:
                    raise ValueError(
                        "prepare((model, optimizer, scheduler)): optimizer is None; "
                        "pass a frozen model alone: prepare(model)"
                    )
                model, optimizer, scheduler = self._prepare_train(model, optimizer, scheduler)
                self._train_states[id(model)] = TrainState(model, optimizer, scheduler)
                out.append((model, optimizer, scheduler))
            else:
                out.append(None if item is None else self._prepare_eval(item))
        return out[0] if len(out) == 1 else out

    @abstractmethod
    def _prepare_train(self, model: nn.Module, optimizer: Optimizer, scheduler: Any) -> tuple[Any, Any, Any]:
        """Wraps a trainable model (DeepSpeed builds its engine here)."""

    @abstractmethod
    def _prepare_eval(self, model: nn.Module) -> Any:
        """Wraps a frozen model for inference (evaluation mode, no optimizer)."""

    def prepare_models_and_optimizers(
        self,
        actor: nn.Module | None,
        critic: nn.Module | None,
        reward_models: nn.Module | Sequence[nn.Module] | None,
        initial_model: nn.Module | None,
        args: Any = None,
        max_steps: int | None = None,
    ) -> tuple[tuple[Any, Any, Any], tuple[Any, Any, Any], Any, Any]:
        """Runs the three-step protocol for the actor and critic (with their learning rates) and
        prepares the reward and reference models frozen.

        The optimizer settings come from the strategy's own config (``self.config``), which already
        holds ``args`` and every override given to ``get_strategy(args, **overrides)``. ``args`` is
        accepted for LightRFT's call form; where it disagrees with the config, the config wins and a
        warning names the fields."""
        cfg = self.config
        if args is not None:
            _warn_args_disagree(cfg, args)
        if max_steps is None or max_steps <= 0:
            raise ValueError(f"max_steps={max_steps!r} is invalid: pass the number of optimizer steps (> 0)")

        def train(model: nn.Module | None, lr: float) -> tuple[Any, Any, Any]:
            if model is None:
                return (None, None, None)
            model = self.prepare_model(model, is_training=True)
            optim = self.create_optimizer(
                model, lr=lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.l2, eps=cfg.adam_eps
            )
            sched = self.create_scheduler(optim, max_steps)
            return self.prepare((model, optim, sched))

        def frozen(model: nn.Module | None) -> Any:
            return None if model is None else self.prepare(self.prepare_model(model, is_training=False))

        actor_triple = train(actor, cfg.actor_learning_rate)
        critic_triple = train(critic, cfg.critic_learning_rate)
        if isinstance(reward_models, (list, tuple)):
            rms: Any = [frozen(m) for m in reward_models]
        else:
            rms = frozen(cast(nn.Module | None, reward_models))
        return actor_triple, critic_triple, rms, frozen(initial_model)

    def train_state(self, model: Any) -> TrainState:
        """The step counters of a model prepared with an optimizer."""
        try:
            return self._train_states[id(model)]
        except KeyError:
            raise _not_prepared(model) from None

    def _train_state_for(self, model: Any, optimizer: Any, scheduler: Any = None) -> TrainState:
        st = self._train_states.get(id(model))
        if st is None:
            st = self._adopt(model, optimizer, scheduler)
            self._train_states[id(model)] = st
        return st

    def _adopt(self, model: Any, optimizer: Any, scheduler: Any) -> TrainState:
        """A model that ``backward`` / ``optimizer_step`` meet unprepared. Real backends refuse it
        (it is not sharded or wrapped); FakeStrategy adopts it unless ``strict``."""
        raise _not_prepared(model)

    def is_accumulation_boundary(self, model: Any) -> bool:
        """Whether the next ``optimizer_step`` on ``model`` will really step."""
        return self._is_boundary_next(self.train_state(model))

    def _is_boundary_next(self, st: TrainState) -> bool:
        return (st.micro_step + 1) % self.accumulated_gradient == 0

    def unwrap_model(self, model: Any) -> nn.Module:
        """The user's module under torch's wrappers (DDP, ``torch.compile``); backends with a
        wrapper of their own (DeepSpeed's engine) extend this."""
        while True:
            if hasattr(model, "_orig_mod"):
                model = model._orig_mod
            elif isinstance(model, nn.parallel.DistributedDataParallel):
                model = model.module
            else:
                return model

    # -------------------------------------------------------------- training
    # The training step is written once, here: counting micro-steps, the accumulation boundary,
    # "max_norm 0 means no clipping", skipping (and counting) a step whose gradient norm is not
    # finite, and the scheduler step. A backend supplies only the mechanism: ``_backward``,
    # ``_accumulate`` and ``_clip_and_step`` (and ``_adopt`` for models it meets unprepared).
    def backward(self, loss: torch.Tensor, model: Any, optimizer: Any, **kwargs: Any) -> None:
        """Backward of one micro-batch loss, scaled by 1 / accumulation steps. Gradients are
        reduced across ranks on the micro-step that ends an accumulation boundary (and, on
        backends with ``syncs_only_at_boundary=False``, on every micro-step)."""
        st = self._train_state_for(model, optimizer)
        self._backward(loss, st, boundary=self._is_boundary_next(st))

    def optimizer_step(
        self, optimizer: Any, model: Any, scheduler: Any = None, name: str = "model", **kwargs: Any
    ) -> float | None:
        """Called after every ``backward``. Steps only at an accumulation boundary; there it clips
        to ``max_norm`` (0: no clipping) and returns the global L2 gradient norm (before clipping).
        A non-finite norm skips the update and the scheduler step (counted in ``skipped_steps``).
        Returns None between boundaries. ``name`` is accepted for LightRFT call sites (logging)."""
        st = self._train_state_for(model, optimizer, scheduler)
        st.micro_step += 1
        if st.micro_step % self.accumulated_gradient != 0:
            self._accumulate(st)
            return None
        st.global_step += 1
        norm = float(self._clip_and_step(st, self.max_norm if self.max_norm > 0 else math.inf))
        if not math.isfinite(norm):
            st.skipped_steps += 1
        elif scheduler is not None and not self.backend_steps_scheduler:
            scheduler.step()
        return norm

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite gradient norm, over every prepared model."""
        return sum(s.skipped_steps for s in self._train_states.values())

    def _backward(self, loss: torch.Tensor, st: TrainState, boundary: bool) -> None:
        """Mechanism: back-propagate one micro-batch (``boundary``: it ends an accumulation step,
        so gradients are to be reduced now). Torch-native: scale by 1 / accumulation steps."""
        (loss / self.accumulated_gradient).backward()

    def _accumulate(self, st: TrainState) -> None:
        """Mechanism: an ``optimizer_step`` between boundaries (torch-native: nothing to do)."""
        return None

    def _clip_and_step(self, st: TrainState, max_norm: float) -> float:
        """Mechanism at a boundary: clip the gradients to ``max_norm`` (``inf``: no clipping),
        apply the update unless their norm is not finite, clear the gradients; return the
        global L2 norm before clipping, the same on every rank."""
        params = [p for p in st.model.parameters() if p.grad is not None]
        norm = self._clip_grad_norm(params, max_norm)
        if math.isfinite(norm):
            st.optimizer.step()
        st.optimizer.zero_grad(set_to_none=True)
        return norm

    def _clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """The global gradient norm of ``params``, clipped to ``max_norm`` (plain tensors)."""
        if not params:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # ------------------------------------------------------ optimizer offload
    def maybe_offload_optimizer(self, optimizer: Any) -> Any:
        """Moves the optimizer states to host memory where the backend does that (FSDP with
        ``adam_offload``), so a colocated engine gets the memory; a no-op elsewhere. Returns the
        optimizer (LightRFT call sites assign it)."""
        return optimizer

    def maybe_load_optimizer(self, optimizer: Any) -> Any:
        """Brings offloaded optimizer states back before the next ``optimizer_step``; a no-op
        where nothing was offloaded. Returns the optimizer."""
        return optimizer

    @abstractmethod
    def moving_average(self, model: Any, model_ema: Any, beta: float = 0.992, device: str = "cpu") -> None:
        """EMA: ``ema = beta * ema + (1 - beta) * model`` over every parameter. ``device`` is
        accepted for LightRFT call sites: the EMA stays where ``model_ema`` lives."""

    # ----------------------------------------------------------- checkpoints
    #: Distributions whose versions the checkpoint manifest records, besides python, torch,
    #: lightrft-config and lightrft-strategy-api (a backend adds its own package and library).
    checkpoint_distributions: ClassVar[tuple[str, ...]] = ()

    # Offline hooks: ``lightrft-ckpt`` and the fault kit (lightrft.testing.checkpoint_faults) find
    # a checkpoint's strategy class through the registry, from the manifest's ``backend``, and ask
    # it about its native files. They run without an instance, a process group or a GPU.
    #: The kinds of files a native checkpoint of this backend holds, in the order the fault kit
    #: damages them: ``(kind, glob patterns of the path relative to the checkpoint)``.
    checkpoint_file_kinds: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = LIGHTRFT_FILE_KINDS

    @classmethod
    def read_checkpoint_tensors(cls, path: Path, manifest: dict[str, Any], load: bool) -> dict[str, Any]:
        """The model weights of this backend's native checkpoint at ``path`` (``manifest``: its
        manifest), keyed as the backend saved them: tensors with ``load``, else ``(shape, dtype)``
        or tensors memory-mapped. A backend without an offline reader leaves this as it is."""
        raise CheckpointError(
            f"checkpoint {str(path)!r} has backend={manifest.get('backend')!r}, whose strategy "
            f"{cls.__name__} has no offline reader of its native files",
            path=str(path),
        )

    @classmethod
    def convert_checkpoint_to_portable(cls, path: Path, manifest: dict[str, Any], staging: Path) -> None:
        """Writes the model, optimizer and scheduler state of this backend's native checkpoint
        ``path`` in the portable layout into ``staging`` (which holds LightRFT's own files
        already; the caller writes the manifest). A backend without an offline converter leaves
        this as it is: :func:`lightrft.strategy.ckpt_cli.converts_offline` tells the two apart."""
        raise CheckpointError(
            f"checkpoint {str(path)!r} has backend={manifest.get('backend')!r}, whose strategy "
            f"{cls.__name__} has no offline conversion to the portable layout",
            path=str(path),
        )

    # The orchestration (staging, manifest, verification and agreement, rotation, LightRFT's own
    # files) lives in lightrft.strategy.checkpointer.Checkpointer; these methods keep their
    # signatures and hand over. A backend supplies the hooks below.
    @property
    def checkpointer(self) -> Checkpointer:
        """The object that saves, verifies, loads and rotates this strategy's checkpoints."""
        cp = self.__dict__.get("_checkpointer")
        if cp is None:
            cp = self.__dict__["_checkpointer"] = Checkpointer(self)
        return cp

    def save_ckpt(
        self,
        model: Any,
        save_dir: str | os.PathLike,
        tag: str | None = None,
        max_num: int | None = None,
        max_mem: float | None = None,
        client_state: dict[str, Any] | None = None,
        save_latest: bool = True,
        layout: str | None = None,
    ) -> Path:
        """Saves model, optimizer, scheduler, ``client_state``, RNG and dataloader positions to
        ``save_dir/<tag>`` atomically, with a manifest of every file's size and checksum written
        last; then keeps at most ``max_num`` checkpoints / ``max_mem`` GB. Call it on every rank.

        ``layout``: ``"native"`` (the backend's own files; the default) or ``"portable"`` (model and
        optimizer state keyed by parameter name, which another backend or world size can load;
        see :mod:`lightrft.strategy.portable`). Defaults to the ``ckpt_layout`` argument."""
        return self.checkpointer.save_ckpt(
            model,
            save_dir,
            tag,
            max_num=max_num,
            max_mem=max_mem,
            client_state=client_state,
            save_latest=save_latest,
            layout=layout,
        )

    def load_ckpt(
        self,
        model: Any,
        load_dir: str | os.PathLike,
        tag: str | None = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
        verify_checksums: bool = True,
    ) -> tuple[str, dict[str, Any]]:
        """Loads ``load_dir/<tag>`` (``latest`` by default). Returns ``(path, client_state)``.

        Before anything is loaded, every rank checks the manifest (every file present with its
        recorded size; the checksums split over the ranks, skipped with ``verify_checksums=False``)
        and that this strategy can read the checkpoint; the ranks then agree: if any rank found a
        problem, every rank raises the same :class:`CheckpointError` naming the file, what is wrong
        and the last good checkpoint (``tag=``), and the model, optimizer, scheduler, RNG and
        dataloaders are untouched. Call it on every rank."""
        return self.checkpointer.load_ckpt(
            model,
            load_dir,
            tag,
            strict=load_module_strict,
            optimizer_states=load_optimizer_states,
            scheduler_states=load_lr_scheduler_states,
            module_only=load_module_only,
            checksums=verify_checksums,
        )

    def _save_portable(self, model: Any, path: Path) -> None:
        """Writes the portable layout (every rank). The default serves torch-native backends
        (plain or FSDP2 modules with a torch optimizer)."""
        self._save_dcp(model, path, portable.PORTABLE_DIR)

    def _load_portable(
        self,
        model: Any,
        path: Path,
        *,
        load_module_strict: bool,
        load_optimizer_states: bool,
        load_lr_scheduler_states: bool,
    ) -> None:
        """Reads the portable layout (every rank), resharding to this world size."""
        self._load_dcp(
            model,
            path,
            portable.PORTABLE_DIR,
            strict=load_module_strict,
            optimizer_states=load_optimizer_states,
            scheduler_states=load_lr_scheduler_states,
        )

    # A torch-native backend's model and optimizer state as a DCP directory ``path/subdir``: the
    # portable layout's (``portable``) and a backend's native one (FSDP's ``dcp``) alike.
    def _save_dcp(self, model: Any, path: Path, subdir: str) -> None:
        """Writes the model's and its optimizer's state under ``path/subdir`` (every rank; the
        scheduler is the caller's)."""
        st = self._train_states.get(id(model))
        portable.save_portable(
            self.unwrap_model(model),
            st.optimizer if st is not None else None,
            path,
            no_dist=self.world_size == 1,
            subdir=subdir,
        )

    def _load_dcp(
        self,
        model: Any,
        path: Path,
        subdir: str,
        *,
        strict: bool,
        optimizer_states: bool,
        scheduler_states: bool,
        legacy_scheduler_names: tuple[str, ...] = (),
    ) -> None:
        """Reads what :meth:`_save_dcp` wrote (every rank, resharding to this world size), and the
        scheduler from ``path/lightrft_scheduler.pt`` (or the first of ``legacy_scheduler_names``)."""
        st = self._train_states.get(id(model))
        portable.load_portable(
            self.unwrap_model(model),
            st.optimizer if st is not None else None,
            path,
            strict=strict,
            with_optimizer=optimizer_states,
            no_dist=self.world_size == 1,
            subdir=subdir,
        )
        if st is not None and scheduler_states:
            portable.load_scheduler(st.scheduler, path, legacy_names=legacy_scheduler_names)

    def _checkpoint_info(self) -> dict[str, Any]:
        """Backend facts the manifest records besides backend, step and world size (e.g. the
        ZeRO stage); the same facts :meth:`_checkpoint_incompatibility` checks at load."""
        return {}

    def _checkpoint_incompatibility(self, manifest: dict[str, Any]) -> str | None:
        """Why this strategy cannot load a checkpoint with ``manifest`` (completing the sentence
        "checkpoint <path> ..."), or None. By default a native checkpoint of the same backend loads."""
        if manifest.get("backend") != self.name:
            return (
                f"was written by backend {manifest.get('backend')!r} in its native layout, which the "
                f"{self.name!r} strategy cannot read"
            )
        return None

    @abstractmethod
    def _save_checkpoint(self, model: Any, path: Path) -> None:
        """Writes the backend's model / optimizer / scheduler state into ``path`` (every rank)."""

    @abstractmethod
    def _load_checkpoint(
        self,
        model: Any,
        path: Path,
        *,
        load_module_strict: bool,
        load_optimizer_states: bool,
        load_lr_scheduler_states: bool,
    ) -> None:
        """Reads what ``_save_checkpoint`` wrote."""

    # ---------------------------------------------------------- model files
    def save_model(
        self, model: Any, output_dir: str | os.PathLike, tokenizer: Any = None, **kwargs: Any
    ) -> None:
        """Writes a consolidated Hugging Face directory (safetensors, config, tokenizer) on rank 0."""
        self.checkpointer.save_model(model, output_dir, tokenizer, **kwargs)

    def load_model(self, model: Any, path: str | os.PathLike, strict: bool = True) -> None:
        """Loads a Hugging Face directory (or .safetensors file) into a prepared or plain model."""
        self.checkpointer.load_model(model, path, strict=strict)

    @abstractmethod
    def _full_state_dict(self, model: Any) -> dict[str, torch.Tensor] | None:
        """The full, unsharded state dict with clean names, on CPU, on rank 0 (None elsewhere)."""

    @abstractmethod
    def _load_full_state_dict(self, model: Any, state_dict: dict[str, torch.Tensor], strict: bool) -> None:
        """Loads a full state dict (same on every rank) into the (possibly sharded) model."""

    # ------------------------------------------------------------ weight sync
    def iter_weight_buckets(
        self,
        model: Any,
        bucket_bytes: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        transient: bool = False,
    ) -> Iterator[WeightBucket]:
        """The model's full parameters as buckets of at most ``bucket_bytes`` (one tensor may exceed
        it alone), with clean names; only one bucket is materialised at a time.

        ``dtype``: the tensors arrive in this dtype (an engine's), cast once; a sharded backend
        casts its shards before gathering them, so fewer bytes move. ``transient=True``: a
        bucket's tensors are valid only until the next bucket is requested (the consumer copies
        them at once, in stream order); a backend may then hand out its gathered buffers without a
        copy. Consumers that keep buckets (``list(...)``) must leave it False."""
        size = bucket_bytes or self.config.weight_sync_bucket_mb << 20
        named = cast_named_tensors(self._iter_full_parameters(model), dtype)
        return bucket_named_tensors(named, size, clean_param_name)

    @abstractmethod
    def _iter_full_parameters(self, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields ``(name, full tensor)`` one at a time, on every rank."""

    # ------------------------------------------------------------- dataloader
    def setup_dataloader(
        self,
        dataset: Any,
        batch_size: int,
        shuffle: bool = True,
        collate_fn: Any = None,
        drop_last: bool = True,
        pin_memory: bool = False,
        num_workers: int = 0,
        consumed_samples: int = 0,
        seed: int | None = None,
    ) -> ResumableDataLoader:
        """A dataloader over this rank's share of ``dataset`` whose position is saved by
        ``save_ckpt`` and restored by ``load_ckpt``."""
        dp_rank = self.get_rank() // self.config.sp_size
        sampler = ResumableDistributedSampler(
            dataset,
            num_replicas=self.dp_size,
            rank=dp_rank,
            shuffle=shuffle,
            seed=self.seed if seed is None else seed,
            drop_last=drop_last,
            consumed_samples=consumed_samples,
        )
        loader = ResumableDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            drop_last=drop_last,
            pin_memory=pin_memory,
            num_workers=num_workers,
        )
        self._dataloaders.append(loader)
        return loader

    # ---------------------------------------------------------------- engine
    # The engine's lifecycle lives in lightrft.strategy.engine.EngineLifecycle; these methods keep
    # this project's keywords and LightRFT's names and argument order.
    @property
    def engine_lifecycle(self) -> EngineLifecycle:
        """The object that owns this strategy's rollout engine (created on first use)."""
        lc = self.__dict__.get("_engine_lifecycle")
        if lc is None:
            lc = self.__dict__["_engine_lifecycle"] = EngineLifecycle(self)
        return lc

    @property
    def inference_engine(self) -> InferenceEngine | None:
        """The rollout engine, or None before ``setup_inference_engine``."""
        return self.engine_lifecycle.engine

    @inference_engine.setter
    def inference_engine(self, engine: InferenceEngine | None) -> None:
        # Assigning None forgets the engine without shutting it down (the caller did).
        self.engine_lifecycle.engine = engine

    def setup_inference_engine(
        self,
        args: Any = None,
        engine_type: str | None = None,
        actor: Any = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> InferenceEngine:
        """Creates the rollout engine named by ``engine_type`` (``config.engine_type`` by default),
        colocated with training; engines are found through the ``lightrft.engines`` entry points.

        This project's form: ``setup_inference_engine(model=hf_model, tokenizer=tok)``, where
        ``model`` is an unsharded Hugging Face model to build the engine from. LightRFT's form:
        ``setup_inference_engine(args, engine_type="vllm", actor=actor)``: with ``actor`` (the
        prepared training model, possibly sharded) the engine is built from the actor's config and
        the actor's weights are pushed at once; ``args.pretrain`` (a model directory) is passed to
        the engine as ``model_path`` when neither model nor actor is given. A module passed as the
        first positional argument is taken as ``model``. The engine is awake afterwards.
        """
        if isinstance(args, nn.Module):
            if model is not None:
                raise TypeError("setup_inference_engine: a module passed positionally and model=")
            model, args = args, None
        if args is not None and model is None and actor is None and getattr(args, "pretrain", None):
            kwargs.setdefault("model_path", args.pretrain)
        return self.engine_lifecycle.setup(
            engine_type, model=model, tokenizer=tokenizer, actor=actor, **kwargs
        )

    def update_engine_weights(self, model: Any, bucket_bytes: int | None = None) -> None:
        """Pushes the trained weights into the engine, one bounded bucket at a time, and leaves it
        awake: wake weights -> push -> empty cache -> wake the rest -> reset the prefix cache.

        Without an engine (``setup_inference_engine`` not called) nothing is pushed and an
        :class:`~lightrft.strategy.engine.EngineNotSetUpWarning` is issued, on every strategy."""
        self.engine_lifecycle.update_weights(model, bucket_bytes)

    def gather_and_generate(
        self,
        sampling_params: Any = None,
        all_prompt_token_ids: Sequence[Sequence[int]] | None = None,
        all_prompts: Sequence[str] | None = None,
        all_images: Sequence[Any] | None = None,
        sleep_engine: bool = True,
        images_num: Sequence[int] | None = None,
        all_videos: Sequence[Any] | None = None,
        videos_num: Sequence[int] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        multi_modal_inputs: Sequence[Any] | None = None,
    ) -> list[GenerationOutput]:
        """Generates for this rank's prompts and returns this rank's outputs (``n`` per prompt,
        prompt-major). With a tensor-parallel engine (``engine.tp_group``) the group's prompts are
        gathered, generated together and each rank gets its own. No prompts anywhere in the group:
        ``[]``.

        Takes LightRFT's argument order (``sampling_params, all_prompt_token_ids, all_prompts,
        all_images, sleep_engine, images_num, all_videos, videos_num``; ``sampling_params`` may be a
        ``vllm.SamplingParams``) and this project's keywords (``prompts=``, ``prompt_token_ids=``,
        ``multi_modal_inputs=`` one dict per prompt). With images or videos the text prompts are
        used, otherwise the token ids. ``sleep_engine`` (LightRFT's default True) puts the engine
        to sleep afterwards when ``config.enable_engine_sleep``."""
        if isinstance(sampling_params, (list, tuple)):
            raise TypeError(
                "gather_and_generate: the first positional argument is sampling_params (LightRFT's "
                "order); pass prompts by keyword: prompt_token_ids=... or prompts=..."
            )
        ids = prompt_token_ids if prompt_token_ids is not None else all_prompt_token_ids
        texts = prompts if prompts is not None else all_prompts
        mm = multi_modal_inputs
        if mm is None and (all_images is not None or all_videos is not None):
            n = len(texts) if texts is not None else len(ids or [])
            mm = lightrft_multi_modal_inputs(n, all_images, images_num, all_videos, videos_num)
        if ids is not None and texts is not None:
            # LightRFT passes both: text with the images, token ids otherwise.
            if mm is not None:
                ids = None
            else:
                texts = None
        return self.engine_lifecycle.gather_and_generate(
            sampling_params,
            prompts=texts,
            prompt_token_ids=ids,
            multi_modal_inputs=mm,
            sleep_engine=sleep_engine,
        )

    def engine_generate_local(
        self,
        sampling_params: Any = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        multi_modal_inputs: Sequence[Any] | None = None,
        *,
        prompts: Sequence[str] | None = None,
    ) -> list[GenerationOutput]:
        """Generates this rank's prompts on the local engine, without gathering (LightRFT's name and
        order). ``multi_modal_inputs`` in LightRFT's form (``{"prompt": text, "multi_modal_data":
        {...}}`` per prompt) or one ``multi_modal_data`` dict per prompt with ``prompts=``."""
        if prompt_token_ids is not None and multi_modal_inputs is not None and prompts is None:
            raise ValueError("engine_generate_local: pass prompt_token_ids or multi_modal_inputs, not both")
        if (
            multi_modal_inputs is not None
            and prompts is None
            and all(isinstance(x, dict) and "prompt" in x for x in multi_modal_inputs)
        ):
            prompts = [x["prompt"] for x in multi_modal_inputs]
            multi_modal_inputs = [x.get("multi_modal_data") for x in multi_modal_inputs]
        if prompt_token_ids is None and prompts is None:
            raise ValueError("engine_generate_local: pass prompt_token_ids or multi_modal_inputs")
        if not (prompt_token_ids if prompts is None else prompts):
            return []
        return self.engine_lifecycle.generate_local(
            sampling_params,
            prompts=prompts,
            prompt_token_ids=None if prompts is not None else prompt_token_ids,
            multi_modal_inputs=multi_modal_inputs,
        )

    def maybe_sleep_inference_engine(self, level: int | None = None) -> bool:
        """Puts the engine to sleep (frees its device memory for training) when
        ``config.enable_engine_sleep``, at ``level`` (``config.engine_sleep_level`` by default);
        returns whether it sleeps now (False without an engine)."""
        return self.engine_lifecycle.sleep(level)

    def wakeup_inference_engine(self, tags: Sequence[str] | None = None) -> None:
        """Wakes the engine (no-op when awake or absent). After a level-2 sleep the weights are
        gone: this raises, naming ``update_engine_weights``, which wakes and pushes in order."""
        self.engine_lifecycle.wake_up(tags)


_OPTIMIZER_FIELDS = ("actor_learning_rate", "critic_learning_rate", "adam_betas", "adam_eps", "l2")


def _warn_args_disagree(cfg: StrategyConfig, args: Any) -> None:
    """Warns when ``args`` give optimizer values other than the config's."""
    try:
        given = StrategyConfig.from_args(args)
    except Exception:  # args the config cannot read: the strategy's config is used, nothing to compare
        return
    differ = [
        f"{name}: args {getattr(given, name)!r}, strategy {getattr(cfg, name)!r}"
        for name in _OPTIMIZER_FIELDS
        if name in given.model_fields_set
        and tuple(_as_tuple(getattr(given, name))) != tuple(_as_tuple(getattr(cfg, name)))
    ]
    if differ:  # Python's warning filters show it once per call site
        warnings.warn(
            "prepare_models_and_optimizers: args disagree with the strategy's config ("
            + "; ".join(differ)
            + "); the strategy's config is used (it holds the overrides given to get_strategy)",
            UserWarning,
            stacklevel=3,
        )


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _not_prepared(model: Any) -> ValueError:
    return ValueError(
        f"{type(model).__name__} was not prepared for training by this strategy: call "
        "strategy.prepare((model, optimizer, scheduler)) and use the model it returns"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
