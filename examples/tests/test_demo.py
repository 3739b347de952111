"""lightrft-demo as a user runs it: options, every strategy, kill and resume, two nodes.

Short runs use a higher learning rate so that 6-10 steps are enough to see the reward rise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightrft.config import ConfigError
from lightrft_demo import read_metrics
from lightrft_demo.cli import DemoOptionError, main, parse_options, torchrun_command
from lightrft_demo.train import SetupError, run

FAST = ["--actor_learning_rate", "2e-2", "--save-steps", "2"]
DEMO = [sys.executable, "-m", "lightrft_demo"]
SCRIPT = str(Path(sys.executable).parent / "lightrft-demo")


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # the demo must decide to launch torchrun itself
    return env


def _run(cmd: list[str], timeout: float = 420) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_improves(records: list[dict], margin: float = 0.15) -> None:
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + margin, f"reward did not rise by {margin}: {[round(x, 3) for x in rewards]}"


def _steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records]


def _kill_when(proc: subprocess.Popen, metrics: Path, steps: int, timeout: float = 300) -> None:
    """SIGKILLs the whole process group (launcher, torchrun, ranks) once ``steps`` records exist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc={proc.returncode}) before step {steps}:\n{out[-2000:]}\n{err[-4000:]}")
        if len(read_metrics(metrics)) >= steps:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no step {steps} within {timeout} s")


# ----------------------------------------------------------------------------------- options
def test_config_document_is_overridden_by_the_command_line(tmp_path: Path) -> None:
    doc = tmp_path / "run.yaml"
    doc.write_text("strategy: deepspeed\nzero_stage: 3\niterations: 7\nactor_learning_rate: 0.02\ngroup_size: 4\n")
    args = parse_options(["--config", str(doc), "--iterations", "9"])
    assert (args.strategy, args.zero_stage, args.actor_learning_rate) == ("deepspeed", 3, 0.02)
    assert (args.iterations, args.group_size, args.engine_type) == (9, 4, "hf")


def test_config_document_errors_name_the_key(tmp_path: Path) -> None:
    doc = tmp_path / "run.yaml"
    doc.write_text("iteratons: 7\n")
    with pytest.raises(DemoOptionError, match=r"'iteratons'.*demo options are .*iterations"):
        parse_options(["--config", str(doc)])
    doc.write_text("zero_stage: 5\n")
    with pytest.raises(ConfigError, match="zero_stage"):
        parse_options(["--config", str(doc)])
    doc.write_text("group_size: 1\n")
    with pytest.raises(DemoOptionError, match=r"group_size=1 is invalid: it must be an integer >= 2"):
        parse_options(["--config", str(doc)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nproc", "2"], r"strategy='fake' runs in one process"),
        (["--strategy", "fsdp", "--nnodes", "2"], r"nnodes=2 needs --rdzv-endpoint"),
        (["--target-token", "16"], r"target_token=16 is invalid: .* 0\.\.15"),
        (["--resume", "--overwrite"], "contradict"),
    ],
)
def test_bad_options_are_refused_with_the_reason(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(DemoOptionError, match=message):
        parse_options(argv)
    assert main(argv) == 2
    assert "lightrft-demo: error:" in capsys.readouterr().err


def test_torchrun_command_passes_rendezvous_through() -> None:
    argv = ["--strategy", "fsdp", "--nproc", "4", "--nnodes", "2", "--rdzv-endpoint", "h0:29400", "--rdzv-id", "j1"]
    cmd = torchrun_command(parse_options(argv), argv)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    joined = " ".join(cmd)
    assert "--nproc-per-node 4 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint h0:29400 --rdzv-id j1" in joined
    assert cmd[-len(argv) - 2 :] == ["-m", "lightrft_demo", *argv]
    single = torchrun_command(parse_options(["--strategy", "fsdp", "--nproc", "2"]), [])
    assert "--standalone" in single and "--rdzv-endpoint" not in single


def test_engine_that_is_not_installed_gives_the_install_hint(tmp_path: Path, capsys) -> None:
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    assert main(["--engine", "vllm", "--iterations", "1", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "engine_type='vllm'" in err and "lightrft-engines[vllm]" in err, err


# ---------------------------------------------------------------------------------- fake
def test_fake_run_rises_and_writes_its_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run(parse_options(["--iterations", "8", *FAST, "--output-dir", str(out)]))
    records = read_metrics(out / "metrics.jsonl")
    assert _steps(records) == list(range(1, 9)) and records == result.records
    _assert_improves(records)
    # 4 prompts x 8 samples x 6 new tokens on one rank
    assert all(r["tokens"] == 192 and r["tokens_per_s"] > 0 and r["sync_s"] > 0 for r in records)
    assert (out / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model" / "config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "global_step6",
        "global_step8",
        "latest",
    ]  # max_ckpt_num=2 keeps the last two
    # The saved configuration reruns the same setup.
    again = parse_options(["--config", str(out / "config.yaml")])
    assert (again.iterations, again.actor_learning_rate, again.save_steps) == (8, 2e-2, 2)
    # A second run into the same directory must be told what to do.
    with pytest.raises(SetupError, match=r"holds a previous run .*--resume.*--overwrite"):
        run(parse_options(["--iterations", "8", "--output-dir", str(out)]))


def test_fake_killed_mid_run_resumes_with_the_same_curve(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    argv = ["--iterations", "10", *FAST]
    _run([*DEMO, *argv, "--output-dir", str(straight)])
    proc = subprocess.Popen(
        [*DEMO, *argv, "--output-dir", str(killed)], env=_env(), start_new_session=True, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _kill_when(proc, killed / "metrics.jsonl", steps=5)
    before = read_metrics(killed / "metrics.jsonl")
    assert 5 <= len(before) < 10
    resumed = _run([*DEMO, *argv, "--output-dir", str(killed), "--resume"])
    ckpt_step = int((killed / "checkpoints" / "latest").read_text().removeprefix("global_step"))
    records = read_metrics(killed / "metrics.jsonl")
    assert _steps(records) == list(range(1, 11)), "a step is missing or written twice"
    sessions = [r["session"] for r in records]
    resumed_at = sessions.index(1) if 1 in sessions else None
    assert resumed_at is not None and resumed_at % 2 == 0 and 4 <= resumed_at <= len(before), sessions
    assert "resumed from" in resumed.stdout and f"steps {resumed_at + 1}..10" in resumed.stdout
    assert ckpt_step == 10
    # FakeStrategy checkpoints resume bit for bit and prompts / sampling depend only on the step:
    # the interrupted run's curve is the uninterrupted one.
    reference = read_metrics(straight / "metrics.jsonl")
    for ours, theirs in zip(records, reference):
        assert ours["reward"] == pytest.approx(theirs["reward"], abs=1e-6), (ours["step"], ours, theirs)
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------ 2 gloo ranks
@pytest.mark.slow
def test_fsdp_two_ranks_killed_and_resumed(tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    argv = [SCRIPT, "--strategy", "fsdp", "--nproc", "2", "--iterations", "8", *FAST, "--output-dir", str(out)]
    proc = subprocess.Popen(argv, env=_env(), start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    _kill_when(proc, out / "metrics.jsonl", steps=3)
    resumed = _run([*argv, "--resume"])
    records = read_metrics(out / "metrics.jsonl")
    assert _steps(records) == list(range(1, 9)), "a step is missing or written twice"
    assert [r["session"] for r in records].count(1) in (6, 5, 4), records  # resumed at step 2, 3 or 4
    assert "resumed from" in resumed.stdout and "world_size=2" in resumed.stdout
    assert all(r["tokens"] == 384 for r in records)  # 2 ranks x 4 prompts x 8 samples x 6 tokens
    _assert_improves(records)


@pytest.mark.slow
def test_deepspeed_two_ranks_resumes_and_continues(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    base = [*DEMO, "--strategy", "deepspeed", "--zero_stage", "2", "--nproc", "2", *FAST, "--output-dir", str(out)]
    first = _run([*base, "--iterations", "4"])
    assert "lightrft-demo summary" in first.stdout and "deepspeed ZeRO-2" in first.stdout
    _run([*base, "--iterations", "8", "--resume"])
    records = read_metrics(out / "metrics.jsonl")
    assert _steps(records) == list(range(1, 9))
    assert [r["session"] for r in records] == [0] * 4 + [1] * 4
    assert all(r["tokens"] == 384 for r in records)
    _assert_improves(records)


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes(tmp_path: Path) -> None:
    out = tmp_path / "nodes"
    port = _free_port()
    argv = [*DEMO, "--strategy", "fsdp", "--nnodes", "2", "--nproc", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", f"demo-{port}", "--iterations", "6", *FAST, "--output-dir", str(out)]  # fmt: skip
    nodes = [
        subprocess.Popen(argv, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = []
    for node in nodes:
        try:
            stdout, stderr = node.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            for n in nodes:
                n.kill()
            pytest.fail("two-node run did not finish within 420 s")
        assert node.returncode == 0, f"a node failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
        outputs.append(stdout)
    # Rank 0 lives on one of the two agents; only it prints the summary.
    assert sum("lightrft-demo summary" in o for o in outputs) == 1, outputs
    assert any("world_size=2" in o for o in outputs)
    records = read_metrics(out / "metrics.jsonl")
    assert _steps(records) == list(range(1, 7))
    assert all(r["tokens"] == 384 for r in records)  # both nodes' rollouts are counted
    _assert_improves(records, margin=0.1)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6
