"""The package's layering, read from its imports: stages sit above `models/` and the core
modules, import only downward (in the direction the data flows) and only public names of
another package. A new upward or private import fails here, naming the file and the line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "edgedistill"
# Lowest first. Core modules share rank 0; a stage may import any lower rank.
RANKS = {
    "errors": 0, "console": 0, "net": 0, "recipe": 0, "recipe_reference": 0, "recipes": 0, "run": 0,
    "models": 1,
    "teachers": 2,
    "data": 3,
    "distill": 4,
    "evaluate": 5,
    "export": 6,
    "serve": 7,
    "pipeline": 8,
    "cli": 9, "__main__": 9,
}


def _unit(module: str) -> str:
    """'edgedistill.models.hf' -> 'models'; 'edgedistill' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every edgedistill import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgedistill"):
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("edgedistill")]
    return found


def layer_violations(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        own = relative.parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for line, module, names in _imports(path):
            other = _unit(module)
            where = f"{relative}:{line}"
            if other not in RANKS:
                if other:
                    problems.append(f"{where}: imports {module}, a package the layering does not know")
                continue
            if other == own:
                continue
            if RANKS[other] > RANKS[own]:
                problems.append(f"{where}: {own} (rank {RANKS[own]}) imports upward from {module} (rank {RANKS[other]})")
            private = [n for n in names if n.startswith("_")] + [p for p in module.split(".") if p.startswith("_")]
            if private:
                problems.append(f"{where}: imports private {', '.join(private)} from another package ({module})")
    return problems


def test_every_package_module_has_a_rank():
    units = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units <= set(RANKS), f"give these a rank in RANKS: {sorted(units - set(RANKS))}"


def test_stages_import_only_downward_and_public_names():
    assert layer_violations(PACKAGE) == []


@pytest.mark.parametrize("source, expected", [
    ("from edgedistill.serve.app import create_app\n", "teachers (rank 2) imports upward from edgedistill.serve.app"),
    ("from edgedistill.models.hf import _load_error\n", "imports private _load_error from another package"),
    ("import edgedistill.evaluate.report\n", "teachers (rank 2) imports upward from edgedistill.evaluate.report"),
])
def test_the_checker_catches_upward_and_private_imports(tmp_path, source, expected):
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "bad.py").write_text(source, encoding="utf-8")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "fine.py").write_text("from edgedistill.recipe import Recipe\n", encoding="utf-8")
    problems = layer_violations(tmp_path)
    assert len(problems) == 1 and expected in problems[0] and problems[0].startswith("teachers/bad.py:1:")
