"""adam_offload on CPU ranks: DeepSpeedCPUAdam (its op builds for ~100 s on first use)."""

from lightrft.strategy import get_strategy
from lightrft.testing.conformance import checks as conf


def run() -> dict:
    """Trains the conformance model 3 steps at ZeRO-2 with adam_offload on this rank."""
    s = get_strategy({**conf.BASE_CONFIG, "strategy": "deepspeed", "zero_stage": 2, "adam_offload": True})
    model, optim, sched = conf.build(s)
    kind = type(getattr(optim, "optimizer", optim)).__name__
    run = conf.train_steps(s, model, optim, sched, conf.make_batches(conf.DATA_SEED, conf.STEPS, 8))
    return {
        "optimizer": kind,
        "losses": run["losses"],
        "norms": run["norms"],
        "params": conf.flat(conf.full_params(s, model)),
    }
