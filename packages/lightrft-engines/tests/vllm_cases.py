"""Shared pieces of the real-vLLM tests: a tiny Llama vLLM's CPU backend can run (head size 32),
a local word-level tokenizer (no hub), and the per-rank weight-sync case run under torchrun."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist

from lightrft.strategy import SamplingParams
from lightrft.testing import make_tiny_llama

VOCAB = 128
MAX_LEN = 96


def tiny_llama(seed: int = 0, tie: bool = False) -> Any:
    """Llama with 4 heads of size 32 (vLLM's CPU attention supports 32, not 16)."""
    model = make_tiny_llama(seed=seed, vocab_size=VOCAB, hidden_size=128)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    return model


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over "w0".."w124" plus <unk>, <s>, </s>, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


def prompts_for(rank: int) -> list[list[int]]:
    """Two prompts longer than a KV block (16 tokens), so prefix caching really caches them."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (24, 37)]


GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


def train_one_step(strategy: Any, model: Any, optim: Any, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed + strategy.get_rank())
    ids = torch.randint(3, VOCAB, (strategy.config.micro_train_batch_size, 32), generator=g)
    for _ in range(strategy.accumulated_gradient):
        out = model(input_ids=ids.to(strategy.device), labels=ids.to(strategy.device))
        strategy.backward(out.loss, model, optim)
        strategy.optimizer_step(optim, model, None)


def full_weights(strategy: Any, model: Any) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu().clone() for b in strategy.iter_weight_buckets(model) for n, t in b}


def sync_case(backend: str, zero_stage: int = 3, tie: bool = False, tp: int = 1) -> dict[str, Any]:
    """One rank: build the engine from the initial model, train a step, push, and generate; then a
    fresh engine from the trained weights generates the same prompts."""
    from lightrft.strategy import get_strategy

    cfg = {
        "strategy": backend,
        "zero_stage": zero_stage,
        "train_batch_size": 4,
        "micro_train_batch_size": 1,
        "bf16": False,
        "seed": 3,
        "engine_type": "vllm",
        "engine_max_model_len": MAX_LEN,
        "engine_enforce_eager": True,
        "weight_sync_bucket_mb": 1,
        "engine_tp_size": tp,
    }
    strategy = get_strategy(cfg)
    actor = tiny_llama(seed=1, tie=tie)
    engine_model = copy.deepcopy(actor)
    actor = strategy.prepare_model(actor)
    optim = strategy.create_optimizer(actor, lr=3e-2)
    actor, optim, _ = strategy.prepare((actor, optim, None))
    prompts = prompts_for(strategy.get_rank())
    strategy.setup_inference_engine(model=engine_model)
    before = strategy.gather_and_generate(
        prompt_token_ids=prompts, sampling_params=GREEDY, sleep_engine=False
    )
    train_one_step(strategy, actor, optim)
    strategy.update_engine_weights(actor)
    after = strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=GREEDY, sleep_engine=False)
    trained = full_weights(strategy, actor)
    strategy.engine_lifecycle.shutdown()
    # The training job's process group outlives the engine (vLLM's shutdown would destroy it).
    assert dist.is_initialized() and dist.get_world_size() == 2, "engine shutdown broke the process group"
    fresh_model = tiny_llama(seed=99, tie=tie)
    fresh_model.load_state_dict(trained, strict=False)
    strategy.setup_inference_engine(model=fresh_model)
    fresh = strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=GREEDY, sleep_engine=False)
    strategy.engine_lifecycle.shutdown()
    return {
        "before": [o.output_token_ids for o in before],
        "after": [o.output_token_ids for o in after],
        "fresh": [o.output_token_ids for o in fresh],
    }


#: The cases of ``test_two_gloo_ranks_push_equals_fresh_engine``: (backend, ZeRO stage, engine TP
#: size, tied embeddings).
SYNC_CASES = [("fsdp", 0, 1, False), ("deepspeed", 3, 1, True), ("fsdp", 0, 2, False)]


def case_id(backend: str, zero_stage: int, tp: int, tie: bool) -> str:
    return f"{backend}-{zero_stage}-{tp}-{tie}"


def sync_cases(cases: list[list[Any]]) -> dict[str, dict[str, Any]]:
    """One rank: :func:`sync_case` for each ``(backend, zero_stage, tp, tie)`` in turn, in one
    launch (each rank's imports of torch, vLLM and the backends cost ~10 s of CPU, more than a
    case's checks), by :func:`case_id`. Each case builds its own strategy, model and engines, and
    shuts its engines down before the next."""
    return {case_id(b, s, tp, tie): sync_case(b, zero_stage=s, tie=tie, tp=tp) for b, s, tp, tie in cases}
