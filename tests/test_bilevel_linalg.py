"""Closed-form checks of the bi-level linear algebra (float64)."""

import warnings

import pytest
import torch

from deqkit.bilevel import (
    LBFGS,
    BilevelProblem,
    ExactHypergradient,
    JacobianFreeHypergradient,
    LBFGSInverse,
    SecantMemory,
    SHINEHypergradient,
    dense_bfgs_inverse,
    two_loop,
)
from deqkit.errors import ConvergenceError, ConvergenceWarning, NonFiniteError, OptionError
from deqkit.inverse import InverseEstimate
from deqkit.linear import CG


@pytest.fixture(autouse=True)
def _float64_default():
    """This module builds its tensors in float64; restore the global default afterwards."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


def _quadratic(n=12, seed=0, cond=50.0):
    """h(x, λ) = ½xᵀAx − bᵀx + ½Σ e^{λ_j} x_j²;  L(x) = ½‖x − c‖²."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    A = q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)), n)) @ q.T
    b = torch.randn(n, generator=g)
    c = torch.randn(n, generator=g)
    inner = lambda x, lam: 0.5 * x @ A @ x - b @ x + 0.5 * (torch.exp(lam) * x * x).sum()
    outer = lambda x: 0.5 * ((x - c) ** 2).sum()
    return BilevelProblem(inner, outer, torch.zeros(n)), A, b, c


def _closed_form(A, b, c, lam):
    H = A + torch.diag(torch.exp(lam))
    x = torch.linalg.solve(H, b)
    # dL/dλ_j = −(∂²h/∂λ_j∂x)ᵀ H⁻¹ ∇L,  ∂²h/∂λ_j∂x_i = δ_ij e^{λ_j} x_j
    return x, -torch.exp(lam) * x * torch.linalg.solve(H, x - c)


def test_exact_matches_closed_form_on_quadratic():
    pb, A, b, c = _quadratic()
    lam = torch.linspace(-1, 1, 12)
    inner = LBFGS(memory=30, tol=1e-12, max_iter=500).solve(pb, lam)
    x_true, g_true = _closed_form(A, b, c, lam)
    assert inner.converged
    torch.testing.assert_close(inner.x, x_true, rtol=1e-9, atol=1e-10)
    hg = ExactHypergradient(tol=1e-13).hypergradient(pb, lam, inner)
    assert hg.converged and hg.n_hvp > 0
    torch.testing.assert_close(hg.grad, g_true, rtol=1e-8, atol=1e-10)
    # and the closed form itself against central finite differences of L(x*(λ))
    eps = 1e-6
    for j in (0, 5, 11):
        e = torch.zeros(12)
        e[j] = eps
        lp = pb.outer_value(_closed_form(A, b, c, lam + e)[0])
        lm = pb.outer_value(_closed_form(A, b, c, lam - e)[0])
        assert abs((lp - lm) / (2 * eps) - float(g_true[j])) < 1e-6 * max(1.0, abs(float(g_true[j])))


def test_scalar_lambda_hypergradient_closed_form():
    pb, A, b, c = _quadratic(seed=1)
    lam = torch.tensor(0.3)
    inner = LBFGS(tol=1e-12).solve(pb, lam)
    _, g_vec = _closed_form(A, b, c, lam.expand(12))
    hg = ExactHypergradient(tol=1e-13).hypergradient(pb, lam, inner)
    assert hg.grad.shape == lam.shape
    torch.testing.assert_close(hg.grad, g_vec.sum(), rtol=1e-8, atol=1e-10)


def test_two_loop_equals_dense_bfgs_inverse():
    g = torch.Generator().manual_seed(3)
    n, m = 15, 9
    M = torch.randn(n, n, generator=g)
    A = M @ M.T + 0.5 * torch.eye(n)
    s = [torch.randn(n, generator=g) for _ in range(m)]
    y = [A @ si + 0.01 * torch.randn(n, generator=g) for si in s]
    assert all(float(si @ yi) > 0 for si, yi in zip(s, y))
    H = dense_bfgs_inverse(s, y)
    for _ in range(3):
        v = torch.randn(n, generator=g)
        torch.testing.assert_close(two_loop(s, y, v), H @ v, rtol=1e-10, atol=1e-12)
    # secant condition of the newest pair, and an explicit γ
    torch.testing.assert_close(H @ y[-1], s[-1], rtol=1e-10, atol=1e-12)
    v = torch.randn(n, generator=g)
    torch.testing.assert_close(two_loop(s, y, v, gamma=0.37), dense_bfgs_inverse(s, y, gamma=0.37) @ v, rtol=1e-10, atol=1e-12)
    # n A-conjugate exact pairs of a quadratic: BFGS recovers A⁻¹ exactly
    s = list(torch.linalg.eigh(A).eigenvectors.T)
    y = [A @ si for si in s]
    torch.testing.assert_close(dense_bfgs_inverse(s, y), torch.linalg.inv(A), rtol=1e-7, atol=1e-8)


def test_lbfgs_result_pairs_and_memory_bound():
    pb, A, b, c = _quadratic(n=40, cond=1e3)
    res = LBFGS(memory=5, tol=1e-10, max_iter=500).solve(pb, torch.zeros(40))
    assert res.converged and res.message == "converged"
    assert len(res.s) == len(res.y) <= 5
    assert all(float(si @ yi) > 0 for si, yi in zip(res.s, res.y))
    assert len(res.grad_norms) == res.nstep + 1 and res.grad_norms[-1] <= 1e-10
    # Armijo line search also converges
    res2 = LBFGS(memory=5, tol=1e-8, max_iter=2000, line_search="armijo").solve(pb, torch.zeros(40))
    assert res2.converged
    torch.testing.assert_close(res2.x, res.x, rtol=1e-6, atol=1e-7)


def test_secant_memory_skips_bad_pairs():
    mem = SecantMemory(3)
    assert mem.push(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert not mem.push(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]))
    assert not mem.push(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert mem.n_skipped == 2 and len(mem) == 1
    for _ in range(5):
        mem.push(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 1.0]))
    assert len(mem) == 3


def test_options_validated():
    with pytest.raises(OptionError, match="LBFGS: line_search='backtrack' is not valid.*wolfe"):
        LBFGS(line_search="backtrack")
    with pytest.raises(OptionError, match="LBFGS: memory must be an integer >= 1, got 0"):
        LBFGS(memory=0)
    with pytest.raises(OptionError, match="LBFGS: on_failure='record'.*'warn', 'raise', 'ignore'"):
        LBFGS(on_failure="record")
    with pytest.raises(OptionError, match="SHINEHypergradient: refine must be an integer >= 0"):
        SHINEHypergradient(refine=-1)
    with pytest.raises(OptionError, match="SHINEHypergradient: opa_freq"):
        SHINEHypergradient(opa_freq=0)
    with pytest.raises(OptionError, match="ExactHypergradient: on_failure='silent'"):
        ExactHypergradient(on_failure="silent")
    with pytest.raises(OptionError, match="ExactHypergradient: tol must be a finite number > 0, got 0"):
        ExactHypergradient(tol=0)
    with pytest.raises(OptionError, match="tol must be a finite number > 0, got inf"):
        LBFGS(tol=float("inf"))
    with pytest.raises(OptionError, match="CG: max_iter must be an integer"):
        CG(max_iter=2.5)


@pytest.mark.parametrize(
    "make, typo, hint",
    [
        (lambda **kw: LBFGS(**kw), "memroy", "memory"),
        (lambda **kw: ExactHypergradient(**kw), "tolerance", "tol"),
        (lambda **kw: ExactHypergradient(**kw), "on_fail", "on_failure"),
        (lambda **kw: SHINEHypergradient(**kw), "opa", "opa_freq"),
        (lambda **kw: SecantMemory(3, **kw), "curvature_epsilon", "curvature_eps"),
        (lambda **kw: CG(**kw), "rtol", "tol"),
    ],
)
def test_typo_option_did_you_mean(make, typo, hint):
    with pytest.raises(OptionError, match=f"unknown option '{typo}'.*Did you mean '{hint}'"):
        make(**{typo: 1})


def test_cg_failure_is_reported():
    pb, *_ = _quadratic(n=30, cond=1e4)
    lam = torch.full((30,), -8.0)
    inner = LBFGS(tol=1e-10, max_iter=2000).solve(pb, lam)
    with pytest.warns(ConvergenceWarning, match="CG missed"):
        hg = ExactHypergradient(tol=1e-12, max_iter=3).hypergradient(pb, lam, inner)
    assert not hg.converged and hg.nstep == 3
    with pytest.raises(ConvergenceError):
        ExactHypergradient(tol=1e-12, max_iter=3, on_failure="raise").hypergradient(pb, lam, inner)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hg = ExactHypergradient(tol=1e-12, max_iter=3, on_failure="ignore").hypergradient(pb, lam, inner)
    assert not hg.converged


def test_inner_failures_recorded_or_raised():
    pb, *_ = _quadratic(n=30, cond=1e4)
    lam = torch.full((30,), -8.0)
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        res = LBFGS(tol=1e-12, max_iter=2).solve(pb, lam)
    assert not res.converged and res.nstep == 2
    with pytest.raises(ConvergenceError):
        LBFGS(tol=1e-12, max_iter=2, on_failure="raise").solve(pb, lam)
    bad = BilevelProblem(lambda x, lam: (x * x).sum() * torch.tensor(float("nan")), lambda x: x.sum(), torch.ones(3))
    with pytest.raises(NonFiniteError):
        LBFGS().solve(bad, torch.tensor(0.0))
    # non-positive-definite Hessian met by CG
    concave = BilevelProblem(lambda x, lam: -(x * x).sum() * torch.exp(lam), lambda x: x.sum(), torch.ones(3))
    fake = LBFGS(on_failure="ignore", max_iter=1).solve(concave, torch.tensor(0.0))
    with pytest.raises(NonFiniteError, match="curvature"):
        ExactHypergradient().hypergradient(concave, torch.tensor(0.0), fake)


def test_shine_refuses_missing_state():
    pb, *_ = _quadratic()
    lam = torch.zeros(12)
    plain = LBFGS(tol=1e-8).solve(pb, lam)
    with pytest.raises(ValueError, match="OPA"):
        SHINEHypergradient(opa_freq=5).hypergradient(pb, lam, plain)
    with pytest.raises(ValueError, match="LBFGS"):
        SHINEHypergradient().hypergradient(pb, lam, object())


def test_estimators_agree_on_quadratic_with_full_memory():
    # with memory ≥ n on a quadratic, L-BFGS pairs span the space: SHINE ≈ Exact
    pb, A, b, c = _quadratic(n=8, cond=10)
    lam = torch.zeros(8)
    inner = LBFGS(memory=30, tol=1e-12).solve(pb, lam)
    g_ex = ExactHypergradient(tol=1e-13).hypergradient(pb, lam, inner).grad
    g_ref = SHINEHypergradient(refine=50).hypergradient(pb, lam, inner).grad
    torch.testing.assert_close(g_ref, g_ex, rtol=1e-7, atol=1e-9)
    g_jf = JacobianFreeHypergradient().hypergradient(pb, lam, inner).grad
    assert float((g_jf - g_ex).norm()) > 1e-3 * float(g_ex.norm())


def test_cg_solves_spd_system_with_warm_start():
    _, A, b, _ = _quadratic(n=20, cond=100)
    x_true = torch.linalg.solve(A, b)
    cg = CG(tol=1e-12, max_iter=200)
    res = cg.solve(lambda v: v @ A, b[None])
    assert res.all_converged and int(res.nstep[0]) <= 40
    torch.testing.assert_close(res.z[0], x_true, rtol=1e-9, atol=1e-10)
    warm = cg.solve(lambda v: v @ A, b[None], x0=(x_true + 1e-6)[None])
    assert warm.all_converged and int(warm.nstep[0]) < int(res.nstep[0])


# --------------------------------------------------------------------------- CG as a LinearSolver
def _spd_batch(B=4, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, d, d, generator=g)
    scales = torch.logspace(0, 3, B)  # one well-, one badly-conditioned system per sample
    A = M @ M.transpose(1, 2) / d + torch.diag_embed(torch.ones(B, d) / scales[:, None])
    b = torch.randn(B, d, generator=g)
    return A, b


def test_cg_class_matches_dense_solve_batched_per_sample_stop():
    A, b = _spd_batch()
    b[1] = 0.0  # a zero right-hand side converges at step 0 and stays zero
    calls = []

    def matvec(x):
        calls.append(1)
        return torch.einsum("bij,bj->bi", A, x)

    res = CG(tol=1e-12, max_iter=500).solve(matvec, b)
    x_true = torch.linalg.solve(A, b)
    torch.testing.assert_close(res.z, x_true, rtol=1e-8, atol=1e-10)
    assert res.converged.all() and res.z[1].abs().max() == 0 and int(res.nstep[1]) == 0
    # every sample stops on its own test: step counts differ, the loop ran as long as the slowest
    assert len(set(res.nstep.tolist())) > 2 and len(calls) == int(res.nstep.max())
    # the residual reported is the relative one compared to tol
    true_rel = (b - matvec(res.z)).norm(dim=1) / (b.norm(dim=1) + 1e-300)
    assert float(true_rel[[0, 2, 3]].max()) < 1e-10
    # a batch equals its samples solved one by one (a frozen sample does not change)
    for i in (0, 3):
        one = CG(tol=1e-12, max_iter=500).solve(lambda x, i=i: x @ A[i].T, b[i : i + 1])
        assert int(one.nstep[0]) == int(res.nstep[i])
        torch.testing.assert_close(one.z[0], res.z[i], rtol=1e-10, atol=1e-12)
    # abs stop mode
    res_abs = CG(tol=1e-9, max_iter=500, stop_mode="abs").solve(matvec, b)
    assert float((b - matvec(res_abs.z)).norm(dim=1).max()) < 1e-8


def test_cg_solve_adjoint_protocol():
    # J symmetric with eigenvalues < 1: I − J is SPD; solve w = wJ + v for rows w
    g = torch.Generator().manual_seed(5)
    B, d = 3, 9
    Q, _ = torch.linalg.qr(torch.randn(B, d, d, generator=g))
    J = Q @ torch.diag_embed(torch.linspace(-0.9, 0.9, d).expand(B, d)) @ Q.transpose(1, 2)
    v = torch.randn(B, d, generator=g)
    vjp = lambda w: torch.einsum("bi,bij->bj", w, J)  # noqa: E731
    res = CG(tol=1e-12, max_iter=100).solve_adjoint(vjp, v)
    eye = torch.eye(d)
    w_true = torch.linalg.solve((eye - J).transpose(1, 2), v.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(res.z, w_true, rtol=1e-9, atol=1e-11)
    assert res.converged.all() and res.solver == "cg"
    # the shape of v is kept (rows of any shape), and a warm start from the answer needs no step
    v4 = v.view(B, 3, 3)
    res4 = CG(tol=1e-12, max_iter=100).solve_adjoint(lambda w: vjp(w.reshape(B, d)).view(B, 3, 3), v4, w0=w_true.view(B, 3, 3))
    assert res4.z.shape == v4.shape and int(res4.nstep.max()) <= 1
    assert res.time_s >= 0
    with pytest.raises(OptionError, match="does not take preconditioner="):
        CG().solve_adjoint(vjp, v, preconditioner=lambda y: y)
    # I − J not positive definite: CG refuses instead of returning garbage
    with pytest.raises(NonFiniteError, match="curvature"):
        CG().solve_adjoint(lambda w: 2.0 * w, v)


def test_cg_cap_reported_per_sample():
    A, b = _spd_batch(seed=2)
    res = CG(tol=1e-14, max_iter=3).solve(lambda x: torch.einsum("bij,bj->bi", A, x), b)
    assert not res.converged.any() and res.nstep.tolist() == [3, 3, 3, 3]
    assert res.n_failed == 4 and "cg" in res.summary()


# --------------------------------------------------------------------------- LBFGSInverse
def test_lbfgs_inverse_matches_dense_bfgs_inverse():
    g = torch.Generator().manual_seed(7)
    n, m = 10, 6
    M = torch.randn(n, n, generator=g)
    A = M @ M.T + torch.eye(n)
    s = [torch.randn(n, generator=g) for _ in range(m)]
    y = [A @ si for si in s]
    H = LBFGSInverse(s, y)
    assert isinstance(H, InverseEstimate) and H.n_pairs == m
    D = dense_bfgs_inverse(s, y)
    torch.testing.assert_close(H.dense(), D)
    V = torch.randn(4, n, generator=g)
    torch.testing.assert_close(H.apply(V), V @ D.T, rtol=1e-10, atol=1e-12)  # rows: H v each
    torch.testing.assert_close(H.apply(V[0]), D @ V[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H.apply_left(V), V @ D, rtol=1e-10, atol=1e-12)  # v H, H symmetric
    assert H.transpose() is H and H.detach() is H
    torch.testing.assert_close(H @ V[1], D @ V[1], rtol=1e-10, atol=1e-12)
    # no pairs: H = I (γ = 1)
    empty = LBFGSInverse([], [], dim=3)
    torch.testing.assert_close(empty.dense(), torch.eye(3))
    torch.testing.assert_close(empty.apply(V[0, :3]), V[0, :3])


def test_lbfgs_result_inverse_is_what_shine_uses():
    pb, A, b, c = _quadratic(n=10, cond=20)
    lam = torch.zeros(10)
    inner = LBFGS(memory=5, tol=1e-10).solve(pb, lam)
    inv = inner.inverse
    assert isinstance(inv, LBFGSInverse) and inv.n_pairs == len(inner.s) <= 5
    torch.testing.assert_close(inv.dense(), dense_bfgs_inverse(inner.s, inner.y))
    _, v = pb.outer_value_and_grad(inner.x)
    hg = SHINEHypergradient().hypergradient(pb, lam, inner)
    torch.testing.assert_close(hg.w, inv.apply(v))
    assert hg.converged and hg.nstep == 0 and hg.n_hvp == 0 and hg.time_s >= 0
    # the result protocol
    for r in (inner, hg):
        assert {"converged", "nstep", "residual", "time_s"} <= set(vars(r))
        assert r.all_converged and r.n_failed == 0


# --------------------------------------------------------------------------- failure policy
@pytest.mark.parametrize("policy", ["warn", "raise", "ignore"])
def test_on_failure_policies_on_capped_cg(policy):
    pb, *_ = _quadratic(n=30, cond=1e4)
    lam = torch.full((30,), -8.0)
    inner = LBFGS(tol=1e-10, max_iter=2000).solve(pb, lam)
    est = ExactHypergradient(tol=1e-12, max_iter=3, on_failure=policy)
    if policy == "raise":
        with pytest.raises(ConvergenceError, match="ExactHypergradient: CG missed tol=1.0e-12 after 3"):
            est.hypergradient(pb, lam, inner)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hg = est.hypergradient(pb, lam, inner)
    assert not hg.converged and hg.nstep == 3 and hg.residual > 1e-12
    assert [w.category for w in caught] == ([ConvergenceWarning] if policy == "warn" else [])
    if policy == "warn":
        assert caught[0].filename == __file__  # the warning points at the caller


def test_on_failure_policies_on_capped_lbfgs():
    pb, *_ = _quadratic(n=30, cond=1e4)
    lam = torch.full((30,), -8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = LBFGS(tol=1e-12, max_iter=2, on_failure="ignore").solve(pb, lam)
    assert not res.converged and res.nstep == 2 and res.residual == res.grad_norms[-1] > 1e-12
    assert res.message == "max_iter reached" and res.time_s > 0


@pytest.mark.parametrize("B", [1, 3])
def test_cg_refuses_non_finite_products(B):
    b = torch.ones(B, 4)
    with pytest.raises(NonFiniteError, match="not finite"):
        CG().solve(lambda p: p * float("nan"), b)
    with pytest.raises(NonFiniteError, match="non-positive curvature"):
        CG().solve(lambda p: -p, b)


def test_cg_adjoint_follows_the_shared_dtype_policy_and_operand_checks():
    """CG's adjoint goes through LinearSolver.solve_adjoint like every linear solver: a bfloat16
    right-hand side is solved in float32 (the VJP sees bfloat16, w comes back in bfloat16), a tol
    below bfloat16's resolution is raised to it with a PrecisionWarning, and a NaN right-hand side
    is a NonFiniteError naming the incoming gradient."""
    import warnings

    from deqkit.errors import NonFiniteError, PrecisionWarning
    from deqkit.linear import CG

    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    S = 0.4 * (M + M.T) / float(torch.linalg.matrix_norm(M + M.T, ord=2))  # symmetric, ‖S‖ = 0.4
    v = torch.randn(3, 6, generator=g, dtype=torch.float64)
    seen = set()

    def vjp(u):
        seen.add(u.dtype)
        return u @ S.to(u.dtype)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CG(tol=1e-8, max_iter=50).solve_adjoint(vjp, v.bfloat16())
    assert seen == {torch.bfloat16} and res.z.dtype == torch.bfloat16
    assert any(issubclass(w.category, PrecisionWarning) and "bfloat16" in str(w.message) for w in caught)
    assert res.tol >= 4 * 2**-7 and bool(res.converged.all())
    want = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - S.T, v.T).T  # w (I − S) = v
    assert float((res.z.double() - want).norm() / want.norm()) < 0.05
    with pytest.raises(NonFiniteError, match="right-hand side"):
        CG().solve_adjoint(vjp, torch.full((2, 6), float("nan"), dtype=torch.float64))
