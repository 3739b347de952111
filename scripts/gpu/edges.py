"""The engines at the edges a user hits (issue 18), on real engines: one process per engine.

    python scripts/gpu/edges.py --engine vllm|sglang --out DIR --budget-s 240
    python scripts/gpu/edges.py --engine hf --device cpu --out DIR     # CPU dry run (also vllm-cpu)

Phases (each records checks with the numbers they compare; a phase that would not fit the budget is
recorded as not run):

- ``levels`` (item 2): one meaning per sleep level. Level 1 keeps a host copy (device memory freed,
  host memory grows by about the weights, wake alone restores identical outputs); level 2 keeps no
  copy (device freed, host does not grow, ``wakeup_inference_engine()`` without a push raises the
  same error on every engine, outputs identical after a push). SGLang fixes the level at start
  (``enable_weights_cpu_backup`` only with ``engine_sleep_level=1``): two engine starts, and level 1
  on the level-2 engine is refused.
- ``recreate`` (item 1): a second engine in the same process. vLLM: a mismatched engine is refused
  at ``setup_inference_engine`` with what works, one of the same settings reuses the process's
  engine (no new start) and holds the new model's weights (checksum and outputs). SGLang: a
  second engine starts after the first one's shutdown (checked by the level-1 engine of ``levels``).
- ``peft`` (item 3, vLLM): a LoRA actor pushed after a level-2 sleep: no missing weights, outputs
  and checksum equal to the merged model's.
- ``death`` (item 8, SGLang): the scheduler subprocess is killed during a long generation; the call
  raises ``EngineDiedError`` (engine named, log quoted, recovery said) within a bounded time, and
  ``save_ckpt`` then writes a checkpoint that ``load_ckpt`` restores exactly. vLLM runs in process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): there is no engine process to lose; recorded as such.

Models are Llamas with random weights made from configs; prompts are token ids (no tokenizer). The
models stay on the CPU so device memory is the engine's alone. Writes ``DIR/edges_<engine>.json``
and ``DIR/edges_<engine>.log``; exits 1 when a check failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

SIZES = {
    # ~1.0B: weights of 2 GiB in bf16, enough for host and device memory to show clearly.
    "1b": {"hidden_size": 2048, "num_layers": 16, "vocab_size": 32000, "max_position_embeddings": 2048},
    # CPU dry run (vLLM's CPU attention needs head size 32: hidden 128 / 4 heads).
    "tiny": {"hidden_size": 128, "num_layers": 2, "vocab_size": 128, "max_position_embeddings": 128},
}


class Run:
    """Checks, log lines and the budget of one run."""

    def __init__(self, out: Path, engine: str, budget_s: float) -> None:
        self.out, self.engine = out, engine
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.checks: list[dict[str, Any]] = []
        self.phases: dict[str, Any] = {}
        self.log_file = open(out / f"edges_{engine}.log", "w")  # noqa: SIM115 - closed in finish()

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def check(self, phase: str, name: str, ok: bool, **values: Any) -> bool:
        self.checks.append({"phase": phase, "check": name, "ok": bool(ok), **values})
        self.log(f"{'PASS' if ok else 'FAIL'} {phase}: {name} {json.dumps(values, default=str)}")
        return bool(ok)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def phase(self, name: str, need_s: float, fn: Any, *args: Any) -> None:
        if self.left() < need_s:
            self.phases[name] = f"not run: {self.left():.0f} s left of the budget, needs ~{need_s:.0f} s"
            self.log(f"SKIP {name}: {self.phases[name]}")
            return
        t = time.monotonic()
        self.log(f"== {name}")
        try:
            fn(self, *args)
            self.phases[name] = f"ran in {time.monotonic() - t:.1f} s"
        except Exception as e:
            self.phases[name] = f"error after {time.monotonic() - t:.1f} s: {type(e).__name__}: {e}"
            self.check(name, "phase ran without an unexpected error", False, error=f"{type(e).__name__}: {e}")
            self.log(traceback.format_exc())

    def finish(self, meta: dict[str, Any]) -> int:
        failed = [c for c in self.checks if not c["ok"]]
        result = {
            **meta,
            "engine": self.engine,
            "wall_s": round(time.monotonic() - self.t0, 1),
            "phases": self.phases,
            "checks": self.checks,
            "failed": len(failed),
        }
        (self.out / f"edges_{self.engine}.json").write_text(json.dumps(result, indent=2, default=str))
        self.log(f"{'phase':<10} {'check':<62} result")
        for c in self.checks:
            self.log(f"{c['phase']:<10} {c['check'][:62]:<62} {'ok' if c['ok'] else 'FAILED'}")
        for name, state in self.phases.items():
            self.log(f"phase {name}: {state}")
        self.log(f"{len(self.checks) - len(failed)} of {len(self.checks)} checks passed")
        self.log_file.close()
        return 1 if failed else 0


# ------------------------------------------------------------------------------ measurements
def device_used() -> int:
    """Bytes in use on the device (every process: SGLang's schedulers hold the engine's memory)."""
    import torch

    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def host_rss() -> int:
    """Resident bytes of this process and all its descendants (SGLang's host copy lives in its
    scheduler process; vLLM's in this one)."""
    from lightrft.strategy.utils import child_pids

    pids, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        if pid in pids:
            continue
        pids.add(pid)
        todo += child_pids(pid)
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def gib(n: float) -> float:
    return round(n / 2**30, 3)


# ---------------------------------------------------------------------------------- models
def make_model(size: str, seed: int) -> Any:
    """A Llama of ``SIZES[size]`` with random weights (seeded; the global RNG is left alone)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES[size]
    config = LlamaConfig(
        vocab_size=s["vocab_size"],
        hidden_size=s["hidden_size"],
        intermediate_size=(8 * s["hidden_size"]) // 3 // 64 * 64
        if s["hidden_size"] >= 1024
        else 2 * s["hidden_size"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=16 if s["hidden_size"] >= 1024 else 4,
        num_key_value_heads=8 if s["hidden_size"] >= 1024 else 2,
        max_position_embeddings=s["max_position_embeddings"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def weight_bytes(model: Any, itemsize: int) -> int:
    return sum(p.numel() for p in model.parameters()) * itemsize


def prompts(size: str, n: int = 4, length: int = 20, seed: int = 7, step: int = 3) -> list[list[int]]:
    """``n`` random prompts of ``length``, ``length + step``, ... tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = SIZES[size]["vocab_size"]
    return [torch.randint(3, vocab, (length + step * i,), generator=g).tolist() for i in range(n)]


def greedy(strategy: Any, ids: list[list[int]], max_new: int = 16) -> list[list[int]]:
    from lightrft.strategy import SamplingParams

    sp = SamplingParams(max_new_tokens=max_new, temperature=0.0)
    outs = strategy.gather_and_generate(prompt_token_ids=ids, sampling_params=sp, sleep_engine=False)
    return [o.output_token_ids for o in outs]


def lora_actor(base: Any, r: int = 8, alpha: int = 16) -> tuple[Any, Any]:
    """A LoRA model over ``base`` (q_proj, v_proj; nonzero deltas) and the merged plain model it
    equals: ``lightrft.testing.make_lora_like`` (peft's names and attributes; peft itself is not
    on the GPU machine)."""
    from lightrft.testing import make_lora_like

    return make_lora_like(base, r=r, alpha=alpha)


# ---------------------------------------------------------------------------------- strategy
def make_strategy(engine: str, device: str, **cfg: Any) -> Any:
    from lightrft.strategy import get_strategy

    base = {
        "strategy": "fsdp",
        "train_batch_size": 1,
        "micro_train_batch_size": 1,
        "bf16": device == "cuda",
        "seed": 3,
        "engine_type": engine,
        "engine_mem_util": 0.3,
        "engine_enforce_eager": device != "cuda",
        "weight_sync_bucket_mb": 256,
    }
    base.update(cfg)
    return get_strategy(base)


def setup(strategy: Any, model: Any) -> tuple[Any, int]:
    """The engine built from ``model``, and the device bytes its start took."""
    before = device_used()
    engine = strategy.setup_inference_engine(model=model)
    return engine, device_used() - before


# ------------------------------------------------------------------------------------ phases
def phase_levels(run: Run, ctx: dict[str, Any]) -> None:
    """Item 2 on one engine (vLLM, hf: both levels; SGLang: the level it was started for)."""
    strategy, model, ids = ctx["strategy"], ctx["model"], ctx["ids"]
    held = ctx["held"]
    wbytes = weight_bytes(model, 2 if ctx["device"] == "cuda" else 4)
    ref = greedy(strategy, ids)
    ctx["ref"] = ref
    levels = ctx["levels"]
    for level in levels:
        p = f"level{level}"
        d0, h0 = device_used(), host_rss()
        t = time.monotonic()
        strategy.maybe_sleep_inference_engine(level)
        sleep_s = time.monotonic() - t
        d1, h1 = device_used(), host_rss()
        freed, grown = d0 - d1, h1 - h0
        if ctx["device"] == "cuda":
            run.check(
                p,
                "sleep frees >= 90% of the device memory the engine took",
                freed >= 0.9 * held,
                freed_gib=gib(freed),
                held_gib=gib(held),
                sleep_s=round(sleep_s, 3),
            )
            if level == 1:
                run.check(
                    p,
                    "level 1 keeps a host copy: host grows >= 80% of the weights",
                    grown >= 0.8 * wbytes,
                    host_grown_gib=gib(grown),
                    weights_gib=gib(wbytes),
                )
            else:
                run.check(
                    p,
                    "level 2 keeps no copy: host grows <= 10% of the weights",
                    grown <= 0.1 * wbytes,
                    host_grown_gib=gib(grown),
                    weights_gib=gib(wbytes),
                )
        if level == 1:
            strategy.wakeup_inference_engine()
            run.check(p, "wake alone restores identical outputs", greedy(strategy, ids) == ref)
        else:
            try:
                strategy.wakeup_inference_engine()
                raised = ""
            except RuntimeError as e:
                raised = str(e)
            run.check(
                p,
                "wake without a push raises the one clear error",
                "discarded its weights (sleep level 2)" in raised and "update_engine_weights" in raised,
                error=raised[:200],
            )
            t = time.monotonic()
            strategy.update_engine_weights(model)
            push_s = time.monotonic() - t
            run.check(
                p,
                "after level 2 + push, outputs are identical",
                greedy(strategy, ids) == ref,
                push_s=round(push_s, 3),
            )
    refused = ctx.get("refused_level")
    if refused is not None:
        try:
            strategy.maybe_sleep_inference_engine(refused)
            raised = ""
        except RuntimeError as e:
            raised = str(e)
        run.check(
            f"level{refused}",
            f"level {refused} is refused on an engine started for the other level",
            "engine_sleep_level" in raised,
            error=raised[:200],
        )


def phase_recreate_vllm(run: Run, ctx: dict[str, Any]) -> None:
    """Item 1 on vLLM: a mismatched second engine is refused; a matching one reuses the process's."""
    import torch

    strategy, size, ids, ref = ctx["strategy"], ctx["size"], ctx["ids"], ctx["ref"]
    sleep_mode = ctx["device"] == "cuda"
    other = make_model(size, seed=5)
    other.config.max_position_embeddings = SIZES[size]["max_position_embeddings"] // 2  # other settings
    t = time.monotonic()
    try:
        strategy.setup_inference_engine(model=other)
        raised = ""
    except RuntimeError as e:
        raised = str(e)
    if sleep_mode:
        run.check(
            "recreate",
            "an engine of other settings is refused, saying what works",
            "one sleep-mode engine per process" in raised
            and "What works" in raised
            and "max_position_embeddings" in raised,
            error=raised[:300],
            took_s=round(time.monotonic() - t, 2),
        )
    else:
        # Without sleep mode (CPU) a second engine is an ordinary new engine.
        run.check(
            "recreate",
            "without sleep mode a second engine of other settings starts",
            raised == "",
            error=raised[:300],
        )
    m2 = make_model(size, seed=21)
    t = time.monotonic()
    engine = strategy.setup_inference_engine(model=m2)
    took = time.monotonic() - t
    out2 = greedy(strategy, ids)
    reused = bool(getattr(engine, "reused", False))
    if sleep_mode:
        run.check(
            "recreate",
            "an engine of the same settings reuses the process's engine",
            reused,
            setup_s=round(took, 2),
        )

    def checksum() -> float:
        if hasattr(engine, "param_checksum"):
            return float(engine.param_checksum())
        return float(sum(p.detach().float().sum() for p in engine.model.parameters()))  # hf's copy

    c2 = checksum()
    run.check("recreate", "the new model generates differently from the first", out2 != ref)
    strategy.update_engine_weights(ctx["model"])
    c1 = checksum()
    run.check("recreate", "pushing the first model back restores its outputs", greedy(strategy, ids) == ref)
    strategy.update_engine_weights(m2)
    c2_again = checksum()
    # The engine's own checksum of the same weights is the same sum in the same order: exact up to
    # float32 summation noise (1e-6 relative); two random models differ by more than 1e-5 relative
    # (the sums are dominated by the norm weights, ones in both: the random part is what differs).
    run.check(
        "recreate",
        "setup with the new model loaded it (checksum as after pushing it)",
        abs(c2 - c2_again) <= 1e-6 * max(1.0, abs(c2)) and abs(c2 - c1) > 1e-5 * max(1.0, abs(c1)),
        after_setup=c2,
        after_push=c2_again,
        first_model=c1,
    )
    if ctx["device"] == "cuda":
        dt = engine.weight_dtype or torch.float32
        s_ref = float(sum(p.detach().to(dt).float().sum() for p in ctx["model"].parameters()))
        s_m2 = float(sum(p.detach().to(dt).float().sum() for p in m2.parameters()))
        # vLLM on CUDA holds the same elements (fused into qkv / gate_up, summed in another order):
        # a rounding difference far below the gap between two random models' sums. (vLLM on CPU
        # repacks its linear weights, so there the sum differs and only the check above applies.)
        run.check(
            "recreate",
            "the engine's checksum is the new model's own sum",
            abs(c2 - s_m2) < 0.01 * abs(s_ref - s_m2),
            engine_sum=c2,
            new_sum=s_m2,
            old_sum=s_ref,
        )
    strategy.update_engine_weights(ctx["model"])  # the phases after this one start from the first model


def phase_peft(run: Run, ctx: dict[str, Any]) -> None:
    """Item 3: a LoRA actor's engine, a level-2 sleep, a push: no missing weights, merged outputs."""
    strategy, ids, model = ctx["strategy"], ctx["ids"], ctx["model"]
    actor, merged = lora_actor(model)
    engine = strategy.setup_inference_engine(model=actor)  # vLLM on GPU: reuses the parked engine
    first = greedy(strategy, ids)
    strategy.update_engine_weights(merged)
    want = greedy(strategy, ids)
    want_sum = engine.param_checksum() if hasattr(engine, "param_checksum") else None
    run.check("peft", "the LoRA actor's engine generates as the merged model", first == want)
    strategy.maybe_sleep_inference_engine(2)
    try:
        strategy.update_engine_weights(actor)
        raised = ""
    except RuntimeError as e:
        raised = str(e)
    run.check(
        "peft", "a full LoRA push after a level-2 sleep misses no weights", raised == "", error=raised[:300]
    )
    got = greedy(strategy, ids)
    run.check("peft", "after the push, outputs equal the merged model's", got == want)
    if want_sum is not None:
        s = engine.param_checksum()
        run.check(
            "peft",
            "after the push, the checksum equals the merged model's",
            abs(s - want_sum) <= 1e-6 * max(1.0, abs(want_sum)),
            engine_sum=s,
            merged_sum=want_sum,
        )


def phase_death(run: Run, ctx: dict[str, Any]) -> None:
    """Item 8 on SGLang: kill the scheduler during a long generation."""
    import torch

    from lightrft.strategy import EngineDiedError, SamplingParams

    strategy, size = ctx["strategy"], ctx["size"]
    engine = strategy.inference_engine
    pids = list(getattr(engine, "engine_pids", []))
    run.check("death", "the engine's processes are known", bool(pids), pids=pids)
    if not pids:
        return
    import psutil  # an SGLang dependency

    # The engine's tree, with what the schedulers spawned (the kill orphans those). A
    # psutil.Process keeps its create time, so a pid reused later is not taken for it.
    tree: dict[int, Any] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree.update((p.pid, p) for p in [root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            pass
    from lightrft.engines._sglang_procs import _cmdline

    # SGLang names its processes (setproctitle) "sglang::scheduler..." where it can; the schedulers
    # start before the detokenizer.
    victim = next((p for p in pids if "scheduler" in _cmdline(p).lower()), pids[0])
    long = SamplingParams(max_new_tokens=SIZES[size]["max_position_embeddings"] // 2, temperature=1.0, n=4)
    many = prompts(size, n=32, length=16, seed=9, step=0)
    killed_at: list[float] = []

    def kill() -> None:
        time.sleep(1.0)
        killed_at.append(time.monotonic())
        os.kill(victim, signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    err: BaseException | None = None
    try:
        for _ in range(5):  # long generations; the kill lands inside the first (or the next raises)
            strategy.gather_and_generate(prompt_token_ids=many, sampling_params=long, sleep_engine=False)
    except BaseException as e:  # noqa: BLE001 - recorded
        err = e
    after = time.monotonic() - killed_at[0] if killed_at else None
    msg = str(err or "")
    run.check(
        "death",
        "the generation raises EngineDiedError within 30 s of the kill",
        isinstance(err, EngineDiedError) and after is not None and after <= 30,
        error_type=type(err).__name__,
        seconds_after_kill=after,
        victim=victim,
    )
    run.check(
        "death",
        "the error names the engine, quotes its log and says how to recover",
        "'sglang'" in msg and "SGLang log" in msg and "save_ckpt" in msg and "setup_inference_engine" in msg,
        message_head=msg[:300],
    )
    t = time.monotonic()
    try:
        strategy.update_engine_weights(ctx["model"])
        raised: BaseException | None = None
    except BaseException as e:  # noqa: BLE001 - recorded
        raised = e
    run.check(
        "death",
        "the next update_engine_weights raises EngineDiedError at once",
        isinstance(raised, EngineDiedError) and time.monotonic() - t < 5,
        error_type=type(raised).__name__,
    )
    # Training state intact: a prepared actor trains a step, saves, and a fresh one loads it exactly.
    actor = make_model("tiny", seed=4)
    actor = strategy.prepare_model(actor)
    optim = strategy.create_optimizer(actor, lr=1e-3)
    actor, optim, _ = strategy.prepare((actor, optim, None))
    x = torch.randint(3, 100, (1, 12), device=strategy.device)
    strategy.backward(actor(input_ids=x, labels=x).loss, actor, optim)
    strategy.optimizer_step(optim, actor, None)
    ckpt = Path(tempfile.mkdtemp(prefix="edges-ckpt-", dir=run.out))
    strategy.save_ckpt(actor, str(ckpt))
    want = {n: t.detach().float().cpu().clone() for b in strategy.iter_weight_buckets(actor) for n, t in b}
    fresh = strategy.prepare_model(make_model("tiny", seed=99))
    fo = strategy.create_optimizer(fresh, lr=1e-3)
    fresh, fo, _ = strategy.prepare((fresh, fo, None))
    strategy.load_ckpt(fresh, str(ckpt))
    got = {n: t.detach().float().cpu() for b in strategy.iter_weight_buckets(fresh) for n, t in b}
    same = want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    run.check(
        "death",
        "after the engine died, save_ckpt writes a checkpoint that loads exactly",
        same,
        path=str(ckpt),
    )
    strategy.engine_lifecycle.shutdown()
    # Left: still running, or a zombie of this process (the engine must reap its own children); a
    # zombie of another parent is that parent's to reap.
    left: dict[int, list[Any]] = {}
    for pid, proc in tree.items():
        try:
            if proc.is_running():  # True for a zombie too
                status, ppid = proc.status(), proc.ppid()
                if status != psutil.STATUS_ZOMBIE or ppid == os.getpid():
                    left[pid] = [status, ppid]
        except psutil.NoSuchProcess:
            pass
    run.check(
        "death",
        "shutdown of the dead engine leaves none of its processes",
        not left,
        left=sorted(left),
        tree=sorted(tree),
        status_parent={str(p): v for p, v in left.items()},
    )


# ---------------------------------------------------------------------------------- engines
def run_engine(run: Run, args: argparse.Namespace) -> None:
    device, size = args.device, args.size
    ids = prompts(size)
    model = make_model(size, seed=1)
    if args.engine == "sglang":
        # Engine 1: level 2 (the default); level 1 is refused on it. Engine 2 (a second engine in
        # the same process, item 1): level 1, then level 2 on it; then item 8 on it.
        strategy = make_strategy("sglang", device)
        _, held = setup(strategy, model)
        ctx = {
            "strategy": strategy,
            "model": model,
            "ids": ids,
            "device": device,
            "size": size,
            "held": held,
            "levels": [2],
            "refused_level": 1,
        }
        run.phase("levels", 30, phase_levels, ctx)
        strategy.engine_lifecycle.shutdown()
        strategy1 = make_strategy("sglang", device, engine_sleep_level=1)
        t = time.monotonic()
        try:
            _, held1 = setup(strategy1, model)
            started = ""
        except Exception as e:  # noqa: BLE001 - recorded
            started, held1 = f"{type(e).__name__}: {e}", 0
        run.check(
            "recreate",
            "a second SGLang engine starts in the same process after shutdown",
            started == "",
            error=started[:300],
            start_s=round(time.monotonic() - t, 1),
        )
        if started:
            return
        ctx1 = {**ctx, "strategy": strategy1, "held": held1, "levels": [1, 2], "refused_level": None}
        run.phase("levels-1", 40, phase_levels, ctx1)
        run.phase("death", 40, phase_death, ctx1)
        return
    strategy = make_strategy(args.engine, device)
    t = time.monotonic()
    _, held = setup(strategy, model)
    run.log(f"engine started in {time.monotonic() - t:.1f} s, took {gib(held)} GiB of device memory")
    ctx = {
        "strategy": strategy,
        "model": model,
        "ids": ids,
        "device": device,
        "size": size,
        "held": held,
        "levels": [1, 2],
        "refused_level": None,
    }
    run.phase("levels", 30, phase_levels, ctx)
    if "ref" not in ctx:
        return
    run.phase("recreate", 40 if device == "cuda" else 20, phase_recreate_vllm, ctx)
    if args.engine == "vllm":
        run.phase("peft", 30, phase_peft, ctx)
    else:
        run.phases["peft"] = "not run: item 3 is about the vllm engine"
    run.phases["death"] = (
        "not applicable: the vllm engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, "
        "external_launcher), so no engine process can die apart from training"
        if args.engine == "vllm"
        else "not applicable: the hf engine runs in this process"
    )
    strategy.engine_lifecycle.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["vllm", "sglang", "hf"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 1b on cuda, tiny on cpu")
    args = ap.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.size = args.size or ("1b" if args.device == "cuda" else "tiny")
    if args.engine == "sglang" and args.device != "cuda":
        ap.error("--engine sglang needs --device cuda (SGLang has no CPU path here)")
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)  # expandable segments defeat sleep (refused)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.engine, args.budget_s)
    meta: dict[str, Any] = {
        "device": args.device,
        "size": args.size,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "budget_s": args.budget_s,
    }
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    for mod in ("vllm", "sglang", "transformers", "peft"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - not installed here
            meta[mod] = None
    try:
        run_engine(run, args)
    except Exception as e:  # noqa: BLE001 - recorded, and a failed check
        run.check("setup", "the run started its engine", False, error=f"{type(e).__name__}: {e}")
        run.log(traceback.format_exc())
    return run.finish(meta)


if __name__ == "__main__":
    sys.exit(main())
