"""The library core never imports the applications (``deqkit.cli``, ``deqkit.apps``).

Two checks: a static scan of every core module's imports with ``ast`` (absolute and relative,
inside functions too), and a fresh interpreter that imports every core module while the
application packages are made unimportable.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deqkit"
APPS = ("deqkit.cli", "deqkit.apps")
#: ``python -m`` entry points: they run the command line, so they import it
SHIMS = ("deqkit.__main__", "deqkit.bench")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> list[Path]:
    """Every module of the package outside the applications (and the ``python -m deqkit`` / ``deqkit.bench`` shims)."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name in SHIMS or any(name == a or name.startswith(a + ".") for a in APPS):
            continue
        out.append(path)
    return out


def imported_names(path: Path) -> set[str]:
    """The absolute names of every module ``path`` imports (``from x import y`` counts ``x`` and ``x.y``)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_the_scan_sees_relative_and_absolute_imports():
    names = imported_names(PACKAGE / "cli" / "dispatch.py")
    assert "deqkit.data" in names and "deqkit.cli.options" in names
    assert len(core_modules()) > 20


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_does_not_import_the_apps(path):
    bad = sorted(n for n in imported_names(path) if any(n == a or n.startswith(a + ".") for a in APPS))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the library core must not depend on the applications"


def test_core_imports_with_the_apps_unimportable():
    names = [_module_name(p) for p in core_modules()]
    code = f"""
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name in {APPS!r} or name.startswith(tuple(a + "." for a in {APPS!r})):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
for name in {names!r}:
    importlib.import_module(name)
assert not [m for m in sys.modules if m.startswith({APPS!r})]
print("ok", len({names!r}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]
