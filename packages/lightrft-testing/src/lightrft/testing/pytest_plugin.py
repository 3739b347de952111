"""pytest plugin of lightrft-testing (loaded through the ``pytest11`` entry point).

- ``@pytest.mark.gpu`` / ``@pytest.mark.gpu(2)``: skipped, with the reason, unless that many CUDA
  devices are visible.
- fixtures ``fake_strategy`` (a FakeStrategy with small batch sizes) and ``tiny_model``.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu(n=1): needs n CUDA GPUs; skipped with a reason otherwise")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        needed = int(marker.args[0]) if marker.args else int(marker.kwargs.get("n", 1))
        if available < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA GPU(s); {available} visible"))


@pytest.fixture
def fake_strategy() -> Any:
    from lightrft.strategy import get_fake_strategy

    return get_fake_strategy({"train_batch_size": 8, "micro_train_batch_size": 2, "bf16": False})


@pytest.fixture
def tiny_model() -> Any:
    from lightrft.testing.models import make_tiny_model

    return make_tiny_model(0)
