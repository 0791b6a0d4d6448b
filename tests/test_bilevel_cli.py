"""Smoke test of ``deqkit hpo`` (deqkit.cli.hpo, deqkit.apps.hpo) on a small setting."""

import argparse
import json

import pytest
import torch

from deqkit.bilevel import load_hpo_dataset, logistic_hpo_problem
from deqkit.cli import hpo as cli
from deqkit.cli import main


def _dense_cosine_to_exact(problem, lam):
    """JacobianFree's cosine to the exact hypergradient at ``lam``, independently of the library's
    solvers: Newton on the inner problem and a dense Hessian solve."""
    x = problem.x0.clone()
    hess = lambda x: torch.autograd.functional.hessian(lambda x: problem.inner(x, lam), x)  # noqa: E731
    for _ in range(50):
        g = torch.autograd.functional.jacobian(lambda x: problem.inner(x, lam), x)
        if float(g.norm()) < 1e-12:
            break
        x = x - torch.linalg.solve(hess(x), g)
    v = torch.autograd.functional.jacobian(problem.outer, x)
    cross = torch.autograd.functional.jacobian(
        lambda l: torch.autograd.functional.jacobian(lambda x: problem.inner(x, l), x, create_graph=True), lam
    )
    g_exact = -cross.T @ torch.linalg.solve(hess(x), v)
    g_jfb = -cross.T @ v
    return float(g_jfb @ g_exact / (g_jfb.norm() * g_exact.norm()))


def test_hpo_cli_writes_plot_and_json(tmp_path, capsys):
    rc = main(
        [
            "hpo",
            "--dataset",
            "breast_cancer",
            "--outer-steps",
            "3",
            "--grad",
            "exact,shine-opa,jacobian-free",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "shine-opa" in out and "cos(exact)" in out
    png = tmp_path / "hpo_breast_cancer.png"
    js = tmp_path / "hpo_breast_cancer.json"
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert set(data["estimators"]) == {"exact", "shine-opa", "jacobian-free"}
    for name, r in data["estimators"].items():
        assert len(r["history"]) == 3
        assert 0 < r["final_val_loss"] < 1.0 and 0 < r["final_test_loss"] < 1.0
        assert r["total_time"] > 0 and -1.0 <= r["cosine_to_exact"] <= 1.0 + 1e-12
    assert data["estimators"]["exact"]["cosine_to_exact"] == pytest.approx(1.0, abs=1e-8)
    # a non-trivial row, against an independent dense computation at that run's final λ
    jfb = data["estimators"]["jacobian-free"]
    problem = logistic_hpo_problem(load_hpo_dataset("breast_cancer", seed=0))
    d = problem.x0.numel()
    lam = torch.tensor(jfb["final_lam"], dtype=torch.float64).expand(d).clone()
    expected = _dense_cosine_to_exact(problem, lam)
    assert expected < 0.99
    # the CLI solves the inner problem only to the run's last inner tolerance: measured gap 0.015
    assert jfb["cosine_to_exact"] == pytest.approx(expected, abs=0.03)
    # atomic writes leave no temporary (named .<name>.XXXX.tmp by deqkit's atomic_open) behind
    assert not any(p.name.startswith(".") and p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_hpo_subparser_registration_and_validation():
    parser = argparse.ArgumentParser(prog="deqkit")
    sub = parser.add_subparsers(dest="command")
    cli.add_subparser(sub)
    args = parser.parse_args(["hpo", "--dataset", "digits", "--grad", "shine,exact", "--per-feature"])
    assert args.func is cli.run and args.grad == ["shine", "exact"] and args.per_feature
    with pytest.raises(SystemExit):
        parser.parse_args(["hpo", "--grad", "shine-opaa"])
    with pytest.raises(SystemExit):
        parser.parse_args(["hpo", "--dataset", "mnist"])


def test_hpo_grad_opts_are_checked_before_any_work(capsys):
    assert main(["hpo", "--grad-opts", "opa_fre=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deqkit: error:") and "Did you mean 'opa_freq'" in err
    assert main(["hpo", "--grad-opts", "refine=2.5"]) == 2
    assert "refine must be an integer" in capsys.readouterr().err
