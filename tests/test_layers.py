"""The house's import rules (README § Architecture), held by a test instead of goodwill.

Every module of the package is parsed (ast) and every import it makes is collected, the lazy ones
inside functions included. Layers, outer to inner:

    face      cli.py, __main__.py, bench/        nothing imports it
    pipeline  pipeline/ (demo), world/           world/ never imports pipeline/
    stages    stages/ (and stages/rl/)
    services  services/
    training  training/
    engine    engine/                            imports nothing of minihuatuo

A module may import its own layer and the layers below it, and the module graph has no cycle.
The checker is tested on planted violations, so that a rule it stopped enforcing would show.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minihuatuo"

RANK = {"engine": 0, "training": 1, "services": 2, "stages": 3, "world": 4, "pipeline": 4, "face": 5}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "__main__", "bench"):
        return "face"  # the package root holds only __version__
    return parts[1]


def imports(module: str, source: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules `source` imports, at any depth (lazy imports included). `from X import y`
    is the module X.y when there is one, else the module X."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative: from the module's package, up level − 1 packages
                base = module.split(".") if is_package else module.split(".")[:-1]
                target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
    return {m for m in found if m in modules and m != module}


def package_sources() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
            for p in sorted(PACKAGE.rglob("*.py"))}


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Broken rules, one line each: an import of an outer layer, of the face, of pipeline/ from
    world/, and every import cycle."""
    graph = {m: imports(m, src, is_pkg, set(sources)) for m, (src, is_pkg) in sources.items()}
    bad = []
    for m, deps in graph.items():
        for d in sorted(deps):
            lm, ld = layer(m), layer(d)
            if ld == "face" and lm != "face":
                bad.append(f"{m} imports the face ({d})")
            elif RANK[ld] > RANK[lm]:
                bad.append(f"{m} ({lm}) imports {d} ({ld}), an outer layer")
            elif lm == "world" and ld == "pipeline":
                bad.append(f"{m} (world) imports {d} (the demo pipeline)")
    state: dict[str, int] = {}  # cycles: depth-first search, 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                bad.append("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return bad


def test_the_package_keeps_the_import_rules():
    sources = package_sources()
    assert {layer(m) for m in sources} == set(RANK), "every layer has modules, and no module is outside them"
    assert violations(sources) == []


def test_the_checker_sees_planted_violations():
    """Each rule fails on an import planted into a copy of the real sources (lazy ones too)."""
    sources = package_sources()
    plants = {
        "minihuatuo.engine.model": ("from minihuatuo.stages.sft import train\n", "an outer layer"),
        "minihuatuo.services.reward": ("def f():\n    from minihuatuo.stages.rl import ppo\n", "an outer layer"),
        "minihuatuo.stages.sft": ("from minihuatuo.pipeline.demo import run_demo\n", "an outer layer"),
        "minihuatuo.services.serve": ("from minihuatuo.cli import DTYPES\n", "imports the face"),
        "minihuatuo.world.exam": ("from minihuatuo.pipeline import demo\n", "(the demo pipeline)"),
        "minihuatuo.training.distributed": ("from ..services import config\n", "an outer layer"),
    }
    for module, (line, message) in plants.items():
        src, is_pkg = sources[module]
        planted = {**sources, module: (src + "\n" + line, is_pkg)}
        found = violations(planted)
        assert any(v.startswith(module) and message in v for v in found), (module, found)
    # a cycle inside one layer: sample imports kv_cache; planted, kv_cache imports sample
    src, is_pkg = sources["minihuatuo.engine.kv_cache"]
    planted = {**sources, "minihuatuo.engine.kv_cache": (src + "\nfrom minihuatuo.engine import sample\n", is_pkg)}
    assert any(v.startswith("import cycle") and "minihuatuo.engine.kv_cache" in v for v in violations(planted))
