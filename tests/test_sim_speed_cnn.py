"""``deqkit bench --section sim-speed --model cnn``: the SIM speed benchmark on a convolutional baseline.

A tiny CNN on digits (8x8 images, embedded) and a few samples, so the run takes seconds: the
numbers are finite, the ADMM (``fit_sim`` with the receptive-field supports) reaches CVXPY's
objective on the rows both solve with the same supports, the CVXPY rows come from every layer,
and bad input is one OptionError.
"""

from __future__ import annotations

import math

import pytest
import torch

from deqkit.apps.bench import SimSpeedConfig, bench_sim_speed
from deqkit.apps.bench.sim_speed import format_sim_speed, spread_rows
from deqkit.cli import bench as bench_cli
from deqkit.cli import build_parser
from deqkit.errors import OptionError

TINY = SimSpeedConfig(model="cnn", channels=[2, 4], samples=120, cvxpy_rows=4, epochs=1)


@pytest.fixture(scope="module")
def cnn_run() -> dict:
    pytest.importorskip("cvxpy")
    pytest.importorskip("sklearn")
    lines: list[str] = []
    out = bench_sim_speed(TINY, log=lines.append)
    out["text"] = "\n".join(lines)
    return out


def test_the_cnn_run_reports_finite_numbers_of_the_right_shapes(cnn_run: dict) -> None:
    # digits 8x8 -> 2x4x4 (32 units) -> 4x2x2 (16 units): 48 (A,B) rows; Phi = [X U 1] has 48 + 64 + 1 columns
    assert cnn_run["phi_shape"] == (120, 48 + 64 + 1)
    assert cnn_run["rows"] == 48 and cnn_run["layer_rows"] == {1: 32, 2: 16}
    assert cnn_run["fit_rows"] == 48 + 10
    for key in ("admm_s", "fit_s", "cvxpy_s_per_row", "gap_max", "gap_min", "support_mean"):
        assert math.isfinite(cnn_run[key]) and cnn_run[key] == cnn_run[key], key
    assert cnn_run["admm_s"] > 0 and cnn_run["fit_s"] >= cnn_run["admm_s"]
    assert cnn_run["admm_converged"] == 48 and cnn_run["cvxpy_status"] == {"optimal"}
    # each row reads its 3x3 receptive field (fewer at the borders) of the layer below, plus the bias
    assert 1 < cnn_run["support_mean"] <= 2 * 9 + 1
    assert "speed-up" in cnn_run["text"] and "(layer 1)" in cnn_run["text"] and "(layer 2)" in cnn_run["text"]


def test_the_admm_reaches_cvxpys_objective_with_the_same_supports(cnn_run: dict) -> None:
    # relative objective gap on the common rows; a solver given a different support (e.g. CVXPY
    # over all columns) lands far from it
    assert abs(cnn_run["gap_max"]) < 1e-4 and abs(cnn_run["gap_min"]) < 1e-4


def test_the_cvxpy_rows_come_from_every_layer(cnn_run: dict) -> None:
    assert cnn_run["cvxpy_rows"] == 4 and len(set(cnn_run["cvxpy_row_ids"])) == 4
    assert sorted(cnn_run["cvxpy_row_layers"]) == [1, 1, 2, 2]
    # states are stacked last layer first: rows 0..15 are layer 2, rows 16..47 layer 1
    for i, layer in zip(cnn_run["cvxpy_row_ids"], cnn_run["cvxpy_row_layers"]):
        assert layer == (2 if i < 16 else 1)


def test_spread_rows_shares_the_rows_between_layers() -> None:
    layers = torch.tensor([3] * 4 + [2] * 8 + [1] * 16)
    rows = spread_rows(layers, 5)
    assert len(rows) == 5 and rows == sorted(set(rows))
    per_layer = [int(layers[i]) for i in rows]
    assert sorted(per_layer) == [1, 1, 2, 2, 3]  # an equal share each, layer 1 takes the remainder
    assert spread_rows(layers, 1) == [20]  # the middle of layer 1
    assert spread_rows(layers, 100) == list(range(28))  # more than there are: every row once


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model": "conv"}, r"model='conv' is not valid; choose one of 'mlp', 'cnn'"),
        ({"model": "cnn", "dataset": "mnist1d"}, r"model='cnn' needs an image data set, got dataset='mnist1d'"),
    ],
)
def test_bad_input_is_one_option_error(changes: dict, match: str) -> None:
    cfg = SimSpeedConfig(**{**vars(TINY), **changes})
    with pytest.raises(OptionError, match=match):
        bench_sim_speed(cfg, log=lambda s: None)


def test_the_cli_flags_reach_the_config() -> None:
    args = build_parser().parse_args(
        ["bench", "--section", "sim-speed", "--model", "cnn", "--channels", "2,4", "--kernel-size", "5", "--padding", "2"]
    )
    sim = bench_cli.config(args).sim_speed
    assert (sim.model, sim.channels, sim.kernel_size, sim.stride, sim.padding) == ("cnn", [2, 4], 5, 2, 2)
    default = bench_cli.config(build_parser().parse_args(["bench", "--section", "sim-speed"])).sim_speed
    assert (default.model, default.channels, default.kernel_size, default.stride, default.padding) == ("mlp", [8, 16], 3, 2, 1)
    with pytest.raises(SystemExit):  # argparse's one-line usage error
        build_parser().parse_args(["bench", "--model", "resnet"])


def test_help_shows_the_cnn_flags_with_their_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model {mlp,cnn}" in text and "(default: mlp)" in text
    assert "channels of the CNN baseline's convolutions (default: 8,16)" in text


def test_the_mlp_report_is_unchanged() -> None:
    r = {
        "model": "mlp",
        "phi_shape": (100, 20),
        "rows": 8,
        "admm_s": 0.5,
        "admm_converged": 8,
        "admm_max_steps": 40,
        "cvxpy_rows": 2,
        "cvxpy_s_per_row": 0.25,
        "gap_max": 1e-7,
        "gap_min": -1e-8,
        "cvxpy_status": {"optimal"},
    }
    assert format_sim_speed(SimSpeedConfig(), r) == "\n".join(
        [
            "Phi (100, 20), 8 (A,B) rows, lam=1.0",
            "ADMM (all 8 rows, incl. eigendecomposition): 0.50 s, converged 8/8, steps max 40",
            "CVXPY/Clarabel (tol 1e-06): 0.25 s/row over 2 rows -> 2.0 s for all rows",
            "speed-up: 4.0x; ADMM objective rel. gap on those rows: max 1.00e-07, min -1.00e-08; CVXPY status {'optimal'}",
        ]
    )
