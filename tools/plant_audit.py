"""Plant each bug of issue 17's table, one at a time, and list the tests that fail.

Usage: python tools/plant_audit.py [ROW ...] — run from the repository root (PYTHONPATH=.).
The library files are restored after each plant (also on Ctrl-C). Never commit a planted file.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# row: (file, old, new, test files)
PLANTS = {
    "cosine": ("deqkit/diagnostics.py", "cosine=_cos(g, g_ref)", "cosine=_cos(g, g)",
               ["tests/test_audit_core.py"]),
    "hoag-up": ("deqkit/bilevel/hoag.py", "lam = (lam - step * g)", "lam = (lam + step * g)",
                ["tests/test_audit_bilevel.py"]),
    "refine-H": ("deqkit/shine.py", "state0=transposed(H))", "state0=H)", ["tests/test_audit_core.py"]),
    "fallback-ge": ("deqkit/shine.py", "bad = w.norm(dim=1) > self", "bad = w.norm(dim=1) >= self",
                    ["tests/test_audit_core.py"]),
    "no-cache": ("deqkit/deq.py", "with parametrize.cached():", "with __import__('contextlib').nullcontext():",
                 ["tests/test_audit_core.py"]),
    "jfb-ignored": ("deqkit/estimators.py", 'return v.clone() if self.warm_start == "jfb" else None', "return None",
                    ["tests/test_audit_core.py"]),
    "no-damping": ("deqkit/estimators.py",
                   "z = fz if self.damping == 1.0 else self.damping * fz + (1 - self.damping) * z", "z = fz",
                   ["tests/test_audit_core.py"]),
    "no-rng-restore": ("deqkit/train.py", '        _set_rng_state(ckpt["rng"])\n', "        pass\n",
                       ["tests/test_audit_train.py"]),
    "direct-write": ("deqkit/train.py", "    with atomic_open(path, \"wb\") as fh:\n        torch.save(obj, fh)",
                     "    Path(path).parent.mkdir(parents=True, exist_ok=True)\n    torch.save(obj, path)",
                     ["tests/test_audit_train.py"]),
}


def main(rows: list[str]) -> int:
    bad = 0
    for row in rows or list(PLANTS):
        path, old, new, tests = PLANTS[row]
        f = Path(path)
        src = f.read_text()
        if src.count(old) != 1:
            print(f"{row}: pattern not found once in {path} (library changed?)")
            bad += 1
            continue
        try:
            f.write_text(src.replace(old, new))
            out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests],
                                 capture_output=True, text=True, timeout=600).stdout
        finally:
            f.write_text(src)
        failed = [line.split(" ", 1)[1].split(" - ")[0] for line in out.splitlines() if line.startswith("FAILED ")]
        print(f"{row}: {len(failed)} failing")
        for t in failed:
            print(f"    {t}")
        bad += not failed
    return bad


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
