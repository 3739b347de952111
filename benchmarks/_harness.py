"""What the two overhead benchmarks share: models, the implementation under test, and the
interleaved timing of several training-step variants in one process.

Method (each configuration = one model, one backend setting):

1. Setup, variant by variant: build the model from the same seed, wrap it, run ``--warmup``
   steps. Its *persistent* memory is what stays allocated afterwards (parameters, optimizer
   states, buffers) above what was allocated before it was built.
2. Timed rounds: every variant runs one block of ``--block`` steps, the variants back to back,
   the order alternating (ABBA...). A block starts after ``cuda.synchronize()`` and a barrier
   and ends with ``cuda.synchronize()``; its time is the slowest rank's. Python's garbage
   collector runs between blocks, never inside one. The peak-memory counter is reset before
   each block; the block's *transient* peak is ``max_memory_allocated`` minus what was
   allocated when it started.
3. Rounds continue until ``--seconds`` of timed rounds have passed (decided from the clock
   only, never from the ratios; an even number of rounds, at least ``--min-rounds``), or
   exactly ``--rounds`` when that is given.
4. Per non-raw variant: the paired ratios ``t_variant / t_raw`` of each round
   (:mod:`_stats`), and the peak-memory ratio ``(persistent + max transient)`` against raw's,
   max over ranks. The losses of the same step of each variant are compared (same init, same
   data: a check that the variants do the same training).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _stats import paired_ratio_summary, step_time_summary

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

#: Llama shapes. ``small`` is the model of the earlier figures (271M untied); ``1b`` is a
#: TinyLlama-like 0.95B; ``tiny`` is the CPU smoke-test model (gloo, no timing meaning).
MODELS: dict[str, dict[str, int]] = {
    "small": {
        "hidden_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "intermediate_size": 2816,
    },
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "intermediate_size": 5632,
    },
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
}
VOCAB = {"small": 32000, "1b": 32000, "tiny": 256}


def add_common_args(parser: Any) -> None:
    """The flags both benchmarks take (``--impl-path`` is read before lightrft is imported)."""
    default_models = "small,1b" if CUDA else "tiny"
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for the JSON and table")
    parser.add_argument(
        "--impl-path",
        default=None,
        help="root of a source tree (or export) whose packages/*/src provide lightrft; default: installed",
    )
    parser.add_argument("--label", default=None, help="name of the implementation in tables (before/after)")
    parser.add_argument("--models", default=default_models, help=f"comma list of {sorted(MODELS)}")
    parser.add_argument("--variants", default="raw,strategy", help="comma list; 'raw' is the reference")
    parser.add_argument(
        "--micro-batch",
        default="8" if CUDA else "2",
        help="sequences per GPU per step: one number for every model, or per model, e.g. small=48,1b=24",
    )
    parser.add_argument("--seq", type=int, default=1024 if CUDA else 32)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant after setup")
    parser.add_argument("--block", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--seconds", type=float, default=18.0, help="timed seconds per configuration")
    parser.add_argument("--rounds", type=int, default=0, help="exact number of rounds (0: by --seconds)")
    parser.add_argument("--min-rounds", type=int, default=8)
    parser.add_argument("--max-rounds", type=int, default=400)


def check_args(args: Any, known_variants: tuple[str, ...]) -> None:
    """Clear errors for bad flags (name, value, what is valid)."""
    for m in args.models.split(","):
        if m not in MODELS:
            raise SystemExit(f"--models: {m!r} is not a model; valid: {', '.join(MODELS)}")
    names = args.variants.split(",")
    for v in names:
        if v not in known_variants:
            raise SystemExit(f"--variants: {v!r} is not a variant; valid: {', '.join(known_variants)}")
    if "raw" not in names or len(names) < 2 or len(set(names)) != len(names):
        raise SystemExit(
            f"--variants={args.variants!r} is invalid: name 'raw' and at least one other, once each"
        )
    for m in args.models.split(","):
        micro_batch_for(args, m)  # raises a clear error for a bad --micro-batch
    for flag in ("seq", "block", "min_rounds", "max_rounds"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')}={getattr(args, flag)} is invalid: must be >= 1")
    if args.warmup < 1:
        raise SystemExit(
            f"--warmup={args.warmup} is invalid: at least 1 step (allocator, lazy optimizer state)"
        )
    if args.rounds and args.rounds < 4:
        raise SystemExit(
            f"--rounds={args.rounds} is invalid: at least 4 rounds for an interval (0: by --seconds)"
        )
    if args.min_rounds < 4:
        raise SystemExit(f"--min-rounds={args.min_rounds} is invalid: at least 4 rounds for an interval")


def micro_batch_for(args: Any, preset: str) -> int:
    """``--micro-batch`` for one model: ``8`` (every model) or ``small=48,1b=24`` (per model)."""
    spec = str(args.micro_batch)
    try:
        if "=" not in spec:
            value = int(spec)
        else:
            table = {k.strip(): int(v) for k, v in (item.split("=", 1) for item in spec.split(","))}
            if preset not in table:
                raise SystemExit(f"--micro-batch={spec!r} is invalid: it names no value for model {preset!r}")
            value = table[preset]
    except ValueError:
        raise SystemExit(
            f"--micro-batch={spec!r} is invalid: a whole number or model=number pairs, e.g. small=48,1b=24"
        ) from None
    if value < 1:
        raise SystemExit(f"--micro-batch={spec!r} is invalid: must be >= 1 for model {preset!r}")
    return value


def args_for_model(args: Any, preset: str) -> Any:
    """A copy of ``args`` whose ``micro_batch`` is that model's (an int)."""
    import argparse

    return argparse.Namespace(**{**vars(args), "micro_batch": micro_batch_for(args, preset)})


# ---------------------------------------------------------------------------- implementation
def use_impl(impl_path: str | None, label: str | None) -> dict[str, Any]:
    """Puts ``impl_path/packages/*/src`` first on ``sys.path`` (before lightrft is imported), so
    the strategy code under test is that tree's. Returns what identifies it."""
    if any(name == "lightrft" or name.startswith("lightrft.") for name in sys.modules):
        raise RuntimeError("use_impl() must run before anything imports lightrft")
    info: dict[str, Any] = {"label": label or ("installed" if impl_path is None else Path(impl_path).name)}
    if impl_path is None:
        return info
    root = Path(impl_path).resolve()
    srcs = sorted(root.glob("packages/*/src"))
    if not srcs:
        raise SystemExit(f"--impl-path={impl_path!r} is invalid: no packages/*/src under {root}")
    sys.path[:0] = [str(s) for s in srcs]
    digest = hashlib.sha256()
    for f in sorted(p for s in srcs for p in s.rglob("*.py")):
        digest.update(str(f.relative_to(root)).encode())
        digest.update(f.read_bytes())
    info.update({"path": str(root), "sources_sha256": digest.hexdigest()[:16]})
    rev = root / "REVISION"
    if rev.is_file():
        info["revision"] = rev.read_text().strip()
    return info


def loaded_from(*modules: str) -> dict[str, str]:
    """The files the named modules were imported from (proof of which tree ran)."""
    out = {}
    for name in modules:
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__file__", "?") if mod else "not imported"
    return out


# ----------------------------------------------------------------------------------- models
def build_model(preset: str, seq: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (fp32, untied head, SDPA) on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = MODELS[preset]
    config = LlamaConfig(
        vocab_size=VOCAB[preset],
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=seq,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        **shape,
    )
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config)
    model = model.float()
    model.train()
    return model


def make_batches(preset: str, micro_batch: int, seq: int, n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + dist.get_rank())
    return [torch.randint(0, VOCAB[preset], (micro_batch, seq), generator=g).to(DEVICE) for _ in range(n)]


# ---------------------------------------------------------------------------------- timing
def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if CUDA else 0


def free_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@dataclass
class Variant:
    """One way of training: ``step(batch)`` runs a full training step and returns the loss."""

    name: str
    step: Callable[[torch.Tensor], torch.Tensor]
    keep: list[Any] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], Any] = lambda: None
    """Releases what the variant built (a DeepSpeed engine must be destroyed)."""
    persistent_bytes: int = 0
    block_times: list[float] = field(default_factory=list)
    enqueue: list[float] = field(default_factory=list)
    """Per block: the time until the Python loop has queued its last kernel / the block's wall
    time. Near 1 for ``raw`` (which never waits for the GPU inside a block): the step is
    host-bound (the GPU waits for launches), so host jitter, not GPU work, sets the step time."""
    transient_peaks: list[int] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    steps_done: int = 0

    def run(self, batches: list[torch.Tensor], n: int) -> None:
        for _ in range(n):
            loss = self.step(batches[self.steps_done % len(batches)])
            self.losses.append(loss.detach().float().reshape(()))
            self.steps_done += 1


def _max_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def setup_variants(
    builders: dict[str, Callable[[], Variant]], batches: list[torch.Tensor], warmup: int
) -> dict[str, Variant]:
    """Builds each variant and warms it up; records its persistent memory."""
    out: dict[str, Variant] = {}
    for name, build in builders.items():
        free_memory()
        sync()
        before = allocated()
        v = build()
        v.run(batches, warmup)
        sync()
        free_memory()
        v.persistent_bytes = allocated() - before
        out[name] = v
        dist.barrier()
    return out


def interleave(variants: dict[str, Variant], batches: list[torch.Tensor], args: Any) -> int:
    """Timed rounds (see the module docstring); returns the number of rounds."""
    names = list(variants)
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        rounds = 0
        while True:
            order = names if rounds % 2 == 0 else names[::-1]
            for n in order:
                v = variants[n]
                sync()
                dist.barrier()
                sync()
                base = allocated()
                if CUDA:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                v.run(batches, args.block)
                queued = time.perf_counter() - t0
                sync()
                wall = time.perf_counter() - t0
                v.block_times.append(wall)
                v.enqueue.append(queued / wall)
                v.transient_peaks.append((torch.cuda.max_memory_allocated() - base) if CUDA else 0)
            rounds += 1
            gc.collect()
            if args.rounds:
                if rounds >= args.rounds:
                    break
                continue
            elapsed = _max_over_ranks([time.perf_counter() - start])[0]
            if (
                rounds % 2 == 0
                and rounds >= args.min_rounds
                and (elapsed >= args.seconds or rounds >= args.max_rounds)
            ):
                break
    finally:
        gc.enable()
    return rounds


def summarize(variants: dict[str, Variant], block: int, tokens_per_step: int) -> dict[str, Any]:
    """Per-variant figures and the comparisons of every other variant with ``raw``."""
    out: dict[str, Any] = {"variants": {}, "comparisons": {}}
    losses = {}
    for name, v in variants.items():
        times = _max_over_ranks(v.block_times)
        transient = max(_max_over_ranks([float(x) for x in v.transient_peaks]))
        persistent = max(_max_over_ranks([float(v.persistent_bytes)]))
        t = step_time_summary(times, block)
        losses[name] = torch.stack(v.losses).cpu()
        out["variants"][name] = {
            "time": t,
            "tokens_per_s": tokens_per_step / t["median_step_s"],
            "enqueue": statistics.median(_max_over_ranks(v.enqueue)),
            "block_times_s": times,
            "persistent_gib": persistent / 2**30,
            "transient_peak_gib": transient / 2**30,
            "peak_gib": (persistent + transient) / 2**30,
            "steps": v.steps_done,
            "final_loss": float(losses[name][-1]),
            "losses": [round(float(x), 6) for x in losses[name]],
            **v.info,
        }
    raw = out["variants"]["raw"]
    for name, row in out["variants"].items():
        if name == "raw":
            continue
        n = min(len(losses[name]), len(losses["raw"]))
        out["comparisons"][name] = {
            "time": paired_ratio_summary(row["block_times_s"], raw["block_times_s"], block),
            "memory_ratio": row["peak_gib"] / raw["peak_gib"] if raw["peak_gib"] else float("nan"),
            "max_loss_diff": float((losses[name][:n] - losses["raw"][:n]).abs().max()),
        }
    return out


def environment() -> dict[str, Any]:
    """Card, driver, library versions."""
    import transformers

    card = torch.cuda.get_device_name() if CUDA else "CPU (smoke run: no timing meaning)"
    smi = ""
    if CUDA:
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            smi = "nvidia-smi unavailable"
    return {
        "card": card,
        "nvidia_smi": smi,
        "world_size": dist.get_world_size(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def table(
    bench: str, env: dict[str, Any], impl: dict[str, Any], configs: list[dict[str, Any]], args: Any
) -> str:
    """The printed report of one benchmark run."""
    lines = [
        f"# {bench}: {env['world_size']} x {env['card']}, torch {env['torch']}, impl {impl['label']}"
        + (f" ({impl.get('revision', '')} {impl.get('sources_sha256', '')})" if "path" in impl else ""),
        f"rounds of {args.block} steps per variant, ABBA order, {args.warmup} warm-up steps; "
        f"micro-batch {args.micro_batch} x {args.seq} tokens per GPU; queued = time until the last kernel "
        "is queued / block time (near 100% for raw: host-bound); ratio = median of paired per-round "
        "ratios [95% bootstrap CI]; geomean [95% t CI]; memory = (persistent + transient peak) / raw's",
        "",
        "| config | variant | step (s) | tokens/s | queued | peak GiB (persist + transient) | time / raw [95% CI] "
        "| geomean [95% CI] | verdict <= 1.01 | steps for ±1% | mem / raw | max loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in configs:
        for name, row in cfg["variants"].items():
            cmp = cfg["comparisons"].get(name)
            mem = f"{row['peak_gib']:.2f} ({row['persistent_gib']:.2f} + {row['transient_peak_gib']:.2f})"
            head = f"| {cfg['name']} | {name} | {row['time']['median_step_s']:.4f} | {row['tokens_per_s']:,.0f} | {row.get('enqueue', float('nan')):.0%} | {mem} "
            if cmp is None:
                lines.append(head + f"| {cfg['rounds']} rounds | | | | | |")
                continue
            t = cmp["time"]
            glo, ghi = t["geomean_ci95"]
            lo, hi = t["median_ci95"]
            lines.append(
                head
                + f"| {t['median']:.3f} [{lo:.3f}, {hi:.3f}] | {t['geomean']:.3f} [{glo:.3f}, {ghi:.3f}] "
                f"| {t['verdict']} | {t['steps_for_1pct']} | {cmp['memory_ratio']:.3f} | {cmp['max_loss_diff']:.2e} |"
            )
    return "\n".join(lines)


def write_results(bench: str, args: Any, payload: dict[str, Any], text: str) -> None:
    """``{bench}_bench.json`` and ``.md`` under ``--out`` (rank 0)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{bench}_bench.md").write_text(text + "\n")
    (out / f"{bench}_bench.json").write_text(json.dumps(payload, indent=2))
    print(text, flush=True)
    print(f"wrote {out / f'{bench}_bench.json'}", flush=True)
