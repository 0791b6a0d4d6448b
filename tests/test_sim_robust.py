"""The certified ℓ∞ gain of an implicit model and the robust SIM program (deqkit.sim.robust)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from deqkit.errors import ConvergenceWarning
from deqkit.sim import (
    BatchedADMM,
    ImplicitModel,
    collect_states,
    fgsm,
    fit_sim,
    make_mlp,
    mlp_to_implicit,
    pgd,
)
from deqkit.sim.robust import certified_accuracy, certified_linf_gain
from deqkit.solvers import Anderson

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: a second thread only adds contention


def _tight(model):
    model.solver = Anderson(memory=6, tol=1e-12, max_iter=500, stop_mode="abs")
    return model


def _positive_model(n=5, p=4, q=3, seed=0):
    """Non-negative weights, A strictly upper triangular, large biases: every unit stays active
    near u = 0.5, so the model is affine there and the bound is attained along δ = ε·1."""
    g = torch.Generator().manual_seed(seed)
    m = ImplicitModel(n, p, q, bias=True, dtype=torch.float64)
    with torch.no_grad():
        m.A.copy_(torch.triu(torch.rand(n, n, generator=g, dtype=torch.float64), 1) * 0.3)
        m.B[:, :p] = torch.rand(n, p, generator=g, dtype=torch.float64)
        m.B[:, p] = 5.0
        m.C.copy_(torch.rand(q, n, generator=g, dtype=torch.float64))
        m.D[:, :p] = torch.rand(q, p, generator=g, dtype=torch.float64)
    return _tight(m)


def test_gain_is_attained_where_the_model_is_affine_and_monotone():
    m = _positive_model()
    g = certified_linf_gain(m)
    assert g.certified and g.per_output.shape == (3,)
    u = torch.full((1, 4), 0.5, dtype=torch.float64)
    eps = 1e-2
    with torch.no_grad():
        dy = m(u + eps) - m(u)
    torch.testing.assert_close(dy[0], g.per_output * eps, atol=1e-10, rtol=1e-9)


def _net_and_data(seed=0):
    torch.manual_seed(seed)
    net = make_mlp(6, [10, 8], 3).double()
    with torch.no_grad():
        for mod in net:
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(2.0)
    u = torch.rand(120, 6, dtype=torch.float64)
    y = net(u).argmax(1).detach()
    return net, u, y


def _output_change_loss(y0):
    return lambda out, _y: (out - y0).abs().max(dim=1).values.sum()


@pytest.mark.parametrize("which", ["exact", "robust-fit"])
def test_certified_bound_holds_on_every_test_point_against_attacks(which):
    net, u, y = _net_and_data()
    if which == "exact":
        model = _tight(mlp_to_implicit(net))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = _tight(
                fit_sim(collect_states(net, u), 0.01, input_radius=0.5, output_radius=1.0, structure="feedforward").model
            )
    gain = certified_linf_gain(model)
    assert gain.certified and 0 < gain.gain < float("inf")
    ut, yt = u[:40], y[:40]
    with torch.no_grad():
        y0 = model(ut)
    worst = 0.0
    for eps in (0.01, 0.05, 0.2):
        advs = [
            fgsm(model, ut, yt, eps, clip=None),
            pgd(model, ut, yt, eps, steps=10, clip=None, seed=0),
            pgd(model, ut, y0, eps, steps=20, clip=None, seed=1, loss_fn=_output_change_loss(y0)),
        ]
        for adv in advs:
            assert float((adv - ut).abs().max()) <= eps + 1e-12
            with torch.no_grad():
                dy = (model(adv) - y0).abs()
            # every output of every point: |Δŷ_k| ≤ g_k ε (solver tolerance 1e-12)
            assert bool((dy <= gain.per_output[None, :] * eps + 1e-9).all()), (eps, float((dy / eps).max()), gain.gain)
            worst = max(worst, float(dy.max() / eps))
    assert worst > 0.05 * gain.gain  # the attacks do move the outputs: the check is not vacuous


def _fits(*radii: dict) -> list:
    """The plain fit (λ = 0.001, feedforward) of seed 1's states, then one fit per dict of radius options."""
    net, u, _ = _net_and_data(seed=1)
    st = collect_states(net, u)
    kw = dict(structure="feedforward", admm_ab=BatchedADMM(max_iter=5000), admm_cd=BatchedADMM(max_iter=5000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        out = [fit_sim(st, 0.001, **kw)]
        for r in radii:  # a callable gets the previous result (to reuse the radii it reports)
            out.append(fit_sim(st, 0.001, **(r(out[-1]) if callable(r) else r), **kw))
    return out


def test_robust_program_keeps_its_balls_and_lowers_the_gain():
    free, rob = (r.model for r in _fits(dict(input_radius=0.3, output_radius=0.8)))
    p = rob.p
    assert float(rob.B.detach()[:, :p].abs().sum(1).max()) <= 0.3 + 1e-9
    cd = torch.cat([rob.C.detach(), rob.D.detach()[:, :p]], 1)
    assert float(cd.abs().sum(1).max()) <= 0.8 + 1e-9
    assert rob.is_wellposed()
    g_free, g_rob = certified_linf_gain(free).gain, certified_linf_gain(rob).gain
    assert g_rob <= 0.8 * max(1.0, 0.3 / (1 - rob.kappa)) + 1e-9
    assert g_rob < g_free


def test_relative_radii_are_fractions_of_the_plain_fits_largest_rows():
    plain, rel, same = _fits(
        dict(input_radius=0.5, output_radius=0.7, radius_scale="relative"),
        lambda prev: dict(input_radius=prev.input_radius, output_radius=prev.output_radius),
    )
    free = plain.model
    p = free.p
    rows = lambda m: (m.B.detach()[:, :p].abs().sum(1), torch.cat([m.C.detach(), m.D.detach()[:, :p]], 1).abs().sum(1))
    b_free, cd_free = rows(free)
    assert rel.input_radius == pytest.approx(0.5 * float(b_free.max()))
    assert rel.output_radius == pytest.approx(0.7 * float(cd_free.max()))
    b_rob, cd_rob = rows(rel.model)
    assert float(b_rob.max()) <= rel.input_radius + 1e-9 and float(cd_rob.max()) <= rel.output_radius + 1e-9
    assert float(b_rob.max()) > 0.99 * rel.input_radius  # the ball is active
    # the relative program is the absolute one at the radii it reports
    for k in "ABCD":
        torch.testing.assert_close(getattr(rel.model, k), getattr(same.model, k), atol=2e-4, rtol=0)
    assert same.input_radius == rel.input_radius and plain.input_radius is None


def test_relative_radius_must_be_a_fraction():
    net, u, _ = _net_and_data(seed=1)
    st = collect_states(net, u)
    from deqkit.errors import OptionError

    with pytest.raises(OptionError, match=r"\(0, 1\]"):
        fit_sim(st, 0.001, input_radius=1.5, radius_scale="relative")
    with pytest.raises(OptionError, match="radius_scale"):
        fit_sim(st, 0.001, input_radius=0.5, radius_scale="fraction")


def test_block_ball_matches_cvxpy():
    pytest.importorskip("cvxpy")
    from deqkit.sim import solve_rows_cvxpy

    g = torch.Generator().manual_seed(3)
    phi = torch.rand(40, 9, generator=g, dtype=torch.float64)
    z = torch.randn(4, 40, generator=g, dtype=torch.float64)
    kw = dict(radius=0.4, n_constrained=3)
    admm = BatchedADMM(tol=1e-9, tol_abs=1e-11, max_iter=20000, on_failure="raise")
    ours = admm.solve(phi, z, 0.5, block_ball=(3, 7, 0.6), **kw)
    ref = solve_rows_cvxpy(phi, z, 0.5, block_ball=(3, 7, 0.6), **kw)
    assert float(ours.beta[:, 3:7].abs().sum(1).max()) <= 0.6 + 1e-9
    torch.testing.assert_close(ours.objective, torch.as_tensor(ref.objective), rtol=1e-5, atol=1e-6)
    free = admm.solve(phi, z, 0.5, **kw)
    assert float(free.beta[:, 3:7].abs().sum(1).max()) > 0.6  # the ball is active: the test can fail


def test_certified_accuracy_is_below_clean_and_falls_with_eps():
    net, u, y = _net_and_data(seed=2)
    model = _tight(mlp_to_implicit(net))
    accs = [certified_accuracy(model, u, y, e) for e in (0.0, 0.001, 0.01, 0.1)]
    assert accs[0] == pytest.approx(1.0)  # y are the model's own predictions
    assert all(a >= b for a, b in itertools.pairwise(accs)) and accs[-1] < accs[0]
    # a certified point really survives the attack
    eps = 0.01
    gain = certified_linf_gain(model)
    with torch.no_grad():
        out = model(u)
    adv = pgd(model, u, y, eps, steps=10, clip=None, seed=0)
    with torch.no_grad():
        pred = model(adv).argmax(1)
    g = gain.per_output
    margin_ok = ((out.gather(1, y[:, None]) - out > (g[y][:, None] + g[None, :]) * eps) | F.one_hot(y, out.shape[1]).bool()).all(
        1
    )
    assert bool((pred[margin_ok] == y[margin_ok]).all())


def test_ill_posed_model_is_not_certified():
    m = ImplicitModel(2, 2, 1, dtype=torch.float64)
    with torch.no_grad():
        m.A.copy_(torch.tensor([[0.0, 1.2], [1.0, 0.0]], dtype=torch.float64))
    g = certified_linf_gain(m)
    assert not g.certified and g.gain == float("inf") and g.spectral_radius > 1
