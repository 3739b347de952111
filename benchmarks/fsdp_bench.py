"""FSDPV2Strategy against hand-written FSDP2 code: step time and peak memory, interleaved.

    torchrun --nproc-per-node=2 benchmarks/fsdp_bench.py --out DIR [--impl-path TREE --label NAME]

Per model (``--models small,1b``: Llama 271M and 0.95B, random weights): bf16 compute with fp32
master weights and fp32 gradient reduction, fused AdamW (one parameter group, no decay),
global-norm clipping at 1.0, no accumulation, micro-batch 8 x 1024 tokens per GPU.

Variants (same seed, same batches; timing and statistics: ``_harness`` / ``_stats``):

- ``raw``: FSDP2 as a careful user writes it (torchtitan's recipe), with everything the
  strategy does to be fast: ``fully_shard`` on each decoder layer, the embeddings and the
  head (the strategy's units) with the same mixed-precision policy and
  ``reshard_after_forward``; the root with torch's default (kept unsharded after forward);
  the gradient norm as ``get_total_norm`` + ``full_tensor`` (one all-reduce, no DTensor
  dispatch in the clip) and ``clip_grads_with_norm_``; ``step()``;
  ``zero_grad(set_to_none=True)``. It never reads the norm on the host and never skips a step.
- ``raw_norm``: ``raw`` plus the norm read as a float after ``step()`` is queued (what the
  strategy does to return it): isolates the cost of that host sync.
- ``strategy``: ``prepare_model`` / ``create_optimizer`` / ``prepare`` / ``backward`` /
  ``optimizer_step`` of the FSDPV2Strategy under test (``--impl-path``), which also returns
  the norm and skips a non-finite step.

On CPU (no CUDA) it runs the ``tiny`` model over gloo: a test of the plumbing, not a timing.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Any

import _harness as H
import torch
import torch.distributed as dist

VARIANTS = ("raw", "raw_norm", "strategy")
LR, BETAS, EPS, MAX_NORM = 1e-4, (0.9, 0.95), 1e-8, 1.0


def raw_variant(preset: str, args: Any, read_norm: bool) -> H.Variant:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    model = H.build_model(preset, args.seq)
    mesh = init_device_mesh(H.DEVICE, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    units = [*model.model.layers, model.model.embed_tokens, model.lm_head]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=args.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # root: torch's default (no reshard after forward)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, fused=H.CUDA)

    def step(ids: torch.Tensor) -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, MAX_NORM, total)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if read_norm:
            float(total)
        return loss

    return H.Variant("raw_norm" if read_norm else "raw", step, [model, optim], {"param_groups": 1})


def strategy_variant(preset: str, args: Any) -> H.Variant:
    from lightrft.fsdp import FSDPV2Strategy

    world = dist.get_world_size()
    strategy = FSDPV2Strategy(
        {
            "bf16": True,
            "micro_train_batch_size": args.micro_batch,
            "train_batch_size": args.micro_batch * world,
            "max_norm": MAX_NORM,
            "adam_betas": BETAS,
            "adam_eps": EPS,
            "l2": 0.0,
            "fsdp_reshard_after_forward": args.reshard_after_forward,
        }
    )
    strategy.setup_distributed()
    model = strategy.prepare_model(H.build_model(preset, args.seq))
    optim = strategy.create_optimizer(model, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    model, optim, _ = strategy.prepare((model, optim, None))
    norms: list[float] = []

    def step(ids: torch.Tensor) -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        strategy.backward(loss, model, optim)
        norms.append(strategy.optimizer_step(optim, model, None))
        return loss

    info = {"param_groups": len(optim.param_groups), "fused": bool(optim.defaults.get("fused"))}
    return H.Variant("strategy", step, [model, optim, strategy, norms], info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_common_args(parser)
    parser.add_argument(
        "--reshard-after-forward",
        type=lambda s: {"true": True, "false": False}[s.lower()],
        default=True,
        help="of the decoder layers, embeddings and head, in both variants (true/false)",
    )
    args = parser.parse_args()
    H.check_args(args, VARIANTS)
    impl = H.use_impl(args.impl_path, args.label)
    if H.CUDA:
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cpu:gloo,cuda:nccl" if H.CUDA else "gloo")
    names = args.variants.split(",")
    configs = []
    for preset in args.models.split(","):
        margs = H.args_for_model(args, preset)
        batches = H.make_batches(preset, margs.micro_batch, args.seq)
        builders = {
            n: partial(strategy_variant, preset, margs)
            if n == "strategy"
            else partial(raw_variant, preset, margs, n == "raw_norm")
            for n in names
        }
        variants = H.setup_variants(builders, batches, args.warmup)
        rounds = H.interleave(variants, batches, args)
        cfg = H.summarize(variants, args.block, margs.micro_batch * args.seq * dist.get_world_size())
        model = variants["raw"].keep[0]
        cfg.update(
            {
                "name": preset,
                "model": preset,
                "micro_batch": margs.micro_batch,
                "params": sum(p.numel() for p in model.parameters()),
                "rounds": rounds,
            }
        )
        configs.append(cfg)
        del variants, builders
        H.free_memory()
        dist.barrier()
    impl["loaded_from"] = H.loaded_from("lightrft.fsdp.strategy", "lightrft.strategy.base")
    if dist.get_rank() == 0:
        env = H.environment()
        payload = {"bench": "fsdp", "env": env, "impl": impl, "args": vars(args), "configs": configs}
        H.write_results(
            "fsdp", args, payload, H.table("FSDP2: FSDPV2Strategy vs raw", env, impl, configs, args)
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
