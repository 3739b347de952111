"""SGLangEngine on CPU: what is ours, against a recording double of ``sglang.Engine``.

SGLang has no CPU path here, so these tests put :class:`RecordingSGLangEngine` (a stand-in for
``sglang.Engine`` that keeps a real Hugging Face model built from the engine's config directory,
loads the flattened payloads into it and generates greedily) behind the engine's
``runtime_factory`` seam. They check bucket flattening per tensor-parallel rank, the order of
release / resume / push / flush, ``begin/end_weight_update`` by version, the success flag, output
conversion and errors. The real SGLang runs in ``test_sglang_gpu.py`` and ``scripts/gpu-sglang.sh``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightrft.engines import _sglang_compat as compat
from lightrft.engines import _sglang_live as live_push
from lightrft.engines._sglang_buckets import flatten_bucket, unflatten_bucket
from lightrft.engines.sglang import SGLangEngine, request_sampling_params, sampling_dict
from lightrft.strategy import SamplingParams, get_fake_strategy
from lightrft.strategy.registry import register_engine
from lightrft.testing import make_tiny_llama, rank_threads, run_distributed

transformers = pytest.importorskip("transformers")

# ServerArgs fields of the releases the double imitates (only the ones the engine looks at).
FIELDS_0_5_12 = frozenset(
    {"model_path", "disable_piecewise_cuda_graph", "enable_weights_cpu_backup", "cuda_graph_max_bs"}
)
FIELDS_0_5_16 = frozenset(
    {
        "model_path",
        "cuda_graph_backend_prefill",
        "enable_weights_cpu_backup",
        "cuda_graph_max_bs_decode",
        "sleep_on_idle",
    }
)


class RecordingSGLangEngine:
    """A recording double of ``sglang.Engine`` (not SGLang): it logs every call, keeps a Hugging
    Face model built from ``model_path``'s config with random ("dummy") weights, loads
    ``flattened_bucket`` payloads into it by name and generates greedily (or sampled with
    ``sampling_seed``), returning SGLang's output dicts. Releasing ``weights`` overwrites the
    weights with noise (SGLang frees them) unless ``enable_weights_cpu_backup``. From 0.5.21 it
    refuses updates outside ``begin_weight_update`` / ``end_weight_update``, as SGLang does."""

    def __init__(self, runtime: RecordingSGLangRuntime, **server_args: Any) -> None:
        self.runtime = runtime
        self.server_args = server_args
        self.calls: list[tuple[str, Any]] = []
        config = transformers.AutoConfig.from_pretrained(server_args["model_path"])
        torch.manual_seed(1234)  # dummy weights, unlike any test model
        self.model = transformers.AutoModelForCausalLM.from_config(config).eval()
        self.in_session = False
        self.fail_update_at: int | None = None
        self.updates = 0
        self.payload_ranks: list[list[int]] = []
        self.payload_dtypes: set[torch.dtype] = set()
        self.shut = False
        #: What each ``generate`` call received (token ids per request, sampling parameters).
        self.requests: list[dict[str, Any]] = []
        #: The names of each live-push message (``_sglang_live``), in order.
        self.live_messages: list[list[str]] = []
        self.model.load_weights = self._load_weights  # SGLang's models load by name
        #: The prefix cache holds KV of weights older than the last update: set by an update,
        #: cleared by what flushes it in SGLang (``flush_cache``, an update's ``flush_cache=True``,
        #: releasing the KV cache). SGLang would serve from it in silence; the double refuses.
        self.stale_prefix_cache = False
        self.released: set[str] = set()  # tags released and not resumed

    @torch.no_grad()
    def _load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """SGLang's ``model.load_weights``: each tensor copied (and so cast) into its parameter."""
        params = dict(self.model.named_parameters())
        for name, t in named:
            params[name].copy_(t)

    # ---------------------------------------------------------------- weights
    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> Any:
        params = dict(self.model.named_parameters())  # SGLang: None (and a log line) when unknown
        return None if name not in params else params[name].detach().float()[:truncate_size].tolist()

    def update_weights_from_tensor(
        self, named_tensors: list[Any], load_format: str | None = None, flush_cache: bool = True
    ) -> tuple[bool, str]:
        self.calls.append(("update_weights_from_tensor", {"n": len(named_tensors), "flush": flush_cache}))
        self.updates += 1
        if self.fail_update_at == self.updates:
            return False, "injected failure"
        if self.runtime.version >= (0, 5, 21) and not self.in_session:
            return False, "must run between begin_weight_update() and end_weight_update()"
        if flush_cache:  # SGLang flushes after a successful load when asked
            self.stale_prefix_cache = False
        elif "kv_cache" not in self.released:  # a released cache holds nothing
            self.stale_prefix_cache = True
        if load_format == live_push.LOADER:  # tensors by reference, as after SGLang's IPC
            self.live_messages.append([n for n, _ in named_tensors])
            self.payload_dtypes.update(t.dtype for _, t in named_tensors[1:])
            live_push.load_live(self.model, named_tensors)
            return True, "Success"
        assert load_format == "flattened_bucket"
        tp = self.server_args["tp_size"]
        assert len(named_tensors) == tp, f"{len(named_tensors)} payloads for tp_size={tp}"
        self.payload_ranks.append([p["rank"] for p in named_tensors])
        first = unflatten_bucket(named_tensors[0]["flat"], named_tensors[0]["entries"])
        for p in named_tensors[1:]:  # every TP rank received the same weights from its own GPU
            other = unflatten_bucket(p["flat"], p["entries"])
            assert [n for n, _ in other] == [n for n, _ in first]
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, other))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in first:
                self.payload_dtypes.add(t.dtype)
                params[name].copy_(t.to(params[name].dtype))
        return True, "Success"

    def begin_weight_update(self, selector: str = "all") -> tuple[bool, str]:
        self.calls.append(("begin_weight_update", selector))
        self.in_session = True
        return True, ""

    def end_weight_update(self) -> tuple[bool, str]:
        self.calls.append(("end_weight_update", None))
        self.in_session = False
        return True, ""

    def flush_cache(self) -> Any:
        self.calls.append(("flush_cache", None))
        self.stale_prefix_cache = False
        return type("FlushCacheReqOutput", (), {"success": True})()

    # ------------------------------------------------------------------ memory
    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self.calls.append(("release_memory_occupation", list(tags or [])))
        self.released |= set(tags or [])
        if "kv_cache" in (tags or []):  # SGLang's release flushes the caches it frees
            self.stale_prefix_cache = False
        if "weights" in (tags or []) and not self.server_args.get("enable_weights_cpu_backup"):
            with torch.no_grad():
                for p in self.model.parameters():
                    p.normal_()

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self.calls.append(("resume_memory_occupation", list(tags or [])))
        self.released -= set(tags or [])

    def shutdown(self) -> None:
        self.calls.append(("shutdown", None))
        self.shut = True

    # ---------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(
        self,
        input_ids: list[list[int]],
        sampling_params: dict[str, Any] | list[dict[str, Any]],
        return_logprob: bool = False,
        **_: Any,
    ) -> list[dict[str, Any]]:
        """SGLang's batch form: one sampling dict for all requests or one per request; ``n`` (when
        given) samples per request, prompt-major. Each request samples from its own generator
        seeded with its ``sampling_seed``."""
        self.calls.append(("generate", len(input_ids)))
        if self.stale_prefix_cache:
            raise AssertionError(
                "generate over a prefix cache of the old weights: no flush since the last push"
            )
        self.requests.append({"input_ids": [list(x) for x in input_ids], "sampling_params": sampling_params})
        per_request = (
            sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(input_ids)
        )
        assert len(per_request) == len(input_ids)
        out = []
        for ids, params in zip(input_ids, per_request):
            steps, stop = params["max_new_tokens"], set(params.get("stop_token_ids", []))
            gen = torch.Generator().manual_seed(params.get("sampling_seed", 0))
            for _ in range(params.get("n", 1)):
                seq, toks, lps, reason = list(ids), [], [], "length"
                for _ in range(steps):
                    logp = torch.log_softmax(self.model(torch.tensor([seq])).logits[0, -1].float(), -1)
                    if params["temperature"] == 0.0:
                        tok = int(logp.argmax())
                    else:
                        probs = torch.softmax(logp / params["temperature"], -1)
                        tok = int(torch.multinomial(probs, 1, generator=gen))
                    seq.append(tok)
                    toks.append(tok)
                    lps.append((float(logp[tok]), tok, None))
                    if tok in stop:
                        reason = "stop"
                        break
                meta: dict[str, Any] = {"finish_reason": {"type": reason}}
                if return_logprob:
                    meta["output_token_logprobs"] = lps
                out.append({"output_ids": toks, "meta_info": meta})
        return out


class RecordingSGLangEngineBefore0521(RecordingSGLangEngine):
    """The double of a release before 0.5.21: no weight-update sessions."""

    begin_weight_update = None  # type: ignore[assignment]
    end_weight_update = None  # type: ignore[assignment]


class RecordingSGLangRuntime:
    """The runtime seam's double: a version, ServerArgs fields, the recording engine, and a
    payload that keeps the flattened buffer (SGLang's would be a CUDA IPC handle) and the rank
    that made it."""

    def __init__(self, version: tuple[int, int, int], fields: frozenset[str]) -> None:
        self.version = version
        self.server_fields = fields
        self.engines: list[RecordingSGLangEngine] = []
        self.sender_prepared = 0
        #: ``os.environ`` while each engine was created (what SGLang's schedulers would inherit).
        self.env_at_create: list[dict[str, str]] = []
        #: Called before each engine is built (a test's stand-in for a slow or hanging start).
        self.on_create: Any = None

    def create_engine(self, **server_args: Any) -> RecordingSGLangEngine:
        self.env_at_create.append(dict(os.environ))
        if self.on_create is not None:
            self.on_create()
        cls = RecordingSGLangEngine if self.version >= (0, 5, 21) else RecordingSGLangEngineBefore0521
        engine = cls(self, **server_args)
        self.engines.append(engine)
        return engine

    def prepare_sender(self) -> None:
        self.sender_prepared += 1

    def serialize_bucket(self, flat: torch.Tensor, entries: list[Any]) -> dict[str, Any]:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return {"rank": rank, "flat": flat.clone(), "entries": list(entries)}


def engine_class(version: tuple[int, int, int] = (0, 5, 16), fields: frozenset[str] = FIELDS_0_5_16) -> type:
    """An SGLangEngine whose runtime is a fresh :class:`RecordingSGLangRuntime`."""
    runtime = RecordingSGLangRuntime(version, fields)

    class RecordedSGLangEngine(SGLangEngine):
        runtime_factory = staticmethod(lambda: runtime)

    RecordedSGLangEngine.recording_runtime = runtime  # type: ignore[attr-defined]
    return RecordedSGLangEngine


class CharTokenizer:
    """A tokenizer double: one id per character (ord % 128)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 128 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


CONFIG: dict[str, Any] = {"train_batch_size": 2, "micro_train_batch_size": 2, "bf16": False, "seed": 5}


def _strategy(**overrides: Any) -> Any:
    return get_fake_strategy({**CONFIG, **overrides})


@torch.no_grad()
def _greedy(model: Any, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    seq, lps = list(ids), []
    for _ in range(steps):
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), -1)
        tok = int(logp.argmax())
        seq.append(tok)
        lps.append(float(logp[tok]))
    return seq[len(ids) :], lps


def _setup(strategy: Any, model: Any, version=(0, 5, 16), fields=FIELDS_0_5_16, **kw: Any) -> Any:
    cls = engine_class(version, fields)
    name = f"sglang-recording-{version[2]}"
    register_engine(name, cls)
    engine = strategy.setup_inference_engine(model=model, engine_type=name, **kw)
    return engine, cls.recording_runtime.engines[0]


# ------------------------------------------------------------------ pure functions
def test_flatten_bucket_aligns_casts_floats_and_round_trips() -> None:
    bucket = [
        ("a", torch.arange(3, dtype=torch.float32)),  # 12 bytes as fp32, 6 as bf16
        ("b", torch.arange(5, dtype=torch.int64)),  # kept int64: never cast
        ("c", torch.randn(3, 2)),
    ]
    flat, entries = flatten_bucket(bucket, "cpu", torch.bfloat16)
    assert flat.dtype == torch.uint8
    assert [(e.name, e.dtype, e.start, e.end) for e in entries] == [
        ("a", torch.bfloat16, 0, 6),
        ("b", torch.int64, 16, 56),
        ("c", torch.bfloat16, 64, 76),
    ]
    assert flat.numel() == 76
    back = dict(unflatten_bucket(flat, entries))
    assert torch.equal(back["a"], bucket[0][1].to(torch.bfloat16))
    assert torch.equal(back["b"], bucket[1][1])
    assert torch.equal(back["c"], bucket[2][1].to(torch.bfloat16)) and back["c"].shape == (3, 2)
    flat32, entries32 = flatten_bucket(bucket, "cpu", None)
    assert torch.equal(dict(unflatten_bucket(flat32, entries32))["c"], bucket[2][1])
    with pytest.raises(ValueError, match="empty"):
        flatten_bucket([], "cpu")


def test_compat_version_rules() -> None:
    assert compat.parse_version("0.5.15.post1") == (0, 5, 15)
    with pytest.raises(ValueError, match="'nightly'"):
        compat.parse_version("nightly")
    assert compat.memory_tags((0, 5, 3)) == ["weights", "kv_cache"]
    assert compat.memory_tags((0, 5, 16)) == ["weights", "kv_cache", "cuda_graph"]
    assert compat.result_ok((False, "bad")) == (False, "bad")
    assert compat.result_ok(None) == (True, "")
    assert compat.result_ok(type("R", (), {"success": False, "message": "busy"})()) == (False, "busy")
    # prefill CUDA graphs: off under the memory saver, spelled per version, the caller's choice kept
    assert compat.prefill_graph_args(FIELDS_0_5_16, True, {}) == {"cuda_graph_backend_prefill": "disabled"}
    assert compat.prefill_graph_args(FIELDS_0_5_12, True, {}) == {"disable_piecewise_cuda_graph": True}
    assert compat.prefill_graph_args(FIELDS_0_5_16, False, {}) == {}
    assert compat.prefill_graph_args(FIELDS_0_5_16, True, {"cuda_graph_backend_prefill": "breakable"}) == {}
    # the scheduler waits for requests instead of holding a core: on where the version has it,
    # the caller's choice kept
    assert compat.idle_args(FIELDS_0_5_16, {}) == {"sleep_on_idle": True}
    assert compat.idle_args(FIELDS_0_5_16, {"sleep_on_idle": False}) == {}
    assert compat.idle_args(frozenset({"model_path"}), {}) == {}
    assert compat.decode_graph_batch_args(FIELDS_0_5_16 | {"cuda_graph_max_bs_decode"}, 8) == {
        "cuda_graph_max_bs_decode": 8
    }
    assert compat.decode_graph_batch_args(FIELDS_0_5_12 | {"cuda_graph_max_bs"}, 8) == {
        "cuda_graph_max_bs": 8
    }
    assert compat.eager_args(FIELDS_0_5_12) == {
        "disable_cuda_graph": True,
        "disable_piecewise_cuda_graph": True,
    }
    # decode graphs: up to the next power of two of an RL engine's concurrency, in [8, 256]
    assert [compat.rl_decode_graph_max_bs(c) for c in (1, 8, 9, 48, 1000)] == [8, 8, 16, 64, 256]
    assert compat.decode_graph_args(FIELDS_0_5_16, 16, {}) == {"cuda_graph_max_bs_decode": 16}
    assert compat.decode_graph_args(FIELDS_0_5_12, 16, {}) == {"cuda_graph_max_bs": 16}
    for chosen in ("cuda_graph_max_bs", "cuda_graph_bs_decode", "disable_cuda_graph", "cuda_graph_config"):
        assert compat.decode_graph_args(FIELDS_0_5_16, 16, {chosen: 1}) == {}
    # float32 has no fa3 kernels: triton, unless the caller chose
    assert compat.attention_args("float32", {}) == {"attention_backend": "triton"}
    assert compat.attention_args("bfloat16", {}) == {}
    assert compat.attention_args("float32", {"attention_backend": "flashinfer"}) == {}


def test_scheduler_env_removes_torchruns_variables_and_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    torchrun = {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "x",
    }
    for k, v in torchrun.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", "/keep")
    changes = compat.scheduler_env(os.environ, "/tmp/cfg.json")
    assert changes == {**{k: None for k in torchrun}, "SGLANG_LOGGING_CONFIG_PATH": "/tmp/cfg.json"}
    monkeypatch.delenv("SGLANG_LOGGING_CONFIG_PATH", raising=False)
    with compat.scoped_env(changes):
        assert not set(torchrun) & set(os.environ)
        assert (
            os.environ["SGLANG_LOGGING_CONFIG_PATH"] == "/tmp/cfg.json"
            and os.environ["PYTHONPATH"] == "/keep"
        )
    assert {k: os.environ[k] for k in torchrun} == torchrun and "SGLANG_LOGGING_CONFIG_PATH" not in os.environ


def test_logging_config_leaves_other_loggers_alone(tmp_path: Path) -> None:
    import logging
    import logging.config

    other = logging.getLogger("lightrft-test-other")
    handler = logging.StreamHandler()
    other.addHandler(handler)
    root_handlers = list(logging.getLogger().handlers)
    log = tmp_path / "s.log"
    logging.config.dictConfig(compat.logging_config(str(log), "warning"))
    try:
        logging.getLogger("sglang.srt.managers.scheduler").info("Load weight end")
        logging.getLogger("sglang.srt.managers.scheduler").debug("not in the file")
        assert "Load weight end" in log.read_text() and "not in the file" not in log.read_text()
        logging.getLogger("lightrft.engines._sglang_live").info("lightrft live push, map of 3 tensors")
        assert "INFO lightrft.engines._sglang_live: lightrft live push, map of 3 tensors" in log.read_text()
        assert not other.disabled and handler in other.handlers
        assert logging.getLogger().handlers == root_handlers
        assert not (tmp_path / "s.log.stacks").exists()  # faulthandler is moved in SGLang's children only
    finally:
        for name in ("sglang", "lightrft.engines._sglang_live"):
            for h in logging.getLogger(name).handlers:
                h.close()
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
        other.removeHandler(handler)


def test_sampling_dict() -> None:
    sp = SamplingParams(
        max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=4, n=2, stop_token_ids=[3], seed=11
    )
    # One request's dict: no ``n`` (a prompt is sent n times), the copy's seed offset by its index.
    assert sampling_dict(sp) == {
        "max_new_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 4,
        "stop_token_ids": [3],
        "sampling_seed": 11,
    }
    assert sampling_dict(sp, copy=1)["sampling_seed"] == 12
    assert "stop_token_ids" not in sampling_dict(SamplingParams()) and "sampling_seed" not in sampling_dict(
        SamplingParams()
    )
    assert sampling_dict(SamplingParams(extra={"ignore_eos": True}))["ignore_eos"] is True
    with pytest.raises(ValueError, match=r"extra has 'n'=3.*SamplingParams.n"):
        sampling_dict(SamplingParams(extra={"n": 3}))
    # The call's parameters: one dict for every request, or one per request when seeded.
    assert request_sampling_params(SamplingParams(n=4), 2) == sampling_dict(SamplingParams(n=4))
    seeded = request_sampling_params(SamplingParams(n=3, seed=7), 2)
    assert [d["sampling_seed"] for d in seeded] == [7, 8, 9, 7, 8, 9]


# ------------------------------------------------------------------ errors
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("sglang") is not None, reason="sglang is installed here"
)
def test_missing_sglang_names_the_extra() -> None:
    strategy = _strategy()
    with pytest.raises(ImportError, match=r"lightrft-engines\[sglang\]"):
        strategy.setup_inference_engine(model=make_tiny_llama(seed=0), engine_type="sglang")


def test_tp_size_must_divide_world_size() -> None:
    register_engine("sglang-recording-tp", engine_class())
    strategy = _strategy(engine_tp_size=2)
    with pytest.raises(
        ValueError, match=r"engine_tp_size=2 does not divide the world size 1.*valid values: \[1\]"
    ):
        strategy.setup_inference_engine(model=make_tiny_llama(seed=0), engine_type="sglang-recording-tp")


def test_expandable_segments_refused_with_the_memory_saver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(RuntimeError, match="expandable_segments.*enable_engine_sleep=False"):
        engine_class()(strategy=_strategy(enable_engine_sleep=True), model=make_tiny_llama(seed=0))
    engine = engine_class()(strategy=_strategy(enable_engine_sleep=False), model=make_tiny_llama(seed=0))
    assert engine.server_args["enable_memory_saver"] is False


def test_needs_a_model_or_path() -> None:
    with pytest.raises(ValueError, match="model= .*model_path="):
        engine_class()(strategy=_strategy())


# ------------------------------------------------------------------ construction
def test_weight_rows_read_back_the_pushed_weights_in_the_engine_dtype() -> None:
    strategy = _strategy(bf16=True)
    actor = make_tiny_llama(seed=4)
    engine, _ = _setup(strategy, make_tiny_llama(seed=0))
    strategy.update_engine_weights(actor)
    name = "model.layers.0.self_attn.o_proj.weight"
    rows = engine.weight_rows(name, 3)
    assert rows is not None and rows.dtype == torch.bfloat16
    assert torch.equal(rows, dict(actor.named_parameters())[name].detach()[:3].to(torch.bfloat16))
    with pytest.raises(KeyError, match="no parameter 'model.nope'"):
        engine.weight_rows("model.nope", 3)
    engine.is_leader = False  # another rank of the engine's group reads nothing
    assert engine.weight_rows(name, 3) is None


def test_server_args_from_strategy_config() -> None:
    strategy = _strategy(engine_mem_util=0.3, enable_engine_sleep=True, engine_sleep_level=2, bf16=True)
    engine, double = _setup(strategy, make_tiny_llama(seed=0))
    args = double.server_args
    assert Path(args["model_path"], "config.json").exists()
    assert {k: args[k] for k in ("tp_size", "base_gpu_id", "skip_tokenizer_init", "mem_fraction_static")} == {
        "tp_size": 1,
        "base_gpu_id": 0,
        "skip_tokenizer_init": True,
        "mem_fraction_static": 0.3,
    }
    assert args["random_seed"] == 5 and args["dtype"] == "bfloat16" and args["context_length"] == 128
    assert args["enable_memory_saver"] is True and args["load_format"] == "dummy"
    assert args["cuda_graph_backend_prefill"] == "disabled" and "enable_weights_cpu_backup" not in args
    assert "disable_cuda_graph" not in args  # CUDA graphs stay on by default (decode)
    # The config gives neither micro_rollout_batch_size nor n_samples_per_prompt: SGLang's own range.
    assert "cuda_graph_max_bs_decode" not in args and "attention_backend" not in args
    assert engine.decode_graph_max_bs is None and engine.decode_graph_captured is None
    assert args["sleep_on_idle"] is True  # no core held by the scheduler while the loop trains
    assert args["log_level"] == "warning" and engine.log_path is not None
    assert engine.log_path.name.endswith(".log")
    assert double.payload_dtypes == {torch.bfloat16}  # the initial push was cast once, to bf16
    path = args["model_path"]
    strategy.engine_lifecycle.shutdown()
    assert double.shut and not os.path.exists(path)


def test_server_args_version_0_5_12_sleep_level_1_and_caller_overrides() -> None:
    strategy = _strategy(enable_engine_sleep=True, engine_sleep_level=1, engine_max_model_len=64)
    _, double = _setup(strategy, make_tiny_llama(seed=0), (0, 5, 12), FIELDS_0_5_12, mem_fraction_static=0.2)
    args = double.server_args
    assert args["disable_piecewise_cuda_graph"] is True and "cuda_graph_backend_prefill" not in args
    assert args["enable_weights_cpu_backup"] is True and args["context_length"] == 64
    assert args["mem_fraction_static"] == 0.2  # the caller's keyword wins
    assert "sleep_on_idle" not in args  # a version without the field is not given it
    assert "cuda_graph_max_bs" not in args and "cuda_graph_max_bs_decode" not in args  # SGLang's range
    assert args["dtype"] == "float32" and args["attention_backend"] == "triton"  # bf16=False: no fa3
    strategy2 = _strategy(enable_engine_sleep=False)
    _, double2 = _setup(strategy2, make_tiny_llama(seed=0))
    assert double2.server_args["enable_memory_saver"] is False
    assert "cuda_graph_backend_prefill" not in double2.server_args


def test_decode_graph_batch_from_the_rollout_config_and_caller_choices() -> None:
    strategy = get_fake_strategy(
        {**CONFIG, "micro_rollout_batch_size": 6, "rollout_batch_size": 12, "n_samples_per_prompt": 4}
    )
    _, double = _setup(strategy, make_tiny_llama(seed=0))
    assert double.server_args["cuda_graph_max_bs_decode"] == 32  # 6 x 4 -> 32
    _, double = _setup(_strategy(micro_rollout_batch_size=4, rollout_batch_size=8), make_tiny_llama(seed=0))
    assert double.server_args["cuda_graph_max_bs_decode"] == 8  # 4 x 1, at least 8
    _, double = _setup(_strategy(), make_tiny_llama(seed=0), cuda_graph_bs_decode=[1, 2])
    assert "cuda_graph_max_bs_decode" not in double.server_args  # the caller chose
    _, double = _setup(_strategy(engine_enforce_eager=True), make_tiny_llama(seed=0))
    assert (
        double.server_args["disable_cuda_graph"] is True
        and "cuda_graph_max_bs_decode" not in double.server_args
    )
    _, double = _setup(
        _strategy(), make_tiny_llama(seed=0), log_level="info", attention_backend="fa3", sleep_on_idle=False
    )
    assert double.server_args["log_level"] == "info" and double.server_args["attention_backend"] == "fa3"
    assert double.server_args["sleep_on_idle"] is False


def test_captured_decode_batch_read_back_from_resolved_or_passed_arguments() -> None:
    resolved = SimpleNamespace(
        cuda_graph_max_bs=None, cuda_graph_max_bs_decode=None, cuda_graph_bs=[1, 2, 160]
    )
    assert compat.captured_decode_max_bs(resolved, {"cuda_graph_max_bs_decode": 8}) == 160  # SGLang's own
    assert compat.captured_decode_max_bs(SimpleNamespace(cuda_graph_max_bs=256), {}) == 256
    assert compat.captured_decode_max_bs(None, {"cuda_graph_max_bs_decode": 32}) == 32
    assert compat.captured_decode_max_bs(None, {"disable_cuda_graph": True}) == 0
    assert compat.captured_decode_max_bs(SimpleNamespace(), {}) is None
    assert compat.decode_graph_args(FIELDS_0_5_16, None, {}) == {}


def test_generation_above_the_captured_graphs_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """A decode batch above what SGLang captured runs eagerly: one warning names the batch, the
    cap and the fix; a batch within the cap, and eager engines by choice, say nothing."""
    import lightrft.engines._common as common

    strategy = get_fake_strategy(
        {**CONFIG, "micro_rollout_batch_size": 2, "rollout_batch_size": 4, "n_samples_per_prompt": 2}
    )
    engine, double = _setup(strategy, make_tiny_llama(seed=0))
    assert double.server_args["cuda_graph_max_bs_decode"] == 8 and engine.decode_graph_captured == 8
    common._said.discard("sglang-eager-decode-8")
    sp = SamplingParams(max_new_tokens=2, temperature=0.0, n=2)
    with caplog.at_level(logging.WARNING, logger="lightrft.engines"):
        engine.generate(prompt_token_ids=[[1, 2]] * 4, sampling_params=sp)  # 8 requests: captured
        assert not [r for r in caplog.records if "WITHOUT CUDA graphs" in r.getMessage()]
        engine.generate(prompt_token_ids=[[1, 2]] * 5, sampling_params=sp)  # 10 requests
        engine.generate(prompt_token_ids=[[1, 2]] * 6, sampling_params=sp)  # said once only
    said = [r.getMessage() for r in caplog.records if "WITHOUT CUDA graphs" in r.getMessage()]
    assert len(said) == 1 and caplog.records[-1].levelno == logging.WARNING
    assert "batch of 10 requests" in said[0] and "captured up to 8" in said[0]
    assert "cuda_graph_max_bs=10" in said[0]
    strategy.engine_lifecycle.shutdown()
    eager, _ = _setup(_strategy(engine_enforce_eager=True), make_tiny_llama(seed=0))
    assert eager.decode_graph_captured == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightrft.engines"):
        eager.generate(prompt_token_ids=[[1, 2]] * 20, sampling_params=SamplingParams(max_new_tokens=1))
    assert not [r for r in caplog.records if "WITHOUT CUDA graphs" in r.getMessage()]


def test_engine_starts_outside_torchruns_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """SGLang's schedulers inherit the environment of ``Engine()``: torchrun's variables are gone
    there (TORCHELASTIC_USE_AGENT_STORE hangs their init_process_group on torch < PR #191989), the
    logging config is set, and everything is back afterwards."""
    import json

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_PORT", "29511")
    monkeypatch.setenv("LIGHTRFT_SGLANG_LOG_DIR", str(tmp_path))
    engine, double = _setup(_strategy(), make_tiny_llama(seed=0))
    env = double.runtime.env_at_create[0]
    assert "TORCHELASTIC_USE_AGENT_STORE" not in env and "MASTER_PORT" not in env
    config = json.loads(Path(env["SGLANG_LOGGING_CONFIG_PATH"]).read_text())
    assert config["handlers"]["file"]["filename"] == str(engine.log_path)
    assert engine.log_path.parent == tmp_path and engine.log_path.name.startswith("sglang-rank0-")
    assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True" and os.environ["MASTER_PORT"] == "29511"
    assert "SGLANG_LOGGING_CONFIG_PATH" not in os.environ


#: A stand-in for an SGLang scheduler: configures SGLang's logging as ``configure_logger`` does,
#: logs, then hangs (as the schedulers did in init_process_group on the H100 machine).
_HANGING_SCHEDULER = """
import json, logging.config, os, time
logging.config.dictConfig(json.load(open(os.environ["SGLANG_LOGGING_CONFIG_PATH"])))
logging.getLogger("sglang.srt.model_executor").info("Capture cuda graph begin")
def wait_for_store():
    open(os.environ["LIGHTRFT_TEST_HANGING"], "w").close()  # in the frame the stacks must show
    time.sleep(300)
wait_for_store()
"""


def test_start_deadline_stops_the_schedulers_and_quotes_their_log_and_stacks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``sglang.Engine()`` waits for its schedulers without a limit; past ``start_timeout_s`` they
    are stopped (SIGABRT: faulthandler writes their stacks), ``Engine()`` sees a dead scheduler and
    raises, and the error quotes the scheduler's log and stacks.

    Deterministic whatever the load: the deadline fires after ``start_timeout_s`` (2 s), and the
    stop it triggers is held until the scheduler has logged and sits in ``wait_for_store`` (a marker
    file it writes there): a spawned child re-imports the test's main module first, 10 s and more
    on a loaded 2-core machine, and a stop before that would find neither a log line nor the
    frame."""
    import multiprocessing
    import time

    from lightrft.engines import _sglang_procs

    monkeypatch.setenv("LIGHTRFT_SGLANG_LOG_DIR", str(tmp_path))
    hanging = tmp_path / "hanging"
    monkeypatch.setenv("LIGHTRFT_TEST_HANGING", str(hanging))
    procs: list[Any] = []
    stop = _sglang_procs._stop_children
    held_s: list[float] = []

    def stop_once_hanging(before: set[int]) -> None:
        t = time.monotonic()
        while not hanging.exists() and time.monotonic() - t < 300:
            time.sleep(0.05)
        held_s.append(time.monotonic() - t)
        stop(before)

    monkeypatch.setattr(_sglang_procs, "_stop_children", stop_once_hanging)

    def hanging_start() -> None:  # what Engine() does: spawn, then poll the scheduler until it dies
        proc = multiprocessing.get_context("spawn").Process(target=exec, args=(_HANGING_SCHEDULER, {}))
        proc.start()
        procs.append(proc)
        while proc.is_alive():
            time.sleep(0.1)
        raise RuntimeError(f"Rank 0 scheduler died during initialization (exit code: {proc.exitcode})")

    cls = engine_class()
    cls.recording_runtime.on_create = hanging_start
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        cls(strategy=_strategy(), model=make_tiny_llama(seed=0), start_timeout_s=2)
    took = time.monotonic() - t0
    message = str(info.value)
    assert hanging.exists() and len(held_s) == 1, held_s  # the deadline fired once, the child hung
    assert "TimeoutError: SGLang engine was not ready after 2 s" in message, message
    assert "Capture cuda graph begin" in message  # the scheduler's log, quoted
    assert "wait_for_store" in message  # its stack at the deadline (faulthandler, SIGABRT)
    # The deadline, not the scheduler, ended the wait: not before 2 s (an upper bound on how long
    # the stop then takes would depend on the machine's load; the hang it guards against is the
    # TimeoutError's absence, asserted above).
    assert procs[0].exitcode == -6 and took >= 2
    assert not cls.recording_runtime.engines


def test_first_push_of_a_whole_model_is_bucketed() -> None:
    model = make_tiny_llama(seed=0, hidden_size=256)  # about 5 MiB in float32
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    engine, double = _setup(_strategy(weight_sync_bucket_mb=1), model)
    pushes = [c for c in double.calls if c[0] == "update_weights_from_tensor"]
    assert len(pushes) >= total // (1 << 20) and not engine.needs_weight_push
    assert [c[0] for c in double.calls][-1] == "flush_cache"  # once, after the last bucket
    assert sum(c[0] == "flush_cache" for c in double.calls) == 1


# ------------------------------------------------------------------ generation
def test_generation_outputs_logprobs_n_and_stop() -> None:
    model = make_tiny_llama(seed=2)
    strategy = _strategy()
    engine, double = _setup(strategy, model)
    assert not engine.needs_weight_push and not engine.is_sleeping and engine.tp_group is None
    prompts = [[1, 2, 3], [7, 8]]
    sp = SamplingParams(max_new_tokens=5, temperature=0.0, n=2, logprobs=True)
    with rank_threads():  # the double and the reference with one thread count, set here
        outs = strategy.gather_and_generate(sp, all_prompt_token_ids=prompts, sleep_engine=False)
    assert len(outs) == 4
    for k, out in enumerate(outs):  # prompt-major: p0, p0, p1, p1
        with rank_threads():
            want, lps = _greedy(model, prompts[k // 2], 5)
        assert out.prompt_token_ids == prompts[k // 2]
        assert out.output_token_ids == want and out.finish_reason == "length"
        # Bitwise by construction: the double runs _greedy's ops (a full forward per token, then
        # log_softmax in float32) on the pushed float32 copy of the same weights, same threads.
        assert out.logprobs == lps
    stop = outs[0].output_token_ids[1]
    stopped = engine.generate(
        prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(5, 0.0, stop_token_ids=[stop])
    )
    assert stopped[0].output_token_ids == outs[0].output_token_ids[:2] and stopped[0].finish_reason == "stop"
    assert stopped[0].logprobs is None


def test_n_samples_go_to_sglang_as_repeated_prompts_in_one_call() -> None:
    """``n`` samples of a prompt reach SGLang as n requests of it, all in one ``generate`` call with
    no ``n`` in their parameters (SGLang 0.5.16's own ``n`` prefills each prompt alone first and
    keeps ``prompts x (n - 1)`` request states for good: ``request_sampling_params``). Outputs come
    back prompt-major with their prompt's ids; seeded copies sample with seed + copy, so they differ
    and each equals a single seeded generation."""
    model = make_tiny_llama(seed=4)
    strategy = _strategy()
    engine, double = _setup(strategy, model)
    prompts = [[1, 2, 3], [7, 8]]
    greedy = SamplingParams(max_new_tokens=3, temperature=0.0, n=3, logprobs=True)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=greedy)
    assert [c for c in double.calls if c[0] == "generate"] == [("generate", 6)]  # one call, 2 x 3
    sent = double.requests[-1]
    assert sent["input_ids"] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert isinstance(sent["sampling_params"], dict) and "n" not in sent["sampling_params"]
    assert [o.prompt_token_ids for o in outs] == [prompts[0]] * 3 + [prompts[1]] * 3
    with rank_threads():
        want = [_greedy(model, p, 3)[0] for p in prompts]
    assert [o.output_token_ids for o in outs] == [want[0]] * 3 + [want[1]] * 3
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=7)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=sampled)
    sent = double.requests[-1]["sampling_params"]
    assert isinstance(sent, list) and [d["sampling_seed"] for d in sent] == [7, 8, 9, 7, 8, 9]
    assert all("n" not in d for d in sent)
    first = [o.output_token_ids for o in outs[:3]]
    assert len({tuple(x) for x in first}) == 3  # three different samples of prompt 0
    for copy in range(3):
        alone = engine.generate(
            prompt_token_ids=[prompts[0]],
            sampling_params=SamplingParams(max_new_tokens=6, temperature=1.0, seed=7 + copy),
        )
        assert alone[0].output_token_ids == first[copy]
    strategy.engine_lifecycle.shutdown()


def test_generation_from_text_and_seeds() -> None:
    model = make_tiny_llama(seed=3)
    strategy = _strategy()
    engine, _ = _setup(strategy, model, tokenizer=CharTokenizer())
    out = engine.generate(prompts=["ab"], sampling_params=SamplingParams(4, 0.0))[0]
    assert out.prompt_token_ids == [97, 98]
    assert out.output_token_ids == _greedy(model, [97, 98], 4)[0]
    assert out.text == CharTokenizer().decode(out.output_token_ids)
    a = engine.generate(prompt_token_ids=[[5]], sampling_params=SamplingParams(6, 1.0, seed=1))
    b = engine.generate(prompt_token_ids=[[5]], sampling_params=SamplingParams(6, 1.0, seed=1))
    c = engine.generate(prompt_token_ids=[[5]], sampling_params=SamplingParams(6, 1.0, seed=2))
    assert a[0].output_token_ids == b[0].output_token_ids != c[0].output_token_ids


def test_prompt_too_long_names_the_prompt() -> None:
    strategy = _strategy(engine_max_model_len=8)
    engine, double = _setup(strategy, make_tiny_llama(seed=0))
    with pytest.raises(ValueError, match="prompt 1 has 8 tokens.*max_model_len=8"):
        engine.generate(prompt_token_ids=[[1, 2], list(range(8))])
    assert not [c for c in double.calls if c[0] == "generate"]


def test_images_for_a_text_only_model_name_the_prompt() -> None:
    engine, double = _setup(_strategy(), make_tiny_llama(seed=0))
    with pytest.raises(ValueError, match="prompt 1 has 1 image.*LlamaForCausalLM is text-only"):
        engine.generate(prompts=["x", "y"], multi_modal_inputs=[None, {"image": [object()]}])
    assert not [c for c in double.calls if c[0] == "generate"]


def test_use_after_shutdown() -> None:
    strategy = _strategy()
    engine, double = _setup(strategy, make_tiny_llama(seed=0))
    engine.shutdown()
    engine.shutdown()  # twice is fine
    assert [c for c in double.calls if c[0] == "shutdown"] == [("shutdown", None)]
    for call in (
        lambda: engine.generate(prompt_token_ids=[[1]]),
        lambda: engine.update_weights([]),
        engine.sleep,
    ):
        with pytest.raises(RuntimeError, match="shut down"):
            call()


# ------------------------------------------------------------------ weights
def _push_log(double: RecordingSGLangEngine) -> list[str]:
    return [c[0] for c in double.calls if c[0] != "generate"]


@pytest.mark.parametrize("version", [(0, 5, 16), (0, 5, 21)])
def test_push_flattened_buckets_sessions_by_version_flush_once(version: tuple[int, int, int]) -> None:
    strategy = _strategy()
    trained = make_tiny_llama(seed=4)
    engine, double = _setup(strategy, make_tiny_llama(seed=0), version)
    double.calls.clear()
    bucket_bytes = 1 << 14
    n_buckets = len(list(strategy.iter_weight_buckets(trained, bucket_bytes)))
    assert n_buckets > 3
    strategy.update_engine_weights(trained, bucket_bytes)
    session = ["begin_weight_update"] if version >= (0, 5, 21) else []
    end = ["end_weight_update"] if version >= (0, 5, 21) else []
    assert _push_log(double) == session + ["update_weights_from_tensor"] * n_buckets + end + ["flush_cache"]
    assert all(c[1] == {"n": 1, "flush": False} for c in double.calls if c[0] == "update_weights_from_tensor")
    assert double.payload_ranks[-n_buckets:] == [[0]] * n_buckets
    for name, p in trained.named_parameters():
        assert torch.equal(dict(double.model.named_parameters())[name], p), name
    out = engine.generate(prompt_token_ids=[[1, 2]], sampling_params=SamplingParams(4, 0.0))[0]
    assert out.output_token_ids == _greedy(trained, [1, 2], 4)[0]


def test_a_failed_update_raises_and_closes_the_session() -> None:
    strategy = _strategy()
    engine, double = _setup(strategy, make_tiny_llama(seed=0), (0, 5, 21))
    double.calls.clear()
    double.fail_update_at = double.updates + 2
    with pytest.raises(RuntimeError, match="update_weights_from_tensor failed on rank 0: injected failure"):
        strategy.update_engine_weights(make_tiny_llama(seed=4), 1 << 14)
    assert _push_log(double) == [
        "begin_weight_update",
        "update_weights_from_tensor",
        "update_weights_from_tensor",
        "end_weight_update",
    ]
    assert not double.in_session


def test_a_0_5_21_engine_without_session_would_fail_silently() -> None:
    """Why sessions matter: SGLang 0.5.21 answers (False, msg) outside one; the engine's check of
    the flag turns that into an error instead of stale weights."""
    strategy = _strategy()
    engine, double = _setup(strategy, make_tiny_llama(seed=0), (0, 5, 21))
    ok, message = double.update_weights_from_tensor([], load_format="flattened_bucket")
    assert not ok and "begin_weight_update" in message
    double.begin_weight_update = None  # as if the engine had not detected the session API
    with pytest.raises(RuntimeError, match="must run between begin_weight_update"):
        engine.update_weights([[("model.norm.weight", torch.ones(64))]])


# ------------------------------------------------------------------ sleep / wake
def test_release_discards_weights_and_the_push_restores_them_in_order() -> None:
    strategy = _strategy(enable_engine_sleep=True, engine_sleep_level=2)
    model = make_tiny_llama(seed=6)
    engine, double = _setup(strategy, model)
    sp = SamplingParams(5, 0.0)
    before = strategy.engine_generate_local(sp, prompt_token_ids=[[3, 4]])[0].output_token_ids
    double.calls.clear()
    assert strategy.maybe_sleep_inference_engine() is True
    assert double.calls == [("release_memory_occupation", ["weights", "kv_cache", "cuda_graph"])]
    assert engine.is_sleeping and engine.needs_weight_push
    with pytest.raises(RuntimeError, match="update_engine_weights"):
        strategy.engine_generate_local(sp, prompt_token_ids=[[3, 4]])
    with pytest.raises(RuntimeError, match="update_engine_weights"):
        engine.generate(prompt_token_ids=[[3, 4]])
    with pytest.raises(RuntimeError, match="weights are released"):
        engine.update_weights([[("model.norm.weight", torch.ones(64))]])
    # a partial push does not make the weights valid
    engine.wake_up(tags=["weights"])
    engine.update_weights([[("model.norm.weight", dict(model.named_parameters())["model.norm.weight"])]])
    assert engine.needs_weight_push
    double.calls.clear()
    strategy.update_engine_weights(model, 1 << 15)
    log = _push_log(double)
    assert log[0] == "update_weights_from_tensor"  # weights were already awake
    # the KV cache was released (and flushed with it) through the push: no flush call
    assert log[-2:] == ["update_weights_from_tensor", "resume_memory_occupation"]
    assert "flush_cache" not in log
    assert double.calls[-1] == ("resume_memory_occupation", ["kv_cache", "cuda_graph"])
    assert not engine.is_sleeping and not engine.needs_weight_push
    assert strategy.engine_generate_local(sp, prompt_token_ids=[[3, 4]])[0].output_token_ids == before


def test_full_cycle_order_through_strategy_calls() -> None:
    strategy = _strategy(enable_engine_sleep=True, engine_sleep_level=2)
    model = make_tiny_llama(seed=6)
    engine, double = _setup(strategy, model)
    strategy.maybe_sleep_inference_engine()
    double.calls.clear()
    strategy.update_engine_weights(model, 1 << 15)
    log = [(c[0], c[1]) for c in double.calls if c[0] != "update_weights_from_tensor"]
    assert log == [
        ("resume_memory_occupation", ["weights"]),
        ("resume_memory_occupation", ["kv_cache", "cuda_graph"]),
    ]
    assert double.calls[1][0] == "update_weights_from_tensor"


def test_level_1_with_cpu_backup_needs_no_push() -> None:
    strategy = _strategy(enable_engine_sleep=True, engine_sleep_level=1)
    engine, double = _setup(strategy, make_tiny_llama(seed=7))
    sp = SamplingParams(5, 0.0)
    before = engine.generate(prompt_token_ids=[[9]], sampling_params=sp)[0].output_token_ids
    engine.sleep(1)
    assert engine.is_sleeping and not engine.needs_weight_push
    with pytest.raises(RuntimeError, match=r"\['cuda_graph', 'kv_cache', 'weights'\] are released"):
        engine.generate(prompt_token_ids=[[9]])
    strategy.wakeup_inference_engine()
    assert double.calls[-2:] == [
        ("resume_memory_occupation", ["weights"]),
        ("resume_memory_occupation", ["kv_cache", "cuda_graph"]),
    ]
    assert engine.generate(prompt_token_ids=[[9]], sampling_params=sp)[0].output_token_ids == before
    with pytest.raises(ValueError, match="sleep level=3"):
        engine.sleep(3)
    with pytest.raises(ValueError, match=r"wake_up tags \['cpu'\] are invalid"):
        engine.wake_up(["cpu"])


def test_sleep_needs_the_memory_saver() -> None:
    engine, _ = _setup(_strategy(enable_engine_sleep=False), make_tiny_llama(seed=0))
    with pytest.raises(RuntimeError, match="enable_engine_sleep=True"):
        engine.sleep(2)


def test_sharded_like_model_starts_with_dummy_weights() -> None:
    """A model whose parameters are shards is not pushed at construction: the engine reports
    needs_weight_push until the strategy's buckets arrive."""
    from torch.distributed.tensor import DTensor  # noqa: F401  (DTensor exists: the check is by type name)

    model = make_tiny_llama(seed=0)
    p = next(model.parameters())
    p.ds_id = 0  # how ZeRO-3 marks a partitioned parameter
    engine, double = _setup(_strategy(), model)
    assert engine.needs_weight_push and double.updates == 0
    with pytest.raises(RuntimeError, match="update_engine_weights"):
        engine.generate(prompt_token_ids=[[1]])


# ------------------------------------------------------------------ two ranks, one engine
def tp2_checks() -> dict[str, Any]:
    """Runs on 2 gloo ranks (engine_tp_size=2): one engine on rank 0, generate / push / sleep on
    both ranks."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    strategy = get_fake_strategy(
        {**CONFIG, "engine_tp_size": 2, "enable_engine_sleep": True, "engine_sleep_level": 2}
    )
    model = make_tiny_llama(seed=8)
    cls = engine_class()
    register_engine("sglang-recording-tp2", cls)
    engine = strategy.setup_inference_engine(model=model, engine_type="sglang-recording-tp2")
    runtime = cls.recording_runtime
    result: dict[str, Any] = {"engines_here": len(runtime.engines), "group": engine.group_ranks}
    if runtime.engines:
        result["seed"] = runtime.engines[0].server_args["random_seed"]
    mine = [[1, 2, 3]] if rank == 0 else [[4, 5], [6]]
    outs = strategy.gather_and_generate(SamplingParams(4, 0.0), all_prompt_token_ids=mine, sleep_engine=False)
    result["own_outputs_ok"] = [o.output_token_ids == _greedy(model, p, 4)[0] for o, p in zip(outs, mine)]
    result["n_outputs"] = len(outs)
    trained = make_tiny_llama(seed=9)
    strategy.maybe_sleep_inference_engine()
    result["needs_push_after_release"] = engine.needs_weight_push
    strategy.update_engine_weights(trained, 1 << 14)
    out = strategy.gather_and_generate(
        SamplingParams(4, 0.0), all_prompt_token_ids=[[2, 2]], sleep_engine=False
    )
    result["after_push_ok"] = out[0].output_token_ids == _greedy(trained, [2, 2], 4)[0]
    if rank == 0:
        double = runtime.engines[0]
        result["payload_ranks"] = sorted({tuple(r) for r in double.payload_ranks})
        result["log"] = [
            c[0] for c in double.calls if c[0] in ("release_memory_occupation", "resume_memory_occupation")
        ]
        double.fail_update_at = double.updates + 1
    try:
        strategy.update_engine_weights(trained, 1 << 14)
        result["failure_raised"] = False
    except RuntimeError as e:
        result["failure_raised"] = "injected failure" in str(e)
    too_long = [list(range(130))] if rank == 1 else [[1]]
    try:
        strategy.gather_and_generate(
            SamplingParams(2, 0.0), all_prompt_token_ids=too_long, sleep_engine=False
        )
        result["too_long_raised"] = False
    except ValueError as e:
        result["too_long_raised"] = "prompt 1 has 130 tokens" in str(e)
    strategy.engine_lifecycle.shutdown()
    return result


@pytest.mark.slow
def test_tensor_parallel_group_of_two_ranks() -> None:
    results = run_distributed(
        "test_sglang_engine:tp2_checks", 2, env={"PYTHONPATH": os.path.dirname(__file__)}, timeout=300
    )
    r0, r1 = results
    assert r0["engines_here"] == 1 and r1["engines_here"] == 0  # one sglang.Engine, on the first rank
    assert r0["group"] == r1["group"] == [0, 1]
    assert r0["seed"] == CONFIG["seed"]  # group 0
    assert r0["own_outputs_ok"] == [True] and r1["own_outputs_ok"] == [True, True]
    assert (r0["n_outputs"], r1["n_outputs"]) == (1, 2)
    assert r0["needs_push_after_release"] and r1["needs_push_after_release"]
    assert r0["after_push_ok"] and r1["after_push_ok"]
    assert r0["payload_ranks"] == [(0, 1)]  # every bucket: one payload per TP rank, in rank order
    assert r0["log"] == ["release_memory_occupation", "resume_memory_occupation", "resume_memory_occupation"]
    assert r0["failure_raised"] and r1["failure_raised"]  # both ranks learn of the failure
    assert r0["too_long_raised"] and r1["too_long_raised"]
