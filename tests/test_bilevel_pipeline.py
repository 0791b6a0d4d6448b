"""The whole bi-level pipeline: finite differences, SHINE vs OPA, HOAG, reference problem."""

import math

import pytest
import torch
import torch.nn.functional as F

from deqkit.bilevel import (
    HOAG,
    LBFGS,
    BilevelProblem,
    ExactHypergradient,
    JacobianFreeHypergradient,
    SHINEHypergradient,
    hypergradient_cosine,
    load_hpo_dataset,
    logistic_hpo_problem,
    make_hypergradient,
)
from deqkit.errors import OptionError

DT = torch.float64


def _logreg(seed, n=300, d=40):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=g, dtype=DT)
    A[:, : d // 2] *= 3.0  # anisotropic: H far from a multiple of I
    xt = torch.randn(d, generator=g, dtype=DT)
    b = torch.sign(A @ xt + 2 * torch.randn(n, generator=g, dtype=DT))
    Av, bv, At, bt = A[: n // 3], b[: n // 3], A[n // 3 :], b[n // 3 :]

    def inner(x, lam):
        return F.softplus(-bt * (At @ x)).sum() + 0.5 * (torch.exp(lam) * x * x).sum()

    def outer(x):
        return F.softplus(-bv * (Av @ x)).mean()

    return BilevelProblem(inner, outer, torch.zeros(d, dtype=DT))


def test_pipeline_hypergradient_matches_finite_differences():
    pb = _logreg(0, n=120, d=10)
    lam = torch.linspace(-2.0, 1.0, 10, dtype=DT)
    solver = LBFGS(memory=30, tol=1e-11, max_iter=500)
    inner = solver.solve(pb, lam)
    assert inner.converged
    g_exact = ExactHypergradient(tol=1e-12).hypergradient(pb, lam, inner).grad
    g_refine = SHINEHypergradient(refine=40).hypergradient(pb, lam, inner).grad
    eps = 1e-5
    fd = torch.zeros(10, dtype=DT)
    for j in range(10):
        e = torch.zeros(10, dtype=DT)
        e[j] = eps
        lp = pb.outer_value(solver.solve(pb, lam + e, x0=inner.x).x)
        lm = pb.outer_value(solver.solve(pb, lam - e, x0=inner.x).x)
        fd[j] = (lp - lm) / (2 * eps)
    torch.testing.assert_close(g_exact, fd, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(g_refine, fd, rtol=1e-5, atol=1e-9)
    # the scalar-λ hypergradient is the sum of the per-feature one at λ·1
    lam_s = torch.tensor(-0.5, dtype=DT)
    inner_s = solver.solve(pb, lam_s)
    g_s = ExactHypergradient(tol=1e-12).hypergradient(pb, lam_s, inner_s).grad
    g_v = ExactHypergradient(tol=1e-12).hypergradient(pb, lam_s.expand(10).clone(), inner_s).grad
    assert g_s.shape == () and abs(float(g_s) - float(g_v.sum())) < 1e-10


def test_shine_opa_cosine_beats_shine_on_seeded_problems():
    cos_shine, cos_opa = [], []
    for seed in range(5):
        pb = _logreg(seed)
        lam = torch.full((40,), -1.0, dtype=DT)
        cos_shine.append(hypergradient_cosine(pb, lam, SHINEHypergradient(), tol=1e-6)["cosine"])
        r = hypergradient_cosine(pb, lam, SHINEHypergradient(opa_freq=5), tol=1e-6)
        cos_opa.append(r["cosine"])
    assert all(o >= s for o, s in zip(cos_opa, cos_shine)), (cos_opa, cos_shine)
    assert min(cos_opa) > 0.95 and sum(cos_opa) / 5 > 0.98
    assert sum(cos_shine) / 5 < 0.95  # the comparison is not vacuous


def test_opa_adds_pairs_and_needs_outer_gradient():
    pb = _logreg(1)
    lam = torch.zeros(40, dtype=DT)
    est = SHINEHypergradient(opa_freq=5)
    opts = est.inner_options(pb)
    assert opts["opa_freq"] == 5 and callable(opts["outer_grad"])
    res = LBFGS(memory=60, tol=1e-8).solve(pb, lam, **opts)
    assert res.converged and res.n_opa >= 1 and any(res.is_opa)
    assert res.n_opa <= res.nstep // 5
    plain = LBFGS(memory=60, tol=1e-8).solve(pb, lam)
    assert plain.n_opa == 0 and not any(plain.is_opa)


def test_reference_problem_autograd_pieces():
    sp = load_hpo_dataset("breast_cancer", seed=0)
    assert len(sp.y_train) == 512 and len(sp.y_val) + len(sp.y_test) == 57
    assert sp.X_train.dtype == DT and set(sp.y_train.unique().tolist()) == {-1.0, 1.0}
    sp2 = load_hpo_dataset("breast_cancer", seed=0)
    assert torch.equal(sp.X_val, sp2.X_val)  # seeded split
    pb = logistic_hpo_problem(sp)
    x = 0.1 * torch.randn(30, dtype=DT, generator=torch.Generator().manual_seed(0))
    lam = torch.linspace(-1, 1, 30, dtype=DT)
    # closed-form gradient, Hessian-vector product and mixed derivative of the logistic loss
    A, b = sp.X_train, sp.y_train
    sig = torch.sigmoid(-b * (A @ x))
    grad = -A.T @ (b * sig) + torch.exp(lam) * x
    torch.testing.assert_close(pb.inner_value_and_grad(x, lam)[1], grad)
    v = torch.randn(30, dtype=DT, generator=torch.Generator().manual_seed(1))
    hv = A.T @ (sig * (1 - sig) * (A @ v)) + torch.exp(lam) * v
    torch.testing.assert_close(pb.hvp_operator(x, lam)(v), hv)
    torch.testing.assert_close(pb.cross_vjp(x, lam, v), torch.exp(lam) * x * v)


def test_hoag_decreases_validation_loss_and_records():
    sp = load_hpo_dataset("breast_cancer", seed=0)
    pb = logistic_hpo_problem(sp)
    lam0 = torch.tensor(0.0, dtype=DT)
    for name in ("exact", "shine-opa"):
        res = HOAG(make_hypergradient(name), outer_steps=6).run(pb, lam0)
        h = res.history
        assert len(h) == 6 and all(h[i]["time_s"] < h[i + 1]["time_s"] for i in range(5))
        assert res.best_val_loss < h[0]["val_loss"]
        assert all(math.isfinite(r["val_loss"]) and math.isfinite(r["test_loss"]) for r in h)
        # the first step moves λ by one unit (L₀ = ‖g₀‖/√p, p = 1), well inside ±12
        assert abs(h[1]["lam_mean"] - h[0]["lam_mean"]) == pytest.approx(1.0, rel=1e-12)
        assert h[1]["inner_tol"] == pytest.approx(0.78 * h[0]["inner_tol"])
    # λ is clipped to the bounds: the same first step lands on the bound instead of one unit away
    free = HOAG(JacobianFreeHypergradient(), outer_steps=2).run(pb, lam0).history
    res = HOAG(JacobianFreeHypergradient(), outer_steps=3, lam_bounds=(-0.1, 0.1)).run(pb, lam0)
    assert abs(free[1]["lam_mean"]) == pytest.approx(1.0, rel=1e-12)
    assert res.history[1]["lam_mean"] == pytest.approx(0.1 * math.copysign(1.0, free[1]["lam_mean"]), abs=1e-15)
    assert all(abs(r["lam_mean"]) <= 0.1 + 1e-12 for r in res.history)
    with pytest.raises(OptionError, match="HypergradientEstimator"):
        HOAG("exact")
    with pytest.raises(OptionError, match="Did you mean 'shine-opa'"):
        make_hypergradient("shine-opaa")


def test_make_hypergradient_registry_and_options():
    from deqkit._options import validated_options
    from deqkit.bilevel import HYPERGRADIENT_NAMES, HYPERGRADIENTS, HypergradientEstimator, WEstimate, register_hypergradient

    assert set(HYPERGRADIENT_NAMES) <= set(HYPERGRADIENTS.names())
    assert make_hypergradient("exact", tol=1e-8).tol == 1e-8
    refine = make_hypergradient("shine-refine")
    assert isinstance(refine, SHINEHypergradient) and refine.refine == 5 and refine.name == "shine-refine"
    opa = make_hypergradient("shine-opa", opa_freq=3)
    assert opa.opa_freq == 3 and opa.name == "shine-opa" and opa.default_memory() == 60
    assert make_hypergradient("shine", refine=2, opa_freq=4).name == "shine-opa-refine"
    with pytest.raises(OptionError, match="unknown option 'refine'"):
        make_hypergradient("exact", refine=5)  # options are the estimator's own
    with pytest.raises(OptionError, match="Did you mean 'opa_freq'"):
        make_hypergradient("shine-opa", opa_fre=3)

    # the example of HypergradientEstimator's docstring
    @register_hypergradient("half-gradient")
    @validated_options
    class Half(HypergradientEstimator):
        name = "half-gradient"

        def solve_w(self, problem, lam, inner, v, w0, tol):
            return WEstimate(0.5 * v, 0, 0, True, float("nan"))

    with pytest.raises(OptionError, match="Half got an unknown option 'tol'"):
        make_hypergradient("half-gradient", tol=1e-3)
    try:
        pb = _logreg(3, n=90, d=6)
        res = HOAG(make_hypergradient("half-gradient"), outer_steps=2).run(pb, torch.tensor(0.0, dtype=DT))
        assert res.estimator == "half-gradient" and res.nstep == 2
        inner = LBFGS(tol=1e-8).solve(pb, torch.tensor(0.0, dtype=DT))
        half = make_hypergradient("half-gradient").hypergradient(pb, torch.tensor(0.0, dtype=DT), inner).grad
        full = JacobianFreeHypergradient().hypergradient(pb, torch.tensor(0.0, dtype=DT), inner).grad
        torch.testing.assert_close(half, 0.5 * full)
    finally:
        HYPERGRADIENTS.remove("half-gradient")
    assert "half-gradient" not in HYPERGRADIENTS


def test_hoag_result_protocol_and_failure_policy():
    from deqkit.errors import ConvergenceError, ConvergenceWarning

    pb = _logreg(2, n=120, d=10)
    lam0 = torch.tensor(0.0, dtype=DT)
    res = HOAG(ExactHypergradient(), outer_steps=3).run(pb, lam0)
    assert res.converged and res.nstep == 3 and res.time_s == res.history[-1]["time_s"]
    assert res.residual == res.last_inner.residual <= res.history[-1]["inner_tol"]
    assert res.all_converged and "HOAGResult" in res.summary()
    # an inner solver capped at one step misses the last step's tolerance
    capped = LBFGS(max_iter=1, on_failure="ignore")
    with pytest.warns(ConvergenceWarning, match="HOAG: the last outer step's inner solve"):
        res = HOAG(ExactHypergradient(), solver=capped, outer_steps=2).run(pb, lam0)
    assert not res.converged and res.n_inner_not_converged == 2
    with pytest.raises(ConvergenceError):
        HOAG(ExactHypergradient(), solver=capped, outer_steps=2, on_failure="raise").run(pb, lam0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HOAG(ExactHypergradient(), solver=capped, outer_steps=2, on_failure="ignore").run(pb, lam0)
    with pytest.raises(OptionError, match="HOAG: lam_bounds must be .* low < high"):
        HOAG(JacobianFreeHypergradient(), lam_bounds=(1.0, -1.0))
    with pytest.raises(OptionError, match="HOAG got an unknown option 'reject_rtol'"):
        HOAG(JacobianFreeHypergradient(), reject_rtol=0.1)


def test_load_hpo_dataset_fractions():
    sp = load_hpo_dataset("digits", seed=2, val_fraction=0.2, test_fraction=0.1)
    n = len(sp.y_train) + len(sp.y_val) + len(sp.y_test)
    assert n == 1797 and len(sp.y_train) == round(0.7 * 1797) and len(sp.y_val) == 359
    with pytest.raises(OptionError, match="val_fraction \\+ test_fraction must be < 1"):
        load_hpo_dataset("digits", val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(OptionError, match="Did you mean 'breast_cancer'"):
        load_hpo_dataset("breast-cancer")
    with pytest.raises(OptionError, match="unknown option 'train_frac'"):
        load_hpo_dataset("digits", train_frac=0.9)
