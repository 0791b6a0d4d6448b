"""Sampled mutation testing of the modules that produce deqkit's reported numbers (issue 17).

    python tools/mutation.py [--mutants N] [--seed S] [--jobs J] [--timeout-factor F] [--only PATH ...]
                             [--list] [--report FILE]

Enumerates every mutant of the modules in :data:`TARGETS` (AST operators as in mutmut: comparison
flips, arithmetic swaps, boolean swaps, constant nudges, ``True``↔``False``, sign removal, ``not``
removal, ``+=``↔``-=``, a simple assignment's value set to ``None``, ``return x`` → ``return None``),
samples ``N`` of them with a fixed seed (stratified: every module gets its share, at least one), and for
each mutant writes the mutated module into a scratch copy of the package, then runs that module's test
files against it (``pytest -x``) with a timeout of ``F ×`` the unmutated run's time. A mutant is
*killed* when the tests fail or time out, *survived* when they pass. The working tree is never touched.

Lines marked ``# pragma: no mutate`` are skipped, as are docstrings, strings, annotations, ``__all__``, and the
message arguments of ``raise`` / ``warnings.warn`` (mutating a message kills nothing worth knowing).

:data:`TARGETS` is the one place that lists the modules and their tests: update it when the module
layout changes. A module entry may restrict mutation to some functions (``functions``).

Exit status: 0 when the killed fraction is at least ``--threshold`` (default 0.9), else 1.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CORE_TESTS = [
    "tests/test_audit_defaults.py",
    "tests/test_audit_core.py",
    "tests/test_core_gradients.py",
    "tests/test_core_solvers.py",
    "tests/test_core_line_search.py",
    "tests/test_core_errors.py",
    "tests/test_shine.py",
    "tests/test_exact_policy.py",
    "tests/test_conformance.py",
    "tests/test_gmres_krylov.py",
    "tests/properties/test_prop_solvers.py",
    # 0.2 additions: safeguards and dtype policy, tuple states, Adaptive, mixed precision, regularisers, faults
    "tests/test_core_reliability.py",
    "tests/test_tuple_states.py",
    "tests/test_adaptive.py",
    "tests/test_amp.py",
    "tests/test_amp_overflow.py",
    "tests/test_regularizers.py",
    "tests/faults/test_library_faults.py",
    "tests/faults/test_bad_inputs.py",
    "tests/test_numerics_audit.py",
]
SHINE_TESTS = [
    "tests/test_audit_defaults.py",
    "tests/test_audit_core.py",
    "tests/test_shine.py",
    "tests/test_conformance.py",
    "tests/test_core_gradients.py",
    "tests/test_adaptive.py",
]
BILEVEL_TESTS = [
    "tests/test_audit_defaults.py",
    "tests/test_audit_bilevel.py",
    "tests/test_bilevel_linalg.py",
    "tests/test_bilevel_pipeline.py",
    "tests/test_line_search_trace.py",
    "tests/test_numerics_audit.py",
]
SIM_TESTS = [
    "tests/test_audit_defaults.py",
    "tests/test_audit_sim.py",
    "tests/test_sim_admm.py",
    "tests/test_sim_structure.py",
    "tests/test_sim_input_weight.py",
    "tests/test_sim_projection.py",
    "tests/test_sim_model.py",
    "tests/test_sim_cnn.py",
    "tests/test_sim_density.py",
    "tests/test_sim_robust.py",
    "tests/test_sim_pruning.py",
    "tests/test_sim_options.py",
    "tests/test_sim_attacks.py",
    "tests/test_numerics_audit.py",
]
TRAIN_TESTS = [
    "tests/test_audit_train.py",
    "tests/test_train.py",
    "tests/test_step_decisions.py",
    "tests/faults/test_kill_resume.py",
    "tests/faults/test_corrupt_files.py",
    "tests/faults/test_disk_full.py",
    "tests/test_numerics_audit.py",
]

# The modules that produce reported numbers, and the tests that guard them (update this table when
# the module layout changes; paths are relative to the repository root). 0.2 layout: solvers/,
# linear/, estimators/ and train/ are packages; CG moved from bilevel to linear/cg.py.
TARGETS: dict[str, dict] = {
    "deqkit/solvers/base.py": {"tests": CORE_TESTS},
    "deqkit/solvers/tracking.py": {"tests": CORE_TESTS},
    "deqkit/solvers/fixed_point.py": {"tests": CORE_TESTS},
    "deqkit/solvers/anderson.py": {"tests": CORE_TESTS},
    "deqkit/solvers/broyden.py": {"tests": CORE_TESTS},
    "deqkit/linear/base.py": {"tests": CORE_TESTS},
    "deqkit/linear/gmres.py": {"tests": CORE_TESTS},
    "deqkit/linear/dense.py": {"tests": CORE_TESTS},
    "deqkit/linear/auto.py": {"tests": CORE_TESTS},
    "deqkit/linear/fixed_point.py": {"tests": CORE_TESTS},
    "deqkit/linear/cg.py": {"tests": [*BILEVEL_TESTS, "tests/test_conformance.py"]},
    "deqkit/estimators/base.py": {"tests": CORE_TESTS},
    "deqkit/estimators/exact.py": {"tests": CORE_TESTS},
    "deqkit/estimators/phantom.py": {"tests": CORE_TESTS},
    "deqkit/estimators/shine.py": {"tests": SHINE_TESTS},
    "deqkit/deq.py": {"tests": CORE_TESTS},
    "deqkit/diagnostics.py": {
        "tests": ["tests/test_audit_core.py", "tests/test_cli.py", "tests/test_numerics_audit.py"],
        "functions": ["_cos", "_run", "gradient_quality"],
    },
    "deqkit/bilevel/hypergrad.py": {"tests": BILEVEL_TESTS},
    "deqkit/bilevel/hoag.py": {"tests": BILEVEL_TESTS},
    "deqkit/bilevel/lbfgs.py": {"tests": BILEVEL_TESTS},
    "deqkit/sim/fit.py": {"tests": SIM_TESTS},
    "deqkit/sim/admm.py": {"tests": SIM_TESTS},
    "deqkit/train/checkpoint.py": {
        "tests": TRAIN_TESTS,
        "functions": ["rng_state", "set_rng_state", "epoch_generator", "atomic_torch_save"],
    },
    "deqkit/train/loop.py": {
        "tests": TRAIN_TESTS,
        "functions": ["_checkpoint", "save_checkpoint", "load_checkpoint", "_on_interrupt"],
    },
    "deqkit/_io.py": {"tests": TRAIN_TESTS, "functions": ["atomic_open"]},
    "deqkit/train/augment.py": {"tests": ["tests/test_augment.py"]},
}

SWAP_CMP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
SWAP_BIN = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.Pow: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
}
MESSAGE_CALLS = {"warn", "warning", "print", "write"}
MESSAGE_NAMES = {"owner", "msg", "message", "what"}  # names that only feed error/warning messages


@dataclass
class Mutant:
    module: str
    index: int  # position in the module's list of mutation points
    line: int
    kind: str
    original: str
    mutated: str
    status: str = "pending"
    seconds: float = 0.0


def _skip_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes that must not be mutated: docstrings, annotations, messages of raise/warn/print, ``__all__``."""
    skip: set[int] = set()

    def mark(node: ast.AST) -> None:
        for n in ast.walk(node):
            skip.add(id(n))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                mark(body[0])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                if a.annotation is not None:
                    mark(a.annotation)
            if node.returns is not None:
                mark(node.returns)
        if isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, ast.Raise) and node.exc is not None:
            mark(node.exc)
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in MESSAGE_CALLS:
                mark(node)
        if isinstance(node, ast.JoinedStr):
            mark(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            mark(node)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            mark(node)  # the export list declares the API (checked by the docs build), computes nothing
    return skip


def _function_lines(tree: ast.AST, names: list[str]) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def _points(tree: ast.AST, source: str, functions: list[str] | None) -> list[tuple[ast.AST, str, object]]:
    """Every mutation point as ``(node, kind, payload)``, in a deterministic order."""
    skip = _skip_nodes(tree)
    no_mutate = {i + 1 for i, line in enumerate(source.splitlines()) if "pragma: no mutate" in line}
    allowed = _function_lines(tree, functions) if functions else None
    out: list[tuple[ast.AST, str, object]] = []
    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        if node.lineno in no_mutate or (allowed is not None and node.lineno not in allowed):
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in SWAP_CMP:
                    out.append((node, "compare", i))
        elif isinstance(node, ast.BinOp) and type(node.op) in SWAP_BIN:
            out.append((node, "binop", None))
        elif isinstance(node, ast.AugAssign) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            out.append((node, "augassign", None))
        elif isinstance(node, ast.BoolOp):
            out.append((node, "boolop", None))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            out.append((node, "unary", None))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            out.append((node, "constant", None))
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], (ast.Name, ast.Attribute))
            and not (isinstance(node.value, ast.Constant) and node.value.value is None)
            and getattr(node.targets[0], "id", None) not in MESSAGE_NAMES
        ):
            out.append((node, "assign-none", None))
        elif (
            isinstance(node, ast.Return)
            and node.value is not None
            and not (isinstance(node.value, ast.Constant) and node.value.value is None)
        ):
            out.append((node, "return-none", None))
    return out


def _mutate(node: ast.AST, kind: str, payload: object) -> None:
    if kind == "compare":
        node.ops[payload] = SWAP_CMP[type(node.ops[payload])]()
    elif kind in ("binop", "augassign"):
        table = SWAP_BIN if kind == "binop" else {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
        node.op = table[type(node.op)]()
    elif kind == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif kind == "constant":
        v = node.value
        node.value = (not v) if isinstance(v, bool) else (v + 1 if isinstance(v, int) else (v * 2 if v else 1.0))
    elif kind == "assign-none" or kind == "return-none":
        node.value = ast.Constant(None)


def _unary_fix(tree: ast.AST) -> ast.AST:
    """Replace marked unary nodes (``-x`` → ``x``, ``not x`` → ``x``) in their parent."""

    class Strip(ast.NodeTransformer):
        def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
            self.generic_visit(node)
            return node.operand if getattr(node, "_strip", False) else node

    return ast.fix_missing_locations(Strip().visit(tree))


def _describe(node: Any, kind: str, payload: Any) -> str:
    """A short description of the mutation ``kind`` at ``node``."""
    if kind == "compare":
        return f"{type(node.ops[payload]).__name__}→{SWAP_CMP[type(node.ops[payload])].__name__}"
    if kind == "binop":
        return f"{type(node.op).__name__}→{SWAP_BIN[type(node.op)].__name__}"
    return {
        "augassign": lambda: f"{type(node.op).__name__}= swapped",
        "boolop": lambda: f"{type(node.op).__name__} swapped",
        "unary": lambda: f"{type(node.op).__name__} removed",
        "constant": lambda: f"{node.value!r} nudged",
        "assign-none": lambda: "value → None",
        "return-none": lambda: "return None",
    }[kind]()


def enumerate_mutants(module: str, spec: dict) -> list[Mutant]:
    source = (ROOT / module).read_text()
    tree = ast.parse(source)
    lines = source.splitlines()
    mutants = []
    for i, (node, kind, payload) in enumerate(_points(tree, source, spec.get("functions"))):
        desc = _describe(node, kind, payload)
        mutants.append(Mutant(module, i, node.lineno, kind, lines[node.lineno - 1].strip()[:100], desc))
    return mutants


def mutated_source(m: Mutant) -> str:
    source = (ROOT / m.module).read_text()
    tree = ast.parse(source)
    node, kind, payload = _points(tree, source, TARGETS[m.module].get("functions"))[m.index]
    if kind == "unary":
        node._strip = True  # type: ignore[attr-defined]
        tree = _unary_fix(tree)
    else:
        _mutate(node, kind, payload)
    return ast.unparse(ast.fix_missing_locations(tree))


def _pytest(tests: list[str], pythonpath: Path, timeout: float, show_failure: bool = False) -> tuple[str, float]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-W", "ignore", *tests]
    t0 = time.perf_counter()
    try:
        # a background launch (nohup, `&`) ignores SIGINT, and Python then installs no KeyboardInterrupt
        # handler: give the tests the default disposition (the trainer's Ctrl-C tests rely on it)
        proc = subprocess.run(
            cmd,
            cwd=pythonpath,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0
    status = "survived" if proc.returncode == 0 else "killed"
    if show_failure and proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-2000:], file=sys.stderr)
    if proc.returncode not in (0, 1):  # collection error, internal error: the mutant broke an import
        status = "killed"
    return status, time.perf_counter() - t0


def _scratch(workdir: Path) -> Path:
    """A scratch copy of the package, the tests and the pytest configuration (a worker's own): pytest
    runs there, so the mutated package is the one imported (``python -m`` puts the cwd first)."""
    for name in ("deqkit", "tests"):
        shutil.copytree(ROOT / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    shutil.copyfile(ROOT / "pyproject.toml", workdir / "pyproject.toml")
    return workdir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", type=int, default=120, help="mutants to sample over all modules (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout-factor", type=float, default=6.0)
    ap.add_argument(
        "--min-timeout",
        type=float,
        default=180.0,
        help="per-mutant timeout floor in seconds (a loaded machine slows the tests several-fold)",
    )
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--only", nargs="*", default=None, help="restrict to these module paths")
    ap.add_argument("--list", action="store_true", help="list the sampled mutants and exit")
    ap.add_argument("--report", default="runs/mutation-report.json", help="write the results as JSON here")
    ap.add_argument("--from-report", default=None, help="rerun only the survivors (and timeouts) of this JSON report")
    ap.add_argument(
        "--budget-min",
        type=float,
        default=45.0,
        help="start no new mutant after this many minutes (the rest are reported as not run)",
    )
    args = ap.parse_args(argv)

    unknown = [m for m in args.only or [] if m not in TARGETS]
    if unknown:
        print(f"mutation: --only {unknown} not in TARGETS: {list(TARGETS)}", file=sys.stderr)
        return 2
    targets = {m: s for m, s in TARGETS.items() if args.only is None or m in args.only}
    missing = [m for m in targets if not (ROOT / m).is_file()]
    missing += [t for s in targets.values() for t in s["tests"] if not (ROOT / t).is_file()]
    missing += [
        f"{m}::{f}"
        for m, s in targets.items()
        if (ROOT / m).is_file()
        for f in s.get("functions", [])
        if not _function_lines(ast.parse((ROOT / m).read_text()), [f])
    ]
    if missing:
        print(
            f"mutation: modules, test files or functions not found (update TARGETS in {__file__}): {sorted(set(missing))}",
            file=sys.stderr,
        )
        return 2
    per_module = {m: enumerate_mutants(m, s) for m, s in targets.items()}
    total = sum(len(v) for v in per_module.values())
    rng = random.Random(args.seed)
    if args.mutants <= 0 or args.mutants >= total:
        sample = [m for v in per_module.values() for m in v]
    else:
        sample = []
        for muts in per_module.values():  # stratified: proportional share, at least one
            k = max(1, round(args.mutants * len(muts) / total))
            sample += rng.sample(muts, min(k, len(muts)))
    if args.from_report:
        old = json.loads(Path(args.from_report).read_text())
        keep = {(m["module"], m["index"], m["line"]) for m in old["mutants"] if m["status"] in ("survived", "timeout")}
        sample = [m for v in per_module.values() for m in v if (m.module, m.index, m.line) in keep]
        if len(sample) != len(keep):
            print(
                f"mutation: {len(keep) - len(sample)} survivors of {args.from_report} no longer match the source", file=sys.stderr
            )
    print(f"mutation: {total} mutants in {len(targets)} modules; running {len(sample)} (seed {args.seed})", flush=True)
    if args.list:
        for m in sample:
            print(f"  {m.module}:{m.line} [{m.kind}] {m.mutated}: {m.original}")
        return 0

    with tempfile.TemporaryDirectory(prefix="deqkit-mutation-") as tmp:
        workers = [_scratch(Path(tmp) / f"w{i}") for i in range(args.jobs)]
        # baselines: each test set must pass unmutated; its time sets the timeout
        base: dict[tuple[str, ...], float] = {}
        for spec in targets.values():
            key = tuple(spec["tests"])
            if key in base:
                continue
            status, secs = _pytest(list(key), workers[0], timeout=1800, show_failure=True)
            if status != "survived":
                print(f"mutation: the unmutated tests fail: {' '.join(key)}", file=sys.stderr)
                return 2
            base[key] = secs
            print(f"  baseline {secs:6.1f}s  {' '.join(key)}", flush=True)

        free = list(workers)

        deadline = time.perf_counter() + 60 * args.budget_min

        def run_one(m: Mutant) -> Mutant:
            if time.perf_counter() > deadline:
                m.status = "not run"
                return m
            w = free.pop()
            target = w / m.module
            try:
                target.write_text(mutated_source(m))
                tests = TARGETS[m.module]["tests"]
                m.status, m.seconds = _pytest(tests, w, timeout=max(args.min_timeout, args.timeout_factor * base[tuple(tests)]))
            finally:
                shutil.copyfile(ROOT / m.module, target)
                free.append(w)
            print(f"  {m.status:8s} {m.seconds:6.1f}s  {m.module}:{m.line} [{m.kind}] {m.mutated}", flush=True)
            return m

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            done = list(pool.map(run_one, sample))
        elapsed = time.perf_counter() - t0
    not_run = [m for m in done if m.status == "not run"]
    done = [m for m in done if m.status != "not run"]
    if not_run:
        print(f"mutation: time budget of {args.budget_min:g} min spent; {len(not_run)} sampled mutants not run")

    killed = [m for m in done if m.status in ("killed", "timeout")]
    survived = [m for m in done if m.status == "survived"]
    frac = len(killed) / max(len(done), 1)
    print(
        f"\nmutation: {len(killed)}/{len(done)} killed ({100 * frac:.1f} %), "
        f"{sum(m.status == 'timeout' for m in done)} by timeout; {elapsed:.0f} s wall"
    )
    by_module: dict[str, list[int]] = {}
    for m in done:
        k = by_module.setdefault(m.module, [0, 0])
        k[0] += m.status != "survived"
        k[1] += 1
    for mod, (k, n) in by_module.items():
        print(f"  {mod:32s} {k:3d}/{n:3d}")
    if survived:
        print("survivors:")
        for m in survived:
            print(f"  {m.module}:{m.line} [{m.kind}] {m.mutated}: {m.original}")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(
            json.dumps(
                {
                    "seed": args.seed,
                    "sampled": len(done),
                    "total": total,
                    "killed": len(killed),
                    "killed_fraction": frac,
                    "wall_s": elapsed,
                    "mutants": [asdict(m) for m in done],
                },
                indent=1,
            )
        )
    return 0 if frac >= args.threshold else 1


if __name__ == "__main__":
    sys.exit(main())
