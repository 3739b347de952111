"""Which SGLang start-up works on this GPU machine: tries a few configurations in turn, each in a
process of its own with its own time limit, and prints which one starts and generates.

    PYTHONPATH=/tmp/site:/tmp/ssite python3 scripts/gpu-sglang-probe.py --out $OUT/probe [--budget 540]

Configurations (in this order; ``--only a,b`` picks some):

- ``eager``: ``sglang.Engine`` without CUDA graphs and without the memory saver (does SGLang run at
  all? It also pays the one-time JIT compilation of SGLang's kernels, ``~/.cache/tvm-ffi``).
- ``saver-graphs8``: the memory saver, prefill graphs off, decode graphs up to batch 8 (what
  ``SGLangEngine`` does for a small rollout micro-batch).
- ``lightrft-under-torchrun-env``: ``lightrft.engines.sglang.SGLangEngine`` with torchrun's variables
  set (``TORCHELASTIC_USE_AGENT_STORE=True``, ``RANK``, ``MASTER_PORT``...): weights pushed,
  generation, release / resume + push, identical outputs. The engine must remove those variables
  for its schedulers.
- ``raw-under-torchrun-env``: ``sglang.Engine`` with those variables left in place: expected to hang
  in the schedulers' ``init_process_group`` on torch without pytorch PR #191989 (the cause of the
  2026-11-27 hang); a short limit.

The model is a random 4-layer Llama (hidden 512, 4 heads, 2 KV heads, vocab 1024, bf16), the shape
of ``test_sglang_gpu.py``'s, so the JIT kernels compiled here serve the GPU tests too. Each
configuration's output (SGLang at log level info, and on a time-out every process's Python stack:
the process group gets SIGABRT, SGLang's schedulers run faulthandler) goes to
``<out>/probe-<name>.log``; ``<out>/probe.json`` has the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = {  # name: seconds allowed
    "eager": 170,
    "saver-graphs8": 150,
    "lightrft-under-torchrun-env": 150,
    "raw-under-torchrun-env": 60,
}
TORCHRUN_ENV = {
    "TORCHELASTIC_USE_AGENT_STORE": "True",
    "TORCHELASTIC_RUN_ID": "probe",
    "TORCHELASTIC_RESTART_COUNT": "0",
    "RANK": "0",
    "LOCAL_RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_WORLD_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29577",
}
PROMPTS = [[5, 6, 7, 8], [100, 200]]


def facts() -> dict[str, Any]:
    """What decides the outcome, printed before anything runs."""
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import torch.distributed.rendezvous as rdzv

        # pytorch PR #191989: only honour TORCHELASTIC_USE_AGENT_STORE at MASTER_ADDR:MASTER_PORT.
        out["torch_has_agent_store_fix"] = hasattr(rdzv, "_agent_store_serves")
    except Exception as e:  # noqa: BLE001
        out["torch_has_agent_store_fix"] = f"? {e}"
    for mod in ("sglang", "flashinfer", "torch_memory_saver", "transformers", "tvm_ffi", "sgl_kernel"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            out[mod] = f"not importable: {type(e).__name__}: {e}"[:200]
    out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    nvcc = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
    out["nvcc"] = nvcc or None
    if nvcc:
        v = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        out["nvcc_version"] = v[-1] if v else "?"
    out["ninja"] = shutil.which("ninja")
    out["TVM_FFI_CACHE_DIR"] = os.environ.get("TVM_FFI_CACHE_DIR", "~/.cache/tvm-ffi")
    out["jit_modules_cached"] = _jit_count()
    out["env"] = {
        k: os.environ.get(k)
        for k in (
            "PYTORCH_CUDA_ALLOC_CONF",
            "LD_PRELOAD",
            "CUDA_VISIBLE_DEVICES",
            "TORCHELASTIC_USE_AGENT_STORE",
        )
    }
    return out


def _jit_count() -> int:
    d = Path(os.path.expanduser(os.environ.get("TVM_FFI_CACHE_DIR", "~/.cache/tvm-ffi")))
    return len(list(d.glob("*/*.so"))) if d.is_dir() else 0


def write_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(path))


# ------------------------------------------------------------------ one configuration (child)
def run_one(name: str, model_dir: str) -> dict[str, Any]:
    import torch

    res: dict[str, Any] = {"name": name, "jit_before": _jit_count()}
    base = {
        "model_path": model_dir,
        "dtype": "bfloat16",
        "skip_tokenizer_init": True,
        "mem_fraction_static": 0.25,
        "context_length": 512,
        "log_level": "info",
        "random_seed": 1,
    }
    t0 = time.perf_counter()
    if name == "lightrft-under-torchrun-env":
        from transformers import AutoModelForCausalLM

        from lightrft.engines.sglang import SGLangEngine
        from lightrft.strategy import SamplingParams

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        engine = SGLangEngine(model=model, mem_fraction_static=0.25, log_level="info", start_timeout_s=140)
        res["ready_s"] = time.perf_counter() - t0
        res["server_args"] = {k: str(v) for k, v in engine.server_args.items() if k != "model_path"}
        res["log_path"] = str(engine.log_path)
        sp = SamplingParams(max_new_tokens=8, temperature=0.0, extra={"ignore_eos": True})
        first = [o.output_token_ids for o in engine.generate(prompt_token_ids=PROMPTS, sampling_params=sp)]
        engine.sleep(2)  # release weights, KV cache, CUDA graphs; then what an RL step does:
        engine.wake_up(["weights"])
        engine.update_weights([list(model.named_parameters())])
        engine.wake_up()
        again = [o.output_token_ids for o in engine.generate(prompt_token_ids=PROMPTS, sampling_params=sp)]
        res["generated"] = [len(x) for x in first]
        res["ok"] = all(len(x) == 8 for x in first) and again == first
        res["identical_after_release_resume_push"] = again == first
        engine.shutdown()
    else:
        from sglang.srt.entrypoints.engine import Engine

        args = dict(base)
        if name == "eager":
            args.update(disable_cuda_graph=True)
        else:
            args.update(
                enable_memory_saver=True, cuda_graph_backend_prefill="disabled", cuda_graph_max_bs_decode=8
            )
        engine = Engine(**args)
        res["ready_s"] = time.perf_counter() - t0
        out = engine.generate(
            input_ids=PROMPTS, sampling_params={"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
        )
        res["generated"] = [len(o["output_ids"]) for o in out]
        res["ok"] = all(n == 8 for n in res["generated"])
        if args.get("enable_memory_saver"):
            free0 = torch.cuda.mem_get_info()[0]
            engine.release_memory_occupation()
            res["released_gib"] = (torch.cuda.mem_get_info()[0] - free0) / 2**30
            engine.resume_memory_occupation()
        engine.shutdown()
    res["total_s"] = time.perf_counter() - t0
    res["jit_after"] = _jit_count()
    return res


# ------------------------------------------------------------------ driver (parent)
def run_child(name: str, limit: float, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    if name.endswith("under-torchrun-env"):
        env.update(TORCHRUN_ENV)
    env.setdefault("PYTHONUNBUFFERED", "1")
    log = out_dir / f"probe-{name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--one", name, "--model", str(model_dir)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(proc)
    took = time.monotonic() - t0
    text = log.read_text(errors="replace")
    result: dict[str, Any] = {"name": name, "limit_s": limit, "wall_s": round(took, 1), "rc": proc.returncode}
    for line in text.splitlines():
        if line.startswith("PROBE_RESULT "):
            result.update(json.loads(line[len("PROBE_RESULT ") :]))
    result["timed_out"] = timed_out
    result.setdefault("ok", False)
    if not result["ok"]:
        result["tail"] = text.splitlines()[-25:]
    return result


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGABRT to the whole process group (every SGLang process dumps its Python stacks: the
    schedulers run faulthandler, the probe's child too), then SIGKILL."""
    for sig, wait in ((signal.SIGABRT, 8.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out") + "/probe")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all configurations together")
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    ap.add_argument("--model", default="/tmp/sglang-probe-model")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.one:  # child
        import faulthandler

        faulthandler.enable()
        res = run_one(a.one, a.model)
        print("PROBE_RESULT " + json.dumps(res), flush=True)
        return

    t_start = time.monotonic()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = facts()
    print("== facts\n" + json.dumps(info, indent=2), flush=True)
    write_model(Path(a.model))
    names = a.only.split(",") if a.only else list(CONFIGS)
    results = []
    for name in names:
        left = a.budget - (time.monotonic() - t_start)
        limit = min(CONFIGS[name], left - 5)
        if limit < 30:
            results.append({"name": name, "skipped": f"{left:.0f} s of the budget left"})
            print(f"== {name}: skipped ({left:.0f} s left)", flush=True)
            continue
        print(f"== {name}: up to {limit:.0f} s", flush=True)
        r = run_child(name, limit, Path(a.model), out_dir)
        results.append(r)
        keys = (
            "ok",
            "timed_out",
            "ready_s",
            "total_s",
            "generated",
            "released_gib",
            "jit_before",
            "jit_after",
        )
        print("   " + json.dumps({k: r.get(k) for k in keys if k in r}), flush=True)
        if not r["ok"]:
            print("   last lines:\n      " + "\n      ".join(r.get("tail", [])), flush=True)
    (out_dir / "probe.json").write_text(json.dumps({"facts": info, "results": results}, indent=2))
    print("\n== summary (config: result)")
    for r in results:
        if "skipped" in r:
            verdict = "skipped"
        elif r["ok"]:
            verdict = f"STARTS in {r.get('ready_s', 0):.0f} s and GENERATES"
        elif r["timed_out"]:
            verdict = f"HUNG (stopped after {r['limit_s']:.0f} s; stacks in probe-{r['name']}.log)"
        else:
            verdict = f"FAILED rc={r['rc']} (probe-{r['name']}.log)"
        print(f"  {r['name']:<30} {verdict}")
    working = [r["name"] for r in results if r.get("ok")]
    print(f"working: {', '.join(working) or 'none'}")


if __name__ == "__main__":
    main()
