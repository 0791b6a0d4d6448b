"""Kill a run (``kill -9``, or ``SIGTERM``) at a seeded random point, then ``--resume`` it:
train, compare, sim and hpo. Expected behaviour of every case:

* ``SIGTERM`` is handled like Ctrl-C: the run stops cleanly (a training step is finished and
  checkpointed), exit status 143, the last stderr line says what was kept and to re-run with
  ``--resume``, no traceback;
* ``kill -9``: nothing half-written is left (every output is replaced atomically);
* after ``--resume``: the same result as an uninterrupted run — train and compare bit for bit
  (final weights, metrics log, results table without wall-clock columns); hpo the same λ and
  losses for every estimator; sim the same rows, λ kept from the first run bit for bit and λ
  after them within the ADMM tolerance (their solve starts cold; documented by ``--resume``).

The kill point: a seeded uniform delay after the run's first output file appears (first epoch
checkpoint, first estimator, first λ). ``DEQKIT_FAULT_SEEDS=N`` tries N points per case.
All child processes start together (their interpreter start-up overlaps).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from faultkit import (
    SIGNALS,
    assert_one_error_line,
    cli,
    fault_seeds,
    finish,
    history_without_times,
    kill_at,
    model_state,
    start,
)

JOBS = {
    "train": (
        ["train", "--epochs", "10", "--subset", "256", "--width", "16", "--batch-size", "32", "--no-progress"],
        "last.pt",
        1.0,
    ),
    "compare": (
        ["compare", "--grad", "exact,shine", "--epochs", "3", "--subset", "192", "--width", "16", "--no-progress"],
        "checkpoints/exact/last.pt",
        1.5,
    ),
    "sim": (
        [
            "sim",
            "--hidden",
            "8",
            "--samples",
            "150",
            "--lam",
            "0.1,0.3,1",
            "--epochs",
            "2",
            "--n-test",
            "80",
            "--n-attack",
            "0",
            "--no-plot",
            "--max-iter-ab",
            "300",
            "--max-iter-cd",
            "300",
        ],
        "sim_results.json",
        1.0,
    ),
    "hpo": (
        ["hpo", "--grad", "exact,shine,jacobian-free", "--outer-steps", "12", "--no-progress"],
        "hpo_breast_cancer.json",
        0.8,
    ),
}
CASES = [(job, sig, seed) for job in JOBS for sig in SIGNALS for seed in fault_seeds()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kills")


@pytest.fixture(scope="module")
def children(workdir):
    """Every killed run, started at once; a thread per run sends its signal at its kill point."""
    runs = {}
    for job, sig, seed in CASES:
        argv, trigger, span = JOBS[job]
        out = workdir / f"{job}-{sig}-{seed}"
        delay = random.Random(f"{job}/{sig}/{seed}").uniform(0.0, span)
        proc = start([*argv, "--out", str(out)], workdir)
        result: dict = {"out": out, "delay": delay, "tries": 1}

        def watch(proc=proc, argv=argv, trigger=out / trigger, delay=delay, sig=SIGNALS[sig], result=result):
            # a run that finished before its kill point (a quiet machine) is run again with a
            # shorter delay (at most twice), so the signal lands inside the work
            while True:
                result["landed"] = kill_at(proc, trigger, result["delay"], sig)
                result["rc"], result["stdout"], result["stderr"] = finish(proc)
                if result["landed"] and result["rc"] in (0, -sig) and "wrote " in result["stdout"]:
                    # the work had finished (its last line printed) and the signal met the interpreter's
                    # shutdown, after deqkit's handler was gone: the run is complete, nothing to resume
                    result["landed"] = False
                if result["landed"] or result["tries"] == 3:
                    return
                shutil.rmtree(result["out"])
                result["delay"] *= 0.25
                result["tries"] += 1
                proc = start([*argv, "--out", str(result["out"])], workdir)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        runs[(job, sig, seed)] = (thread, result)
    for argv in BAD_INPUT_CHILDREN:  # started with the others: their interpreter start-up overlaps
        runs[tuple(argv)] = start(argv, workdir)
    yield runs
    for value in runs.values():
        if isinstance(value, tuple):
            value[0].join(timeout=300)


_REFERENCE: dict = {}


def reference(job: str, workdir: Path, capsys) -> Path:
    """The uninterrupted run (in this process), once per job."""
    if job not in _REFERENCE:
        out = workdir / f"{job}-reference"
        rc, _, err = cli([*JOBS[job][0], "--out", str(out)], capsys)
        assert rc == 0, err
        _REFERENCE[job] = out
    return _REFERENCE[job]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def same_train(ref: Path, out: Path) -> None:
    a, b = model_state(ref / "last.pt"), model_state(out / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history_without_times(_lines(ref / "metrics.jsonl")) == history_without_times(_lines(out / "metrics.jsonl"))


TIMED = ("train_time_s", "bwd_ms", "bwd_speedup", "history")


def same_compare(ref: Path, out: Path) -> None:
    ra, rb = (json.loads((d / "results.json").read_text())["results"] for d in (ref, out))
    assert [r["estimator"] for r in ra] == [r["estimator"] for r in rb]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in TIMED} == {k: v for k, v in y.items() if k not in TIMED}
        assert history_without_times(x["history"]) == history_without_times(y["history"])
    for name in ("exact", "shine"):
        a = model_state(ref / "checkpoints" / name / "last.pt")
        b = model_state(out / "checkpoints" / name / "last.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)


def same_hpo(ref: Path, out: Path) -> None:
    ea, eb = (json.loads((d / "hpo_breast_cancer.json").read_text())["estimators"] for d in (ref, out))
    assert list(ea) == list(eb)
    for name in ea:
        assert ea[name]["final_lam"] == eb[name]["final_lam"]
        assert [h["val_loss"] for h in ea[name]["history"]] == [h["val_loss"] for h in eb[name]["history"]]
        assert ea[name]["final_test_loss"] == eb[name]["final_test_loss"]


def same_sim(ref: Path, out: Path, kept: set) -> None:
    ra, rb = (json.loads((d / "sim_results.json").read_text()) for d in (ref, out))
    untimed = lambda b: {k: v for k, v in b.items() if k != "how"}
    assert rb["complete"] and untimed(ra["baseline"]) == untimed(rb["baseline"])
    assert [r["lam"] for r in ra["sim"]] == [r["lam"] for r in rb["sim"]]
    for x, y in zip(ra["sim"], rb["sim"]):
        if x["lam"] in kept:  # kept from the killed run: computed exactly as the uninterrupted run did
            # the same computation in another process: equal up to the last bits of BLAS reductions
            assert x.keys() == y.keys()
            for k in x.keys() - {"solve_time_s"}:
                if isinstance(x[k], float) and isinstance(y[k], float):
                    assert x[k] == pytest.approx(y[k], rel=1e-12, abs=1e-15), k
                else:
                    assert x[k] == y[k], k
        else:  # a cold-started solve of the same program
            assert abs(x["accuracy"] - y["accuracy"]) <= 0.02 and x["wellposed"] == y["wellposed"]


@pytest.mark.parametrize("job,sig,seed", CASES, ids=[f"{j}-{s}-{n}" for j, s, n in CASES])
def test_kill_then_resume(job, sig, seed, children, workdir, capsys):
    ref = reference(job, workdir, capsys)
    thread, res = children[(job, sig, seed)]
    thread.join(timeout=300)
    assert "rc" in res, "the child did not finish"
    out = res["out"]
    assert res["landed"], f"the signal came after the run finished ({res['tries']} tries, last delay {res['delay']:.2f}s)"
    assert "Traceback" not in res["stderr"], res["stderr"]
    if sig == "sigterm":
        assert res["rc"] == 143, res["stderr"]
        last = [ln for ln in res["stderr"].splitlines() if ln.strip()][-1]
        assert last.startswith("deqkit: terminated (SIGTERM)") and "--resume" in last, last
    else:
        assert res["rc"] == -9
    leftovers = list(out.rglob("*.tmp"))
    if sig == "sigterm":
        assert not leftovers, "a temporary file was left after a clean SIGTERM exit"
    else:  # kill -9 mid-write cannot clean up: only deqkit's hidden temporaries, removed by --resume below
        assert all(re.match(r"^\..+\.[0-9a-f]{12}\.tmp$", p.name) for p in leftovers), leftovers
    kept = set()
    if job == "sim" and (out / "sim_results.json").exists():
        kept = {r["lam"] for r in json.loads((out / "sim_results.json").read_text())["sim"]}
    rc, _, err = cli([*JOBS[job][0], "--out", str(out), "--resume"], capsys)
    assert rc == 0, err
    assert not list(out.rglob("*.tmp")), "--resume left a temporary file of the killed run"
    {"train": same_train, "compare": same_compare, "hpo": same_hpo}.get(job, lambda a, b: same_sim(a, b, kept))(ref, out)


#: bad input given to a real child process (what a user sees), alongside the killed runs
BAD_INPUT_CHILDREN = (["compare", "--solver-opts", "tol=abc"],)  # the other cases run in-process (test_bad_inputs.py)


@pytest.mark.parametrize("argv", BAD_INPUT_CHILDREN, ids=[" ".join(a) for a in BAD_INPUT_CHILDREN])
def test_bad_input_in_a_real_process(argv, children):
    """Expected: one line ``deqkit: error: ...``, status 2, no traceback (the boundary of
    test_bad_inputs.py, in a child process)."""
    rc, _, err = finish(children[tuple(argv)])
    assert_one_error_line(rc, err)
