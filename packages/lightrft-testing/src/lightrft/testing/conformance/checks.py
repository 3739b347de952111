"""The behavioural checks of the conformance suite, run inside every rank.

``run_checks`` builds the strategy by name (``get_strategy``), runs each check with its own fresh
models and returns, per check, either its measurements or the traceback of its failure. The
assertions live in :mod:`lightrft.testing.conformance.suite`; the checks only measure, so one run
of N ranks serves every test.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightrft.strategy import SamplingParams, StrategyBase, get_strategy
from lightrft.strategy.checkpoint import LATEST, TMP_PREFIX

from ..models import causal_lm_loss, make_batches, make_tiny_model

MODEL_SEED = 1234
DATA_SEED = 99
#: Defaults of the suite's runs: accumulation of 2 micro-steps on 2 ranks, clipping that bites.
BASE_CONFIG: dict[str, Any] = {
    "seed": 7,
    "train_batch_size": 8,
    "micro_train_batch_size": 2,
    "max_norm": 0.5,
    "bf16": False,
    "actor_learning_rate": 1e-2,
    "lr_warmup_ratio": 0.25,
    "lr_scheduler": "cosine_with_min_lr",
    "l2": 0.01,
    "engine_type": "fake",
}
STEPS = 3


# ----------------------------------------------------------------- helpers
def build(strategy: StrategyBase, seed: int = MODEL_SEED, max_steps: int = 10) -> tuple[Any, Any, Any]:
    """The three-step protocol on a fresh TinyCausalLM."""
    model = strategy.prepare_model(make_tiny_model(seed), is_training=True)
    optim = strategy.create_optimizer(
        model, lr=strategy.config.actor_learning_rate, weight_decay=strategy.config.l2
    )
    sched = strategy.create_scheduler(optim, max_steps)
    return strategy.prepare((model, optim, sched))


def full_params(strategy: StrategyBase, model: Any) -> dict[str, torch.Tensor]:
    """Every full parameter (fp32, CPU) through the weight-sync iterator, keyed by clean name."""
    out: dict[str, torch.Tensor] = {}
    for bucket in strategy.iter_weight_buckets(model):
        for name, t in bucket:
            out[name] = t.detach().float().cpu().clone()
    return out


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[k].reshape(-1) for k in sorted(params)])


def rank_share(strategy: StrategyBase, global_batch: torch.Tensor) -> list[torch.Tensor]:
    """This rank's micro-batches of a global batch: contiguous slices, ``micro`` rows each."""
    dp = strategy.world_size
    per = global_batch.shape[0] // dp
    mine = global_batch[strategy.get_rank() * per : (strategy.get_rank() + 1) * per]
    micro = strategy.config.micro_train_batch_size
    return [mine[i : i + micro] for i in range(0, per, micro)]


def train_steps(
    strategy: StrategyBase,
    model: Any,
    optim: Any,
    sched: Any,
    global_batches: list[torch.Tensor],
    loss_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, list[Any]]:
    """One optimizer step per global batch; returns the global mean loss and the returned norm
    of each step, and what ``optimizer_step`` returned on every micro-step."""
    losses: list[float] = []
    norms: list[float | None] = []
    returned: list[float | None] = []
    for gb in global_batches:
        local = []
        for mb in rank_share(strategy, gb):
            loss = causal_lm_loss(model, mb.to(strategy.device))
            if loss_hook is not None:
                loss = loss_hook(loss)
            strategy.backward(loss, model, optim)
            ret = strategy.optimizer_step(optim, model, sched)
            returned.append(ret)
            local.append(loss.detach().float().cpu())
        losses.append(float(strategy.all_reduce(torch.stack(local).mean(), "mean")))
        norms.append(returned[-1])
    return {"losses": losses, "norms": norms, "returned": returned}


def loader_steps(
    strategy: StrategyBase, model: Any, optim: Any, sched: Any, loader: Any, steps: int
) -> list[float]:
    """Trains ``steps`` optimizer steps from a dataloader; the loss is scaled by a random factor so
    that the RNG state matters for bit-for-bit resume."""
    losses = []
    it = iter(loader)
    for _ in range(steps):
        local = []
        for _ in range(strategy.accumulated_gradient):
            mb = next(it)
            loss = causal_lm_loss(model, mb.to(strategy.device)) * (1 + 0.1 * torch.rand(()).item())
            strategy.backward(loss, model, optim)
            strategy.optimizer_step(optim, model, sched)
            local.append(loss.detach().float().cpu())
        losses.append(float(strategy.all_reduce(torch.stack(local).mean(), "mean")))
    return losses


def shared_tmpdir(strategy: StrategyBase, name: str) -> Path:
    """A directory that every rank sees (rank 0 makes it under $LIGHTRFT_TEST_TMP or /tmp)."""
    path = None
    if strategy.is_rank_0():
        root = os.environ.get("LIGHTRFT_TEST_TMP") or tempfile.gettempdir()
        path = tempfile.mkdtemp(prefix=f"lightrft-{name}-", dir=root)
    return Path(strategy.broadcast_object(path))


# ------------------------------------------------------------------ checks
def check_accumulation(strategy: StrategyBase) -> dict[str, Any]:
    model, optim, sched = build(strategy)
    batch = make_batches(DATA_SEED, 1, strategy.config.train_batch_size)[0]
    before = flat(full_params(strategy, model))
    micro = rank_share(strategy, batch)
    changed_midway = []
    returned = []
    for i, mb in enumerate(micro):
        loss = causal_lm_loss(model, mb.to(strategy.device))
        boundary_predicted = strategy.is_accumulation_boundary(model)
        strategy.backward(loss, model, optim)
        returned.append(strategy.optimizer_step(optim, model, sched))
        now = flat(full_params(strategy, model))
        changed_midway.append(
            {"micro": i, "boundary_predicted": boundary_predicted, "changed": not torch.equal(before, now)}
        )
    st = strategy.train_state(model)
    return {
        "accumulated_gradient": strategy.accumulated_gradient,
        "returned": returned,
        "changes": changed_midway,
        "micro_step": st.micro_step,
        "global_step": st.global_step,
        "lr_after": [g["lr"] for g in _param_groups(optim)],
    }


def _param_groups(optim: Any) -> list[dict[str, Any]]:
    inner = getattr(optim, "optimizer", optim)
    return list(getattr(inner, "param_groups", getattr(optim, "param_groups", [])))


_REDUCTIONS = (
    "all_reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",  # FSDP2's gradient reduce-scatter in newer torch
    "_reduce_scatter_base",
    "reduce",
    "all_reduce_coalesced",
)


def check_no_sync(strategy: StrategyBase) -> dict[str, Any]:
    """Counts gradient reductions issued during each micro-step's backward."""
    model, optim, sched = build(strategy)
    batch = make_batches(DATA_SEED, 1, strategy.config.train_batch_size)[0]
    counts: list[dict[str, Any]] = []
    calls = {"n": 0}
    originals = {n: getattr(dist, n) for n in _REDUCTIONS if hasattr(dist, n)}

    def counting(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            calls["n"] += 1
            return fn(*a, **k)

        return wrapper

    for mb in rank_share(strategy, batch):
        boundary = strategy.is_accumulation_boundary(model)
        loss = causal_lm_loss(model, mb.to(strategy.device))
        calls["n"] = 0
        for n, fn in originals.items():
            setattr(dist, n, counting(fn))
        try:
            strategy.backward(loss, model, optim)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        finally:
            for n, fn in originals.items():
                setattr(dist, n, fn)
        counts.append({"boundary": boundary, "reductions": calls["n"]})
        strategy.optimizer_step(optim, model, sched)
    return {
        "counts": counts,
        "syncs_only_at_boundary": strategy.syncs_only_at_boundary,
        "world_size": strategy.world_size,
    }


def check_parity(strategy: StrategyBase) -> dict[str, Any]:
    model, optim, sched = build(strategy)
    batches = make_batches(DATA_SEED, STEPS, strategy.config.train_batch_size)
    run = train_steps(strategy, model, optim, sched, batches)
    params = full_params(strategy, model)
    return {**run, "params": flat(params), "names": sorted(params)}


def check_non_finite(strategy: StrategyBase) -> dict[str, Any]:
    model, optim, sched = build(strategy)
    batches = make_batches(DATA_SEED, 3, strategy.config.train_batch_size)
    first = train_steps(strategy, model, optim, sched, batches[:1])
    before = flat(full_params(strategy, model))
    bad = train_steps(strategy, model, optim, sched, batches[1:2], loss_hook=lambda loss: loss * float("nan"))
    after_bad = flat(full_params(strategy, model))
    good = train_steps(strategy, model, optim, sched, batches[2:3])
    after_good = flat(full_params(strategy, model))
    return {
        "first_norm": first["norms"][0],
        "bad_norm": bad["norms"][0],
        "unchanged_after_bad": bool(torch.equal(before, after_bad)),
        "skipped_steps": strategy.skipped_steps,
        "good_norm": good["norms"][0],
        "changed_after_good": not torch.equal(after_bad, after_good),
        "finite_after_good": bool(torch.isfinite(after_good).all()),
    }


def _dataset(strategy: StrategyBase, n: int = 64) -> list[torch.Tensor]:
    rows = make_batches(DATA_SEED + 1, 1, n)[0]
    return [rows[i] for i in range(n)]


def check_checkpoint(strategy: StrategyBase) -> dict[str, Any]:
    """Train, save, train more (the reference); then a fresh model and strategy load the
    checkpoint and train the same steps: losses and parameters must match bit for bit."""
    root = shared_tmpdir(strategy, "ckpt")
    data = _dataset(strategy)
    micro = strategy.config.micro_train_batch_size
    model, optim, sched = build(strategy)
    loader = strategy.setup_dataloader(data, micro, shuffle=True)
    loader_steps(strategy, model, optim, sched, loader, 2)
    client = {"epoch": 3, "note": "hello", "tensor": torch.arange(4)}
    strategy.save_ckpt(model, root, tag="step2", client_state=client)
    ref_losses = loader_steps(strategy, model, optim, sched, loader, 2)
    ref_params = flat(full_params(strategy, model))
    ref_lr = [g["lr"] for g in _param_groups(optim)]
    ref_step = strategy.train_state(model).global_step

    fresh = type(strategy)(strategy.config)
    fresh.setup_distributed()
    model2, optim2, sched2 = build(fresh, seed=MODEL_SEED + 1)
    loader2 = fresh.setup_dataloader(data, micro, shuffle=True)
    torch.manual_seed(12345)  # a different RNG state: load_ckpt must restore the saved one
    path, loaded_client = fresh.load_ckpt(model2, root)
    restored_step = fresh.train_state(model2).global_step
    res_losses = loader_steps(fresh, model2, optim2, sched2, loader2, 2)
    res_params = flat(full_params(fresh, model2))

    # Rotation and the latest marker: two more saves with max_num=2 keep the newest two.
    fresh.save_ckpt(model2, root, tag="step4", max_num=2)
    fresh.save_ckpt(model2, root, tag="step5", max_num=2)
    fresh.barrier()
    listing = sorted(p.name for p in root.iterdir())
    latest = (root / LATEST).read_text().strip()
    fresh.barrier()
    if fresh.is_rank_0():
        shutil.rmtree(root, ignore_errors=True)
    return {
        "path_name": Path(path).name,
        "client": loaded_client,
        "ref_losses": ref_losses,
        "res_losses": res_losses,
        "params_equal": bool(torch.equal(ref_params, res_params)),
        "max_param_diff": float((ref_params - res_params).abs().max()),
        "ref_lr": ref_lr,
        "res_lr": [g["lr"] for g in _param_groups(optim2)],
        "ref_step": ref_step,
        "restored_step": restored_step,
        "listing": listing,
        "latest": latest,
        "tmp_left": [n for n in listing if n.startswith(TMP_PREFIX)],
    }


def check_save_model(strategy: StrategyBase) -> dict[str, Any]:
    from safetensors.torch import load_file

    root = shared_tmpdir(strategy, "hf")
    model, optim, sched = build(strategy)
    train_steps(strategy, model, optim, sched, make_batches(DATA_SEED, 1, strategy.config.train_batch_size))
    expected = full_params(strategy, model)
    out = root / "hf"
    strategy.save_model(model, out)
    result: dict[str, Any] = {}
    if strategy.is_rank_0():
        files = sorted(p.name for p in out.iterdir())
        saved = {}
        for f in out.glob("*.safetensors"):
            saved.update(load_file(str(f)))
        result["files"] = files
        result["missing"] = sorted(set(expected) - set(saved))
        result["max_diff"] = max(
            float((saved[k].float() - v).abs().max()) for k, v in expected.items() if k in saved
        )
    strategy.barrier()
    model2, _, _ = build(strategy, seed=MODEL_SEED + 5)
    strategy.load_model(model2, out)
    loaded = full_params(strategy, model2)
    result["load_max_diff"] = max(float((loaded[k] - expected[k]).abs().max()) for k in expected)
    strategy.barrier()
    if strategy.is_rank_0():
        shutil.rmtree(root, ignore_errors=True)
    return result


def check_collectives(strategy: StrategyBase) -> dict[str, Any]:
    r, n = strategy.get_rank(), strategy.world_size
    t = torch.tensor([float(r + 1), 2.0 * (r + 1)])
    return {
        "rank": r,
        "world_size": n,
        "mean": strategy.all_reduce(t, "mean"),
        "sum": strategy.all_reduce(t, "sum"),
        "max": strategy.all_reduce(t, "max"),
        "scalar_mean": strategy.all_reduce(float(r + 1), "mean"),
        "dict_sum": strategy.all_reduce({"a": float(r), "b": torch.tensor(float(r + 1))}, "sum"),
        "gather": strategy.all_gather(torch.full((r + 1, 2), float(r))),
        "gather_scalar": strategy.all_gather(r * 10),
        "gather_0d": strategy.all_gather(torch.tensor(float(r))),
        "int_mean": strategy.all_reduce(torch.tensor([r + 1]), "mean"),
    }


def check_ema(strategy: StrategyBase) -> dict[str, Any]:
    model, optim, sched = build(strategy)
    initial = flat(full_params(strategy, model))
    ema = strategy.prepare(strategy.prepare_model(make_tiny_model(MODEL_SEED), is_training=False))
    train_steps(strategy, model, optim, sched, make_batches(DATA_SEED, 1, strategy.config.train_batch_size))
    trained = flat(full_params(strategy, model))
    strategy.moving_average(model, ema, beta=0.9)
    got = flat(full_params(strategy, ema))
    expected = 0.9 * initial + 0.1 * trained
    return {"max_diff": float((got - expected).abs().max()), "moved": float((trained - initial).abs().max())}


def check_weight_sync(strategy: StrategyBase) -> dict[str, Any]:
    """Pushes trained weights into a FakeEngine in small buckets; the engine must then hold
    exactly the trained weights and generate what a local copy of the model generates."""
    model, optim, sched = build(strategy)
    train_steps(strategy, model, optim, sched, make_batches(DATA_SEED, 1, strategy.config.train_batch_size))
    expected = full_params(strategy, model)
    bucket_bytes = 4096
    largest = max(t.numel() * 4 for t in expected.values())
    buckets = list(strategy.iter_weight_buckets(model, bucket_bytes))
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
    multi_tensor_over = [s for s, b in zip(sizes, buckets) if len(b) > 1 and s > bucket_bytes]
    engine = strategy.setup_inference_engine(model=make_tiny_model(MODEL_SEED), engine_type="fake")
    strategy.update_engine_weights(model, bucket_bytes=bucket_bytes)
    engine_sd = dict(engine.model.named_parameters())  # type: ignore[attr-defined]
    max_diff = max(float((engine_sd[k].float() - v).abs().max()) for k, v in expected.items())
    # A reference copy of the trained model, generating greedily.
    ref = make_tiny_model(MODEL_SEED)
    with torch.no_grad():
        for k, p in ref.named_parameters():
            p.copy_(expected[k])
    prompts = [[1, 2, 3], [4 + strategy.get_rank(), 5]]
    sp = SamplingParams(max_new_tokens=5, temperature=0.0)
    outs = strategy.gather_and_generate(prompt_token_ids=prompts, sampling_params=sp)
    ref_out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(5):
                ids.append(int(ref(torch.tensor([ids]))[0, -1].argmax()))
            ref_out.append(ids[len(p) :])
    slept = strategy.maybe_sleep_inference_engine(level=1)
    sleeping_error = ""
    try:
        engine.generate(prompt_token_ids=prompts, sampling_params=sp)
    except RuntimeError as e:
        sleeping_error = str(e)
    strategy.wakeup_inference_engine()
    after_wake = [o.output_token_ids for o in engine.generate(prompt_token_ids=prompts, sampling_params=sp)]
    engine.shutdown()
    strategy.inference_engine = None
    return {
        "names": sorted(engine.names_received),  # type: ignore[attr-defined]
        "expected_names": sorted(expected),
        "max_diff": max_diff,
        "bucket_sizes": sizes,
        "bucket_bytes": bucket_bytes,
        "largest": largest,
        "multi_tensor_over": multi_tensor_over,
        "num_buckets": len(buckets),
        "outputs": [o.output_token_ids for o in outs],
        "reference": ref_out,
        "slept": slept,
        "sleeping_error": sleeping_error,
        "after_wake": after_wake,
    }


def check_misuse(strategy: StrategyBase) -> dict[str, Any]:
    """Bad calls raise clear errors, and a failed save leaves the previous checkpoint intact."""
    found: dict[str, str] = {}

    def expect(name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            found[name] = "no error"
        except Exception as e:  # the suite asserts on type and message
            found[name] = f"{type(e).__name__}: {e}"

    model, optim, sched = build(strategy)
    stray = make_tiny_model(0)
    expect(
        "backward_unprepared",
        lambda: strategy.backward(causal_lm_loss(stray, torch.zeros(2, 4, dtype=torch.long)), stray, None),
    )
    expect("prepare_bad_tuple", lambda: strategy.prepare((model, optim)))
    expect("bad_tag", lambda: strategy.save_ckpt(model, shared_tmpdir(strategy, "bad"), tag="../escape"))
    root = shared_tmpdir(strategy, "misuse")
    expect("missing_ckpt", lambda: strategy.load_ckpt(model, root / "nothing"))
    strategy.save_ckpt(model, root, tag="good")
    expect(
        "bad_client_state",
        lambda: strategy.save_ckpt(model, root, tag="worse", client_state={"fn": object()}),
    )
    strategy.barrier()
    listing = sorted(p.name for p in root.iterdir())
    latest = (root / LATEST).read_text().strip()
    strategy.barrier()
    if strategy.is_rank_0():
        shutil.rmtree(root, ignore_errors=True)
    return {"errors": found, "listing_after_failed_save": listing, "latest": latest}


CHECKS: dict[str, Callable[[StrategyBase], dict[str, Any]]] = {
    "accumulation": check_accumulation,
    "no_sync": check_no_sync,
    "parity": check_parity,
    "non_finite": check_non_finite,
    "checkpoint": check_checkpoint,
    "save_model": check_save_model,
    "collectives": check_collectives,
    "ema": check_ema,
    "weight_sync": check_weight_sync,
    "misuse": check_misuse,
}


def run_checks(
    strategy_name: str, config: dict[str, Any] | None = None, checks: list[str] | None = None
) -> dict[str, Any]:
    """Runs ``checks`` (all by default) against ``get_strategy(strategy=strategy_name, ...)``.
    Returns ``{check: {"ok": True, "result": ...} | {"ok": False, "error": traceback}}``."""
    cfg = {**BASE_CONFIG, **(config or {}), "strategy": strategy_name}
    results: dict[str, Any] = {}
    strategy = None
    for name in checks or list(CHECKS):
        try:
            strategy = get_strategy(cfg)
            results[name] = {"ok": True, "result": _plain(CHECKS[name](strategy))}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
            # Realign ranks after a failure so later checks don't deadlock on stray collectives.
            if dist.is_initialized():
                try:
                    dist.barrier()
                except Exception:
                    break
    if strategy is not None:
        strategy.shutdown()
    return results


def _plain(x: Any) -> Any:
    """Results travel through torch.save/weights_only: keep to tensors and plain containers."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if torch.is_tensor(x):
        return x.detach().cpu()
    if isinstance(x, float) and math.isnan(x):
        return float("nan")
    return x
