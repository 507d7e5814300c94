"""`--executor ray`: units compiled as Ray tasks on a local 2-worker cluster, written into the cache,
linked here; the build is byte-identical to a local one. Skipped where Ray is not installed."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.cache import Cache

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow
DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo"


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".tunec")}


@pytest.fixture
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_units_land_in_the_cache_and_the_build_equals_a_local_one(tmp_path, cluster):
    for name in ("data", "tokenizer"):
        shutil.copytree(DEMO / name, tmp_path / name)
    shutil.copy(DEMO / "collection.yaml", tmp_path / "collection.yaml")
    recipe = tmp_path / "collection.yaml"
    cache = tmp_path / "cache"
    said: list = []
    compile_recipe(recipe, tmp_path / "ray", Options(cache=cache, executor="ray", on_units=lambda r, b: said.append(b)))
    assert len(said[0]) == 6
    units = [p for p in Cache(cache).entries() if p.parent.parent.name == "units"]
    assert len(units) == 6  # every unit written by a Ray task (this process only reads them back)
    compile_recipe(recipe, tmp_path / "local", Options(workers=1, use_cache=False))
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")
    # a local compile then finds every unit in the cache the Ray tasks filled
    said.clear()
    compile_recipe(recipe, tmp_path / "again", Options(workers=1, cache=cache, on_units=lambda r, b: said.append(b)))
    assert said == [[]]
