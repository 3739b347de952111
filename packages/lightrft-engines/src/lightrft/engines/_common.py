"""Helpers shared by the server-class engines (vLLM, SGLang): tensor-parallel groups, prompt
normalisation and checks, a temporary Hugging Face directory to build an engine from, PEFT-merged
weight streams, allocator checks and say-once messages.

Nothing here imports an engine package; ``transformers`` is imported inside functions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightrft.strategy.engine import GenerationOutput, WeightBucket
from lightrft.strategy.hf_io import is_peft_model, original_class_name
from lightrft.strategy.utils import empty_device_cache as empty_device_cache  # the engines call it here

logger = logging.getLogger("lightrft.engines")

_said: set[str] = set()


def say_once(key: str, message: str, level: int = logging.WARNING) -> bool:
    """Logs ``message`` the first time ``key`` is seen in this process (rank 0 only when
    distributed); returns whether it was logged."""
    if key in _said:
        return False
    _said.add(key)
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.log(level, message)
    return True


# ------------------------------------------------------------------ tensor-parallel groups
def engine_tp_groups(
    tp_size: int, field: str = "engine_tp_size", backend: str | None = None
) -> tuple[Any, list[int]]:
    """The group of ``tp_size`` consecutive ranks that shares one engine with this rank.

    Every rank must call this (``new_group`` is collective). Returns ``(group, ranks)``; the group
    is None when ``tp_size`` is 1 (each rank has its own engine). Raises when ``tp_size`` does not
    divide the world size, naming both. ``backend``: the group's backend (None: the default
    group's; "gloo" for a group that only carries Python objects, as SGLang's does).
    """
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"StrategyConfig.{field}={tp_size!r} is invalid: it must be an integer >= 1")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world % tp_size != 0:
        raise ValueError(
            f"StrategyConfig.{field}={tp_size} does not divide the world size {world}: each engine "
            f"spans {field} consecutive ranks; valid values: "
            f"{[d for d in range(1, world + 1) if world % d == 0]}"
        )
    if tp_size == 1:
        return None, [rank]
    mine: Any = None
    ranks: list[int] = []
    for start in range(0, world, tp_size):
        group_ranks = list(range(start, start + tp_size))
        group = dist.new_group(group_ranks, backend=backend)
        if rank in group_ranks:
            mine, ranks = group, group_ranks
    return mine, ranks


# ------------------------------------------------------------------------------ prompts
def to_token_id_lists(
    prompts: Sequence[str] | None,
    prompt_token_ids: Sequence[Sequence[int]] | None,
    tokenizer: Any,
    engine: str,
) -> list[list[int]]:
    """Token ids of every prompt: ``prompt_token_ids`` as given, or ``prompts`` encoded with the
    tokenizer. Raises when neither (or no tokenizer for text) is given."""
    if prompt_token_ids is not None:
        out = []
        for i, ids in enumerate(prompt_token_ids):
            if isinstance(ids, (str, bytes)) or not all(isinstance(t, int) for t in ids):
                raise TypeError(
                    f"prompt_token_ids[{i}] must be a list of ints; got {type(ids).__name__}"
                    + (f" {ids[:3]!r}..." if isinstance(ids, (list, tuple)) else "")
                )
            out.append([int(t) for t in ids])
        return out
    if prompts is None:
        raise ValueError(f"{engine}.generate() needs prompts= (text) or prompt_token_ids=")
    if tokenizer is None:
        raise ValueError(
            f"{engine}.generate(prompts=...) needs a tokenizer: pass tokenizer= to "
            "strategy.setup_inference_engine, or pass prompt_token_ids="
        )
    return [list(tokenizer.encode(p)) for p in prompts]


def check_prompt_lengths(
    ids: Sequence[Sequence[int]], max_model_len: int | None, max_new_tokens: int
) -> None:
    """Raises for the first prompt that leaves no room to generate within ``max_model_len``,
    naming its index and length."""
    if max_model_len is None:
        return
    for i, p in enumerate(ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if len(p) >= max_model_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, which does not fit max_model_len={max_model_len} "
                f"(StrategyConfig.engine_max_model_len) with room to generate; shorten it or raise "
                "engine_max_model_len"
            )
    del max_new_tokens  # the engine truncates generation at max_model_len itself


def decode(tokenizer: Any, ids: Sequence[int]) -> str | None:
    return tokenizer.decode(list(ids)) if tokenizer is not None else None


def finish_reason(reason: Any) -> str | None:
    """``"stop"`` / ``"length"`` / engine-specific, as a plain string."""
    if reason is None:
        return None
    if isinstance(reason, dict):  # SGLang: {"type": "stop", ...}
        reason = reason.get("type")
    return str(reason)


def make_output(
    prompt_ids: Sequence[int],
    out_ids: Sequence[int],
    tokenizer: Any,
    logprobs: Sequence[float] | None,
    reason: Any,
) -> GenerationOutput:
    return GenerationOutput(
        list(prompt_ids),
        list(out_ids),
        decode(tokenizer, out_ids),
        None if logprobs is None else [float(x) for x in logprobs],
        finish_reason(reason),
    )


# ------------------------------------------------------------------- engine settings
def require_model(engine: str, model: Any, model_path: str | None) -> None:
    """Every engine is built from ``model=`` (a Hugging Face model, possibly sharded: its config is
    used and its weights are pushed) or ``model_path=`` (a Hugging Face directory); raises naming
    both when neither is given."""
    if model is None and model_path is None:
        raise ValueError(
            f"{engine} needs model= (a Hugging Face model, possibly sharded: the engine is built from "
            "its config and receives its weights) or model_path= (a Hugging Face directory)"
        )


def model_max_positions(model: Any) -> int | None:
    """``max_position_embeddings`` of the model's Hugging Face config (a vision-language model's
    language model's; None when it has none)."""
    config = getattr(base_hf_model(model), "config", None) if model is not None else None
    value = getattr(text_config(config), "max_position_embeddings", None)
    return int(value) if value is not None else None


def engine_max_len(cfg: Any, model: Any) -> int | None:
    """The engine's maximum prompt + completion length: ``StrategyConfig.engine_max_len`` (the rule
    lives next to ``engine_max_model_len``) with the model's ``max_position_embeddings``."""
    return cfg.engine_max_len(model_max_positions(model))


# ------------------------------------------------------------------- temporary HF directory
def base_hf_model(model: Any) -> Any:
    """The Hugging Face model under wrappers (DeepSpeed engine, DDP, compile, PEFT)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DeepSpeedEngine", "DistributedDataParallel"):
            model = model.module
        elif is_peft_model(model):
            model = model.get_base_model()
        else:
            return model


def is_sharded(model: Any) -> bool:
    """Whether ``model``'s parameters are shards (FSDP2 DTensors, ZeRO-3 partitions)."""
    for p in model.parameters():
        if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" or hasattr(p, "ds_id"):
            return True
    return False


def write_config_dir(model: Any, tokenizer: Any = None, directory: str | os.PathLike | None = None) -> Path:
    """A directory with the model's ``config.json`` (and ``generation_config.json`` and the
    tokenizer files when there are), no weights: engines load dummy weights from it and then
    receive the real ones through ``update_weights``. Works for sharded models (only the config is
    read). The caller removes the directory (:func:`remove_dir`)."""
    base = base_hf_model(model)
    config = getattr(base, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(
            f"cannot build an engine from {type(model).__name__}: it has no Hugging Face `config` "
            "(a PretrainedConfig); pass a transformers model"
        )
    path = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="lightrft-engine-"))
    path.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    cfg["architectures"] = [original_class_name(base)]
    dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        cfg["dtype"] = cfg["torch_dtype"]
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    gen = getattr(base, "generation_config", None)
    if gen is not None and hasattr(gen, "to_json_file"):
        gen.to_json_file(str(path / "generation_config.json"))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(path))
    return path


def remove_dir(path: str | os.PathLike | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------- weights
_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)")
_LORA_PART = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def hf_model_state_names(model: Any) -> list[str]:
    """Parameter names of the model under its wrappers (a PEFT model's base with its LoRA parts
    and ``base_layer`` names; tied ones once)."""
    return [n for n, _ in base_hf_model(model).named_parameters()]


def engine_weight_names(model: Any) -> set[str]:
    """The names a full push must cover once it reached the engine: ``model``'s parameters as
    :func:`merge_peft_stream` yields them (the one mapping of pushed names, used by every engine).
    For a PEFT LoRA model the ``lora_A`` / ``lora_B`` parts are merged away and ``.base_layer.``
    is dropped; a vision-language model's names are mapped by :func:`engine_name_map`; other
    models' names pass unchanged."""
    peft = bool(lora_scalings(model))
    rename = engine_name_map(model)  # a vision-language model's hub layout
    names = set()
    for name in hf_model_state_names(model):
        if peft and ".lora_" in name:
            continue
        name = peft_engine_name(name) if peft else name
        names.add(rename(name) if rename is not None else name)
    return names


def peft_engine_name(name: str) -> str:
    """A PEFT model's parameter name as the engine's base model has it (``base_model.model.`` and
    ``.base_layer.`` removed)."""
    return _PEFT_PREFIX.sub("", name).replace(".base_layer.", ".")


def lora_scalings(model: Any) -> dict[str, float]:
    """``adapter name -> lora_alpha / r`` of a PEFT model (empty for any other model)."""
    if not is_peft_model(model):
        return {}
    out = {}
    for name, cfg in model.peft_config.items():
        r = getattr(cfg, "r", None)
        alpha = getattr(cfg, "lora_alpha", None)
        if r:
            rs = getattr(cfg, "use_rslora", False)
            out[name] = float(alpha) / (r**0.5 if rs else r)
    return out


def push_dtype(engine_dtype: torch.dtype | None, model: Any) -> torch.dtype | None:
    """The dtype an engine asks the strategy to send its weights in (its ``weight_dtype``): the
    engine's own, except for a PEFT LoRA actor, whose weights come in the actor's own precision
    (None). The engine merges ``W + scale * B @ A`` itself (:func:`merge_peft_stream`) and rounds
    the merged weight once to its dtype when it loads it; cast first, ``W``, ``A`` and ``B`` are each
    rounded and the sum is rounded again, so the engine holds other weights than the merged model
    (1B Llama, LoRA r=8 on q_proj/v_proj, bf16: 42 % of those elements differ, the engine's checksum
    moves from 67,678.08 to 67,679.14; H200, 2026-12-03) and other weights than an engine built from
    the same actor (that one merges the actor's own tensors). Cost: a PEFT actor's push moves the
    actor's bytes (fp32 masters: twice bf16's)."""
    return None if lora_scalings(model) else engine_dtype


def merge_peft_stream(
    buckets: Iterable[WeightBucket], scalings: dict[str, float], active: str = "default"
) -> Iterator[WeightBucket]:
    """Turns buckets of a PEFT LoRA model's parameters into the base model's names with the LoRA
    deltas merged: ``W = W_base + scale * B @ A``. Tensors of one module may arrive in different
    buckets; a module's base weight is held back until its ``lora_A`` and ``lora_B`` came (at most
    one module's worth of extra memory per pending module). Names without PEFT parts pass through
    with ``base_model.model.`` removed."""
    pending: dict[str, dict[str, torch.Tensor]] = {}

    def strip(name: str) -> str:
        return _PEFT_PREFIX.sub("", name)

    def ready(module: str) -> tuple[str, torch.Tensor] | None:
        parts = pending[module]
        if {"base", "A", "B"} <= parts.keys():
            w = parts["base"]
            delta = (parts["B"].to(torch.float32) @ parts["A"].to(torch.float32)) * scalings.get(active, 1.0)
            del pending[module]
            return f"{module}.weight", (w.to(torch.float32) + delta.to(w.device)).to(w.dtype)
        return None

    for bucket in buckets:
        out: WeightBucket = []
        for name, t in bucket:
            name = strip(name)
            m = _LORA_PART.match(name)
            if m is not None:
                if m["adapter"] != active:
                    continue
                module = m["module"]
                pending.setdefault(module, {})[m["ab"]] = t
            elif name.endswith(".base_layer.weight"):
                module = name[: -len(".base_layer.weight")]
                pending.setdefault(module, {})["base"] = t
            else:
                out.append((peft_engine_name(name), t))
                continue
            done = ready(module)
            if done is not None:
                out.append(done)
        if out:
            yield out
    if pending:
        raise ValueError(
            f"PEFT weights incomplete for modules {sorted(pending)[:4]}: each LoRA module needs its "
            "base_layer.weight, lora_A and lora_B in the weight stream"
        )


# ------------------------------------------------------------------- multimodal
def text_config(config: Any) -> Any:
    """The language model's config of a vision-language config (``text_config``), else ``config``."""
    return getattr(config, "text_config", None) or config


def is_multimodal(model: Any) -> bool:
    """Whether ``model`` (a Hugging Face model, possibly wrapped or sharded) takes images: its
    config has a ``vision_config``."""
    config = getattr(base_hf_model(model), "config", None) if model is not None else None
    return getattr(config, "vision_config", None) is not None


def find_processor(tokenizer: Any, processor: Any = None) -> Any:
    """The Hugging Face processor (image processor + tokenizer) an engine was given: ``processor``,
    or ``tokenizer`` when it is one (LightRFT passes the processor as the tokenizer)."""
    if processor is not None:
        return processor
    return tokenizer if hasattr(tokenizer, "image_processor") else None


def text_tokenizer(tokenizer: Any) -> Any:
    """The text tokenizer of a processor (or ``tokenizer`` itself)."""
    return getattr(tokenizer, "tokenizer", None) or tokenizer


# Training-side (transformers >= 4.52) prefixes of a vision-language model -> the prefixes of the
# checkpoints on the Hugging Face hub, which vLLM's and SGLang's model classes load (vLLM also
# maps the new names itself; SGLang does not). Applied once per pushed name, at the engine.
_VLM_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
# Vision towers whose hub checkpoints nest the encoder under ``vision_model.`` (transformers 5
# builds some of them flat: ``vision_tower.embeddings...``).
_NESTED_VISION_MODELS = ("siglip_vision_model", "clip_vision_model")


def engine_name_map(model: Any) -> Any:
    """The name map (a function) from the training model's parameter names to the names vLLM's
    and SGLang's implementations of the model load, or None when the names pass unchanged (a
    text-only model). For a vision-language model: the hub checkpoint layout
    (``language_model.model.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
    ``language_model.lm_head.*``), from the layout of transformers >= 4.52 or the old one alike."""
    if model is None or not is_multimodal(model):
        return None
    config = base_hf_model(model).config
    vision_type = getattr(config.vision_config, "model_type", "")
    nest = vision_type in _NESTED_VISION_MODELS

    def rename(name: str) -> str:
        for old, new in _VLM_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        if nest and name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            name = "vision_tower.vision_model." + name[len("vision_tower.") :]
        return name

    return rename


def rename_stream(buckets: Iterable[WeightBucket], rename: Any) -> Iterator[WeightBucket]:
    """``buckets`` with every name passed through ``rename`` (None: unchanged)."""
    for bucket in buckets:
        yield bucket if rename is None else [(rename(n), t) for n, t in bucket]


def image_lists(multi_modal_inputs: Sequence[Any] | None, n_prompts: int) -> list[list[Any]] | None:
    """Each prompt's images (``multi_modal_inputs[i]["image"]``: one image or a list), or None when
    no prompt has one. Raises when the entries do not match the prompts or carry unknown keys."""
    if multi_modal_inputs is None:
        return None
    if len(multi_modal_inputs) != n_prompts:
        raise ValueError(
            f"multi_modal_inputs has {len(multi_modal_inputs)} entries for {n_prompts} prompts: give "
            "one per prompt (None where a prompt has no image)"
        )
    out: list[list[Any]] = []
    for i, mm in enumerate(multi_modal_inputs):
        if mm is None:
            out.append([])
            continue
        if not isinstance(mm, dict):
            raise TypeError(
                f"multi_modal_inputs[{i}] must be a dict like {{'image': [images]}} or None; got "
                f"{type(mm).__name__}"
            )
        unknown = sorted(set(mm) - {"image"})
        if unknown:
            raise ValueError(
                f"multi_modal_inputs[{i}] has keys {unknown}: only 'image' is supported (videos are not)"
            )
        img = mm.get("image")
        out.append([] if img is None else list(img) if isinstance(img, (list, tuple)) else [img])
    return out if any(out) else None


def image_placeholder(processor: Any) -> str | None:
    """The text that stands for one image in a prompt of ``processor``'s model (None: no processor,
    or one that names none). Gemma 3's processor expands its begin-of-image token (``boi_token``)
    into begin, soft tokens and end; transformers 5.19 sets its ``image_token`` to that token, 5.12
    to the soft token the expansion repeats (the version SGLang 0.5.16 pins). So ``boi_token``
    first, then ``image_token`` (LLaVA's ``<image>``, Qwen2-VL's pad token, ...)."""
    for attr in ("boi_token", "image_token"):
        token = getattr(processor, attr, None)
        if isinstance(token, str) and token:
            return token
    return None


def check_images(
    images: list[list[Any]] | None,
    prompts: Sequence[str] | None,
    *,
    multimodal: bool,
    placeholder: str | None,
    model_name: str,
) -> None:
    """Refuses, naming the prompt: images for a text-only model, images without text prompts, and
    a prompt whose count of image placeholders differs from its number of images."""
    if images is None:
        return
    first = next(i for i, imgs in enumerate(images) if imgs)
    if not multimodal:
        raise ValueError(
            f"prompt {first} has {len(images[first])} image(s), but the engine's model {model_name} is "
            "text-only (its config has no vision_config): pass no images, or build the engine from a "
            "vision-language model"
        )
    if prompts is None:
        raise ValueError(
            f"prompt {first} has images: multimodal generation needs the text prompts (prompts= / "
            "all_prompts=) with their image placeholders, not token ids"
        )
    if placeholder is None:
        return
    for i, (text, imgs) in enumerate(zip(prompts, images)):
        found = text.count(placeholder)
        if found != len(imgs):
            raise ValueError(
                f"prompt {i} has {found} image placeholder(s) {placeholder!r} but {len(imgs)} image(s) "
                f"were given for it (images_num[{i}]={len(imgs)}): put one {placeholder!r} in the text "
                "per image"
            )


def check_multimodal_lengths(
    processor: Any,
    prompts: Sequence[str],
    images: list[list[Any]],
    max_model_len: int | None,
) -> list[list[int]] | None:
    """The expanded token ids of each prompt with images (the processor inserts the image tokens),
    None for a prompt without; raises, naming the prompt, when one does not fit ``max_model_len``
    with room to generate. Nothing is computed when ``max_model_len`` is None."""
    if max_model_len is None or processor is None:
        return None
    out: list[list[int] | None] = []
    for i, (text, imgs) in enumerate(zip(prompts, images)):
        if not imgs:
            out.append(None)
            continue
        ids = list(processor(text=[text], images=[imgs], return_tensors="pt")["input_ids"][0].tolist())
        if len(ids) >= max_model_len:
            raise ValueError(
                f"prompt {i} with its {len(imgs)} image(s) takes {len(ids)} tokens once the processor "
                f"inserted the image tokens, which does not fit max_model_len={max_model_len} "
                "(StrategyConfig.engine_max_model_len) with room to generate; use fewer or smaller "
                "images, or raise engine_max_model_len"
            )
        out.append(ids)
    return out  # type: ignore[return-value]
