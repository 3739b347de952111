"""One multimodal RL round on any strategy, run on every rank: the tiny vision-language model
(:func:`~lightrft.testing.models.make_tiny_vlm`) prepared, trained on image+text batches, its
weights pushed into the rollout engine with ``update_engine_weights``, generating with images in
LightRFT's call form, then saved and loaded into a fresh engine. :func:`train_push_generate`
measures (on every rank, through ``run_distributed`` for several), :func:`check_round` asserts, and
:class:`MultimodalRoundSuite` is the test on top of them, which each training backend's tests
subclass. Needs transformers, pillow and an engine (``lightrft-engines[hf]`` for ``engine_type="hf"``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import pytest

from .distributed import rank_threads, run_distributed
from .harness import flat, full_params
from .models import IMAGE_PLACEHOLDER, make_color_image, make_tiny_vlm, vlm_batch, vlm_loss
from .tolerance import PARITY_ADAM_EPS, parity_loss_atol

#: The rollout batch: prompts with 1, 2 and 0 images, as LightRFT passes them (flat images + counts).
PROMPTS = [
    f"{IMAGE_PLACEHOLDER} what colour is the image ?",
    f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER} describe both images :",
    "what colour is the image ?",
]
IMAGES_NUM = [1, 2, 0]
_COLOURS = ["red", "green", "blue", "yellow"]


def rollout_images() -> list[Any]:
    return [make_color_image("red"), make_color_image("blue"), make_color_image("green")]


def training_samples(step: int, n: int) -> list[tuple[str, Any]]:
    """``n`` (text, image) pairs of optimizer step ``step``: a colour's image and its name."""
    out = []
    for i in range(n):
        colour = _COLOURS[(step + i) % len(_COLOURS)]
        out.append(
            (
                f"{IMAGE_PLACEHOLDER} what colour is the image ? {colour}",
                make_color_image(colour, seed=97 * step + i),
            )
        )
    return out


def generate(strategy: Any, processor: Any, max_new_tokens: int = 6) -> list[dict[str, Any]]:
    """Greedy generations of :data:`PROMPTS` with their images (``gather_and_generate`` in
    LightRFT's argument form): tokens and log-probs per prompt."""
    from lightrft.strategy import SamplingParams

    outs = strategy.gather_and_generate(
        SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, logprobs=True),
        all_prompt_token_ids=[processor.tokenizer.encode(p) for p in PROMPTS],
        all_prompts=PROMPTS,
        all_images=rollout_images(),
        sleep_engine=False,
        images_num=IMAGES_NUM,
    )
    return [{"tokens": list(o.output_token_ids), "logprobs": list(o.logprobs or [])} for o in outs]


def train_push_generate(config: dict[str, Any], tmp: str, steps: int = 2, lr: float = 1e-3) -> dict[str, Any]:
    """Prepares the tiny VLM on ``config``'s strategy, builds the engine (``config["engine_type"]``)
    from an unsharded copy, trains ``steps`` optimizer steps on image+text batches (each rank its
    share of ``train_batch_size`` samples per step, in micro-batches), pushes, generates, saves the
    model under ``tmp`` and generates with a fresh engine built from that directory.

    Returns: ``losses`` (this rank's micro-batch losses), ``units`` (the class names of the FSDP
    units below the root, empty for other backends), ``before`` / ``pushed`` / ``fresh``
    generations and ``rank``."""
    import torch

    from lightrft.strategy import get_strategy

    strategy = get_strategy(config)
    model, processor = make_tiny_vlm(seed=0)
    engine_model = copy.deepcopy(model)
    actor = strategy.prepare_model(model, is_training=True)
    # Adam's eps of the parity runs (tolerance.PARITY_ADAM_EPS): with the default 1e-8 the second
    # step's loss would have no bound against another reduction order's.
    optim = strategy.create_optimizer(actor, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, eps=PARITY_ADAM_EPS)
    actor, optim, _ = strategy.prepare((actor, optim, None))
    units: list[str] = []
    try:
        from torch.distributed.fsdp import FSDPModule

        root = strategy.unwrap_model(actor)
        units = sorted(
            {type(m).__name__ for m in root.modules() if isinstance(m, FSDPModule) and m is not root}
        )
    except ImportError:
        pass
    strategy.setup_inference_engine(model=engine_model, tokenizer=processor)
    before = generate(strategy, processor)
    rank, world = strategy.get_rank(), strategy.world_size
    micro = strategy.config.micro_train_batch_size
    losses: list[float] = []
    norms: list[float] = []
    step_params: list[Any] = []
    for step in range(steps):
        mine = training_samples(step, strategy.config.train_batch_size)[rank::world]
        for start in range(0, len(mine), micro):
            part = mine[start : start + micro]
            batch = vlm_batch(processor, [t for t, _ in part], [[img] for _, img in part])
            batch = {k: v.to(strategy.device) for k, v in batch.items()}
            loss = vlm_loss(actor, batch)
            strategy.backward(loss, actor, optim)
            norm = strategy.optimizer_step(optim, actor, None)
            losses.append(float(loss.detach()))
        norms.append(float(norm))
        step_params.append(flat(full_params(strategy, actor)))
    strategy.update_engine_weights(actor)
    pushed = generate(strategy, processor)
    saved = Path(tmp) / "trained"
    strategy.save_model(actor, saved, tokenizer=processor)
    saved_names = saved_weight_names(saved)
    tied_copies_equal = saved_tied_copies_equal(saved)
    strategy.engine_lifecycle.shutdown()
    strategy.setup_inference_engine(model_path=str(saved), tokenizer=processor)
    fresh = generate(strategy, processor)
    strategy.engine_lifecycle.shutdown()
    del torch
    return {
        "rank": rank,
        "losses": losses,
        "norms": norms,
        "step_params": step_params,
        "units": units,
        "before": before,
        "pushed": pushed,
        "fresh": fresh,
        "saved_names": saved_names,
        "tied_copies_equal": tied_copies_equal,
    }


#: The tied output embedding's names (the language model's ``embed_tokens`` shares it). Whether a
#: save keeps it depends on whether the gathered state dict still shares storage: one rank's does,
#: a 2-rank gather gives separate copies. Either is loadable (engines skip a tied lm_head).
TIED_OUTPUT_NAMES = ("language_model.lm_head.weight", "lm_head.weight")
_INPUT_EMBEDDING_NAMES = (
    "language_model.model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
)


def saved_weight_names(directory: Path) -> list[str]:
    """The sorted tensor names in a saved directory's safetensors files."""
    from safetensors import safe_open

    names: list[str] = []
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            names.extend(fh.keys())
    return sorted(names)


def saved_tied_copies_equal(directory: Path) -> bool:
    """Every :data:`TIED_OUTPUT_NAMES` tensor in the saved directory equals the input embedding
    bitwise (True when none was written)."""
    import torch
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k in TIED_OUTPUT_NAMES or k in _INPUT_EMBEDDING_NAMES:
                    tensors[k] = fh.get_tensor(k)
    embed = next((tensors[k] for k in _INPUT_EMBEDDING_NAMES if k in tensors), None)
    return all(
        embed is not None and torch.equal(tensors[k], embed) for k in TIED_OUTPUT_NAMES if k in tensors
    )


def plain_saved_names(tmp: Path) -> list[str]:
    """The tensor names transformers' own ``save_pretrained`` writes for the tiny VLM."""
    model, _ = make_tiny_vlm(seed=0)
    model.save_pretrained(tmp / "plain")
    return saved_weight_names(tmp / "plain")


def check_round(results: list[dict[str, Any]], fake: dict[str, Any], plain_names: list[str]) -> None:
    """Asserts on :func:`train_push_generate`'s per-rank ``results`` against FakeStrategy's
    ``fake`` (one process, the whole batch, with the ranks' thread count: ``rank_threads``): on
    every rank the pushed engine's generations equal the fresh engine's exactly (tokens and
    log-probs: the same fp32 weights, saved unrounded, in the same engine code on the same rank),
    the push changed them, and all ranks generated alike; ``save_model`` wrote the tensor names
    ``plain_names`` (:func:`plain_saved_names`: transformers' own layout; a sharded model's names
    once came out nested wrongly, which the hf engine still loaded and vLLM refused), plus at most
    a tied output embedding equal to the input one; the ranks' losses (sample i of a step on
    rank ``i % world``) of the first step equal FakeStrategy's exactly (the same initial weights,
    the same one-sample forward with the same thread count), and the later steps' mean losses lie
    within ``tolerance.parity_loss_atol`` of FakeStrategy's (the samples' gradients summed in
    another order, through Adam at PARITY_ADAM_EPS, moved the parameters by their measured
    distance; to first order)."""
    world = len(results)
    for r in results:
        assert [g["tokens"] for g in r["fresh"]] == [g["tokens"] for g in r["pushed"]], r["rank"]
        assert [g["logprobs"] for g in r["fresh"]] == [g["logprobs"] for g in r["pushed"]], r["rank"]
        assert [g["logprobs"] for g in r["pushed"]] != [g["logprobs"] for g in r["before"]]
        assert r["pushed"] == results[0]["pushed"]
        extra = sorted(set(r["saved_names"]) - set(plain_names))
        assert set(plain_names) <= set(r["saved_names"]), (
            r["rank"],
            sorted(set(plain_names) - set(r["saved_names"])),
        )
        assert set(extra) <= set(TIED_OUTPUT_NAMES) and r["tied_copies_equal"], (r["rank"], extra)
    ranks = [list(r["losses"]) for r in sorted(results, key=lambda r: r["rank"])]
    merged = [ranks[k % world].pop(0) for k in range(len(fake["losses"]))]
    assert not any(ranks), "the ranks ran more micro-batches than FakeStrategy"
    per_step = len(fake["losses"]) // len(fake["norms"])
    assert merged[:per_step] == fake["losses"][:per_step], (merged, fake["losses"])
    for step in range(1, len(fake["norms"])):
        got = merged[step * per_step : (step + 1) * per_step]
        want = fake["losses"][step * per_step : (step + 1) * per_step]
        a, b = sum(got) / per_step, sum(want) / per_step
        for r in results:
            dp = float((r["step_params"][step - 1].double() - fake["step_params"][step - 1].double()).norm())
            bound = parity_loss_atol(b, fake["norms"][step], dp, per_step)
            assert abs(a - b) <= bound, (step, a, b, dp, bound)


class MultimodalRoundSuite:
    """The multimodal round of a backend: set ``config`` (StrategyConfig overrides, ``strategy``
    at least; ``engine_type="hf"``) in a subclass named ``Test...``. One launch on ``world_size``
    gloo ranks per class (the ``results`` fixture, which a subclass's own tests may use too);
    the test compares it with FakeStrategy's round in this process (:func:`check_round`)."""

    config: ClassVar[dict[str, Any]] = {}
    world_size: ClassVar[int] = 2

    @pytest.fixture(scope="class")
    def results(self, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
        """Every rank's :func:`train_push_generate` (skips without transformers, pillow or the hf
        engine)."""
        for module in ("transformers", "PIL", "lightrft.engines.hf"):
            pytest.importorskip(module)
        tmp = tmp_path_factory.mktemp(f"{self.config.get('strategy', 'backend')}-mm")
        return run_distributed(
            "lightrft.testing.multimodal:train_push_generate",
            self.world_size,
            {"config": self.config, "tmp": str(tmp)},
            timeout=600,
        )

    def test_two_ranks_train_like_fake_and_pushed_generations_equal_a_fresh_engine(
        self, results: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        # The reference with the ranks' thread count (rank_threads): its first-step losses and the
        # ranks' are the same arithmetic (check_round compares them exactly).
        with rank_threads():
            fake = train_push_generate({**self.config, "strategy": "fake"}, str(tmp_path))
        check_round(results, fake, plain_saved_names(tmp_path))
