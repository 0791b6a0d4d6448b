"""Smoke test of the ``deqkit sim`` command on a tiny setting."""

import argparse
import json

import pytest

from deqkit.sim import cli


def test_cli_sim_tiny_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    rc = cli.main([
        "--dataset", "digits", "--hidden", "8", "--samples", "150", "--lam", "0.1,1", "--epochs", "2",
        "--n-test", "80", "--n-attack", "16", "--pgd-steps", "2", "--eps", "0,0.05",
        "--max-iter-ab", "300", "--max-iter-cd", "300", "--penalty", "standardized", "--out", str(out),
        "--baseline", str(tmp_path / "base.pt"),
    ])
    assert rc == 0
    text = capsys.readouterr().out
    assert "baseline" in text and "SIM λ=0.1" in text
    res = json.loads((out / "sim_results.json").read_text())
    assert [r["lam"] for r in res["sim"]] == [0.1, 1.0]
    assert all(r["wellposed"] and r["A_inf_norm"] <= 0.99 + 1e-9 for r in res["sim"])
    assert set(res["sim"][0]["robust"]) == {"fgsm", "pgd"}
    assert (out / "sim.png").stat().st_size > 1000 and (tmp_path / "base.pt").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_cli_registers_subparser_and_validates():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.add_subparser(sub)
    args = parser.parse_args(["sim", "--lam", "0.5"])
    assert args.func is cli.run and args.lam == [0.5]
    with pytest.raises(SystemExit):
        parser.parse_args(["sim", "--attacks", "fgsm,cw"])
    with pytest.raises(SystemExit):
        parser.parse_args(["sim", "--mode", "exact"])
