"""Which modules become FSDP units, decided without a process group (``lightrft.fsdp.sharding``)."""

from __future__ import annotations

import warnings

import pytest
from torch import nn

from lightrft.fsdp import sharding
from lightrft.testing import make_tiny_model


def sequential(hidden: int = 1024, vocab: int = 64) -> nn.Sequential:
    """Embedding, one Linear above MIN_UNIT_PARAMS (1024 x 1024 + 1024), GELU, a small head."""
    return nn.Sequential(
        nn.Embedding(vocab, hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, vocab)
    )


def test_known_decoder_layers_are_the_blocks() -> None:
    model = make_tiny_model(0)
    names = sharding.no_split_class_names(model)
    assert names == ["TinyBlock"]
    assert sharding.find_blocks(model, names) == list(model.layers)


def test_model_without_known_layers_gets_its_large_children_as_units_and_one_warning() -> None:
    model = sequential()
    assert sharding.find_blocks(model, []) == []
    sharding._warned_fallback.discard("Sequential")
    with pytest.warns(
        UserWarning, match=r"(?s)Sequential has no submodule.*\['1'\].*no_split_modules="
    ) as rec:
        blocks = sharding.fallback_blocks(model, [])
    assert len(rec) == 1
    assert blocks == [model[1]]  # 1,049,600 parameters >= 2**20; the head (65,600) stays with the root
    # The embedding is a unit of its own (as in any model); the head below the threshold is not.
    assert sharding.edge_modules(model, blocks) == [model[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: a second model of the class is silent
        assert sharding.fallback_blocks(sequential(), []) != []


def test_small_model_without_known_layers_is_sharded_at_the_root_only() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sharding._warned_fallback.discard("Sequential")
    with pytest.warns(
        UserWarning, match="sharded with any nn.Embedding as units and the root holding the rest"
    ):
        assert sharding.fallback_blocks(model, ["Block"]) == []
    assert sharding.edge_modules(model, []) == []
