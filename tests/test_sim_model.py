"""ImplicitModel: exact reproduction of an MLP, uniqueness of the fixed point, implicit gradients."""

import warnings

import pytest
import torch
from torch import nn

from deqkit.errors import ConvergenceWarning
from deqkit.estimators import Exact
from deqkit.sim import BatchedADMM, ImplicitModel, collect_states, finetune, fit_sim, mlp_to_implicit
from deqkit.solvers import FixedPoint


def _mlp(seed=0, scale=3.0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
    ).double()
    with torch.no_grad():  # large weights: rescaling is needed for ‖A‖_∞ ≤ κ
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(scale)
    return net


def test_mlp_is_reproduced_exactly_before_sparsification():
    net = _mlp()
    u = torch.randn(16, 10, dtype=torch.float64)
    # Picard reaches the exact fixed point in (number of layers) steps: A is nilpotent
    model = mlp_to_implicit(net, kappa=0.99, solver=FixedPoint(tol=1e-13, max_iter=50, stop_mode="abs"))
    assert model.is_wellposed() and model.inf_norm() <= 0.99 + 1e-12
    # strictly block upper triangular: states ordered (x3, x2, x1), sizes 5, 6, 8
    A = model.A.detach()
    assert torch.count_nonzero(torch.tril(A)) == 0
    assert torch.count_nonzero(A[:5, 5:11]) > 0 and torch.count_nonzero(A[5:11, 11:]) > 0
    with torch.no_grad():
        y = model(u)
        x, info = model.equilibrium(u)
    assert info.converged.all() and int(info.nstep.max()) <= 5
    torch.testing.assert_close(y, net(u), rtol=0, atol=1e-12)
    with torch.no_grad():  # default (Anderson, tol 1e-6) solver: same up to its tolerance
        torch.testing.assert_close(mlp_to_implicit(net)(u), net(u), rtol=0, atol=1e-3)
    states = collect_states(net, u)
    torch.testing.assert_close(x, states.X, rtol=0, atol=1e-12)
    ones = torch.ones(16, 1, dtype=torch.float64)
    torch.testing.assert_close(states.Z, states.X @ A.T + torch.cat([u, ones], 1) @ model.B.detach().T, rtol=0, atol=1e-12)


def test_unsupported_layers_are_refused():
    with pytest.raises(ValueError, match="unsupported layer Tanh"):
        mlp_to_implicit(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="end with an affine"):
        mlp_to_implicit(nn.Sequential(nn.Linear(3, 4), nn.ReLU()))
    # consecutive affine layers are composed
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    u = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            mlp_to_implicit(net, solver=FixedPoint(tol=1e-13, max_iter=20, stop_mode="abs"))(u), net(u), rtol=0, atol=1e-12
        )


def test_wellposed_fixed_point_is_unique():
    torch.manual_seed(1)
    model = ImplicitModel(
        30, 6, 2, kappa=0.9, init="random", dtype=torch.float64, solver=FixedPoint(tol=1e-11, max_iter=2000, stop_mode="abs")
    )
    with torch.no_grad():
        model.A.mul_(10)  # then project: rows on the κ-sphere, a genuinely recurrent A
    model.project_wellposed()
    assert model.is_wellposed() and torch.count_nonzero(torch.tril(model.A.detach())) > 0
    u = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        xs = [model.equilibrium(u, x0=torch.randn(4, 30, dtype=torch.float64) * s)[0] for s in (0.0, 1.0, 100.0)]
    for x in xs[1:]:
        torch.testing.assert_close(x, xs[0], rtol=0, atol=1e-9)
    bu = torch.cat([u], 1) @ model.B.detach().T
    torch.testing.assert_close(xs[0], torch.relu(xs[0] @ model.A.detach().T + bu), rtol=0, atol=1e-10)


def test_implicit_gradient_matches_unrolled_autograd_and_fine_tuning_works():
    torch.manual_seed(2)
    model = ImplicitModel(
        12,
        5,
        3,
        kappa=0.8,
        init="random",
        dtype=torch.float64,
        solver=FixedPoint(tol=1e-12, max_iter=500, stop_mode="abs"),
        grad=Exact(tol=1e-11, max_iter=200),
    )
    u = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    loss = nn.functional.cross_entropy(model(u), y)
    loss.backward()
    g_ours = [model.A.grad.clone(), model.B.grad.clone(), u.grad.clone()]
    # reference: autograd through 200 plain Picard steps (converged to machine precision)
    A, B, C, D = (p.detach().clone().requires_grad_() for p in (model.A, model.B, model.C, model.D))
    u2 = u.detach().clone().requires_grad_()
    x = torch.zeros(6, 12, dtype=torch.float64)
    for _ in range(200):
        x = torch.relu(x @ A.T + u2 @ B.T)
    nn.functional.cross_entropy(x @ C.T + u2 @ D.T, y).backward()
    for ours, ref in zip(g_ours, [A.grad, B.grad, u2.grad]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-8)
    # projected gradient fine-tuning: loss goes down, model stays well-posed
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    u0 = u.detach()
    first = None
    for _ in range(5):
        opt.zero_grad()
        l = nn.functional.cross_entropy(model(u0), y)
        first = float(l.detach()) if first is None else first
        l.backward()
        opt.step()
        model.project_wellposed()
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(model(u0), y)) < first
    assert model.is_wellposed()


def test_sim_with_zero_lambda_reproduces_baseline_states():
    net = _mlp(seed=3, scale=1.5)
    u = torch.rand(60, 10, dtype=torch.float64)
    states = collect_states(net, u)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = fit_sim(
            states,
            0.0,
            lam_scale="paper",
            admm_ab=BatchedADMM(max_iter=20000, tol_abs=1e-10, tol=1e-9),
            admm_cd=BatchedADMM(max_iter=20000, tol_abs=1e-10, tol=1e-9),
        )
    assert res.model.is_wellposed()
    with torch.no_grad():
        torch.testing.assert_close(res.model(u), net(u), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="'uniform', 'standardized'"):
        fit_sim(states, 0.1, lam_scale="paper", penalty="l2")


def test_finetune_keeps_sparsity_pattern_and_wellposedness():
    net = _mlp(seed=4, scale=1.0)
    u = torch.rand(80, 10, dtype=torch.float64)
    y = net(u).argmax(1).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = fit_sim(collect_states(net, u), 1.0, lam_scale="paper").model
        pattern = [(p.detach() != 0) for p in (model.A, model.B, model.C, model.D)]
        with torch.no_grad():
            before = float(nn.functional.cross_entropy(model(u), y))
        seen = []
        finetune(model, u, y, epochs=3, lr=1e-2, batch_size=40, log=lambda e, loss: seen.append((e, loss)))
        assert [e for e, _ in seen] == [1, 2, 3] and seen[-1][1] < seen[0][1]
        with torch.no_grad():
            after = float(nn.functional.cross_entropy(model(u), y))
    assert after < before and model.is_wellposed()
    for p, mk in zip((model.A, model.B, model.C, model.D), pattern):
        assert torch.all(p.detach()[~mk] == 0)
