"""GPU tests: marked ``gpu`` and skipped without CUDA (``pytest tests/gpu`` on a machine with a GPU).

``bench/gpu_check.py`` is the longer suite with figures; these are the pass/fail checks.
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
