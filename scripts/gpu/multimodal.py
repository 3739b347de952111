"""Multimodal rollouts on a real engine: a vision-language policy trained one step with FSDP2 on
one rank, pushed into the engine, generating with images; the generations after the push must
equal those of a fresh engine built from the saved trained weights.

    # on the GPU machine (source scripts/gpu-env.sh first; vLLM or SGLang on the path, not both)
    PYTHONPATH=/tmp/site:/tmp/vsite python3 scripts/gpu/multimodal.py --engine vllm --out $OUT/mm-vllm --budget-s 240
    PYTHONPATH=/tmp/site:/tmp/ssite python3 scripts/gpu/multimodal.py --engine sglang --out $OUT/mm-sglang --budget-s 240
    # CPU dry run (the hf engine, gloo, fp32)
    uv run python scripts/gpu/multimodal.py --engine hf --device cpu --size tiny --out /tmp/mm-hf --budget-s 300

The model is ``lightrft.testing.make_tiny_vlm`` (Gemma 3: SigLIP vision tower + Gemma 3 decoder,
random weights, a BPE tokenizer trained locally; ``--size small`` widens it to 256 / 128 hidden so
every attention head is 64 wide). One batch mixes prompts with one, two and three images and a
text-only prompt. Checks (each a row of the table, all must pass):

1. ``push_changes_outputs``: greedy generations after the step and the push differ from those before
   (at least one prompt's tokens, or its first token's log-prob by more than ``LOGPROB_CHANGED``).
2. ``pushed_equals_fresh``: the pushed engine's generations equal, token for token, those of a
   fresh engine built from ``save_model``'s directory (weights in the hub layout, the processor
   beside them; the engine builds its own processor from there: SGLang without
   ``skip_tokenizer_init``). The fresh engine runs in a child process of this script
   (``--fresh-from DIR``: same settings, same prompts, same sampling; it writes its tokens to a
   JSON file): vLLM allows one sleep-mode engine per process, and the one this process built is
   parked for reuse (``lightrft.engines._vllm_process``); reusing it would load the checkpoint
   through the same push path the check is meant to test, so it would not be a fresh engine.
3. ``vision_tower_pushed``: pushing the same weights with only the vision tower perturbed changes
   an image prompt's generation (tokens or first log-prob) and leaves the text-only prompt's tokens
   unchanged; pushing the trained weights back restores ``pushed`` exactly.
4. ``images_change_outputs``: the same prompts with other images (each image's colour changed)
   change an image prompt's generation: the images reach the model at all (SGLang 0.5.16 keeps
   multimodal off for Gemma 3 unless ``enable_multimodal=True``, and then drops the images without
   a word; the engine's multimodal state is logged after its start).
5. ``bad_input_errors``: an image count that does not match the placeholders and a prompt too long
   for ``max_model_len`` are refused naming the prompt, before the engine is called.

Writes ``<out>/multimodal_<engine>.json`` (results, versions, timings) and ``<out>/multimodal_<engine>.log``.
Exit status: 0 when every check passed, 1 when one failed, 3 when the budget ran out first.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# The engine's start-up costs (s), to skip a phase the budget cannot hold (vLLM: 56.7 s measured on
# the H200, 2026-12-03; SGLang 36-100 s).
ENGINE_START_S = {"hf": 5.0, "vllm": 60.0, "sglang": 100.0}
# A child process for the fresh engine: the imports (17.5 s before the first line on the H200 with
# vLLM on the path), the engine start, one generation (2.9 s the first time) and the exit.
CHILD_EXTRA_S = {"hf": 25.0, "vllm": 30.0, "sglang": 35.0}
#: Environment of the torch.distributed group this process started (setup_distributed sets them
#: when it runs alone): the child starts its own group, on its own free port.
_GROUP_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class Budget(Exception):
    """The time budget ran out before a phase."""


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.log_path = self.out / f"multimodal_{args.engine}.log"
        self.log_file = self.log_path.open("w")
        self.results: dict[str, Any] = {
            "engine": args.engine,
            "device": args.device,
            "size": args.size,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "checks": {},
            "timings_s": {},
            "status": "running",
        }

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def need(self, seconds: float, what: str) -> None:
        left = self.args.budget_s - (time.monotonic() - self.t0)
        if left < seconds:
            raise Budget(f"{what} needs ~{seconds:.0f} s, {left:.0f} s of the budget left")

    def timed(self, name: str, fn: Any) -> Any:
        t = time.monotonic()
        value = fn()
        self.results["timings_s"][name] = round(time.monotonic() - t, 2)
        self.log(f"{name}: {self.results['timings_s'][name]} s")
        return value

    def check(self, name: str, ok: bool, detail: Any) -> None:
        self.results["checks"][name] = {"ok": bool(ok), "detail": detail}
        self.log(f"check {name}: {'PASS' if ok else 'FAIL'} {detail}")

    def write(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        path = self.out / f"multimodal_{self.args.engine}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        os.replace(tmp, path)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for mod in ("torch", "transformers", "vllm", "sglang", "PIL"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:  # noqa: BLE001 - absent is a fact to record
            out[mod] = "absent"
    import torch

    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return out


def build(size: str) -> tuple[Any, Any]:
    from lightrft.testing import make_tiny_vlm

    if size == "tiny":
        model, processor = make_tiny_vlm(seed=0)
    else:
        model, processor = make_tiny_vlm(
            seed=0, hidden_size=256, num_layers=4, vision_hidden_size=128, vision_layers=2
        )
    # Random weights give near-uniform logits (log-probs within ~0.01 of each other), in which an
    # image barely moves a log-prob: scaling the (tied) embeddings by 3 scales the logits by 3,
    # so a change of the vision tower shows far above bf16 rounding.
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(3.0)
    return model, processor


def rollout_batch() -> tuple[list[str], list[Any], list[int]]:
    """Prompts with 1, 2, 0 and 3 images (LightRFT's flat ``all_images`` + ``images_num``)."""
    from lightrft.testing import IMAGE_PLACEHOLDER as P
    from lightrft.testing import make_color_image as img

    prompts = [
        f"{P} what colour is the image ?",
        f"{P} and {P} describe both images :",
        "what colour is the image ?",
        f"{P} {P} {P} name the colour :",
    ]
    images = [img("red"), img("blue"), img("green"), img("yellow"), img("red", seed=1), img("blue", seed=2)]
    return prompts, images, [1, 2, 0, 3]


#: The text tokenizer of the model's processor (set once the model is built).
TOKENIZER: Any = None


#: Log-probs of the first generated token of the image prompts, with and without the vision tower
#: perturbed (or before and after the step), must differ by more than this to count as changed.
#: bf16 keeps 8 bits of mantissa: a logit of magnitude <= 16 (far above what these models produce)
#: is rounded by <= 16 * 2**-9 = 0.031, a log-prob (logit minus logsumexp) by at most twice that,
#: 0.0625; 0.1 is above it.
LOGPROB_CHANGED = 0.1


def generate(
    strategy: Any,
    prompts: list[str],
    images: list[Any],
    nums: list[int],
    new_tokens: int,
    logprobs: bool = False,
) -> Any:
    """Greedy generations in LightRFT's call form (token ids and texts; images flat + counts):
    each prompt's tokens (with ``logprobs``: and the first token's log-prob)."""
    from lightrft.strategy import SamplingParams

    ids = [TOKENIZER.encode(p) for p in prompts]
    outs = strategy.gather_and_generate(
        SamplingParams(max_new_tokens=new_tokens, temperature=0.0, logprobs=logprobs),
        all_prompt_token_ids=ids,
        all_prompts=prompts,
        all_images=images,
        sleep_engine=False,
        images_num=nums,
    )
    if logprobs:
        return [list(o.output_token_ids) for o in outs], [o.logprobs[0] for o in outs]
    return [list(o.output_token_ids) for o in outs]


def rewrite_hub_layout(directory: Path, model: Any) -> int:
    """Rewrites the saved safetensors with the hub-layout names the engines load (what the push
    sends); returns the number of renamed tensors."""
    from safetensors.torch import load_file, save_file

    from lightrft.engines._common import engine_name_map

    rename = engine_name_map(model)
    changed = 0
    for f in sorted(directory.glob("*.safetensors")):
        state = load_file(str(f))
        new = {rename(k) if rename else k: v for k, v in state.items()}
        changed += sum(1 for k in state if (rename(k) if rename else k) != k)
        save_file(new, str(f), metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.is_file() and rename:
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    return changed


def strategy_config(args: argparse.Namespace) -> dict[str, Any]:
    """The strategy (and engine) settings: the same in this process and in the fresh engine's."""
    return {
        "strategy": "fsdp",
        "engine_type": args.engine,
        "bf16": args.device == "cuda",
        "seed": 7,
        "train_batch_size": 4,
        "micro_train_batch_size": 4,
        "engine_max_model_len": 256,
        "engine_mem_util": 0.3,
        "engine_enforce_eager": True,
        "weight_sync_bucket_mb": 8,
        "limit_mm_per_prompt": 4,
    }


def fresh_child(args: argparse.Namespace) -> int:
    """``--fresh-from DIR``: a fresh engine from the saved directory (its processor from there too),
    the rollout batch generated greedily, the tokens written to ``--out``/fresh.json."""
    from transformers import AutoProcessor

    from lightrft.strategy import get_strategy

    global TOKENIZER
    t0 = time.monotonic()
    strategy = get_strategy(strategy_config(args))
    strategy.setup_distributed()
    processor = AutoProcessor.from_pretrained(args.fresh_from)
    TOKENIZER = processor.tokenizer
    t = time.monotonic()
    strategy.setup_inference_engine(model_path=str(args.fresh_from), tokenizer=processor)
    start_s = time.monotonic() - t
    prompts, images, nums = rollout_batch()
    t = time.monotonic()
    tokens = generate(strategy, prompts, images, nums, args.new_tokens)
    gen_s = time.monotonic() - t
    strategy.engine_lifecycle.shutdown()
    out = Path(args.out) / "fresh.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    timings = {"engine_start": round(start_s, 2), "generate": round(gen_s, 2)}
    timings["before_exit"] = round(time.monotonic() - t0, 2)
    out.write_text(json.dumps({"tokens": tokens, "timings_s": timings}))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def run_fresh_child(run: Run, save_dir: Path) -> list[list[int]]:
    """Runs :func:`fresh_child` in a new process within what is left of the budget; its tokens."""
    import signal
    import subprocess

    args = run.args
    out = run.out / f"fresh-{args.engine}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fresh-from", str(save_dir), "--out", str(out)]
    cmd += ["--engine", args.engine, "--device", args.device, "--size", args.size]
    cmd += ["--new-tokens", str(args.new_tokens)]
    env = {k: v for k, v in os.environ.items() if k not in _GROUP_ENV}
    left = args.budget_s - (time.monotonic() - run.t0) - 5.0  # 5 s to write the results after it
    log = (run.out / f"fresh_{args.engine}.log").open("w")
    # In this process's group: a `timeout` around this script (scripts/gpu/sitting.sh) reaches it.
    child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        code = child.wait(timeout=max(left, 1.0))
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGTERM)  # its engine's own processes go with it (SGLang's watch it)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise Budget(f"the fresh engine's process ran past the budget ({left:.0f} s left for it)") from None
    finally:
        log.close()
    if code != 0:
        tail = (run.out / f"fresh_{args.engine}.log").read_text()[-2000:]
        raise RuntimeError(f"the fresh engine's process exited {code}; its log ends:\n{tail}")
    data = json.loads((out / "fresh.json").read_text())
    for k, v in data["timings_s"].items():
        run.results["timings_s"][f"fresh_{k}"] = v
    return [list(t) for t in data["tokens"]]


def main_run(run: Run) -> bool:
    import torch

    from lightrft.strategy import get_strategy
    from lightrft.testing import make_color_image, vlm_batch, vlm_loss

    args = run.args
    on_gpu = args.device == "cuda"
    run.results["versions"] = versions()
    run.log(f"versions: {run.results['versions']}")
    strategy = get_strategy(strategy_config(args))
    strategy.setup_distributed()
    global TOKENIZER
    model, processor = run.timed("build_model", lambda: build(args.size))
    TOKENIZER = processor.tokenizer
    run.results["parameters"] = sum(p.numel() for p in model.parameters())
    engine_model = copy.deepcopy(model)
    actor = strategy.prepare_model(model, is_training=True)
    optim = strategy.create_optimizer(actor, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    actor, optim, _ = strategy.prepare((actor, optim, None))
    from torch.distributed.fsdp import FSDPModule

    units = sorted(
        {type(m).__name__ for m in actor.modules() if isinstance(m, FSDPModule) and m is not actor}
    )
    run.results["fsdp_units"] = units
    run.log(f"FSDP unit classes: {units}")

    prompts, images, nums = rollout_batch()
    run.need(ENGINE_START_S[args.engine] + 30, "engine start")
    run.timed(
        "engine_start", lambda: strategy.setup_inference_engine(model=engine_model, tokenizer=processor)
    )
    sgl = getattr(strategy.inference_engine, "engine", None)
    if args.engine == "sglang" and sgl is not None:
        manager = getattr(sgl, "tokenizer_manager", None)
        run.results["sglang_multimodal"] = {
            "enable_multimodal": getattr(getattr(sgl, "server_args", None), "enable_multimodal", "?"),
            "mm_processor": type(getattr(manager, "mm_processor", None)).__name__,
        }
        run.log(f"SGLang multimodal: {run.results['sglang_multimodal']}")
    before, lp_before = run.timed(
        "generate_before", lambda: generate(strategy, prompts, images, nums, args.new_tokens, logprobs=True)
    )
    run.log(f"before: {before}")

    # One optimizer step on image+text batches (each colour's image with its name as the answer).
    from lightrft.testing import IMAGE_PLACEHOLDER as P

    colours = ["red", "green", "blue", "yellow"]
    texts = [f"{P} what colour is the image ? {c}" for c in colours]
    batch = vlm_batch(processor, texts, [[make_color_image(c, seed=i)] for i, c in enumerate(colours)])
    device = strategy.device
    batch = {k: v.to(device) for k, v in batch.items()}

    def step() -> float:
        loss = vlm_loss(actor, batch)
        strategy.backward(loss, actor, optim)
        strategy.optimizer_step(optim, actor, None)
        return float(loss.detach())

    run.results["loss"] = run.timed("train_step", step)
    run.timed("push", lambda: strategy.update_engine_weights(actor))
    pushed, lp_pushed = run.timed(
        "generate_pushed", lambda: generate(strategy, prompts, images, nums, args.new_tokens, logprobs=True)
    )
    run.log(f"pushed: {pushed}")
    moved = [
        i
        for i in range(len(prompts))
        if pushed[i] != before[i] or abs(lp_pushed[i] - lp_before[i]) > LOGPROB_CHANGED
    ]
    run.check(
        "push_changes_outputs",
        bool(moved),
        {
            "prompts_changed": moved,
            "first_logprob_before_vs_pushed": [
                (round(a, 4), round(b, 4)) for a, b in zip(lp_before, lp_pushed)
            ],
        },
    )

    # The images reach the model: other images (other colours), the same prompts and weights.
    others = [make_color_image(c) for c in ("green", "yellow", "red", "blue", "green", "yellow")]
    swapped, lp_swapped = generate(strategy, prompts, others, nums, args.new_tokens, logprobs=True)
    moved_by_images = [
        i
        for i, k in enumerate(nums)
        if k and (swapped[i] != pushed[i] or abs(lp_swapped[i] - lp_pushed[i]) > LOGPROB_CHANGED)
    ]
    run.check(
        "images_change_outputs",
        bool(moved_by_images) and all(swapped[i] == pushed[i] for i, k in enumerate(nums) if not k),
        {
            "image_prompts_changed": moved_by_images,
            "first_logprob_pushed_vs_other_images": [
                (round(a, 4), round(b, 4)) for a, b in zip(lp_pushed, lp_swapped)
            ],
        },
    )

    # Bad input, refused before the engine runs.
    errors: dict[str, str] = {}
    for name, call in {
        "count_mismatch": lambda: generate(strategy, prompts, images, [2, 1, 0, 3], 2),
        "too_long": lambda: generate(
            strategy, [" ".join([P] * 4) + " x" * 300], [make_color_image("red")] * 4, [4], 2
        ),
    }.items():
        try:
            call()
            errors[name] = "no error"
        except ValueError as e:
            errors[name] = str(e)[:200]
    run.check(
        "bad_input_errors",
        errors["count_mismatch"].startswith("prompt 0 has 1 image placeholder")
        and errors["too_long"].startswith("prompt 0"),
        errors,
    )

    # The vision tower is pushed: perturb only its weights, push, generate; then push back.
    def perturbed_buckets() -> Any:
        for bucket in strategy.iter_weight_buckets(
            actor, dtype=getattr(strategy.inference_engine, "weight_dtype", None)
        ):
            yield [
                (n, (t + torch.randn_like(t)) if "vision_tower" in n and t.is_floating_point() else t)
                for n, t in bucket
            ]

    engine = strategy.inference_engine
    torch.manual_seed(0)
    run.timed("push_perturbed_vision", lambda: engine.update_weights(perturbed_buckets()))
    if hasattr(engine, "reset_prefix_cache") and not getattr(engine, "resets_prefix_cache_on_update", False):
        engine.reset_prefix_cache()
    vision_off, lp_off = generate(strategy, prompts, images, nums, args.new_tokens, logprobs=True)
    strategy.update_engine_weights(actor)
    restored, lp_restored = generate(strategy, prompts, images, nums, args.new_tokens, logprobs=True)
    image_prompts = [i for i, k in enumerate(nums) if k]
    text_prompts = [i for i, k in enumerate(nums) if not k]
    changed = [
        i
        for i in image_prompts
        if vision_off[i] != restored[i] or abs(lp_off[i] - lp_restored[i]) > LOGPROB_CHANGED
    ]
    run.check(
        "vision_tower_pushed",
        bool(changed) and all(vision_off[i] == restored[i] for i in text_prompts) and restored == pushed,
        {
            "image_prompts_changed": changed,
            "first_logprob_off_vs_restored": [
                (round(a, 4), round(b, 4)) for a, b in zip(lp_off, lp_restored)
            ],
            "text_prompts_unchanged": all(vision_off[i] == restored[i] for i in text_prompts),
            "restored_equals_pushed": restored == pushed,
        },
    )

    # A fresh engine from the saved trained weights.
    save_dir = run.out / f"trained-{args.engine}"
    run.timed("save_model", lambda: strategy.save_model(actor, save_dir, tokenizer=processor))
    # The server engines load the hub layout their push sends; the hf engine loads with
    # transformers, which reads the layout save_model wrote (the hub names would be left unloaded).
    if args.engine != "hf":
        run.results["renamed_for_hub_layout"] = rewrite_hub_layout(save_dir, engine_model)
    # The engine's device memory goes back (vLLM: parked asleep at level 2, nothing held) before the
    # fresh engine starts in its own process.
    strategy.engine_lifecycle.shutdown()
    if on_gpu:
        torch.cuda.empty_cache()
    run.need(ENGINE_START_S[args.engine] + CHILD_EXTRA_S[args.engine], "fresh engine (child process)")
    fresh = run.timed("fresh_engine_process", lambda: run_fresh_child(run, save_dir))
    run.log(f"fresh: {fresh}")
    run.check(
        "pushed_equals_fresh",
        fresh == pushed,
        {"differing_prompts": [i for i, (a, b) in enumerate(zip(pushed, fresh)) if a != b]},
    )
    return all(c["ok"] for c in run.results["checks"].values())


def table(run: Run) -> None:
    rows = [(name, "PASS" if c["ok"] else "FAIL") for name, c in run.results["checks"].items()]
    rows += [(f"time {k}", f"{v:.1f} s") for k, v in run.results["timings_s"].items()]
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\nmultimodal on {run.args.engine} ({run.args.device}, {run.args.size}): {run.results['status']}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["vllm", "sglang", "hf"], required=True)
    parser.add_argument("--out", required=True, help="directory for the JSON results and the log")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop cleanly before this many seconds")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--fresh-from", type=Path, default=None, help=argparse.SUPPRESS
    )  # internal: the fresh engine's child process (run_fresh_child)
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        if args.engine != "hf":
            parser.error(
                "--device cpu runs the hf engine only (vLLM's VLM modules need torchvision, SGLang a GPU)"
            )
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if args.fresh_from is not None:
        return fresh_child(args)
    run = Run(args)
    code = 1
    try:
        ok = main_run(run)
        run.results["status"] = "passed" if ok else "failed"
        code = 0 if ok else 1
    except Budget as e:
        run.results["status"] = f"budget: {e}"
        run.log(str(e))
        code = 3
    except Exception as e:  # noqa: BLE001 - recorded, then a failing exit status
        run.results["status"] = f"error: {type(e).__name__}: {e}"
        run.log(traceback.format_exc())
        code = 1
    finally:
        run.write()
        table(run)
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        run.log_file.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
