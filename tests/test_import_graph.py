"""The house's one direction, checked on the AST of every module (top-level and function-local imports alike):

finetune -> safer_diffusion -> (nothing of ours); demos and benchmarks sit on top; nothing outside tests/ imports
safer_diffusion.testing; and no import cycle among modules (a package ``__init__`` re-exporting lazily aside).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("safer_diffusion", "finetune", "demos", "benchmarks")


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _targets(mods: dict[str, Path], current: str, node: ast.AST) -> list[str]:
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = current.split(".")
            anchor = parts if mods[current].name == "__init__.py" else parts[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    if current.startswith("demos."):  # `python demos/app.py` puts demos/ on sys.path: `import service` is demos.service
        names += [f"demos.{n}" for n in names]
    out = []
    for name in names:  # the longest known module prefix (``a.b.func`` -> ``a.b``)
        parts = name.split(".")
        while parts and ".".join(parts) not in mods:
            parts.pop()
        if parts:
            out.append(".".join(parts))
    return out


def _graph() -> tuple[dict[str, Path], dict[str, set[str]]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _targets(mods, name, node):
                if target != name and not name.startswith(target + "."):  # a module importing its own package
                    edges[name].add(target)
    return mods, edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


MODS, EDGES = _graph()


def test_the_graph_is_read():
    assert "safer_diffusion.pipeline_safer_stable_diffusion" in MODS and "finetune.train" in MODS
    assert "safer_diffusion.fileio" in EDGES["finetune.train"]  # an absolute import across packages
    assert "safer_diffusion.options" in EDGES["safer_diffusion.export_format"] or "safer_diffusion.fileio" in EDGES[
        "safer_diffusion.export_format"]  # a relative one


def test_library_never_imports_finetune():
    bad = sorted(f"{m} -> {t}" for m, ts in EDGES.items() if m.startswith("safer_diffusion") for t in ts
                 if t.startswith("finetune"))  # fmt: skip
    assert bad == []


def test_only_tests_import_safer_diffusion_testing():
    bad = sorted(m for m, ts in EDGES.items() if "safer_diffusion.testing" in ts and m != "safer_diffusion.testing")
    assert bad == []


def test_no_import_cycle():
    real = [c for c in _cycles(EDGES) if sum(MODS[m].name != "__init__.py" for m in c) >= 2]
    assert real == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in real)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", ["safer_diffusion.cli", "safer_diffusion.evaluation.cli", "safer_diffusion.convert"])
def test_cli_modules_import_no_heavy_framework(module):
    """`--help` and bad input answer at once: the CLI modules import torch/diffusers/transformers only to do work."""
    code = f"import sys, {module}; print(sorted(k for k in ('torch', 'diffusers', 'transformers') if k in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()} at import time"
