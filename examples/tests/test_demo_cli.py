"""lightrft-demo's options: defaults, --config documents, errors, the torchrun command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightrft.config import ConfigError
from lightrft_demo.cli import DemoOptionError, main, parse_options, torchrun_command


# ----------------------------------------------------------------------------------- options
def test_config_document_is_overridden_by_the_command_line(tmp_path: Path) -> None:
    doc = tmp_path / "run.yaml"
    doc.write_text(
        "strategy: deepspeed\nzero_stage: 3\niterations: 7\nactor_learning_rate: 0.02\ngroup_size: 4\n"
    )
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
    argv = [
        "--strategy",
        "fsdp",
        "--nproc",
        "4",
        "--nnodes",
        "2",
        "--rdzv-endpoint",
        "h0:29400",
        "--rdzv-id",
        "j1",
    ]
    cmd = torchrun_command(parse_options(argv))
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    joined = " ".join(cmd)
    assert "--nproc-per-node 4 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint h0:29400 --rdzv-id j1" in joined
    assert cmd[-2:] == ["-m", "lightrft_demo"]  # the ranks read the options from LIGHTRFT_DEMO_ARGV
    single = torchrun_command(parse_options(["--strategy", "fsdp", "--nproc", "2"]))
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
    assert "'vllm'" in err and "lightrft-engines[vllm]" in err, err


def test_one_thread_per_process_unless_omp_num_threads_is_set(monkeypatch, tmp_path: Path) -> None:
    import lightrft_demo.train as train

    seen: list[str | None] = []
    monkeypatch.setattr(train, "run", lambda args: seen.append(os.environ.get("OMP_NUM_THREADS")))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["--output-dir", str(tmp_path)]) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert main(["--output-dir", str(tmp_path)]) == 0
    assert seen == ["1", "3"]
