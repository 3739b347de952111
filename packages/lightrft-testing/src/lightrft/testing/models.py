"""Small models for tests: a plain-torch causal LM and a tiny Hugging Face Llama."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TinyConfig:
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2
    max_positions: int = 64

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class TinyBlock(nn.Module):
    """A residual MLP block with a norm: one FSDP unit."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyCausalLM(nn.Module):
    """Embedding, position embedding, ``num_layers`` blocks, final norm and an untied lm_head.
    ``forward(input_ids)`` returns logits of shape (batch, seq, vocab)."""

    _no_split_modules = ["TinyBlock"]

    def __init__(self, config: TinyConfig | None = None) -> None:
        super().__init__()
        self.config = config or TinyConfig()
        c = self.config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.pos = nn.Embedding(c.max_positions, c.hidden_size)
        self.layers = nn.ModuleList(TinyBlock(c.hidden_size) for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(c.hidden_size)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.pos(positions)[None]
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a plain tensor output or a Hugging Face ``ModelOutput``."""
    return output if torch.is_tensor(output) else output.logits


def causal_lm_loss(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``model`` on ``input_ids``."""
    logits = logits_of(model(input_ids)).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def make_tiny_model(seed: int = 0, config: TinyConfig | None = None) -> TinyCausalLM:
    """A TinyCausalLM whose weights depend only on ``seed`` (same on every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyCausalLM(config)


def make_sequential_lm(seed: int = 0, hidden_size: int = 1024, vocab_size: int = 64) -> nn.Sequential:
    """A causal LM as a plain ``nn.Sequential`` (embedding, Linear, GELU, head): no decoder-layer
    class for a backend to find. At the default size its middle Linear (1,049,600 parameters) is
    large enough to be an FSDP unit of its own; ``model(input_ids)`` returns logits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Embedding(vocab_size, hidden_size),
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, vocab_size),
        )


def make_tiny_llama(
    seed: int = 0, vocab_size: int = 128, hidden_size: int = 64, num_layers: int = 2, **kw: Any
) -> Any:
    """A tiny ``LlamaForCausalLM`` built locally (no hub access). Needs transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise ImportError("make_tiny_llama needs transformers: `uv add transformers`") from e
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        **kw,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def make_batches(
    seed: int, num: int, batch_size: int, seq_len: int = 16, vocab_size: int = 64
) -> list[torch.Tensor]:
    """``num`` deterministic batches of token ids (independent of the global RNG)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch_size, seq_len), generator=g) for _ in range(num)]


class _LoraLinear(nn.Module):
    """A LoRA layer with peft's parameter names: ``base_layer``, ``lora_A.<adapter>``,
    ``lora_B.<adapter>``; ``y = base(x) + scale * B(A(x))``."""

    def __init__(self, base: nn.Linear, r: int, scale: float, gen: torch.Generator, adapter: str) -> None:
        super().__init__()
        self.base_layer = base
        self.scale = scale
        self.adapter = adapter
        self.lora_A = nn.ModuleDict({adapter: nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({adapter: nn.Linear(r, base.out_features, bias=False)})
        with torch.no_grad():  # both nonzero (peft starts B at zero): the delta is real
            self.lora_A[adapter].weight.normal_(0.0, 0.05, generator=gen)
            self.lora_B[adapter].weight.normal_(0.0, 0.05, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * self.lora_B[self.adapter](self.lora_A[self.adapter](x))


class PeftShapedModel(nn.Module):
    """A stand-in for ``peft.PeftModel`` (not peft): the names (``base_model.model.<...>``,
    ``.base_layer.weight``, ``.lora_A.default.weight``), ``peft_config`` with ``r`` and
    ``lora_alpha``, ``get_base_model()`` and ``save_pretrained`` that peft models have, so engine
    code that maps PEFT names can be tested where peft is not installed."""

    def __init__(self, base: nn.Module, r: int, alpha: int, targets: tuple[str, ...], seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for module in list(base.modules()):
            for child, sub in list(module.named_children()):
                if child in targets and isinstance(sub, nn.Linear):
                    setattr(module, child, _LoraLinear(sub, r, alpha / r, gen, "default"))
        self.base_model = nn.Module()
        self.base_model.model = base
        self.peft_config = {"default": SimpleNamespace(r=r, lora_alpha=alpha, use_rslora=False)}

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - shape only
        raise NotImplementedError("PeftShapedModel is a test stand-in: it saves nothing")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model(*args, **kwargs)


def make_lora_like(
    base: nn.Module,
    r: int = 4,
    alpha: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 11,
) -> tuple[PeftShapedModel, nn.Module]:
    """A PEFT-shaped LoRA model over a copy of ``base`` (:class:`PeftShapedModel`) and the plain model
    it equals, with every LoRA delta merged: ``W + (alpha / r) * B @ A`` in float32."""
    import copy

    actor = PeftShapedModel(copy.deepcopy(base), r, alpha, targets, seed)
    merged = copy.deepcopy(base)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for name, module in actor.base_model.model.named_modules():
            if isinstance(module, _LoraLinear):
                a = module.lora_A["default"].weight.float()
                b = module.lora_B["default"].weight.float()
                w = params[f"{name}.weight"]
                w.copy_((w.float() + module.scale * (b @ a)).to(w.dtype))
    return actor, merged
