"""The helpers the vllm and sglang engines share (no engine needed)."""

from __future__ import annotations

import json

import pytest
import torch

from lightrft.engines import _common


def test_peft_lora_stream_is_merged_into_base_names_across_buckets():
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(6, 4, generator=g), torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g)
    bias = torch.randn(6, generator=g)
    p = "base_model.model.model.layers.0.self_attn.q_proj"
    buckets = [
        [(f"{p}.base_layer.weight", w), (f"{p}.lora_A.default.weight", a)],
        [(f"{p}.base_layer.bias", bias), ("base_model.model.lm_head.weight", w)],
        [(f"{p}.lora_B.default.weight", b), (f"{p}.lora_A.other.weight", a)],
    ]
    out = dict(x for bucket in _common.merge_peft_stream(buckets, {"default": 0.5}) for x in bucket)
    assert sorted(out) == [
        "lm_head.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.q_proj.weight",
    ]
    # Bitwise: merge_peft_stream computes w + (B @ A) * scaling in float32, the same ops in the same
    # order as here (a 2-term inner product per element, then a product by 0.5, which is exact).
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], w + (b @ a) * 0.5)
    assert torch.equal(out["model.layers.0.self_attn.q_proj.bias"], bias)


def test_peft_stream_missing_a_lora_part_is_an_error():
    p = "base_model.model.layers.0.q"
    with pytest.raises(ValueError, match="PEFT weights incomplete for modules \\['layers.0.q'\\]"):
        list(_common.merge_peft_stream([[(f"{p}.base_layer.weight", torch.zeros(2, 2))]], {"default": 1.0}))


def test_lora_scalings_reads_alpha_over_r():
    class Cfg:
        r, lora_alpha, use_rslora = 8, 16, False

    class Peft:
        peft_config = {"default": Cfg()}
        base_model = None

        def save_pretrained(self):
            pass

    assert _common.lora_scalings(Peft()) == {"default": 2.0}
    assert _common.lora_scalings(torch.nn.Linear(2, 2)) == {}


def test_prompt_checks_name_the_index():
    with pytest.raises(ValueError, match="prompt 2 has 10 tokens.*max_model_len=10"):
        _common.check_prompt_lengths([[1], [1, 2], list(range(10))], 10, 4)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        _common.check_prompt_lengths([[]], 10, 4)
    with pytest.raises(TypeError, match=r"prompt_token_ids\[1\] must be a list of ints"):
        _common.to_token_id_lists(None, [[1], "ab"], None, "E")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        _common.to_token_id_lists(["hi"], None, None, "E")


def test_tp_group_size_must_divide_the_world():
    assert _common.engine_tp_groups(1) == (None, [0])
    with pytest.raises(
        ValueError, match="engine_tp_size=3 does not divide the world size 1.*valid values: \\[1\\]"
    ):
        _common.engine_tp_groups(3)


def test_config_dir_has_config_and_no_weights(tmp_path):
    pytest.importorskip("transformers")
    from lightrft.testing import make_tiny_llama

    path = _common.write_config_dir(make_tiny_llama(seed=0), directory=tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_size"] == 64
    assert cfg["torch_dtype"] == "float32"
    assert not list(path.glob("*.safetensors"))
    with pytest.raises(ValueError, match="has no Hugging Face `config`"):
        _common.write_config_dir(torch.nn.Linear(2, 2), directory=tmp_path / "x")
