"""No import cycle inside deqkit, and the library core imports none of the applications.

Static check over the source (fast): every ``import`` of a deqkit module, at module level or
inside a function (a lazy import is a hidden cycle too), except under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "deqkit"
#: modules of the application layer, which the library core must not import
APPS = (
    "deqkit.bench",
    "deqkit.compare",
    "deqkit.cli",
    "deqkit.train",
    "deqkit.sim.cli",
    "deqkit.bilevel.cli",
    "deqkit.sim.bench_speed",
)
CORE = (
    "deqkit.solvers",
    "deqkit.linear",
    "deqkit.estimators",
    "deqkit.deq",
    "deqkit.inverse",
    "deqkit.registry",
    "deqkit.results",
    "deqkit.errors",
    "deqkit._options",
    "deqkit.diagnostics",
)


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: pathlib.Path, names: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip: set[int] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            skip |= {id(x) for b in n.body for x in ast.walk(b)}
    deps = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                cand = f"{target}.{a.name}"
                deps.add(cand if cand in names else target)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
    return {d for d in deps if d in names and d != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_cycle_in_the_package():
    graph = _graph()
    cycles, state = [], {}

    def dfs(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v) :] + [v])
            elif not state.get(v):
                dfs(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            dfs(m, [])
    assert not cycles, cycles


def test_the_core_imports_no_application_module():
    graph = _graph()
    seen, todo = set(), [m for m in graph if m.startswith(CORE)]
    while todo:  # everything the core reaches, transitively
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    assert not [m for m in seen if m.startswith(APPS)], sorted(m for m in seen if m.startswith(APPS))
