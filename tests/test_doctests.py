"""The examples in the compiler's docstrings (packing drawings, mixtures, YAML positions...) are true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["tunec.compiler.fileio", "tunec.compiler.yamlpos", "tunec.compiler.pack", "tunec.compiler.templates", "tunec.compiler.mixture",
           "tunec.compiler.leakage", "tunec.compiler.promptsource", "tunec.compiler.load", "tunec.compiler.hubmeta",
           "tunec.compiler.yamltext", "tunec.compiler.sandbox", "tunec.compiler.cache", "tunec._dist"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
