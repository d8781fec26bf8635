"""Shared fixtures: every test starts from the same seed; `gpu` tests need CUDA."""

import os
import random

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (and TRITON_INTERPRET unset)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (no bf16 there)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
