"""Shared pytest fixtures for the tunec test-suite.

Test files use these through pytest's fixture injection only (never import
this module). Everything here is offline and cheap.

Fixtures:

- ``repo_root``: the repository root.
- ``demo_dir``: ``recipes/demo`` (the demo recipe, its data and tokenizer).
- ``demo_tokenizer``: ``recipes/demo/tokenizer``, the project's own byte-level BPE.
- ``write_recipe``: factory writing a recipe YAML into ``tmp_path``.
- ``tiny_task_dir``: a 20-row arithmetic JSONL dataset (plus a 5-row test split)
  under ``tmp_path/tiny``.
- ``hf_cache``: points the ``datasets`` cache at ``tmp_path`` so that tests
  calling ``load_dataset`` leave nothing in the user's cache.
- ``unit_cache`` (autouse): ``TUNEC_CACHE`` set to a fresh temporary folder for every
  test, so no compile writes to the user's cache.
- ``one_thread``: one torch thread for a module's tiny models (on a busy machine
  more threads only wait); modules opt in with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """``recipes/demo``: ``demo.yaml``, ``data/``, ``tokenizer/``."""
    return REPO_ROOT / "recipes" / "demo"


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir: Path) -> Path:
    """Folder of the demo tokenizer (``tokenizer.json``, ``tokenizer_config.json``)."""
    return demo_dir / "tokenizer"


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``write_recipe(text, name="recipe.yaml") -> Path``.

    The text is dedented, and one leading newline (the one right after an
    opening triple quote) is dropped, so the first line of the text is line 1
    of the file: line numbers in expected messages can be read off the test.
    Relative paths in the recipe resolve against ``tmp_path`` (where
    ``tiny_task_dir`` writes ``tiny/``).
    """

    def write(text: str, name: str = "recipe.yaml") -> Path:
        text = textwrap.dedent(text)
        if text.startswith("\n"):
            text = text[1:]
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return write


TINY_TRAIN_ROWS = 20
TINY_TEST_ROWS = 5


def _tiny_rows(start: int, count: int) -> list[dict]:
    # Addition questions of our own making; `a` is a string, as templates print it.
    return [{"q": f"What is {i} plus {i + 3}?", "a": str(2 * i + 3)} for i in range(start, start + count)]


@pytest.fixture
def tiny_task_dir(tmp_path: Path) -> Path:
    """``tmp_path/tiny`` holding ``train.jsonl`` (20 rows) and ``test.jsonl`` (5 rows).

    Every row is ``{"q": "What is i plus i+3?", "a": "<2i+3>"}``; train has
    i = 0..19, test i = 100..104. A recipe written by ``write_recipe`` names
    them ``tiny/train.jsonl`` and ``tiny/test.jsonl``.
    """
    folder = tmp_path / "tiny"
    folder.mkdir()
    for name, rows in (
        ("train.jsonl", _tiny_rows(0, TINY_TRAIN_ROWS)),
        ("test.jsonl", _tiny_rows(100, TINY_TEST_ROWS)),
    ):
        with (folder / name).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    return folder


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Send ``datasets``' cache to ``tmp_path/hf_cache`` for the duration of the test."""
    import datasets.config

    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


_SESSION_CACHE: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """``TUNEC_CACHE`` in a temporary folder before any test module is imported: module-level
    environments (``ENV = dict(os.environ, ...)`` for subprocesses) and module or session fixtures
    that compile never reach the user's cache."""
    folder = tempfile.mkdtemp(prefix="tunec-test-cache-")
    _SESSION_CACHE.append(os.environ.get("TUNEC_CACHE", ""))
    os.environ["TUNEC_CACHE"] = folder


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_CACHE:
        shutil.rmtree(os.environ.get("TUNEC_CACHE", ""), ignore_errors=True)
        before = _SESSION_CACHE.pop()
        if before:
            os.environ["TUNEC_CACHE"] = before
        else:
            os.environ.pop("TUNEC_CACHE", None)


@pytest.fixture(autouse=True)
def unit_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's compile cache (``TUNEC_CACHE``) in a fresh temporary folder, never the user's."""
    folder = tmp_path_factory.mktemp("tunec-cache")
    monkeypatch.setenv("TUNEC_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
