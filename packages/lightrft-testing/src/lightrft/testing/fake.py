"""FakeStrategy: the whole Strategy API in one process, no process group, no GPU, real arithmetic."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightrft.strategy.base import StrategyBase, TrainState
from lightrft.strategy.checkpointer import LIGHTRFT_FILE_KINDS
from lightrft.strategy.weights import clean_param_name

STATE_FILE = "fake_state.pt"


class NoEngineModelWarning(UserWarning):
    """FakeStrategy.setup_inference_engine() was given no model: a model-less FakeEngine stands in."""


class FakeStrategy(StrategyBase):
    """A drop-in strategy for unit tests of training code.

    A model and a torch optimizer that were never prepared are adopted on first use
    (``backward``, ``optimizer_step``), so the seed's testing pattern works as written; pass
    ``strict=True`` to refuse them as real backends do.

    It behaves as a data-parallel world of size 1: gradient accumulation over
    ``train_batch_size / micro_train_batch_size`` micro-steps, one global-norm clip whose norm
    ``optimizer_step`` returns, non-finite norms skip the step, schedulers, checkpoints that
    resume bit for bit, Hugging Face ``save_model``, EMA and weight buckets for engines. Collectives
    act on one rank even when a process group exists.
    """

    __test__ = False
    name = "fake"
    checkpoint_distributions = ("lightrft-testing",)

    def __init__(self, *positional: Any, strict: bool = False, **kwargs: Any) -> None:
        """Takes what :class:`StrategyBase` takes, plus ``strict``: refuse models that were not
        prepared (``prepare``) instead of adopting them on first use, as real backends do."""
        super().__init__(*positional, **kwargs)
        self.strict = strict
        """Refuse unprepared models (the conformance suite uses this); by default a plain model and
        a torch optimizer are adopted by the first ``backward`` / ``optimizer_step``."""

    def _adopt(self, model: Any, optimizer: Any, scheduler: Any) -> TrainState:
        if self.strict or not isinstance(model, nn.Module) or not isinstance(optimizer, Optimizer):
            return super()._adopt(model, optimizer, scheduler)
        return TrainState(model, optimizer, scheduler)

    def setup_inference_engine(
        self,
        args: Any = None,
        engine_type: str | None = None,
        actor: Any = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> Any:
        """As :meth:`StrategyBase.setup_inference_engine`, and LightRFT's trainer-test form
        ``setup_inference_engine(args)`` with no model (no ``model=``, ``actor=``, module or
        ``args.pretrain``): then a model-less :class:`~lightrft.testing.FakeEngine` is set up with
        a :class:`NoEngineModelWarning`. It sleeps, wakes and takes weight pushes (counted), and
        refuses to generate with an error that says to pass a model."""
        no_model = (
            model is None
            and actor is None
            and not isinstance(args, nn.Module)
            and not getattr(args, "pretrain", None)
            and "model_path" not in kwargs
        )
        if not no_model:
            return super().setup_inference_engine(
                args, engine_type, actor, model=model, tokenizer=tokenizer, **kwargs
            )
        import warnings

        from .engine import FakeEngine

        name = engine_type or self.config.engine_type
        warnings.warn(
            f"FakeStrategy.setup_inference_engine() got no model (model=, actor= or args.pretrain): "
            f"a model-less FakeEngine stands in for the {name!r} engine. Sleep, wake and weight pushes "
            "work; generation raises until an engine is set up with a model",
            NoEngineModelWarning,
            stacklevel=2,
        )
        lifecycle = self.engine_lifecycle
        if lifecycle.engine is not None:
            lifecycle.shutdown()
        engine = FakeEngine(strategy=self, model=None, tokenizer=tokenizer, allow_no_model=True)
        lifecycle.engine, lifecycle.engine_type = engine, "fake"
        return engine

    def engine_generate_local(
        self,
        sampling_params: Any = None,
        prompt_token_ids: Any = None,
        multi_modal_inputs: Any = None,
        *,
        prompts: Any = None,
    ) -> list[Any]:
        """As the base; with a model-less engine (see ``setup_inference_engine``) and no prompts at
        all it returns ``[]``, as LightRFT's FakeStrategy does."""
        engine = self.engine_lifecycle.engine
        nothing = prompt_token_ids is None and prompts is None and multi_modal_inputs is None
        if nothing and engine is not None and getattr(engine, "model", False) is None:
            return []
        return super().engine_generate_local(
            sampling_params, prompt_token_ids, multi_modal_inputs, prompts=prompts
        )

    def setup_distributed(self, timeout: timedelta | None = None) -> None:
        from lightrft.strategy.utils import set_seed

        set_seed(self.seed)
        self._set_accumulation()

    # One rank, whatever torch.distributed says.
    @property
    def world_size(self) -> int:
        return 1

    def get_rank(self) -> int:
        return 0

    def barrier(self) -> None:
        return None

    def all_reduce(self, data: Any, op: str = "mean") -> Any:
        if op not in ("mean", "sum", "max", "min"):
            raise ValueError(f"op={op!r} is invalid: valid are mean, sum, max, min")
        if isinstance(data, dict):
            return {k: self.all_reduce(v, op) for k, v in data.items()}
        if torch.is_tensor(data):
            out = data.detach().clone()
            return out if out.is_floating_point() or op != "mean" else out.double()
        return float(data)

    def all_gather(self, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: self.all_gather(v) for k, v in data.items()}
        if torch.is_tensor(data):
            return (data.reshape(1) if data.dim() == 0 else data).detach().clone()
        return [data]

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    # ------------------------------------------------------------------ models
    def create_optimizer(self, model: nn.Module, **kwargs: Any) -> Optimizer:
        weight_decay, kwargs = self.optimizer_kwargs(kwargs)
        return torch.optim.AdamW(self.optimizer_grouped_parameters(model, weight_decay), **kwargs)

    def _prepare_train(self, model: nn.Module, optimizer: Optimizer, scheduler: Any) -> tuple[Any, Any, Any]:
        model.train()
        return model, optimizer, scheduler

    def _prepare_eval(self, model: nn.Module) -> Any:
        model.eval()
        model.requires_grad_(False)
        return model

    @torch.no_grad()
    def moving_average(self, model: Any, model_ema: Any, beta: float = 0.992, device: str = "cpu") -> None:
        ema_params = dict(model_ema.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad:
                e = ema_params[name]
                e.data.copy_((beta * e.data.to(p.device) + (1 - beta) * p.data).to(e.device))

    # ------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model: Any, path: Path) -> None:
        st = self._train_states.get(id(model))
        state: dict[str, Any] = {"model": model.state_dict()}
        if st is not None:
            state["optimizer"] = st.optimizer.state_dict()
            if st.scheduler is not None:
                state["scheduler"] = st.scheduler.state_dict()
        torch.save(state, path / STATE_FILE)

    def _load_checkpoint(
        self,
        model: Any,
        path: Path,
        *,
        load_module_strict: bool,
        load_optimizer_states: bool,
        load_lr_scheduler_states: bool,
    ) -> None:
        state = torch.load(path / STATE_FILE, weights_only=True)
        model.load_state_dict(state["model"], strict=load_module_strict)
        st = self._train_states.get(id(model))
        if st is None:
            return
        if load_optimizer_states and "optimizer" in state:
            st.optimizer.load_state_dict(state["optimizer"])
        if load_lr_scheduler_states and "scheduler" in state and st.scheduler is not None:
            st.scheduler.load_state_dict(state["scheduler"])

    checkpoint_file_kinds = (*LIGHTRFT_FILE_KINDS, ("fake_state", (STATE_FILE,)))

    @classmethod
    def read_checkpoint_tensors(cls, path: Path, manifest: dict[str, Any], load: bool) -> dict[str, Any]:
        return torch.load(path / STATE_FILE, weights_only=True, mmap=True)["model"]

    # ---------------------------------------------------------------- weights
    def _full_state_dict(self, model: Any) -> dict[str, torch.Tensor]:
        return {clean_param_name(k): v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def _load_full_state_dict(self, model: Any, state_dict: dict[str, torch.Tensor], strict: bool) -> None:
        model.load_state_dict(state_dict, strict=strict)

    def _iter_full_parameters(self, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in model.named_parameters():
            yield name, p.detach()


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy, handy for an EMA model or a frozen reference model in tests."""
    return copy.deepcopy(model)
