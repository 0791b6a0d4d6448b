"""Plant each bug of issue 17's table, one at a time, and list the tests that fail.

Usage: python tools/plant_audit.py [--list] [ROW ...] (from any directory). No ROW: every row.

Each plant is written into a scratch copy of ``deqkit/``, ``tests/`` and ``pyproject.toml`` (a
temporary directory; pytest runs there, so the planted package is the one imported): the working
tree is never touched. Exit status: the number of rows whose pattern is missing or whose plant no
test caught.

The patterns are exact source lines of the 0.2 layout (``deqkit/estimators/``, ``deqkit/train/``
packages): when the library moves, a row reports "pattern not found once" and must be updated here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CORE = ["tests/test_audit_core.py"]
# row: (file, old, new, test files)
PLANTS = {
    "cosine": ("deqkit/diagnostics.py", "cosine=_cos(g, g_ref)", "cosine=_cos(g, g)", CORE),
    "hoag-up": (
        "deqkit/bilevel/hoag.py",
        "st.lam = (st.lam - step * g)",
        "st.lam = (st.lam + step * g)",
        ["tests/test_audit_bilevel.py"],
    ),
    "refine-H": (
        "deqkit/estimators/shine.py",
        "solve_adjoint(vjp, v, w0=w, inverse=H.transpose())",
        "solve_adjoint(vjp, v, w0=w, inverse=H)",
        CORE,
    ),
    "fallback-ge": (
        "deqkit/estimators/shine.py",
        "            bad = w.norm(dim=1) > self.fallback_ratio * v.norm(dim=1)\n            stats.n_fallback",
        "            bad = w.norm(dim=1) >= self.fallback_ratio * v.norm(dim=1)\n            stats.n_fallback",
        CORE,
    ),
    "no-cache": ("deqkit/deq.py", "with parametrize.cached():", "with __import__('contextlib').nullcontext():", CORE),
    "jfb-ignored": ("deqkit/estimators/exact.py", 'return v.clone() if self.warm_start == "jfb" else None', "return None", CORE),
    "no-damping": (
        "deqkit/estimators/phantom.py",
        "z = fz if self.damping == 1.0 else self.damping * fz + (1 - self.damping) * z",
        "z = fz",
        CORE,
    ),
    "no-rng-restore": (
        "deqkit/train/loop.py",
        '        set_rng_state(ckpt["rng"])\n',
        "        pass\n",
        ["tests/test_audit_train.py"],
    ),
    "direct-write": (
        "deqkit/train/checkpoint.py",
        '    torch.save(obj, buf)\n    with atomic_open(path, "wb") as fh:\n        fh.write(buf.getbuffer())',
        "    Path(path).parent.mkdir(parents=True, exist_ok=True)\n    torch.save(obj, path)",
        ["tests/test_audit_train.py"],
    ),
}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="rows: " + ", ".join(PLANTS))
    ap.add_argument("rows", nargs="*", metavar="ROW", help="rows to plant (default: all)")
    ap.add_argument("--list", action="store_true", help="list the rows, their files and whether each pattern is found")
    args = ap.parse_args(argv)
    unknown = [r for r in args.rows if r not in PLANTS]
    if unknown:
        ap.error(f"unknown row(s) {unknown}; rows: {', '.join(PLANTS)}")
    if args.list:
        for row, (path, old, _, tests) in PLANTS.items():
            n = (ROOT / path).read_text().count(old) if (ROOT / path).is_file() else 0
            print(f"{row:15s} {path:30s} pattern found {n}x  tests: {' '.join(tests)}")
        return 0
    bad = 0
    with tempfile.TemporaryDirectory(prefix="deqkit-plant-") as tmp:
        scratch = Path(tmp)
        for name in ("deqkit", "tests"):
            shutil.copytree(ROOT / name, scratch / name, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
        shutil.copyfile(ROOT / "pyproject.toml", scratch / "pyproject.toml")
        env = dict(os.environ, PYTHONPATH=str(scratch))
        where = _imported_from(scratch, env)
        if not where.startswith(str(scratch)):
            print(f"plant_audit: the scratch copy is not the package imported ({where!r}); nothing measured")
            return len(PLANTS)
        for row in args.rows or list(PLANTS):
            path, old, new, tests = PLANTS[row]
            f = scratch / path
            src = f.read_text()
            if src.count(old) != 1:
                print(f"{row}: pattern not found once in {path} (library changed?)")
                bad += 1
                continue
            try:
                f.write_text(src.replace(old, new))
                out = subprocess.run(
                    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests],
                    cwd=scratch,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=900,
                ).stdout
            finally:
                f.write_text(src)
            failed = [line.split(" ", 1)[1].split(" - ")[0] for line in out.splitlines() if line.startswith("FAILED ")]
            print(f"{row}: {len(failed)} failing")
            for t in failed:
                print(f"    {t}")
            bad += not failed
    return bad


def _imported_from(scratch: Path, env: dict) -> str:
    """Where ``import deqkit`` resolves from in the scratch directory (as the tests see it)."""
    return subprocess.run(
        [sys.executable, "-c", "import deqkit; print(deqkit.__file__)"],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
