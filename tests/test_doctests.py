"""The examples in the compiler's docstrings (packing drawings, mixtures, YAML positions...) are true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["compiler.yamlpos", "compiler.pack", "compiler.templates", "compiler.mixture",
           "compiler.leakage", "compiler.promptsource"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
