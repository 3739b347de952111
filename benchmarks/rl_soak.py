"""RL soak: a GRPO-shaped loop through the public Strategy API, hundreds of iterations, one GPU.

Each iteration (``python benchmarks/rl_soak.py --strategy fsdp --engine vllm --model 3.5b``):

1. ``gen``: ``strategy.gather_and_generate`` of ``--prompts`` random prompts x ``--samples``
   completions of ``--max-new-tokens`` tokens (temperature 1, the engine's log-probs returned);
2. ``sleep``: ``strategy.maybe_sleep_inference_engine(level=--sleep-level)`` (2: no weight copy);
3. ``train``: one optimizer step accumulated over micro-batches of ``--micro-train-batch``
   sequences (``strategy.backward`` / ``strategy.optimizer_step``), a GRPO loss: group-normalized
   advantages of a token reward, the clipped ratio against the engine's log-probs;
4. ``push`` + ``wake``: ``strategy.update_engine_weights(actor)``; the engine's own ``update_weights``
   and ``wake_up`` calls are timed apart (wrappers on the engine object, nothing else changes).

Recorded per iteration into ``--out``/iterations.jsonl: generation tokens/s, the phase times,
device memory after each phase (``memory_allocated``, ``memory_reserved`` and used per
``mem_get_info``), host RSS (this process, and with its child processes: SGLang's schedulers),
CUDA-graph captures in this process, torch.compile graphs, SGLang's capture log lines, the
mean |log p_train - log p_engine| of the training forward (the weights the engine generated with),
and, outside the timed phases, the number of live gc-tracked Python objects (``gc_objects``, what
vLLM's ``gc.collect()`` in sleep walks; ``gc_probe_s`` what counting cost). Every
``--census-every`` iterations (and at the warm-up's end and the last) a census by type after a full
collection goes to ``census.jsonl``: the types that grew most since the first census (and since
the previous one), so a run that leaks Python objects names them.
Every ``--check-every`` iterations (and at the last) the engine's log-probs on a few fixed prompts
are compared with a forward pass of the trained model right after the push (``_soak.logprob_tolerance``
says how the tolerance follows from bf16 arithmetic). The first check's engine outputs scored by
the current model are reported beside it (``stale``): what an engine that never received a push
since then would score, to show whether the check can tell the two apart (at this learning rate
it often cannot within 25 iterations: on 2026-12-04 the stale score stayed under the tolerance
until iteration 99 at 3.5B). So each check also reads the first rows of a few parameters back from
the engine (``weight_rows``, :func:`weight_names`) and requires them bitwise equal to the trained
model's, read from its training state and cast to the engine's dtype (``weights``).

At the end: the pass checks (``_soak.py``: drift <= 1 % after warm-up, no recompile or recapture,
log-probs within tolerance, the engine's weights equal to the trained ones), ``summary.json``, a table, ``soak.png``. Exits 1 when a check fails
or is not evaluated. ``--plot DIR_OR_JSONL`` redraws the plot (and the summary) from a JSONL later.

CPU dry run: ``--device cpu --engine hf --model tiny --iterations 30``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _soak  # noqa: E402

#: Llama shapes (vocab 32000, untied embeddings, GQA with 128-wide heads): 1.48B and 3.52B.
MODELS: dict[str, dict[str, int]] = {
    "1.5b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 30, "heads": 16, "kv": 4},
    "3.5b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 33, "heads": 24, "kv": 8},
    # tiny: heads of 32 (vLLM's CPU attention has no 16-wide kernel)
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "heads": 4, "kv": 2},
    # thin33: the 3.5B's depth and operators (33 layers, GQA) at a width of 16, so that on a CPU
    # the step's time is mostly its host work (dispatch, autograd, the strategy's hooks), a proxy
    # of what the 3.5B's step costs the host of a GPU machine (train_step_profile.py). Eager
    # attention: the CPU's SDPA backward alone took 1.2 s of a step at width 128.
    "thin33": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 33, "heads": 2, "kv": 1},
}
VOCAB = {"1.5b": 32000, "3.5b": 32000, "tiny": 256, "thin33": 256}
CHECK_PROMPTS = 4
CHECK_NEW_TOKENS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strategy", choices=["fsdp", "deepspeed"], default="fsdp")
    ap.add_argument("--engine", choices=["vllm", "sglang", "hf"], default="vllm")
    ap.add_argument("--model", choices=sorted(MODELS), default="3.5b")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10, help="iterations left out of the checks")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4, help="completions per prompt (GRPO group)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-train-batch", type=int, default=16, help="sequences per micro-step")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--sleep-level", type=int, choices=[1, 2], default=2)
    ap.add_argument("--mem-util", type=float, default=0.3, help="engine_mem_util")
    ap.add_argument("--bucket-mb", type=int, default=512, help="weight_sync_bucket_mb")
    ap.add_argument("--check-every", type=int, default=25, help="iterations between log-prob checks")
    ap.add_argument(
        "--census-every",
        type=int,
        default=25,
        help="iterations between censuses of live Python objects by type (census.jsonl; 0: none)",
    )
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument(
        "--pin-cpus",
        default="",
        help="pin the loop (and the threads and engine processes it starts) to a CPU list (0-3,8) "
        "or to the K fastest CPUs (fastest:K, each timed alone at the start); default: not pinned",
    )
    ap.add_argument(
        "--out", default="soak-out", help="directory for iterations.jsonl, summary.json, soak.png"
    )
    ap.add_argument(
        "--budget-s", type=float, default=0.0, help="stop cleanly before this many seconds (0: none)"
    )
    ap.add_argument(
        "--plot", default=None, help="only redraw soak.png and the summary from this JSONL (or dir)"
    )
    a = ap.parse_args(argv)
    check_batch_args(ap, a, ("iterations", "max_new_tokens"))
    if a.census_every < 0:
        ap.error(f"--census-every={a.census_every} is invalid: give 0 (no census) or more")
    return a


def check_batch_args(ap: argparse.ArgumentParser, a: argparse.Namespace, more: Sequence[str] = ()) -> None:
    """The batch arguments this script and ``train_step_profile.py`` share (and ``more``) are 1 or
    more, and ``--micro-train-batch`` divides ``--prompts x --samples`` (one optimizer step per
    iteration); else the parser's error naming the argument and its value."""
    for name in ("prompts", "samples", "prompt_len", "micro_train_batch", *more):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(a, name)} is invalid: give 1 or more")
    if (a.prompts * a.samples) % a.micro_train_batch:
        ap.error(
            f"--micro-train-batch={a.micro_train_batch} must divide --prompts x --samples = "
            f"{a.prompts * a.samples} (one optimizer step per iteration)"
        )


# ------------------------------------------------------------------------------------ probes
def process_tree() -> list[int]:
    """This process and all its descendants (from /proc), this process first."""
    from lightrft.strategy.utils import child_pids

    me = os.getpid()
    out: list[int] = []
    todo, seen = [me], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo += child_pids(pid)
    return out


def host_rss(tree: list[int]) -> tuple[int, int, dict[str, int]]:
    """(this process's RSS, RSS of this process and all its descendants, RSS per pid of that tree:
    ``process_tree()``) in bytes, from /proc. The per-pid map lets the summary gate the processes that live through
    the whole run apart from helpers that start or exit in it (``_soak.persistent_tree_rss``)."""

    def rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    per_pid = {str(pid): rss(pid) for pid in tree}
    return per_pid[str(tree[0])], sum(per_pid.values()), per_pid


def children_cpu_s(tree: list[int]) -> dict[int, float]:
    """CPU seconds (user + system, from /proc/PID/stat) so far of each process in ``tree`` but the
    first (this one): the engine's processes. Differenced over an iteration, a value near the
    iteration's wall time means a process held a core through it (a scheduler that spins)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in tree[1:]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def host_cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) clock ticks of all CPUs so far, from /proc/stat's ``cpu`` line (None where it
    cannot be read). Differenced over an iteration, steal / total is the share of the host's CPU
    time its hypervisor gave to other guests: a host that slows for that reason shows it here."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(x) for x in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is in user already
    return ticks[7], sum(ticks[:8])


def steal_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Steal ticks over all ticks between two :func:`host_cpu_ticks` readings (None without both
    or without ticks between them)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def current_cpu() -> int | None:
    """The CPU this process's main thread last ran on (``/proc/self/stat`` field 39)."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


def device_used_reader() -> Callable[[], int]:
    """Device-wide used memory in bytes (every process on the GPU: the engine's too), for
    :class:`_soak.PeakSampler`'s thread: NVML's figure where torch can read it (no CUDA call on
    the sampler's thread), else ``total - free`` of ``torch.cuda.mem_get_info``. Both sides of
    ``trl_grpo_compare.py``'s comparison use this reader."""
    import torch

    try:
        torch.cuda.device_memory_used()
        return lambda: int(torch.cuda.device_memory_used())
    except Exception:  # no pynvml: the CUDA runtime's figure, same meaning

        def read() -> int:
            free, total = torch.cuda.mem_get_info()
            return int(total - free)

        return read


def host_topology() -> dict[str, Any]:
    """What the soak ran on, host side: CPUs, this process's affinity, SMT siblings of CPU 0."""

    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    model = None
    for line in (read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu0_thread_siblings": read("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list"),
        "model": model,
    }


def process_name(pid: str) -> str:
    """The first 120 characters of a process's command line (or its name), for the log."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        if not cmd:
            with open(f"/proc/{pid}/comm") as f:
                cmd = f.read().strip()
        return cmd[:120]
    except OSError:
        return "?"


class Probes:
    """Device memory, the counters of recompiles / recaptures, timing with device sync."""

    def sm_clock_mhz(self) -> int | None:
        """The GPU's current SM clock in MHz (NVML, through torch), None without CUDA or NVML."""
        if not self.cuda:
            return None
        try:
            return int(self.torch.cuda.clock_rate())
        except Exception:  # no pynvml / amdsmi: the figure is a diagnostic, not a check
            return None

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device == "cuda"
        self.graph_captures = 0
        if self.cuda:
            # Every CUDA-graph capture in this process (vLLM's engine runs in it) goes through
            # CUDAGraph.capture_begin (torch.cuda.graph calls it): count them.
            cls = torch.cuda.CUDAGraph
            original = cls.capture_begin
            probes = self

            def capture_begin(graph: Any, *args: Any, **kwargs: Any) -> Any:
                probes.graph_captures += 1
                return original(graph, *args, **kwargs)

            cls.capture_begin = capture_begin  # type: ignore[method-assign]
        self.engine_log: Path | None = None

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def memory(self, phase: str) -> dict[str, int]:
        if not self.cuda:
            return {}
        tc = self.torch.cuda
        free, total = tc.mem_get_info()
        return {
            f"mem_{phase}_allocated": tc.memory_allocated(),
            f"mem_{phase}_reserved": tc.memory_reserved(),
            f"mem_{phase}_used": total - free,
        }

    def compile_graphs(self) -> int | None:
        try:
            from torch._dynamo.utils import counters
        except ImportError:
            return None
        return int(counters["stats"]["unique_graphs"])

    def engine_log_captures(self) -> int | None:
        """Lines of SGLang's log (all its processes) that announce a CUDA-graph capture."""
        if self.engine_log is None:
            return None
        try:
            text = self.engine_log.read_text(errors="replace")
        except OSError:
            return None
        return len(re.findall(r"Capture (?:cuda|CUDA) graph begin|Capturing batches", text))


def time_engine_calls(engine: Any, probes: Probes, times: dict[str, float], mem: dict[str, int]) -> None:
    """Wraps the engine object's ``update_weights`` and ``wake_up`` so that each call adds its time
    (device-synchronized) to ``times['push_s']`` / ``times['wake_s']``; memory after the push goes
    to ``mem`` (the strategy calls them inside ``update_engine_weights``)."""
    push, wake = engine.update_weights, engine.wake_up

    def update_weights(buckets: Any, **kw: Any) -> None:  # kw: live_storages (maps_live_weights)
        probes.sync()
        t0 = time.perf_counter()
        push(buckets, **kw)
        probes.sync()
        times["push_s"] = times.get("push_s", 0.0) + time.perf_counter() - t0
        mem.update(probes.memory("push"))

    def wake_up(tags: Any = None) -> None:
        probes.sync()
        t0 = time.perf_counter()
        wake(tags)
        probes.sync()
        times["wake_s"] = times.get("wake_s", 0.0) + time.perf_counter() - t0

    engine.update_weights, engine.wake_up = update_weights, wake_up


# ------------------------------------------------------------------------------------ model
def llama_config(name: str, vocab_size: int | None = None) -> Any:
    """The ``LlamaConfig`` of ``MODELS[name]`` (also what benchmarks/trl_grpo_compare.py trains)."""
    from transformers import LlamaConfig

    m = MODELS[name]
    return LlamaConfig(
        vocab_size=vocab_size or VOCAB[name],
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["heads"],
        num_key_value_heads=m["kv"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def build_model(name: str, device: str, dtype: Any) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    cfg = llama_config(name)
    if name == "thin33":
        cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def training_config(backend: str, n_seq: int, micro: int) -> dict[str, Any]:
    """The soak's training settings (``train_step_profile.py`` uses them too): ZeRO-3 when
    DeepSpeed, bf16, one optimizer step per ``n_seq`` sequences in micro-batches of ``micro``."""
    return {
        "strategy": backend,
        "zero_stage": 3,
        "bf16": True,
        "seed": 1,
        "train_batch_size": n_seq,
        "micro_train_batch_size": micro,
        "max_norm": 1.0,
    }


def build_trained(strategy: Any, backend: str, name: str, device: str, lr: float) -> tuple[Any, Any]:
    """The model ``name`` and its optimizer, prepared by ``strategy``: FSDP2 with fp32 masters
    (bf16 compute) and the strategy's optimizer (torch AdamW, fused on CUDA); ZeRO-3 with bf16
    parameters and torch AdamW (DeepSpeed's FusedAdam would JIT-build first)."""
    import torch

    dtype = torch.float32 if backend == "fsdp" else torch.bfloat16
    actor = strategy.prepare_model(build_model(name, device, dtype))
    if backend == "fsdp":
        optim = strategy.create_optimizer(actor, lr=lr)
    else:
        params = [p for p in actor.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=lr, fused=device == "cuda")
    actor, optim, _ = strategy.prepare((actor, optim, None))
    return actor, optim


#: Rows of each parameter the log-prob check also reads back from the engine (``weight_rows``).
WEIGHT_ROWS = 4


def weight_names(engine_type: str, n_layers: int) -> list[str]:
    """The parameters the check reads back. vLLM and HF: parameters vLLM keeps unfused under
    their Hugging Face names (the first attention output, the last MLP output, the output head,
    whose first rows get gradients every step, unlike the embedding rows of tokens no prompt
    holds), sliced on the device (vLLM's CPU backend leaves linear weights empty: its
    ``weight_rows`` then says so). SGLang: its ``get_weights_by_name`` turns the whole parameter into a
    Python list in the scheduler before it truncates (a 32000 x 3072 embedding would be 98M
    floats), so the smallest matrices, the first and last ``k_proj`` (a slice of its fused
    ``qkv_proj``, which SGLang maps)."""
    if engine_type == "sglang":
        return [f"model.layers.{i}.self_attn.k_proj.weight" for i in (0, n_layers - 1)]
    return [
        "model.layers.0.self_attn.o_proj.weight",
        f"model.layers.{n_layers - 1}.mlp.down_proj.weight",
        "lm_head.weight",
    ]


def trained_rows(strategy: Any, actor: Any, name: str, rows: int) -> Any:
    """The first ``rows`` rows of the trained parameter ``name``, on the host, read from the
    training state itself (FSDP2: the DTensor's full value; ZeRO-3: the gathered partition), not
    through the push's buckets."""
    import torch

    param = dict(strategy.unwrap_model(actor).named_parameters())[name]
    with torch.no_grad():
        if hasattr(param, "ds_id"):  # a ZeRO-3 partition
            from lightrft.deepspeed.zero_state import gathered

            with gathered([param]):
                return param.data[:rows].to("cpu", copy=True)
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        return full.detach()[:rows].to("cpu", copy=True)


def weights_read_back(strategy: Any, actor: Any, engine: Any, names: list[str]) -> dict[str, Any]:
    """``weights_equal``: the engine's first rows of ``names`` (``weight_rows``) equal the trained
    ones cast to the engine's dtype, bitwise (a push rounds each master once); None with
    ``weights_error`` when they could not be read."""
    import torch

    try:
        equal = True
        for name in names:
            got = engine.weight_rows(name, WEIGHT_ROWS)
            if got is None:  # another rank of the engine's group
                return {}
            want = trained_rows(strategy, actor, name, WEIGHT_ROWS).to(got.dtype)
            equal = equal and torch.equal(got, want)
        return {"weights_equal": equal}
    except Exception as e:  # reported in the summary (the check fails), the soak goes on
        return {"weights_equal": None, "weights_error": f"{type(e).__name__}: {e}"}


def token_logprobs(actor: Any, seqs: list[list[int]], starts: list[int]) -> tuple[list[Any], Any]:
    """Log-probs (float32) of ``seq[start:]`` under ``actor`` for each sequence, and the logits'
    RMS over those positions; sequences right-padded to one length."""
    import torch

    dev = next(p for p in actor.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    logits = actor(input_ids=ids, attention_mask=mask).logits
    out, sq, count = [], logits.new_zeros((), dtype=torch.float32), 0
    for i, (s, start) in enumerate(zip(seqs, starts)):
        z = logits[i, start - 1 : len(s) - 1].float()
        lp = torch.log_softmax(z, dim=-1).gather(-1, ids[i, start : len(s)].unsqueeze(-1)).squeeze(-1)
        out.append(lp)
        sq = sq + z.detach().pow(2).sum()
        count += z.numel()
    return out, (sq / max(count, 1)).sqrt()


def grpo_loss(lp: list[Any], old_lp: list[Any], adv: list[float], clip: float = 0.2) -> Any:
    """Token-mean clipped surrogate ``-min(r A, clip(r) A)`` with ``r = exp(lp - old_lp)``."""
    import torch

    total, n = 0.0, 0
    for new, old, a in zip(lp, old_lp, adv):
        ratio = torch.exp(new - old)
        surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a)
        total = total - surrogate.sum()
        n += new.numel()
    return total / max(n, 1)


def advantages(rewards: list[float], group: int) -> list[float]:
    """GRPO: each reward minus its group's mean, over the group's std (+1e-6)."""
    out = []
    for g in range(0, len(rewards), group):
        chunk = rewards[g : g + group]
        mu = sum(chunk) / len(chunk)
        sd = statistics.pstdev(chunk)
        out += [(r - mu) / (sd + 1e-6) for r in chunk]
    return out


def train_step(
    strategy: Any,
    actor: Any,
    optim: Any,
    batch: Sequence[tuple[list[int], int, Sequence[float]]],
    adv: Sequence[float],
    micro: int,
    mark: Callable[[str], Any] = lambda name: contextlib.nullcontext(),
) -> tuple[Any, Any, int]:
    """One optimizer step accumulated over micro-batches of ``micro`` sequences, the GRPO loss
    against the engine's log-probs. ``batch``: (tokens, prompt length, the engine's log-probs of
    ``tokens[prompt length:]``) per sequence; ``adv`` their advantages. Returns the last
    micro-batch's loss, the summed |log p_train - log p_engine| (a device tensor: read once, by the
    caller) and the number of tokens it sums over. ``mark(name)`` wraps each part (``fwd``,
    ``loss``, ``bwd``, ``step``) in a context (``train_step_profile.py`` labels them for the
    profiler). No host sync of its own: the host waits for the device once, where the caller
    synchronizes."""
    import torch

    mad_sum: Any = 0.0
    mad_n = 0
    loss: Any = None
    for m in range(0, len(batch), micro):
        chunk = batch[m : m + micro]
        with mark("fwd"):
            lps, _ = token_logprobs(actor, [s for s, _, _ in chunk], [st for _, st, _ in chunk])
        with mark("loss"):
            # The engine's log-probs in one copy to the device per micro-batch, and the |dlogp|
            # diagnostic summed there: the host waits for the device once per iteration, not once
            # per sequence (64 waits that serialized the host's launches with the device's work).
            flat = torch.tensor([v for _, _, lp in chunk for v in lp], dtype=torch.float32)
            old = list(flat.to(lps[0].device).split([len(lp) for _, _, lp in chunk]))
            with torch.no_grad():
                for new, ref in zip(lps, old):
                    mad_sum = mad_sum + (new.detach() - ref).abs().sum()
                    mad_n += new.numel()
            loss = grpo_loss(lps, old, adv[m : m + micro])
        with mark("bwd"):
            strategy.backward(loss, actor, optim)
        with mark("step"):
            strategy.optimizer_step(optim, actor, None)
    return loss, mad_sum, mad_n


# ------------------------------------------------------------------------------------ run
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.plot:
        return replot(Path(a.plot), a.warmup)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    # Before torch starts a thread: every thread and process started later inherits the pinning.
    pinned = _soak.pin_cpus(a.pin_cpus) if a.pin_cpus else None

    import torch

    if a.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from lightrft.strategy import SamplingParams, get_strategy

    n_seq = a.prompts * a.samples
    max_len = a.prompt_len + max(a.max_new_tokens, CHECK_NEW_TOKENS) + 8
    cfg: dict[str, Any] = {
        **training_config(a.strategy, n_seq, a.micro_train_batch),
        # The engine's concurrency (SGLang sizes its decode CUDA graphs from it): one micro-batch
        # of all prompts x samples.
        "micro_rollout_batch_size": a.prompts,
        "rollout_batch_size": a.prompts,
        "n_samples_per_prompt": a.samples,
        "engine_type": a.engine,
        "engine_mem_util": a.mem_util,
        "engine_max_model_len": max_len,
        "engine_sleep_level": a.sleep_level,
        "enable_engine_sleep": True,
        "weight_sync_bucket_mb": a.bucket_mb,
    }
    strategy = get_strategy(cfg)
    probes = Probes(a.device)
    log = open(out / "log.txt", "a", buffering=1)  # noqa: SIM115  (open for the run)

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")

    say(f"rl_soak {json.dumps(vars(a))}")
    if pinned:
        say(f"pinned to CPUs {pinned['cpus']} ({pinned['spec']})")
    actor, optim = build_trained(strategy, a.strategy, a.model, a.device, a.lr)
    n_params = sum(p.numel() for p in actor.parameters())
    n_layers = MODELS[a.model]["num_hidden_layers"]
    vocab = VOCAB[a.model]

    t0 = time.perf_counter()
    if a.engine == "hf":
        # HFEngine built from a sharded actor leaves the rotary buffers (inv_freq, not pushed)
        # uninitialized: give it a whole model and push the actor's weights over it.
        strategy.setup_inference_engine(model=build_model(a.model, a.device, torch.bfloat16))
        strategy.update_engine_weights(actor)
    else:
        strategy.setup_inference_engine(actor=actor)  # built from the actor's config, weights pushed
    engine_start_s = time.perf_counter() - t0
    engine = strategy.engine_lifecycle.engine
    log_path = getattr(engine, "log_path", None)
    probes.engine_log = Path(log_path) if log_path else None
    say(f"params {n_params / 1e9:.3f}B, engine {a.engine} started in {engine_start_s:.1f} s")
    captured = getattr(engine, "decode_graph_captured", None)
    if captured is not None:  # SGLang: a larger decode batch would run without CUDA graphs
        say(f"decode CUDA graphs captured up to {captured} requests; generation batch {n_seq}")

    extra = {"ignore_eos": True} if a.engine in ("vllm", "sglang") else {"min_new_tokens": a.max_new_tokens}
    gen_sp = SamplingParams(
        max_new_tokens=a.max_new_tokens, temperature=1.0, n=a.samples, logprobs=True, extra=extra
    )
    check_extra = dict(extra)
    if a.engine == "hf":
        check_extra["min_new_tokens"] = CHECK_NEW_TOKENS
    check_sp = SamplingParams(
        max_new_tokens=CHECK_NEW_TOKENS, temperature=1.0, n=1, logprobs=True, seed=5, extra=check_extra
    )
    gcheck = torch.Generator().manual_seed(99)
    check_prompts = [
        torch.randint(10, vocab, (a.prompt_len,), generator=gcheck).tolist() for _ in range(CHECK_PROMPTS)
    ]

    times: dict[str, float] = {}
    mem: dict[str, int] = {}
    time_engine_calls(engine, probes, times, mem)
    jsonl = open(out / "iterations.jsonl", "w", buffering=1)  # noqa: SIM115
    census_file = open(out / "census.jsonl", "w", buffering=1)  # noqa: SIM115
    census_first: Any = None
    census_prev: Any = None
    census_last: dict[str, Any] | None = None

    def census(it: int) -> None:
        """Live objects by type (after gc.collect) into census.jsonl: growth since the first census
        and since the previous one. Outside every timed phase."""
        nonlocal census_first, census_prev, census_last
        t0 = time.perf_counter()
        now = _soak.type_census()
        entry: dict[str, Any] = {"iteration": it, "total": sum(now.values())}
        if census_first is None:
            census_first = now
            entry["top"] = [{"type": k, "count": v} for k, v in now.most_common(_soak.CENSUS_TOP)]
        else:
            entry["growth_since_first"] = _soak.census_growth(census_first, now)
            entry["growth_since_previous"] = _soak.census_growth(census_prev, now)
            entry["total_growth_since_first"] = entry["total"] - sum(census_first.values())
        census_prev = now
        entry["census_s"] = time.perf_counter() - t0
        census_file.write(json.dumps(entry) + "\n")
        census_last = entry
        if "growth_since_first" in entry:
            top = ", ".join(f"{g['type']} +{g['growth']}" for g in entry["growth_since_first"][:4])
            say(f"  census it {it}: {entry['total']} objects ({entry['total_growth_since_first']:+d}): {top}")

    records: list[dict[str, Any]] = []
    pid_names: dict[str, str] = {}  # pid -> command line, for the log when the tree changes
    lp_checks: list[dict[str, Any]] = []
    first_check: tuple[list[list[int]], list[list[float]]] | None = None
    stopped_early = None

    def logprob_check(it: int) -> None:
        nonlocal first_check
        probes.sync()
        t0 = time.perf_counter()
        outs = strategy.gather_and_generate(check_sp, all_prompt_token_ids=check_prompts, sleep_engine=False)
        seqs = [list(o.prompt_token_ids) + list(o.output_token_ids) for o in outs]
        starts = [len(o.prompt_token_ids) for o in outs]
        eng = [list(o.logprobs or []) for o in outs]
        with torch.no_grad():
            lps, rms = token_logprobs(actor, seqs, starts)
            train = [x.tolist() for x in lps]
            flat_e = [v for e in eng for v in e]
            flat_t = [v for t in train for v in t]
            res: dict[str, Any] = {
                "iteration": it,
                "tokens": len(flat_e),
                "mean_abs_diff": _soak.mean_abs_diff(flat_e, flat_t),
                "max_abs_diff": max(abs(x - y) for x, y in zip(flat_e, flat_t)),
                "logit_rms": float(rms),
                "tol": _soak.logprob_tolerance(n_layers, float(rms)),
            }
            if first_check is not None:  # the first check's engine outputs against today's model
                pseqs, peng = first_check
                plps, _ = token_logprobs(actor, pseqs, [len(s) - len(e) for s, e in zip(pseqs, peng)])
                res["stale_mean_abs_diff"] = _soak.mean_abs_diff(
                    [v for e in peng for v in e], [v for t in plps for v in t.tolist()]
                )
        if first_check is None:
            first_check = (seqs, eng)
        res.update(weights_read_back(strategy, actor, engine, weight_names(a.engine, n_layers)))
        res["check_s"] = time.perf_counter() - t0
        lp_checks.append(res)
        say(
            f"  logprob check it {it}: mean |dlogp| {res['mean_abs_diff']:.4f} max {res['max_abs_diff']:.4f} "
            f"tol {res['tol']:.4f} stale {res.get('stale_mean_abs_diff', float('nan')):.4f} "
            f"weights equal {res.get('weights_equal')}{' ' + res['weights_error'] if res.get('weights_error') else ''}"
        )

    # The iteration's peak of device-wide used memory, sampled every 20 ms (a lower bound of the
    # true peak; trl_grpo_compare.py samples TRL's loop the same way). Reported, not gated.
    peaks = _soak.PeakSampler(device_used_reader()).start() if probes.cuda else None
    g = torch.Generator().manual_seed(7)
    for it in range(a.iterations):
        elapsed = time.perf_counter() - t_start
        if a.budget_s and records:
            per_it = statistics.median(r["iter_s"] for r in records[-10:])
            if elapsed + 2 * per_it + 30 > a.budget_s:  # 30 s: summary, plot and engine shutdown
                stopped_early = f"budget: {elapsed:.0f} s of {a.budget_s:.0f} s spent after {it} iterations"
                say(stopped_early)
                break
        times.clear()
        mem.clear()
        rec: dict[str, Any] = {"iteration": it}
        prompts = [torch.randint(10, vocab, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
        if peaks is not None:
            peaks.take()  # the window outside the iteration (checks, census) is left out
        t_it, cpu_it = time.perf_counter(), time.process_time()
        children_cpu_0 = children_cpu_s(process_tree())
        ticks_0 = host_cpu_ticks()

        # 1. generate
        probes.sync()
        t0 = time.perf_counter()
        outs = strategy.gather_and_generate(gen_sp, all_prompt_token_ids=prompts, sleep_engine=False)
        probes.sync()
        rec["gen_s"] = time.perf_counter() - t0
        n_tok = sum(len(o.output_token_ids) for o in outs)
        rec["gen_tokens"], rec["gen_tok_s"] = n_tok, n_tok / rec["gen_s"]
        rec.update(probes.memory("gen"))

        # 2. sleep
        t0 = time.perf_counter()
        strategy.maybe_sleep_inference_engine(level=a.sleep_level)
        probes.sync()
        rec["sleep_s"] = time.perf_counter() - t0
        rec.update(probes.memory("sleep"))

        # 3. train: one optimizer step over micro-batches, GRPO loss against the engine's log-probs
        rewards = [
            sum(1 for t in o.output_token_ids if t % 2 == 0) / max(1, len(o.output_token_ids)) for o in outs
        ]
        adv = advantages(rewards, a.samples)
        t0 = time.perf_counter()
        batch = [
            (list(o.prompt_token_ids) + list(o.output_token_ids), len(o.prompt_token_ids), o.logprobs)
            for o in outs
        ]
        loss, mad_sum, mad_n = train_step(strategy, actor, optim, batch, adv, a.micro_train_batch)
        probes.sync()
        rec["train_s"] = time.perf_counter() - t0
        rec["loss"] = float(loss.detach())
        rec["train_lp_mad"] = float(mad_sum) / max(1, mad_n)
        rec.update(probes.memory("train"))

        # 4. push + wake (update_engine_weights: wake weights -> push -> empty cache -> wake the rest)
        t0 = time.perf_counter()
        strategy.update_engine_weights(actor)
        probes.sync()
        rec["sync_s"] = time.perf_counter() - t0
        rec["push_s"] = times.get("push_s", 0.0)
        rec["wake_s"] = times.get("wake_s", 0.0)
        rec.update(mem)
        rec.update(probes.memory("wake"))
        rec["iter_s"] = time.perf_counter() - t_it
        if peaks is not None:
            rec["mem_peak_used"], rec["mem_peak_samples"] = peaks.take()
        # Reported: CPU seconds of this process's threads in the iteration (near iter_s or above:
        # the host sets the pace; far below: the device does) and the SM clock (a throttled GPU
        # slows every phase at once).
        rec["iter_cpu_s"] = time.process_time() - cpu_it
        rec["sm_clock_mhz"] = probes.sm_clock_mhz()
        # Reported: the hypervisor's steal share of all CPUs in the iteration, and the CPU the main
        # thread ran on at its end (a host that slows in some stretches of the run: which cause)
        rec["host_steal_frac"] = steal_fraction(ticks_0, host_cpu_ticks())
        rec["main_cpu"] = current_cpu()

        tree = process_tree()
        children_cpu_1 = children_cpu_s(tree)
        # CPU seconds the engine's processes (alive at both ends) took during the iteration
        rec["children_cpu_s"] = sum(
            children_cpu_1[p] - children_cpu_0[p] for p in children_cpu_1.keys() & children_cpu_0.keys()
        )
        rec["host_rss"], rec["host_rss_tree"], rec["host_rss_pids"] = host_rss(tree)
        for pid in rec["host_rss_pids"].keys() - pid_names.keys():
            pid_names[pid] = process_name(pid)
            if records:
                say(f"it {it}: process {pid} joined the tree: {pid_names[pid]}")
        if records:
            for pid in records[-1]["host_rss_pids"].keys() - rec["host_rss_pids"].keys():
                say(f"it {it}: process {pid} left the tree: {pid_names.get(pid, '?')}")
        rec["gc_objects"], rec["gc_probe_s"] = _soak.live_objects()  # after iter_s: not timed
        rec["host_ref_s"] = _soak.host_reference()[1]  # the host's speed, not timed either
        rec["cuda_graph_captures"] = probes.graph_captures if probes.cuda else None
        rec["compile_graphs"] = probes.compile_graphs()
        rec["engine_log_captures"] = probes.engine_log_captures()
        rec["engine_req_states"] = _soak.sglang_request_states(engine)
        records.append(rec)
        jsonl.write(json.dumps(rec) + "\n")
        if it == a.iterations - 1 or (it >= a.warmup and (it - a.warmup) % a.check_every == 0):
            logprob_check(it)
        if a.census_every and (
            it == a.iterations - 1
            or it == max(0, a.warmup - 1)
            or (it >= a.warmup and (it - a.warmup + 1) % a.census_every == 0)
        ):
            census(it)
        if it < 3 or it % 10 == 0 or it == a.iterations - 1:
            used = rec.get("mem_wake_used", 0) / 2**30
            say(
                f"it {it:4d} {rec['iter_s']:.3f} s: gen {rec['gen_s']:.3f} ({rec['gen_tok_s']:.0f} tok/s) "
                f"sleep {rec['sleep_s']:.3f} train {rec['train_s']:.3f} push {rec['push_s']:.3f} "
                f"wake {rec['wake_s']:.3f} | cpu {rec['iter_cpu_s']:.2f} s, engine {rec['children_cpu_s']:.2f} s "
                f"| used {used:.2f} GiB rss {rec['host_rss'] / 2**30:.2f} GiB "
                f"| |dlogp| {rec['train_lp_mad']:.4f}"
                + (
                    f" | sglang req states {rec['engine_req_states']}"
                    if rec["engine_req_states"] is not None
                    else ""
                )
            )
    if peaks is not None:
        peaks.stop()
    if records and lp_checks and lp_checks[-1]["iteration"] != records[-1]["iteration"]:
        logprob_check(records[-1]["iteration"])  # a run stopped early still ends with a check
    jsonl.close()
    if (
        a.census_every
        and records
        and (census_last is None or census_last["iteration"] != records[-1]["iteration"])
    ):
        census(records[-1]["iteration"])  # a run stopped early still ends with a census
    census_file.close()
    with open(out / "logprob_checks.json", "w") as f:
        json.dump(lp_checks, f, indent=2)

    summary = _soak.summarize(records, lp_checks, a.warmup, gate_device_memory=probes.cuda)
    summary.update(
        {
            "args": vars(a),
            "params_b": n_params / 1e9,
            "engine_start_s": engine_start_s,
            "wall_s": time.perf_counter() - t_start,
            "stopped_early": stopped_early,
            "medians": _soak.phase_medians(records, a.warmup),
            # Reported, not gated: live gc-tracked objects (first tenth -> last tenth after warm-up)
            # and the last census's top growth (census.jsonl has them all).
            "gc_objects_drift": _soak.drift([float(r["gc_objects"]) for r in records[a.warmup :]]),
            # Reported, not gated: the host's speed (a fixed pure-Python workload) over the run.
            "host_ref_drift": _soak.drift([float(r["host_ref_s"]) for r in records[a.warmup :]]),
            # Reported, not gated: the hypervisor's steal share, first tenth -> last tenth
            "host_steal": _soak.drift(
                [
                    float(r["host_steal_frac"])
                    for r in records[a.warmup :]
                    if r.get("host_steal_frac") is not None
                ]
            ),
            "last_census": census_last,
            # Reported, not gated: the largest sampled device-wide use in one steady iteration
            "peak_used_steady": max(
                (r["mem_peak_used"] for r in records[a.warmup :] if "mem_peak_used" in r), default=None
            ),
            "host": host_topology(),
            "pinned": pinned,
            "versions": versions(a.engine),
            "device": torch.cuda.get_device_name() if probes.cuda else "cpu",
        }
    )
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    say(_soak.format_table(summary, summary["medians"]))
    plot(
        records,
        a.warmup,
        out / "soak.png",
        title=f"{a.strategy} + {a.engine}, {n_params / 1e9:.2f}B",
        say=say,
    )
    strategy.engine_lifecycle.shutdown()
    strategy.shutdown()
    log.close()
    return 0 if summary["passed"] else 1


def versions(engine: str) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist_name in ("torch", "transformers", "deepspeed", engine if engine != "hf" else "transformers"):
        try:
            out[dist_name] = md.version(dist_name)
        except md.PackageNotFoundError:
            out[dist_name] = "absent"
    return out


def plot(records: list[dict[str, Any]], warmup: int, path: Path, title: str, say: Any = print) -> None:
    """Memory and time per iteration (two panels) as a PNG; says so and returns without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say(f"no matplotlib here: plot later with `python benchmarks/rl_soak.py --plot {path.parent}`")
        return
    if not records:
        return
    its = [r["iteration"] for r in records]
    fig, (ax_m, ax_t) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    gib = 2**30
    for key, label in [
        ("mem_gen_used", "device used after gen"),
        ("mem_sleep_used", "device used after sleep"),
        ("mem_train_used", "device used after train"),
        ("mem_train_allocated", "allocated after train"),
        ("mem_train_reserved", "reserved after train"),
        ("host_rss", "host RSS (this process)"),
        ("host_rss_tree", "host RSS (with engine processes)"),
    ]:
        if key in records[0]:
            ax_m.plot(its, [r[key] / gib for r in records], label=label, lw=1)
    ax_m.set_ylabel("GiB")
    ax_m.legend(fontsize=7, loc="center right")
    for key in ("iter_s", "gen_s", "train_s", "sleep_s", "push_s", "wake_s"):
        ax_t.plot(its, [r[key] for r in records], label=key, lw=1)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("seconds")
    ax_t.set_xlabel("iteration")
    ax_t.legend(fontsize=7, loc="center right")
    for ax in (ax_m, ax_t):
        ax.axvspan(its[0] - 0.5, its[0] + warmup - 0.5, color="0.9", label="_warm-up")
    fig.suptitle(f"RL soak: {title} (grey: warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    say(f"plot: {path}")


def replot(src: Path, warmup: int) -> int:
    """``--plot``: the summary and soak.png again from a JSONL (and logprob_checks.json beside it)."""
    jsonl = src / "iterations.jsonl" if src.is_dir() else src
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    checks_path = jsonl.parent / "logprob_checks.json"
    checks = json.loads(checks_path.read_text()) if checks_path.exists() else []
    cuda = bool(records) and any(k.startswith("mem_") for k in records[0])
    summary = _soak.summarize(records, checks, warmup, gate_device_memory=cuda)
    print(_soak.format_table(summary, _soak.phase_medians(records, warmup)))
    plot(records, warmup, jsonl.parent / "soak.png", title=jsonl.parent.name)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
