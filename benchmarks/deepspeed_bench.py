"""DeepspeedStrategy against hand-written DeepSpeed code: step time and peak memory, interleaved.

    torchrun --nproc-per-node=2 benchmarks/deepspeed_bench.py --out DIR [--impl-path TREE --label NAME]

Per model (``--models small,1b``: Llama 271M and 0.95B, random weights) and ZeRO stage
(``--stages 2,3``): bf16, FusedAdam (no decay), gradient clipping 1.0, no accumulation, an LR
warm-up schedule stepped by DeepSpeed, micro-batch 8 x 1024 tokens per GPU.

Variants (same seed, same batches; timing and statistics: ``_harness`` / ``_stats``):

- ``raw``: ``deepspeed.initialize`` with a hand-written config whose *effective* settings equal
  the strategy's (the run compares the two engines' parsed configs and reports any difference
  as ``config_diff``), FusedAdam over ``model.parameters()`` (one group: with no decay a
  careful user has no reason for two), and a plain ``engine.backward`` / ``engine.step`` loop
  that never reads the gradient norm on the host.
- ``raw_norm``: ``raw`` plus ``float(engine.get_global_grad_norm())`` after ``engine.step()``
  (the obvious way to log the norm: the host waits for the whole step).
- ``strategy``: the DeepspeedStrategy under test (``--impl-path``): ``prepare_model`` /
  ``create_optimizer`` / ``prepare`` / ``backward`` / ``optimizer_step``, which returns the
  norm every step (read from pinned host memory when DeepSpeed stores it).

On CPU (no CUDA) it runs the ``tiny`` model in fp32 with torch AdamW over gloo: a test of the
plumbing, not a timing.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from typing import Any

import _harness as H
import torch
import torch.distributed as dist

VARIANTS = ("raw", "raw_norm", "strategy")
LR, BETAS, EPS, MAX_NORM = 1e-4, (0.9, 0.95), 1e-8, 1.0
BF16 = H.CUDA  # DeepSpeed's bf16 optimizers need an accelerator; the CPU smoke run is fp32


def lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 10)


def raw_config(stage: int, micro_batch: int, world: int) -> dict[str, Any]:
    """What a careful DeepSpeed user writes (DeepSpeed's defaults for everything else)."""
    return {
        "train_batch_size": micro_batch * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": MAX_NORM,
        "bf16": {"enabled": BF16},
        # Offload "none" spelled out, as in DeepSpeed's config templates (and the strategy's):
        # the parsed config then equals the strategy's, which the run checks (config_diff).
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "none"}}
        | ({"offload_param": {"device": "none"}} if stage == 3 else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def raw_variant(preset: str, stage: int, args: Any, read_norm: bool) -> H.Variant:
    import deepspeed

    model = H.build_model(preset, args.seq)
    params = [p for p in model.parameters() if p.requires_grad]
    if H.CUDA:
        from deepspeed.ops.adam import FusedAdam

        optim: Any = FusedAdam(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, adam_w_mode=True)
    else:
        optim = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optim,
        lr_scheduler=sched,
        config=raw_config(stage, args.micro_batch, dist.get_world_size()),
    )

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if read_norm:
            float(engine.get_global_grad_norm())
        return loss

    name = "raw_norm" if read_norm else "raw"
    return H.Variant(name, step, [engine], _engine_info(engine), close=engine.destroy)


def strategy_variant(preset: str, stage: int, args: Any) -> H.Variant:
    from lightrft.deepspeed import DeepspeedStrategy

    strategy = DeepspeedStrategy(
        {
            "zero_stage": stage,
            "bf16": BF16,
            "train_batch_size": args.micro_batch * dist.get_world_size(),
            "micro_train_batch_size": args.micro_batch,
            "max_norm": MAX_NORM,
            "adam_betas": BETAS,
            "adam_eps": EPS,
            "l2": 0.0,
        }
    )
    strategy.setup_distributed()
    # Built like the raw variant: the full model on the device, partitioned by deepspeed.initialize.
    model = strategy.prepare_model(H.build_model(preset, args.seq), is_training=True)
    optim = strategy.create_optimizer(model, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda)
    engine, optim, sched = strategy.prepare((model, optim, sched))
    norms: list[float | None] = []

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = engine(input_ids=x, labels=x).loss
        strategy.backward(loss, engine, optim)
        norms.append(strategy.optimizer_step(optim, engine, sched))
        return loss

    return H.Variant(
        "strategy", step, [engine, strategy, norms], _engine_info(engine), close=strategy.shutdown
    )


def _engine_info(engine: Any) -> dict[str, Any]:
    basic = engine.basic_optimizer
    return {
        "optimizer": f"{type(engine.optimizer).__name__}({type(basic).__name__})",
        "param_groups": len(basic.param_groups),
    }


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if hasattr(value, "model_dump"):  # DeepSpeed's pydantic config sections
        value = value.model_dump()
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}", out)
    else:
        out[prefix] = repr(value)


def config_diff(a: Any, b: Any) -> dict[str, list[str]]:
    """The parsed DeepSpeed settings (``engine._config``, sections flattened to dotted keys) that
    differ between two engines: ``{key: [repr in a, repr in b]}``."""
    fa: dict[str, str] = {}
    fb: dict[str, str] = {}
    for src, flat in ((a, fa), (b, fb)):
        for key, value in vars(src._config).items():
            if not key.startswith("_"):
                _flatten(value, key, flat)
    out = {}
    for key in sorted(set(fa) | set(fb)):
        ra, rb = fa.get(key, "<absent>"), fb.get(key, "<absent>")
        if ra != rb and " at 0x" not in ra + rb:
            out[key] = [ra, rb]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_common_args(parser)
    parser.add_argument("--stages", default="2,3", help="comma list of ZeRO stages (1, 2, 3)")
    args = parser.parse_args()
    H.check_args(args, VARIANTS)
    stages = []
    for s in args.stages.split(","):
        if s not in ("1", "2", "3"):
            raise SystemExit(f"--stages: {s!r} is not a ZeRO stage this benchmark runs; valid: 1, 2, 3")
        stages.append(int(s))
    impl = H.use_impl(args.impl_path, args.label)

    import deepspeed

    if H.CUDA:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if H.CUDA else "gloo")
    names = args.variants.split(",")
    configs = []
    for preset in args.models.split(","):
        margs = H.args_for_model(args, preset)
        batches = H.make_batches(preset, margs.micro_batch, args.seq)
        for stage in stages:
            builders = {
                n: partial(strategy_variant, preset, stage, margs)
                if n == "strategy"
                else partial(raw_variant, preset, stage, margs, n == "raw_norm")
                for n in names
            }
            variants = H.setup_variants(builders, batches, args.warmup)
            raw_engine = variants["raw"].keep[0]
            diffs = {n: config_diff(raw_engine, v.keep[0]) for n, v in variants.items() if n != "raw"}
            rounds = H.interleave(variants, batches, args)
            cfg = H.summarize(variants, args.block, margs.micro_batch * args.seq * dist.get_world_size())
            params = sum(int(getattr(p, "ds_numel", p.numel())) for p in raw_engine.module.parameters())
            cfg.update(
                {
                    "name": f"{preset}/zero{stage}",
                    "model": preset,
                    "micro_batch": margs.micro_batch,
                    "stage": stage,
                    "params": params,
                    "rounds": rounds,
                }
            )
            cfg["config_diff"] = diffs
            configs.append(cfg)
            for v in variants.values():
                v.close()
            del variants, builders, raw_engine
            H.free_memory()
            dist.barrier()
    impl["loaded_from"] = H.loaded_from("lightrft.deepspeed.strategy", "lightrft.strategy.base")
    if dist.get_rank() == 0:
        env = {**H.environment(), "deepspeed": deepspeed.__version__}
        payload = {"bench": "deepspeed", "env": env, "impl": impl, "args": vars(args), "configs": configs}
        text = H.table("DeepSpeed: DeepspeedStrategy vs raw", env, impl, configs, args)
        for cfg in configs:
            for n, d in cfg["config_diff"].items():
                text += f"\n{cfg['name']}: effective DeepSpeed settings of {n} vs raw: " + (
                    "identical" if not d else "; ".join(f"{k}: raw {a} / {n} {b}" for k, (a, b) in d.items())
                )
        H.write_results("deepspeed", args, payload, text)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
