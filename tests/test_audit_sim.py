"""Audit (issue 17): numbers the SIM command reports that no test pinned (mutation survivors):
the solve time, the baseline's non-zero count, and fine-tuning with zero epochs.

0.2: ``fit_sim``'s default ``lam_scale`` is ``"normalized"``; the fits here pass ``lam_scale="paper"``
to keep the 0.1 program (λ = 0.1 in the paper's units), and ``baseline_nonzeros(tol=)`` is ``zero_tol=``."""

from __future__ import annotations

import torch

from deqkit.sim import baseline_nonzeros, collect_states, finetune, fit_sim, make_mlp


def _net(seed=0, p=6, hidden=(5, 4), q=3):
    torch.manual_seed(seed)
    return make_mlp(p, list(hidden), q).double()


def test_fit_sim_reports_its_solve_time():
    net = _net()
    u = torch.rand(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = fit_sim(collect_states(net, u), 0.1, lam_scale="paper")
    assert isinstance(res.time_s, float) and 0 < res.time_s < 600


def test_baseline_nonzeros_counts_weights_and_biases_above_the_tolerance():
    net = _net()
    layers = [m for m in net if isinstance(m, torch.nn.Linear)]
    total = sum(m.weight.numel() + m.bias.numel() for m in layers)
    assert baseline_nonzeros(net) == total == 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3
    with torch.no_grad():
        layers[0].weight[0, :4] = 0.0
        layers[1].bias[:2] = 1e-7  # below the default 1e-6
        layers[2].weight[1, 1] = 1e-6  # at the tolerance: counted (|w| >= tol)
    assert baseline_nonzeros(net) == total - 4 - 2
    assert baseline_nonzeros(net, zero_tol=1e-8) == total - 4


def test_finetune_with_zero_epochs_changes_nothing():
    net = _net()
    u = torch.rand(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = fit_sim(collect_states(net, u), 0.1, lam_scale="paper").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(3))
    out = finetune(model, u, y, epochs=0)
    assert out is model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
