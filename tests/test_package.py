"""The package's shape: one top-level package, import layers, the template browser."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tunec.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = {"compiler": "tunec.compiler", "runtime": "tunec.runtime", "tunec": "tunec"}[path.parent.name]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # the name may be a submodule
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("path", sorted((ROOT / "compiler").glob("*.py")), ids=lambda p: p.name)
def test_the_compiler_never_imports_torch_the_runtime_or_the_cli(path):
    bad = [n for n in _imports(path) if any(_under(n, p) for p in ("torch", "peft", "tunec.runtime", "tunec.cli"))]
    assert not bad, f"{path.name} imports {bad}: the compiler must run where torch is absent"


@pytest.mark.parametrize("path", sorted((ROOT / "runtime").glob("*.py")), ids=lambda p: p.name)
def test_the_runtime_never_imports_the_cli(path):
    assert not [n for n in _imports(path) if _under(n, "tunec.cli")]


def test_the_layer_check_sees_relative_and_absolute_imports(tmp_path):
    folder = tmp_path / "compiler"
    folder.mkdir()
    (folder / "x.py").write_text("from ..runtime import run\nimport torch.nn\nfrom .plan import Plan\n")
    assert _imports(folder / "x.py") == {"tunec.runtime", "tunec.runtime.run", "torch.nn", "tunec.compiler.plan",
                                         "tunec.compiler.plan.Plan"}


def test_no_module_shadows_the_standard_library():
    clashes = [p for folder in ("compiler", "runtime", "tunec") for p in (ROOT / folder).glob("*.py")
               if p.stem in sys.stdlib_module_names]
    assert not clashes


def test_python_dash_m_tunec_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "tunec", "--version"], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0 and done.stdout.startswith("tunec, version "), done.stderr


def test_the_template_library_is_package_data():
    from importlib import resources

    names = {p.name for p in resources.files("tunec.templates").joinpath("sentiment").iterdir()}
    assert "review_short.j2" in names


# ----------------------------------------------------------------- tunec templates


def test_templates_list_names_every_library_template_with_its_variables():
    result = CliRunner().invoke(main, ["templates", "list"])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.output.splitlines() if not line.startswith(" ")]
    on_disk = sorted(p.relative_to(ROOT / "templates").with_suffix("").as_posix()
                     for p in (ROOT / "templates").rglob("*.j2"))
    assert names == on_disk
    line = next(ln for ln in result.output.splitlines() if ln.startswith("nli/suppose "))
    assert line.split(None, 1)[1] == "answer_choices, hypothesis, label, premise"


def test_templates_list_one_family_and_a_misspelt_one():
    result = CliRunner().invoke(main, ["templates", "list", "plural"])
    assert result.exit_code == 0
    assert {ln.split()[0] for ln in result.output.splitlines() if not ln.startswith(" ")} == {
        p.with_suffix("").relative_to(ROOT / "templates").as_posix() for p in (ROOT / "templates/plural").glob("*.j2")}
    result = CliRunner().invoke(main, ["templates", "list", "sentimnt"])
    assert result.exit_code == 1 and "did you mean 'sentiment'" in result.output


def test_templates_show_prints_the_file_and_folders_of_ones_own_come_first(tmp_path):
    result = CliRunner().invoke(main, ["templates", "show", "sentiment/one_word"])
    assert result.exit_code == 0
    text = (ROOT / "templates/sentiment/one_word.j2").read_text()
    assert result.output.endswith(text) and "# variables: label, text" in result.output

    mine = tmp_path / "mine" / "sentiment"
    mine.mkdir(parents=True)
    (mine / "one_word.j2").write_text("{# Mine. #}{% block prompt %}{{ review }}{% endblock %}"
                                      "{% block completion %} {{ stars }}{% endblock %}")
    result = CliRunner().invoke(main, ["templates", "show", "sentiment/one_word", "--dir", str(tmp_path / "mine")])
    assert result.exit_code == 0 and "# variables: review, stars" in result.output

    result = CliRunner().invoke(main, ["templates", "show", "sentiment/one_wrd"])
    assert result.exit_code == 1 and "did you mean 'sentiment/one_word'" in result.output
