"""The package layout: no import circles, a light ``import codelens``, and the README's
module table matches the tree."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "codelens"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """codelens modules that ``name`` imports when it runs (module level or inside
    functions); imports under ``if TYPE_CHECKING:`` never run and are left out."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def deepest(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(filter(None, (deepest(a.name) for a in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                found.update(filter(None, [deepest(f"{base}.{alias.name}")]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return {m for m in found if m.startswith("codelens")}


def test_no_module_imports_its_own_importer():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += graph[node]
        return False

    circles = sorted((a, b) for a, targets in graph.items() for b in targets if reaches(b, a))
    assert circles == []


def test_readme_module_table_matches_the_package_tree():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## What is in the box", 1)[1].split("\n## ", 1)[0]
    first_cells = [row.split("|")[1] for row in table.splitlines() if row.startswith("| `")]
    named = set(re.findall(r"`(codelens(?:\.\w+)*)`", " ".join(first_cells)))
    for module in named:
        assert importlib.util.find_spec(module) is not None, f"README names {module}"
    public = {
        f"codelens.{p.stem}"
        for p in PACKAGE.iterdir()
        if not p.name.startswith("_") and (p.suffix == ".py" or (p / "__init__.py").is_file())
    }
    assert public - named == set(), "public modules missing from the README table"


def test_import_codelens_loads_no_torch_until_a_name_is_used():
    script = (
        "import sys, codelens\n"
        "assert 'torch' not in sys.modules and 'transformer_lens' not in sys.modules\n"
        "import codelens.model, codelens.codebook\n"
        "assert codelens.HookedCodebookTransformer is codelens.model.HookedCodebookTransformer\n"
        "assert codelens.EMPTY_SLOT == codelens.codebook.EMPTY_SLOT == -1\n"
        "from codelens import *\n"
        "assert CodebookConfig.__module__ == 'codelens.config'\n"
        "try:\n    codelens.no_such_name\nexcept AttributeError as err:\n"
        "    assert 'no_such_name' in str(err)\nelse:\n    raise SystemExit('no error')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
