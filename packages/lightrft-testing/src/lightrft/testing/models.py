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


# ----------------------------------------------------------------------- a tiny vision-language model
#: Colours of :func:`make_color_image`, each a single token of :func:`make_tiny_vlm`'s tokenizer.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (25, 25, 230),
    "yellow": (230, 230, 25),
}
#: The text placeholder of one image in a prompt of :func:`make_tiny_vlm` (Gemma 3's processor
#: expands it into begin-of-image, ``mm_tokens_per_image`` soft tokens and end-of-image).
IMAGE_PLACEHOLDER = "<start_of_image>"
_VLM_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", IMAGE_PLACEHOLDER, "<end_of_image>", "<image_soft_token>"]
_VLM_CORPUS = (
    "what colour is the image ? the image is {c} . name the colour : {c} . "
    "a {c} square . is it {c} ? yes it is {c} . describe both images : {c} and {c} ."
)


def make_tiny_vlm_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained here on a few sentences about colours (no hub): the
    colour names are single tokens; ``<start_of_image>`` is the image placeholder; the newline runs
    "\\n" to "\\n\\n\\n\\n" are single tokens, as in Gemma 3's own vocabulary."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise ImportError("make_tiny_vlm needs transformers: `uv add transformers pillow`") from e
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=_VLM_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [_VLM_CORPUS.format(c=c) for c in COLORS for _ in range(8)] + ["\n\n", "\n"] * 8
    tok.train_from_iterator(corpus, trainer)
    # Gemma 3's real (SentencePiece) vocabulary has "\n" to "\n\n\n\n" as literal tokens, and
    # vLLM's Gemma 3 processor looks them up by those strings to merge the newlines around an
    # expanded image (vllm/model_executor/models/gemma3_mm.py, _apply_token_matches); byte-level
    # BPE would spell them "Ċ". Added tokens match before pre-tokenization, longest first.
    tok.add_tokens([AddedToken("\n" * k, normalized=False, special=False) for k in range(1, 5)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": IMAGE_PLACEHOLDER,
            "eoi_token": "<end_of_image>",
        },
    )


def make_tiny_vlm(
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
    image_size: int = 28,
    patch_size: int = 14,
    tokens_per_image: int = 4,
) -> tuple[Any, Any]:
    """A randomly initialised ``Gemma3ForConditionalGeneration`` (SigLIP vision tower + Gemma 3
    decoder) and its ``Gemma3Processor``, built locally (no hub): about 0.5 M parameters at the
    defaults, 28x28 images as ``tokens_per_image`` soft tokens each. Gemma 3 is a vision-language
    architecture that transformers, vLLM and SGLang all implement natively; its processor works
    without torchvision (transformers falls back to the PIL image processor).

    Returns ``(model, processor)``; ``processor.tokenizer`` is :func:`make_tiny_vlm_tokenizer`'s.
    Needs transformers and pillow."""
    try:
        import transformers
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    except ImportError as e:
        raise ImportError("make_tiny_vlm needs transformers: `uv add transformers pillow`") from e
    tokenizer = make_tiny_vlm_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _VLM_SPECIAL}
    heads = max(1, hidden_size // 64)
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 1,
            "head_dim": hidden_size // heads,
            "max_position_embeddings": 512,
            "sliding_window": 64,
            "pad_token_id": ids["<pad>"],
            "bos_token_id": ids["<bos>"],
            "eos_token_id": ids["<eos>"],
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": max(1, vision_hidden_size // 64),
            "image_size": image_size,
            "patch_size": patch_size,
            "vision_use_head": False,
        },
        mm_tokens_per_image=tokens_per_image,
        image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids[IMAGE_PLACEHOLDER],
        eoi_token_index=ids["<end_of_image>"],
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
        tie_word_embeddings=True,
    )
    image_processor = transformers.Gemma3ImageProcessor(
        size={"height": image_size, "width": image_size}, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens_per_image
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config)
        # Gemma 3 initialises its image projection to zeros: images would change nothing until
        # trained. A random projection makes the image matter from the start.
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            projection.normal_(0.0, vision_hidden_size**-0.5)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = ids["<eos>"]
    return model, processor


def make_color_image(color: str, size: int = 28, seed: int | None = None) -> Any:
    """A ``size`` x ``size`` PIL image of one of :data:`COLORS` (with ``seed``: a little noise, so
    no two images are equal). Needs pillow."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("make_color_image needs pillow: `uv add pillow`") from e
    if color not in COLORS:
        raise ValueError(f"color={color!r} is unknown; valid: {sorted(COLORS)}")
    base = torch.tensor(COLORS[color], dtype=torch.int16).view(1, 1, 3).expand(size, size, 3)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        base = base + torch.randint(-20, 21, (size, size, 3), generator=g, dtype=torch.int16)
    pixels = base.clamp(0, 255).to(torch.uint8).contiguous()
    return Image.frombytes("RGB", (size, size), bytes(pixels.flatten().tolist()))


def vlm_batch(processor: Any, texts: list[str], images: list[list[Any]]) -> dict[str, torch.Tensor]:
    """A padded training batch for :func:`make_tiny_vlm` (or any Hugging Face vision-language
    processor): the processor's tensors plus ``labels`` (the input ids, -100 on padding and on the
    image tokens, which are not predicted). ``images[i]``: prompt i's images (may be empty)."""
    flat = [img for imgs in images for img in imgs]
    kwargs: dict[str, Any] = {"text": list(texts), "return_tensors": "pt", "padding": True}
    if flat:
        kwargs["images"] = [list(imgs) for imgs in images]
    batch = dict(processor(**kwargs))
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    if "token_type_ids" in batch:
        labels[batch["token_type_ids"] != 0] = -100
    else:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    batch["labels"] = labels
    return batch


def vlm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross entropy of a vision-language ``model`` on a :func:`vlm_batch`."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = logits_of(model(**inputs)).float()
    labels = batch["labels"].to(logits.device)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
