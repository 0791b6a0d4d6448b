"""Global magnitude pruning (deqkit.sim.pruning) and the SIM-vs-pruning benchmark's smoke run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqkit.errors import OptionError
from deqkit.sim import baseline_nonzeros, make_mlp
from deqkit.sim.pruning import magnitude_prune, masked_finetune, prunable_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: a second thread only adds contention


def _net():
    torch.manual_seed(0)
    return make_mlp(6, [10, 8], 3).double()


def test_magnitude_prune_keeps_the_largest_weights_globally():
    net = _net()
    pruned = magnitude_prune(net, 0.4)
    w0 = torch.cat([w.detach().abs().flatten() for w in prunable_weights(net)])
    w1 = torch.cat([w.detach().abs().flatten() for w in prunable_weights(pruned)])
    kept = w1 != 0
    assert int(kept.sum()) == round(0.4 * w0.numel())
    assert float(w0[kept].min()) >= float(w0[~kept].max())  # one global threshold
    assert torch.equal(w1[kept], w0[kept])  # survivors unchanged
    assert all(torch.equal(a.bias, b.bias) for a, b in zip(net, pruned) if isinstance(a, nn.Linear))  # biases kept
    assert prunable_weights(net)[0].abs().min() > 0  # the original is untouched


def test_magnitude_prune_to_a_counted_density():
    net = _net()
    ref = baseline_nonzeros(net)
    pruned = magnitude_prune(net, 0.5, count=baseline_nonzeros, reference=ref)
    assert abs(baseline_nonzeros(pruned) / ref - 0.5) <= 2 / ref
    with pytest.raises(OptionError, match="reference"):
        magnitude_prune(net, 0.5, count=baseline_nonzeros)


def test_masked_finetune_keeps_the_zeros_and_lowers_the_loss():
    net = magnitude_prune(_net(), 0.5)
    u = torch.rand(200, 6, dtype=torch.float64)
    y = (u[:, 0] > 0.5).long() + (u[:, 1] > 0.5).long()
    zeros = [w.detach() == 0 for w in prunable_weights(net)]
    with torch.no_grad():
        before = float(nn.functional.cross_entropy(net(u), y))
    masked_finetune(net, u, y, epochs=20, lr=1e-2, batch_size=50)
    with torch.no_grad():
        after = float(nn.functional.cross_entropy(net(u), y))
    assert after < before
    assert all(bool((w.detach()[z] == 0).all()) for w, z in zip(prunable_weights(net), zeros))


def test_sim_pruning_benchmark_smoke(tmp_path, capsys):
    pytest.importorskip("sklearn")
    import json

    from deqkit.apps.bench import sim_pruning

    rc = sim_pruning.main(
        [
            "--datasets",
            "digits",
            "--models",
            "mlp,cnn",
            "--densities",
            "0.5",
            "--hidden",
            "8",
            "--channels",
            "2,3",
            "--epochs",
            "2",
            "--samples",
            "150",
            "--ft-epochs",
            "1",
            "--n-test",
            "60",
            "--n-attack",
            "20",
            "--eps",
            "0.05",
            "--pgd-steps",
            "2",
            "--first-seed",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "digits/mlp" in out and "digits/cnn" in out and "prune+ft" in out
    res = json.loads((tmp_path / "sim_pruning.json").read_text())
    for arch in ("digits/mlp", "digits/cnn"):
        assert [r["seed"] for r in res["runs"][arch]] == [3]  # --first-seed 3, one seed
        run = res["runs"][arch][0]["0.5"]
        assert abs(run["SIM"]["density"] - 0.5) <= 0.02
        assert abs(run["prune"]["density"] - run["SIM"]["density"]) <= 0.01  # matched density


@pytest.mark.parametrize("flags", [["--seeds", "0"], ["--first-seed", "-1"]])
def test_sim_pruning_rejects_bad_seed_ranges(flags):
    from deqkit.apps.bench import sim_pruning
    from deqkit.errors import OptionError

    with pytest.raises(OptionError, match="--seeds must be >= 1 and --first-seed >= 0"):
        sim_pruning.run(sim_pruning.parser().parse_args(["--datasets", "digits", *flags]))
