"""SGLangEngine at the edges (issue 18), against the recording double of ``sglang.Engine`` of
``test_sglang_engine.py``: one meaning per sleep level, PEFT names, and an engine whose scheduler
process dies (a real child process stands in for the scheduler)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the double, also under --import-mode=importlib

from test_sglang_engine import (  # noqa: E402
    CONFIG,
    RecordingSGLangEngine,
    RecordingSGLangRuntime,
    _setup,
    _strategy,
)

from lightrft.engines import _common  # noqa: E402
from lightrft.engines.sglang import SGLangEngine  # noqa: E402
from lightrft.strategy import EngineDiedError, SamplingParams, get_fake_strategy  # noqa: E402
from lightrft.strategy.registry import register_engine  # noqa: E402
from lightrft.strategy.utils import child_pids  # noqa: E402
from lightrft.testing import make_lora_like, make_tiny_llama, rank_threads, run_distributed  # noqa: E402

GREEDY = SamplingParams(5, 0.0)
LEVEL_2_ERROR = r"wakeup_inference_engine\(\): the '.*' engine discarded its weights \(sleep level 2\)"


# ------------------------------------------------------------------ sleep levels
def test_level_2_default_starts_without_a_host_copy_and_wake_needs_a_push() -> None:
    strategy = _strategy(enable_engine_sleep=True)  # engine_sleep_level: the default, 2
    model = make_tiny_llama(seed=6)
    engine, double = _setup(strategy, model)
    assert strategy.config.engine_sleep_level == 2
    assert "enable_weights_cpu_backup" not in double.server_args
    before = engine.generate(prompt_token_ids=[[3, 4]], sampling_params=GREEDY)[0].output_token_ids
    strategy.maybe_sleep_inference_engine()
    assert engine.needs_weight_push
    with pytest.raises(RuntimeError, match=LEVEL_2_ERROR):
        strategy.wakeup_inference_engine()
    strategy.update_engine_weights(model)
    assert engine.generate(prompt_token_ids=[[3, 4]], sampling_params=GREEDY)[0].output_token_ids == before
    # Level 1 needs the host copy this engine was started without: refused, naming the field.
    with pytest.raises(RuntimeError, match=r"sleep\(level=1\).*engine_sleep_level=1 before setup"):
        strategy.maybe_sleep_inference_engine(1)
    assert not engine.is_sleeping  # nothing was released by the refused call


def test_level_1_engine_keeps_the_copy_and_level_2_on_it_still_means_push_first() -> None:
    strategy = _strategy(enable_engine_sleep=True, engine_sleep_level=1)
    model = make_tiny_llama(seed=7)
    engine, double = _setup(strategy, model)
    assert double.server_args["enable_weights_cpu_backup"] is True
    before = engine.generate(prompt_token_ids=[[9]], sampling_params=GREEDY)[0].output_token_ids
    strategy.maybe_sleep_inference_engine()  # level 1
    strategy.wakeup_inference_engine()  # wake alone restores
    assert engine.generate(prompt_token_ids=[[9]], sampling_params=GREEDY)[0].output_token_ids == before
    strategy.maybe_sleep_inference_engine(2)
    assert engine.needs_weight_push
    with pytest.raises(RuntimeError, match=LEVEL_2_ERROR):
        strategy.wakeup_inference_engine()
    strategy.update_engine_weights(model)
    assert engine.generate(prompt_token_ids=[[9]], sampling_params=GREEDY)[0].output_token_ids == before


# ------------------------------------------------------------------ PEFT names
def test_a_lora_actor_pushed_after_a_release_needs_no_other_weight() -> None:
    base = make_tiny_llama(seed=3)
    actor, merged = make_lora_like(base)
    strategy = _strategy(enable_engine_sleep=True)
    engine, _ = _setup(strategy, actor)
    # The one mapping: what a push must cover is what merge_peft_stream yields from the actor.
    assert engine.expected_names == _common.engine_weight_names(actor)
    assert engine.expected_names == {n for n, _ in merged.named_parameters()}
    want = engine.generate(prompt_token_ids=[[5, 6]], sampling_params=GREEDY)[0].output_token_ids
    strategy.maybe_sleep_inference_engine()
    strategy.update_engine_weights(actor)
    assert not engine.needs_weight_push
    assert engine.generate(prompt_token_ids=[[5, 6]], sampling_params=GREEDY)[0].output_token_ids == want
    from test_sglang_engine import _greedy

    assert want == _greedy(merged, [5, 6], 5)[0]  # the engine holds the merged model


def test_a_lora_actor_pushed_into_a_bf16_engine_holds_the_merged_model_rounded_once() -> None:
    """The vLLM failure of the H200 sitting of 2026-12-03 on this engine: the strategy cast the
    base weights and the LoRA factors to the engine's bf16 before the merge, so the engine held
    other weights than the merged model. Now they come in the actor's precision (float32 here)
    and flatten_bucket rounds the merged weight once."""
    with rank_threads():  # the reference merge and the engine's with one thread count, set here
        actor, merged = make_lora_like(make_tiny_llama(seed=3))
        strategy = _strategy(enable_engine_sleep=True, bf16=True)
        engine, double = _setup(strategy, actor)
        strategy.maybe_sleep_inference_engine(2)
        double.payload_dtypes.clear()
        strategy.update_engine_weights(actor)
    # Bitwise by construction: both sides compute W + scale * (B @ A) in float32 from the same
    # float32 tensors and round once to bf16 (the double keeps float32 parameters holding them).
    held = dict(double.model.named_parameters())
    off = sorted(
        n
        for n, p in merged.named_parameters()
        if not torch.equal(held[n].detach(), p.detach().to(torch.bfloat16).float())
    )
    assert off == [], f"pushed weights differ from the merged model's in {off}"
    assert double.payload_dtypes == {torch.bfloat16}  # the engine's dtype once merged
    strategy.engine_lifecycle.shutdown()


# ------------------------------------------------------------------ a dying engine
class ProcessBackedEngine(RecordingSGLangEngine):
    """The double with a real child process standing in for SGLang's scheduler: while it runs the
    engine works; once it is gone every call waits forever, as ``sglang.Engine`` does when its
    scheduler was killed (nobody answers on the socket)."""

    def __init__(self, runtime: Any, **server_args: Any) -> None:
        super().__init__(runtime, **server_args)
        self.scheduler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    def _wait_if_dead(self) -> None:
        while self.scheduler.poll() is not None:
            time.sleep(0.05)  # hangs, like a request to a dead scheduler

    #: Set by a test: generate() runs until the scheduler is gone, then hangs (a kill mid-call).
    busy_until_killed = False

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        while self.busy_until_killed and self.scheduler.poll() is None:
            time.sleep(0.01)
        self._wait_if_dead()
        return super().generate(*args, **kwargs)

    def update_weights_from_tensor(self, *args: Any, **kwargs: Any) -> Any:
        self._wait_if_dead()
        return super().update_weights_from_tensor(*args, **kwargs)

    def resume_memory_occupation(self, tags: Any = None) -> None:
        self._wait_if_dead()
        super().resume_memory_occupation(tags)

    def shutdown(self) -> None:
        if self.scheduler.poll() is None:
            self.scheduler.kill()
        self.scheduler.wait()
        super().shutdown()


def process_backed_class(name: str) -> type:
    runtime = RecordingSGLangRuntime((0, 5, 16), frozenset({"model_path", "enable_weights_cpu_backup"}))

    def create_engine(**server_args: Any) -> Any:
        engine = ProcessBackedEngine(runtime, **server_args)
        runtime.engines.append(engine)
        return engine

    runtime.create_engine = create_engine  # type: ignore[method-assign]

    class DyingSGLangEngine(SGLangEngine):
        runtime_factory = staticmethod(lambda: runtime)

    DyingSGLangEngine.recording_runtime = runtime  # type: ignore[attr-defined]
    register_engine(name, DyingSGLangEngine)
    return DyingSGLangEngine


def _kill_and_generate(strategy: Any, engine: Any, double: Any) -> tuple[BaseException | None, float]:
    if engine.is_leader:
        assert engine.engine_pids == [double.scheduler.pid]  # the scheduler is watched
        Path(engine.log_path).write_text(
            "scheduler: loading weights\nscheduler: CUDA error: an illegal memory access\n"
        )
        os.kill(double.scheduler.pid, signal.SIGKILL)
        double.scheduler.wait()  # dead before the call (a kill during one: the GPU script)
    t0 = time.monotonic()
    try:
        strategy.gather_and_generate(prompt_token_ids=[[1, 2]], sampling_params=GREEDY, sleep_engine=False)
        return None, time.monotonic() - t0
    except BaseException as e:  # noqa: BLE001 - the test looks at it
        return e, time.monotonic() - t0


def test_a_killed_scheduler_raises_a_clear_error_in_bounded_time_and_training_state_survives(
    tmp_path,
) -> None:
    os.environ.pop("LIGHTRFT_SGLANG_DEATH_POLL_S", None)
    cls = process_backed_class("sglang-dying")
    strategy = get_fake_strategy({**CONFIG, "engine_type": "sglang-dying"})
    actor = make_tiny_llama(seed=2)
    optim = strategy.create_optimizer(actor, lr=1e-2)
    actor, optim, _ = strategy.prepare((actor, optim, None))
    engine = strategy.setup_inference_engine(model=make_tiny_llama(seed=2))
    double = cls.recording_runtime.engines[0]
    assert strategy.gather_and_generate(prompt_token_ids=[[1, 2]], sampling_params=GREEDY, sleep_engine=False)
    assert engine.is_alive
    err, took = _kill_and_generate(strategy, engine, double)
    assert isinstance(err, EngineDiedError), f"got {err!r}"
    # Bounded: the watch polls every 0.5 s (DEFAULT_DEATH_POLL_S); 5 s leaves room for a slow CI.
    assert took < 5.0, f"the error took {took:.1f} s"
    msg = str(err)
    assert "the 'sglang' inference engine died" in msg and f"[{double.scheduler.pid}]" in msg
    assert "CUDA error: an illegal memory access" in msg  # the log's last lines are quoted
    assert "strategy.save_ckpt" in msg and "setup_inference_engine" in msg  # how to recover
    t0 = time.monotonic()
    with pytest.raises(EngineDiedError):
        strategy.update_engine_weights(actor)
    with pytest.raises(EngineDiedError):
        strategy.maybe_sleep_inference_engine()
    assert time.monotonic() - t0 < 1.0  # known dead: no waiting
    # Training state intact: a step, a checkpoint, and a fresh model loads it exactly.
    x = torch.randint(0, 128, (2, 8))
    strategy.backward(actor(input_ids=x, labels=x).loss, actor, optim)
    strategy.optimizer_step(optim, actor, None)
    strategy.save_ckpt(actor, str(tmp_path / "ckpt"))
    fresh = make_tiny_llama(seed=50)
    fo = strategy.create_optimizer(fresh, lr=1e-2)
    fresh, fo, _ = strategy.prepare((fresh, fo, None))
    strategy.load_ckpt(fresh, str(tmp_path / "ckpt"))
    for (n, a), (_, b) in zip(actor.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
    strategy.engine_lifecycle.shutdown()
    assert double.shut and double.scheduler.poll() is not None
    # Recovery as the message says: a new engine works.
    strategy.setup_inference_engine(model=make_tiny_llama(seed=2))
    assert strategy.gather_and_generate(prompt_token_ids=[[1, 2]], sampling_params=GREEDY, sleep_engine=False)
    strategy.engine_lifecycle.shutdown()


def test_a_kill_during_a_call_ends_the_wait() -> None:
    cls = process_backed_class("sglang-dying-mid")
    strategy = get_fake_strategy({**CONFIG, "engine_type": "sglang-dying-mid"})
    strategy.setup_inference_engine(model=make_tiny_llama(seed=2))
    double = cls.recording_runtime.engines[0]
    double.busy_until_killed = True

    def kill() -> None:
        time.sleep(0.5)
        double.scheduler.kill()

    threading.Thread(target=kill, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(EngineDiedError, match=r"exited during generate"):
        strategy.gather_and_generate(prompt_token_ids=[[1]], sampling_params=GREEDY, sleep_engine=False)
    # 0.5 s until the kill, then at most one 0.5 s poll (DEFAULT_DEATH_POLL_S) plus scheduling slack.
    assert time.monotonic() - t0 < 4.0
    strategy.engine_lifecycle.shutdown()


def test_sigquit_from_a_failing_scheduler_does_not_kill_training() -> None:
    """SGLang answers a dead scheduler with SIGQUIT to this process, and its handler kills the
    process tree; the engine takes SIGQUIT over and reports the death at the next call."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set in the main thread only")  # pragma: no cover
    process_backed_class("sglang-sigquit")
    strategy = get_fake_strategy({**CONFIG, "engine_type": "sglang-sigquit"})
    strategy.setup_inference_engine(model=make_tiny_llama(seed=2))
    try:
        os.kill(os.getpid(), signal.SIGQUIT)  # would end pytest with SGLang's (or the default) handler
        time.sleep(0.1)
        with pytest.raises(EngineDiedError, match="reported a failure"):
            strategy.gather_and_generate(prompt_token_ids=[[1]], sampling_params=GREEDY, sleep_engine=False)
    finally:
        strategy.engine_lifecycle.shutdown()
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


#: The scheduler's grandchild: it ignores SIGTERM (then touches the file argv[1]), so only SIGKILL
#: ends it.
_STUBBORN = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open(sys.argv[1], 'w').close(); time.sleep(600)"
)


def _state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of ``pid``, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


class ProcessTreeEngine(RecordingSGLangEngine):
    """The double with SGLang's process layout: a scheduler and a detokenizer started as spawn
    ``multiprocessing.Process`` children (as ``sglang.Engine`` starts them), the scheduler with a
    grandchild of its own. ``shutdown`` is SGLang 0.5.16's (``kill_process_tree``: SIGKILL to
    what is still below this process, no wait, no reap), or does nothing, or raises."""

    shutdown_mode = "sglang-0.5.16"

    def __init__(self, runtime: Any, **server_args: Any) -> None:
        super().__init__(runtime, **server_args)
        spawn = multiprocessing.get_context("spawn")
        ready = Path(tempfile.mkdtemp(prefix="sglang-tree-")) / "grandchild-ready"
        grandchild = [sys.executable, "-c", _STUBBORN, str(ready)]
        self.scheduler = spawn.Process(target=subprocess.call, args=(grandchild,))
        self.detokenizer = spawn.Process(target=time.sleep, args=(600,))
        self.scheduler.start()
        self.detokenizer.start()
        deadline = time.monotonic() + 60
        while not ready.exists():  # Engine() returns once its processes run
            assert time.monotonic() < deadline, "the scheduler's grandchild did not start"
            time.sleep(0.05)
        ready.unlink()
        ready.parent.rmdir()
        (self.grandchild,) = child_pids(self.scheduler.pid)

    @property
    def tree(self) -> list[int]:
        return [self.scheduler.pid, self.detokenizer.pid, self.grandchild]

    def shutdown(self) -> None:
        super().shutdown()
        if self.shutdown_mode == "raises":
            raise RuntimeError("SGLang shutdown failed")
        if self.shutdown_mode == "sglang-0.5.16":
            below = {self.scheduler.pid, self.detokenizer.pid} | set(child_pids(self.scheduler.pid))
            for pid in below:
                if _state(pid) is not None:
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("victim", "shutdown_mode"),
    [("scheduler", "sglang-0.5.16"), ("detokenizer", "raises"), (None, "nothing")],
)
def test_shutdown_leaves_no_process_of_the_engine_running_or_unreaped(
    victim: str | None, shutdown_mode: str
) -> None:
    """The GPU run of 2026-12-03 (SGLang 0.5.16): after a SIGKILL to the scheduler, the engine's
    shutdown left the scheduler and the detokenizer behind. Dead or alive, whatever SGLang's own
    shutdown does, shutdown stops the whole tree (the grandchild a dead scheduler orphaned too,
    though it ignores SIGTERM) and reaps this process's children, in bounded time."""
    runtime = RecordingSGLangRuntime((0, 5, 16), frozenset({"model_path", "enable_weights_cpu_backup"}))

    def create_engine(**server_args: Any) -> Any:
        engine = ProcessTreeEngine(runtime, **server_args)
        engine.shutdown_mode = shutdown_mode
        runtime.engines.append(engine)
        return engine

    runtime.create_engine = create_engine  # type: ignore[method-assign]

    class TreeSGLangEngine(SGLangEngine):
        runtime_factory = staticmethod(lambda: runtime)

    name = f"sglang-tree-{victim or 'alive'}"
    register_engine(name, TreeSGLangEngine)
    strategy = get_fake_strategy({**CONFIG, "engine_type": name})
    engine = strategy.setup_inference_engine(model=make_tiny_llama(seed=2))
    double = runtime.engines[0]
    tree = double.tree
    assert sorted(engine.engine_pids) == sorted(tree[:2])  # found as the real engine finds them
    assert all(_state(p) is not None for p in tree)
    if victim is not None:
        os.kill(getattr(double, victim).pid, signal.SIGKILL)
        time.sleep(0.2)  # dead: a zombie until reaped; the scheduler's grandchild is orphaned
        with pytest.raises(EngineDiedError):
            strategy.gather_and_generate(prompt_token_ids=[[1]], sampling_params=GREEDY, sleep_engine=False)
    t0 = time.monotonic()
    if shutdown_mode == "raises":
        with pytest.raises(RuntimeError, match="SGLang shutdown failed"):
            strategy.engine_lifecycle.shutdown()
    else:
        strategy.engine_lifecycle.shutdown()
    took = time.monotonic() - t0
    # SIGTERM's grace (3 s: the grandchild ignores it), then SIGKILL; 10 s leaves room for a slow CI.
    assert took < 10.0, f"shutdown took {took:.1f} s"
    me = os.getpid()
    left = {p: s for p in tree if (s := _state(p)) is not None and (s[0] != "Z" or s[1] == me)}
    assert not left, f"left running or unreaped (pid: (state, parent)): {left}"
    # The multiprocessing children were joined through their Process objects (exit codes kept).
    assert double.scheduler.exitcode is not None and double.detokenizer.exitcode is not None
    assert engine.closed


def death_tp2() -> dict[str, Any]:
    """2 gloo ranks, one engine (tensor-parallel group of 2) on rank 0; rank 0 kills its scheduler."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    cls = process_backed_class("sglang-dying-tp2")
    strategy = get_fake_strategy({**CONFIG, "engine_tp_size": 2, "engine_type": "sglang-dying-tp2"})
    engine = strategy.setup_inference_engine(model=make_tiny_llama(seed=2))
    double = cls.recording_runtime.engines[0] if cls.recording_runtime.engines else None
    err, took = _kill_and_generate(strategy, engine, double)
    out = {"type": type(err).__name__, "took": took, "quoted": "illegal memory access" in str(err)}
    try:
        strategy.update_engine_weights(make_tiny_llama(seed=3))
        out["next"] = "none"
    except BaseException as e:  # noqa: BLE001 - reported
        out["next"] = type(e).__name__
    strategy.engine_lifecycle.shutdown()
    return out


@pytest.mark.slow
def test_every_rank_of_the_group_learns_of_the_death() -> None:
    results = run_distributed(
        "test_sglang_edges:death_tp2", 2, env={"PYTHONPATH": os.path.dirname(__file__)}, timeout=300
    )
    for rank, r in enumerate(results):
        assert r["type"] == "EngineDiedError" and r["quoted"], f"rank {rank}: {r}"
        assert r["took"] < 5.0, f"rank {rank} took {r['took']:.1f} s"
        assert r["next"] == "EngineDiedError", f"rank {rank}: {r}"
