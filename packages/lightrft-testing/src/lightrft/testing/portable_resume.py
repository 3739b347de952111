"""Portable resume between backends and world sizes, measured on every rank (``run_distributed``).

Backends are named ``fake``, ``fsdp``, ``ds1``, ``ds2``, ``ds3`` (DeepSpeed ZeRO stage N). A writer
trains 2 steps from the conformance suite's model and data, consumes 2 dataloader batches, saves
``<root>/<backend>-ws<N>/saved`` with ``layout="portable"`` (or native) and trains 2 more steps
(the uninterrupted run); a reader builds a differently initialised model, loads a writer's
checkpoint and trains the same 2 steps. :func:`run_matrix` runs such launches from a test and
:func:`resume_problems` says what is wrong with the result: these functions measure, the tests
assert (``assert resume_problems(matrix) == []``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightrft.strategy import clean_param_name, get_strategy

from .conformance.spec import BASE_CONFIG, tiny_model
from .harness import build, full_params, param_groups, train
from .models import make_batches
from .tolerance import PARITY_ADAM_EPS, parity_loss_atol, parity_param_atol

SAVED_STEPS = 2
RESUMED_STEPS = 2
DATASET = [torch.tensor([i]) for i in range(64)]


#: Every parameter partitioned under ZeRO-3 (DeepSpeed keeps small ones whole by default).
_ZERO3_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
BACKENDS: dict[str, dict[str, Any]] = {
    "fake": {"strategy": "fake"},
    "fsdp": {"strategy": "fsdp"},
    "ds1": {"strategy": "deepspeed", "zero_stage": 1},
    "ds2": {"strategy": "deepspeed", "zero_stage": 2},
    "ds3": {"strategy": "deepspeed", "zero_stage": 3, "deepspeed_config": _ZERO3_ALL},
}


def _strategy(backend: str, layout: str = "portable") -> Any:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: valid are {', '.join(BACKENDS)}")
    return get_strategy({**BASE_CONFIG, **BACKENDS[backend], "ckpt_layout": layout})


def _optimizer_summary(strategy: Any, model: Any, optim: Any) -> dict[str, Any]:
    """Adam moments as full fp32 tensors by parameter name, and the step counts (collective; the
    torch-native backends return them on rank 0 only, empty elsewhere)."""
    if strategy.name == "deepspeed":
        from deepspeed.utils import safe_get_full_optimizer_state

        # ZeRO-1/2 link each parameter to its Adam state fragments after the first param group's
        # first step, when the other groups have no state yet, and never again: link again so
        # the fragment API reads the state the optimizer holds.
        link = getattr(model.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            model.optimizer._hp_optimizer_states_linked = False
            link()
        moments = {}
        for name, p in strategy.unwrap_model(model).named_parameters():
            for m in ("exp_avg", "exp_avg_sq"):
                moments[f"{clean_param_name(name)}.{m}"] = (
                    safe_get_full_optimizer_state(p, m).float().cpu().clone()
                )
        base = model.optimizer.optimizer
        steps = sorted({float(st["step"]) for st in base.state.values() if "step" in st})
        return {"moments": moments, "steps": steps}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(
        strategy.unwrap_model(model), optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    state = sd.get("state", {})  # empty on ranks other than 0 (cpu_offload)
    moments = {f"{k}.{m}": v[m].float().clone() for k, v in state.items() for m in ("exp_avg", "exp_avg_sq")}
    steps = sorted({float(v["step"]) for v in state.values()})
    return {"moments": moments, "steps": steps}


def _adam(optim: Any) -> dict[str, Any]:
    group = param_groups(optim)[0]
    return {"eps": float(group["eps"]), "betas": [float(b) for b in group["betas"]]}


def write(backend: str, root: str, layout: str = "portable") -> dict[str, Any]:
    """Trains SAVED_STEPS, saves ``root/<backend>-ws<N>`` in the portable layout, trains on."""
    strategy = _strategy(backend, layout)
    model, optim, sched = build(strategy, tiny_model(), eps=PARITY_ADAM_EPS)
    loader = strategy.setup_dataloader(DATASET, batch_size=2, shuffle=True)
    batches = make_batches(5, SAVED_STEPS + RESUMED_STEPS, strategy.config.train_batch_size)
    train(strategy, model, optim, sched, batches[:SAVED_STEPS])
    it = iter(loader)
    next(it), next(it)
    name = f"{backend}-ws{strategy.world_size}"
    strategy.save_ckpt(model, Path(root) / name, tag="saved")
    saved = {
        "optimizer": _optimizer_summary(strategy, model, optim),
        "lr": sched.get_last_lr(),
        "saved_params": full_params(strategy, model),
    }
    after = train(strategy, model, optim, sched, batches[SAVED_STEPS:])
    out = {
        "name": name,
        "losses": after["losses"],
        "norms": after["norms"],
        "params": full_params(strategy, model),
        "adam": _adam(optim),
        **saved,
    }
    out["loader"] = loader.state_dict()
    return out


def read(backend: str, root: str, names: list[str]) -> dict[str, Any]:
    """For each writer in ``names``: a fresh model (another init) loads its checkpoint and trains
    RESUMED_STEPS; what it loaded and the losses it got."""
    out: dict[str, Any] = {}
    world_size = 1
    for name in names:
        strategy = _strategy(backend)  # a fresh one per checkpoint: its own dataloader list
        world_size = strategy.world_size
        model, optim, sched = build(strategy, tiny_model(4242), eps=PARITY_ADAM_EPS)
        loader = strategy.setup_dataloader(DATASET, batch_size=2, shuffle=True)
        strategy.load_ckpt(model, Path(root) / name)
        loaded = {
            "loaded_params": full_params(strategy, model),
            "optimizer": _optimizer_summary(strategy, model, optim),
            "lr": sched.get_last_lr(),
            "loader": loader.state_dict(),
            "global_step": strategy.train_state(model).global_step,
        }
        batches = make_batches(5, SAVED_STEPS + RESUMED_STEPS, strategy.config.train_batch_size)
        after = train(strategy, model, optim, sched, batches[SAVED_STEPS:])
        out[name] = {
            **loaded,
            "losses": after["losses"],
            "norms": after["norms"],
            "params": full_params(strategy, model),
        }
    return {"reader": f"{backend}-ws{world_size}", "results": out}


def write_then_read(
    writers: list[str], reads: dict[str, list[str]], root: str, layout: str = "portable"
) -> dict[str, Any]:
    """One launch (every rank): each of ``writers`` saves (in ``layout``); then each reader in
    ``reads`` resumes the checkpoints it names (written by this launch or an earlier one)."""
    written = [write(b, root, layout) for b in writers]
    return {"written": written, "read": [read(b, root, names) for b, names in reads.items()]}


Launch = tuple[int, list[str], dict[str, list[str]]]
"""``(world_size, writers, {reader: [checkpoint names]})``: one torchrun launch of the matrix."""


def run_matrix(
    root: str, launches: list[Launch], layout: str = "portable", timeout: float = 1800.0
) -> dict[str, Any]:
    """Runs ``launches`` in order (test side; each under torchrun) and collects ``written``
    (checkpoint name -> what the writer measured on rank 0), ``read`` (``"<reader> <- <writer>"``
    -> what the reader measured on rank 0), ``rank_losses`` (the same key -> the resumed losses
    of every rank) and ``expected`` (every pair the launches asked for). A launch of one rank whose
    writers and readers are all ``fake`` (FakeStrategy needs no process group) runs in this process,
    with the ranks' thread count, instead of under torchrun."""
    from .distributed import rank_threads, run_distributed

    out: dict[str, Any] = {"written": {}, "read": {}, "rank_losses": {}, "expected": []}
    for world_size, writers, reads in launches:
        if world_size == 1 and set(writers) | set(reads) <= {"fake"}:
            with rank_threads():
                per_rank = [write_then_read(writers, reads, root, layout)]
        else:
            per_rank = run_distributed(
                "lightrft.testing.portable_resume:write_then_read",
                world_size,
                {"writers": writers, "reads": reads, "root": root, "layout": layout},
                timeout=timeout,
            )
        out["expected"] += [
            f"{reader}-ws{world_size} <- {name}" for reader, names in reads.items() for name in names
        ]
        for w in per_rank[0]["written"]:
            out["written"][w["name"]] = w
        for i, r in enumerate(per_rank[0]["read"]):
            for writer, got in r["results"].items():
                key = f"{r['reader']} <- {writer}"
                out["read"][key] = got
                out["rank_losses"][key] = [rank["read"][i]["results"][writer]["losses"] for rank in per_rank]
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((float((a[k].float() - b[k].float()).abs().max()) for k in a), default=0.0)


def _flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[k].reshape(-1).double() for k in sorted(params)])


def _run_problems(
    what: str, got: dict[str, Any], want: dict[str, Any], steps: int, first_step: int
) -> list[str]:
    """``got``'s losses and final parameters against ``want``'s, two runs of the last ``steps`` of
    the same training from one state (Adam step ``first_step`` on), each summing the conformance
    configuration's micro-batch gradients and losses in its own order: parameters per element within
    ``tolerance.parity_param_atol`` (at Adam's eps PARITY_ADAM_EPS, which ``write`` and ``read`` train
    with), losses within ``parity_loss_atol`` (the mean in another order, then the parameters'
    measured distance to first order)."""
    micro = BASE_CONFIG["train_batch_size"] // BASE_CONFIG["micro_train_batch_size"]
    a, b = _flat(got["params"]), _flat(want["params"])
    atol = parity_param_atol(
        BASE_CONFIG["actor_learning_rate"],
        steps,
        micro,
        BASE_CONFIG["max_norm"],
        b.numel(),
        want["adam"]["eps"],
        betas=tuple(want["adam"]["betas"]),  # type: ignore[arg-type]
        first_step=first_step,
    )
    problems = []
    dp = float((a - b).norm())
    if (d := float((a - b).abs().max())) > atol:
        problems.append(f"{what}: final parameters differ by {d:.3g} (parity_param_atol {atol:.3g})")
    bounds = [parity_loss_atol(y, n, dp, micro) for y, n in zip(want["losses"], want["norms"])]
    if len(got["losses"]) != len(want["losses"]) or any(
        abs(x - y) > t for x, y, t in zip(got["losses"], want["losses"], bounds)
    ):
        problems.append(
            f"{what}: losses {got['losses']} != {want['losses']} (parity_loss_atol {[f'{t:.3g}' for t in bounds]})"
        )
    return problems


def resume_problems(matrix: dict[str, Any]) -> list[str]:
    """Everything wrong with a :func:`run_matrix` result (an empty list when nothing is): a pair
    asked for but not run; writers whose uninterrupted runs disagree (the same training on another
    backend or world size: another reduction order, within the bounds of ``_run_problems``); a
    resumed run that loaded other parameters, Adam moments, step counts, learning rate, dataloader
    position or train state than the writer saved (all exact: loading copies them); whose losses
    or final parameters are not its writer's uninterrupted run's (exact when the reader is the
    writer's backend and world size, hence its arithmetic; else within the bounds of
    ``_run_problems``); ranks of one reader that got different losses."""
    problems: list[str] = []
    missing = sorted(set(matrix["expected"]) - set(matrix["read"]))
    if missing:
        problems.append(f"pairs not run: {missing}")
    if not matrix["read"]:
        problems.append("no pair was run")
    written = matrix["written"]
    if written:
        ref_name = "fake-ws1" if "fake-ws1" in written else sorted(written)[0]
        ref = written[ref_name]
        for name, w in sorted(written.items()):
            if name != ref_name:
                problems += _run_problems(
                    f"writer {name} against {ref_name}", w, ref, SAVED_STEPS + RESUMED_STEPS, 1
                )
    for key, got in sorted(matrix["read"].items()):
        reader, writer = key.split(" <- ")
        want = written.get(writer)
        if want is None:
            problems.append(f"{key}: the writer's uninterrupted run was not recorded")
            continue
        if sorted(got["params"]) != sorted(want["params"]):
            problems.append(
                f"{key}: parameter names differ: {sorted(got['params'])} != {sorted(want['params'])}"
            )
            continue
        if (d := _max_diff(got["loaded_params"], want["saved_params"])) != 0.0:
            problems.append(f"{key}: loaded parameters differ from the saved ones by {d:.3g}")
        if len(got["losses"]) != RESUMED_STEPS:
            problems.append(f"{key}: resumed losses {got['losses']}: {RESUMED_STEPS} steps expected")
        elif reader == writer:
            # The writer's own backend and world size: the same arithmetic from the same state.
            if got["losses"] != want["losses"]:
                problems.append(f"{key}: resumed losses {got['losses']} != uninterrupted {want['losses']}")
            if (d := _max_diff(got["params"], want["params"])) != 0.0:
                problems.append(f"{key}: final parameters differ by {d:.3g} (the same arithmetic)")
        else:
            problems += [
                p.replace(f"{key}: losses", f"{key}: resumed losses")
                for p in _run_problems(key, got, want, RESUMED_STEPS, SAVED_STEPS + 1)
            ]
        g_opt, w_opt = got["optimizer"], want["optimizer"]
        if not (g_opt["steps"] == w_opt["steps"] == [float(SAVED_STEPS)]):
            problems.append(
                f"{key}: Adam steps {g_opt['steps']} loaded, {w_opt['steps']} saved, expected [{SAVED_STEPS}.0]"
            )
        if sorted(g_opt["moments"]) != sorted(w_opt["moments"]) or not w_opt["moments"]:
            problems.append(
                f"{key}: Adam moments {sorted(g_opt['moments'])} loaded, {sorted(w_opt['moments'])} saved"
            )
        elif (d := _max_diff(g_opt["moments"], w_opt["moments"])) != 0.0:
            problems.append(f"{key}: Adam moments differ by {d:.3g} (loading copies them)")
        if got["lr"] != want["lr"]:
            problems.append(f"{key}: learning rates {got['lr']} != saved {want['lr']}")
        if got["loader"] != want["loader"] or not want["loader"].get("consumed_samples"):
            problems.append(f"{key}: dataloader state {got['loader']} != saved {want['loader']}")
        if got["global_step"] != SAVED_STEPS:
            problems.append(f"{key}: global_step {got['global_step']} != {SAVED_STEPS}")
        ranks = matrix["rank_losses"].get(key, [])
        if any(r != ranks[0] for r in ranks):
            problems.append(f"{key}: ranks got different losses: {ranks}")
    return problems
