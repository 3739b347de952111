"""What a new user of `uv add "lightrft-engines[hf]"` runs: the hf engine found through its entry
point, generating from a small Llama built from a config (no download). Exits 1 on a miss."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightrft.strategy import SamplingParams
from lightrft.strategy.registry import load_engine_class

torch.set_num_threads(1)
HFEngine = load_engine_class("hf")
assert HFEngine.__name__ == "HFEngine", HFEngine
config = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
engine = HFEngine(model=model)
prompts = [[5, 6, 7], [9, 10]]
outs = engine.generate(
    prompt_token_ids=prompts, sampling_params=SamplingParams(max_new_tokens=5, temperature=0.0)
)
# Greedy decoding of the same weights, by hand: the argmax of the last position, appended 5 times.
problems = []
for prompt, out in zip(prompts, outs):
    ids = list(prompt)
    for _ in range(5):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    if out.prompt_token_ids != prompt or list(out.output_token_ids) != ids[len(prompt) :]:
        problems.append(f"{prompt}: engine {out.output_token_ids}, by hand {ids[len(prompt) :]}")
engine.shutdown()
if problems:
    raise SystemExit("engine output differs: " + "; ".join(problems))
print(
    f"ok: hf engine from the lightrft.engines entry point, greedy outputs {[o.output_token_ids for o in outs]}"
)
