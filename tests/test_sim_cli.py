"""Tests of the ``deqkit sim`` command: a smoke run on a tiny setting, and its data loading."""

import argparse
import json

import numpy as np
import pytest
import torch

from deqkit.apps import sim as job
from deqkit.cli import build_parser
from deqkit.cli import sim as cli


def run_sim(argv):
    """``deqkit sim ARGV`` without the command's error boundary (errors propagate)."""
    args = build_parser().parse_args(["sim", *argv])
    return args.func(args)


def test_cli_sim_tiny_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    rc = run_sim(
        [
            "--dataset",
            "digits",
            "--hidden",
            "8",
            "--samples",
            "150",
            "--lam",
            "0.1,1",
            "--epochs",
            "2",
            "--n-test",
            "80",
            "--n-attack",
            "16",
            "--pgd-steps",
            "2",
            "--eps",
            "0,0.05",
            "--max-iter-ab",
            "300",
            "--max-iter-cd",
            "300",
            "--penalty",
            "standardized",
            "--out",
            str(out),
            "--baseline",
            str(tmp_path / "base.pt"),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "baseline" in text and "SIM λ=0.1" in text
    res = json.loads((out / "sim_results.json").read_text())
    assert [r["lam"] for r in res["sim"]] == [0.1, 1.0]
    assert all(r["wellposed"] and r["A_inf_norm"] <= 0.99 + 1e-9 for r in res["sim"])
    assert set(res["sim"][0]["robust"]) == {"fgsm", "pgd"}
    assert (out / "sim.png").stat().st_size > 1000 and (tmp_path / "base.pt").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_cli_sim_feedforward_debias_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    rc = run_sim(
        [
            "--dataset",
            "digits",
            "--hidden",
            "8,4",
            "--samples",
            "150",
            "--lam",
            "0.3",
            "--epochs",
            "2",
            "--n-test",
            "80",
            "--n-attack",
            "0",
            "--structure",
            "feedforward",
            "--no-output-skip",
            "--debias",
            "--finetune-epochs",
            "2",
            "--no-plot",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0 and "SIM λ=0.3 +ft2" in captured.out and "epoch 2/2" in captured.err
    res = json.loads((out / "sim_results.json").read_text())
    assert (res["structure"], res["output_skip"], res["debias"]) == ("feedforward", False, True)
    row, tuned = res["sim"]
    assert row["wellposed"] and 0 < row["nnz"]["total"] and row["nnz"]["D"] <= 10  # D: bias only
    assert (row["finetune_epochs"], tuned["finetune_epochs"]) == (0, 2)
    assert tuned["wellposed"] and tuned["nnz"]["total"] <= row["nnz"]["total"]  # the pattern is kept
    with pytest.raises(SystemExit):  # refused by the flag's type, at parse time
        cli.add_arguments(argparse.ArgumentParser()).parse_args(["--finetune-epochs", "-1"])


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


# --------------------------------------------------------------------------------------------
# data: deqkit.data.load_dataset, raw inputs in [0, 1], no validation split
# --------------------------------------------------------------------------------------------


def test_dataset_choices_and_defaults():
    from deqkit.data import DATASETS

    assert set(job.DATASETS) <= set(DATASETS) and "digits" in job.DATASETS
    assert "mnist1d" not in job.DATASETS  # its signals are not in [0, 1], where the attacks clip
    parser = cli.add_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["--dataset", "mnist5k"]).dataset == "mnist5k"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", "mnist1d"])
    for name in job.DATASETS:
        assert set(job.defaults(name)) == {"samples", "epochs", "lr"}
    assert job.defaults("digits")["epochs"] == 60 and job.defaults("fashion-mnist")["samples"] == 2000


def test_load_data_digits_raw_unit_interval_and_fixed_test_split():
    pytest.importorskip("sklearn")
    xtr, ytr, xte, yte = job.load_data("digits", seed=0)
    assert xtr.shape == (1527, 64) and xte.shape == (270, 64)  # validation folded into training
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    for x in (xtr, xte):
        assert x.min() == 0 and x.max() == 1
        torch.testing.assert_close(x * 16, torch.round(x * 16))  # pixel counts / 16, not standardised
    assert 0.2 < xtr.mean() < 0.4
    xtr1, ytr1, xte1, yte1 = job.load_data("digits", seed=1)
    assert torch.equal(xte1, xte) and torch.equal(yte1, yte)  # same test samples for every seed
    assert not torch.equal(ytr1, ytr)  # training order follows the seed ...
    assert torch.equal(torch.bincount(ytr1), torch.bincount(ytr))  # ... over the same samples


def _write_idx_dir(directory, n_train=60, n_test=20):
    from deqkit.data import write_idx

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", y)
        arrays[split] = (x, y)
    return arrays


def test_load_data_from_data_dir(tmp_path):
    arrays = _write_idx_dir(tmp_path)
    xtr, ytr, xte, yte = job.load_data("fashion-mnist", data_dir=tmp_path)
    assert xtr.shape == (60, 784) and xte.shape == (20, 784)  # all training images, no validation
    x_test, y_test = arrays["t10k"]
    # the official test split, in file order, only scaled to [0, 1]
    torch.testing.assert_close(xte, torch.from_numpy(x_test.reshape(20, -1).astype(np.float32) / 255))
    assert torch.equal(yte, torch.from_numpy(y_test.astype(np.int64)))
    assert xtr.min() >= 0 and xtr.max() <= 1
    from deqkit.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="IDX files"):
        job.load_data("mnist", data_dir=tmp_path / "empty")


def test_cli_states_see_raw_unit_interval_inputs(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    seen = {}

    class Stop(Exception):
        pass

    def spy(net, u, **kw):
        seen["u"] = u
        raise Stop

    monkeypatch.setattr(job, "collect_states", spy)
    with pytest.raises(Stop):
        run_sim(
            [
                "--dataset",
                "digits",
                "--hidden",
                "8",
                "--samples",
                "50",
                "--epochs",
                "0",
                "--n-attack",
                "0",
                "--no-plot",
                "--out",
                str(tmp_path),
            ]
        )
    u = seen["u"]
    assert u.shape == (50, 64) and u.min() >= 0 and u.max() <= 1 and u.max() > 0.99


def _assert_same_row(a, b, rel=1e-6):
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, (a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_row(a[k], b[k], rel)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_row(x, y, rel)
    elif isinstance(a, float) and not isinstance(a, bool):
        assert a == pytest.approx(b, rel=rel, abs=1e-12)
    else:
        assert a == b


def test_cli_sim_resume_keeps_finished_lambdas(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    base = [
        "--dataset",
        "digits",
        "--hidden",
        "8",
        "--samples",
        "150",
        "--lam",
        "0.1,1",
        "--epochs",
        "2",
        "--n-test",
        "80",
        "--n-attack",
        "12",
        "--pgd-steps",
        "2",
        "--eps",
        "0,0.05",
        "--no-plot",
        "--baseline",
        str(tmp_path / "base.pt"),
    ]
    assert run_sim(base + ["--out", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "sim_results.json").read_text())
    assert full["complete"] and [r["lam"] for r in full["sim"]] == [0.1, 1.0]

    real = job.fit_sim
    calls = []

    def interrupted_at_the_second_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = ["--out", str(tmp_path / "part")]
    monkeypatch.setattr(job, "fit_sim", interrupted_at_the_second_fit)
    with pytest.raises(KeyboardInterrupt):
        run_sim(base + out)
    partial = json.loads((tmp_path / "part" / "sim_results.json").read_text())
    assert not partial["complete"] and [r["lam"] for r in partial["sim"]] == [0.1]
    drop = lambda r: {k: v for k, v in r.items() if k != "solve_time_s"}  # noqa: E731
    assert drop(partial["sim"][0]) == drop(full["sim"][0])  # deterministic, PGD starts included

    monkeypatch.setattr(job, "fit_sim", real)
    with pytest.raises(ValueError, match="other settings.*kappa"):
        run_sim(base + out + ["--resume", "--kappa", "0.9"])
    assert run_sim(base + out + ["--resume"]) == 0
    assert "kept from" in capsys.readouterr().err
    resumed = json.loads((tmp_path / "part" / "sim_results.json").read_text())
    assert resumed["complete"] and [r["lam"] for r in resumed["sim"]] == [0.1, 1.0]
    assert resumed["sim"][0] == partial["sim"][0]  # reused as it was
    assert resumed["sim"][1]["wellposed"]
    # the resumed λ equals the uninterrupted run's: its solve starts cold instead of warm from λ=0.1,
    # so floats agree to the solver's tolerance (measured: A_inf_norm 3.4e-9 apart), the rest exactly
    _assert_same_row(drop(resumed["sim"][1]), drop(full["sim"][1]))
    # extending the sweep keeps the λ not asked for again
    argv = [a if a != "0.1,1" else "0.3" for a in base]
    assert run_sim(argv + out + ["--resume"]) == 0
    extended = json.loads((tmp_path / "part" / "sim_results.json").read_text())
    assert [r["lam"] for r in extended["sim"]] == [0.1, 0.3, 1.0]
    assert extended["sim"][0] == resumed["sim"][0] and extended["sim"][2] == resumed["sim"][1]
