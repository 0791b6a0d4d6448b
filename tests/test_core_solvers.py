"""Forward solvers, linear (adjoint) solvers, Broyden's inverse estimate, SolverResult and DEQ modes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import (
    F64,
    FORWARD_NAMES,
    ConvCell,
    LinearCell,
    TanhCell,
    randn,
    rel_err,
    tight_forward_solvers,
    tight_linear_solvers,
)

import deqkit.inverse as dk_inverse
from deqkit import DEQ, GMRES, Anderson, Broyden, BroydenState, Dense, Exact, FixedPoint, SolverResult
from deqkit.linear import as_linear_solver


def _linear_fn(cell, x):
    return lambda z: cell(z, x)


def _closed_form_z(cell, x):
    d = cell.A.shape[0]
    eye = torch.eye(d, dtype=F64)
    with torch.no_grad():
        return torch.linalg.solve(eye - cell.A, (x @ cell.B.T).T).T


# ---------------------------------------------------------------------------------------------
# forward solvers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_forward_solver_reaches_closed_form(name, linear_problem):
    cell, x, _ = linear_problem
    solver = tight_forward_solvers()[name]
    with torch.no_grad():
        res = solver(_linear_fn(cell, x), torch.zeros(x.shape[0], cell.A.shape[0], dtype=F64))
    assert res.all_converged
    assert res.z.dtype == F64
    assert rel_err(res.z, _closed_form_z(cell, x)) < 1e-10
    assert bool((res.rel_residual <= 1e-12).all())


def test_accelerated_solvers_need_fewer_steps_than_picard():
    """On a slowly contracting linear map (ρ = 0.95) Anderson and Broyden beat plain iteration."""
    cell = LinearCell(10, 4, rho=0.95, seed=3)
    x = randn(2, 4, seed=4)
    z0 = torch.zeros(2, 10, dtype=F64)
    with torch.no_grad():
        steps = {n: int(s(_linear_fn(cell, x), z0).nstep.max()) for n, s in tight_forward_solvers(1e-10).items()}
    assert steps["anderson"] < steps["fixed-point"] / 2
    assert steps["broyden"] < steps["fixed-point"] / 2


def _per_sample_problem():
    """``f(z) = tanh(c_b W z + x_b)``: samples contract at different rates (c = 0.05, 0.5, 0.9)."""
    d, B = 6, 3
    W = randn(d, d, seed=11)
    W = W / torch.linalg.matrix_norm(W, ord=2)
    c = torch.tensor([0.05, 0.5, 0.9], dtype=F64)
    x = randn(B, d, seed=12)

    def fn_for(cs, xs):
        return lambda z: torch.tanh(cs[:, None] * (z @ W.T) + xs)

    return fn_for, c, x


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_per_sample_stopping_matches_solving_each_sample_alone(name):
    fn_for, c, x = _per_sample_problem()
    solver = {
        "fixed-point": FixedPoint(tol=1e-10, max_iter=300, freeze_converged=True),
        "anderson": Anderson(tol=1e-10, max_iter=300, freeze_converged=True),
        "broyden": Broyden(memory=30, tol=1e-10, max_iter=300, freeze_converged=True),
    }[name]
    seen = []

    def recording(z):
        seen.append(z.clone())
        return fn_for(c, x)(z)

    batch = solver(recording, torch.zeros_like(x))
    assert batch.all_converged
    assert len(set(batch.nstep.tolist())) == 3, f"samples should stop at different steps, got {batch.nstep.tolist()}"
    for b in range(3):
        alone = solver(fn_for(c[b : b + 1], x[b : b + 1]), torch.zeros_like(x[b : b + 1]))
        assert int(alone.nstep[0]) == int(batch.nstep[b])
        assert bool(alone.converged[0]) == bool(batch.converged[b])
        torch.testing.assert_close(batch.z[b], alone.z[0], rtol=0, atol=1e-13)
        torch.testing.assert_close(batch.abs_trace[: int(batch.nstep[b]), b], alone.abs_trace[:, 0], rtol=1e-9, atol=1e-15)
        # once sample b has converged (its last evaluation is number nstep_b), its iterate is frozen
        n_b = int(batch.nstep[b])
        frozen = seen[n_b - 1][b]
        for later in seen[n_b:]:
            assert torch.equal(later[b], frozen)
        assert torch.equal(batch.z[b], frozen)
        assert not torch.equal(seen[0][b], frozen)  # it did move before freezing


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_by_default_the_batch_iterates_until_its_last_sample_converges(name):
    """Default (``freeze_converged=False``): no sample stops before the slowest one; each sample's
    result is its best iterate over the batch's iterations, so it is at least as close to its fixed
    point as with freezing, and the fast samples far closer, for the same batch step count."""
    fn_for, c, x = _per_sample_problem()
    opts = {"tol": 1e-8, "max_iter": 300}
    make = {"fixed-point": FixedPoint, "anderson": Anderson, "broyden": lambda **k: Broyden(memory=30, **k)}[name]
    frozen = make(**opts, freeze_converged=True)(fn_for(c, x), torch.zeros_like(x))
    batch = make(**opts)(fn_for(c, x), torch.zeros_like(x))
    n = int(frozen.nstep.max())
    assert len(set(frozen.nstep.tolist())) == 3
    assert batch.nstep.tolist() == [n] * 3  # the slowest sample's count, for every sample
    assert batch.all_converged
    assert (batch.residual <= frozen.residual).all()
    fast = frozen.nstep < n
    assert (batch.residual[fast] < 1e-2 * frozen.residual[fast]).all(), (batch.residual, frozen.residual)
    # each sample's iterates are its own: solved alone for the batch's count, it ends the same (Broyden
    # to rounding only: once a sample met the tolerance its H stops changing, while alone, with a tol
    # out of reach, it goes on updating H, so the last few iterates differ at the rounding level)
    atol = 1e-12 if name == "broyden" else 1e-13
    for b in range(3):
        alone = make(tol=1e-300, max_iter=n, stop_mode="abs")(fn_for(c[b : b + 1], x[b : b + 1]), torch.zeros_like(x[b : b + 1]))
        torch.testing.assert_close(batch.z[b], alone.z[0], rtol=0, atol=atol)


@pytest.mark.parametrize("opa_freq", [None, 2])
def test_broyden_keeps_a_converged_samples_inverse_while_its_batch_goes_on(opa_freq):
    """A sample that met the tolerance and keeps iterating with its batch adds no more secant (or
    OPA) updates to its H: its steps are then near the rounding level. Its inverse estimate is the
    one it had when it converged, i.e. the one ``freeze_converged=True`` returns (what SHINE reads)."""
    fn_for, c, x = _per_sample_problem()
    opts = {"memory": 60, "tol": 1e-8, "max_iter": 300, "opa_freq": opa_freq}
    call = {} if opa_freq is None else {"loss_grad": lambda z: z.clone()}  # ∇ of ½‖z‖²
    frozen = Broyden(**opts, freeze_converged=True)(fn_for(c, x), torch.zeros_like(x), **call)
    batch = Broyden(**opts)(fn_for(c, x), torch.zeros_like(x), **call)
    assert len(set(frozen.nstep.tolist())) == 3 and batch.nstep.tolist() == [int(frozen.nstep.max())] * 3
    v = randn(3, x.shape[1], seed=31)
    torch.testing.assert_close(batch.inverse.apply(v), frozen.inverse.apply(v), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(batch.inverse.apply_left(v), frozen.inverse.apply_left(v), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("damping", [1.0, 0.7])
def test_anderson_batched_and_elementwise_history_products_agree(monkeypatch, damping):
    """Wide states take Anderson's history products as ``bmm`` (narrow ones elementwise, faster on
    the CPU there): the same iterates either way (float64)."""
    import deqkit.solvers.anderson as anderson_mod

    d, B = 130, 4
    W = randn(d, d, seed=21)
    W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)
    x = randn(B, d, seed=22)

    def fn(z):
        return torch.tanh(z @ W.T + x)

    solver = Anderson(tol=1e-12, max_iter=60, damping=damping)
    batched = solver(fn, torch.zeros_like(x))
    monkeypatch.setattr(anderson_mod, "_BMM_MIN_DIM", d + 1)
    elementwise = solver(fn, torch.zeros_like(x))
    assert batched.nstep.tolist() == elementwise.nstep.tolist() and batched.all_converged
    torch.testing.assert_close(batched.abs_trace, elementwise.abs_trace, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(batched.z, elementwise.z, rtol=0, atol=1e-12)


def test_anderson_keeps_a_sample_at_an_exact_fixed_point_finite():
    """A sample whose residual is exactly zero (here a constant map) goes on iterating with its batch:
    its zero Gram row must not turn Anderson's mixing weights into inf/NaN."""
    fn_for, c, x = _per_sample_problem()
    c = c.clone()
    c[0] = 0.0  # f(z) = tanh(x₀): g = 0 from the second iterate on
    res = Anderson(tol=1e-10, max_iter=100)(fn_for(c, x), torch.zeros_like(x))
    assert res.all_converged and torch.isfinite(res.z).all()
    assert float(res.abs_residual[0]) == 0.0


# ---------------------------------------------------------------------------------------------
# SolverResult
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORWARD_NAMES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_solver_result_fields(name, stop_mode):
    fn_for, c, x = _per_sample_problem()
    fn = fn_for(c, x)
    cls = {"fixed-point": FixedPoint, "anderson": Anderson, "broyden": Broyden}[name]
    tol = 1e-8
    res = cls(tol=tol, max_iter=200, stop_mode=stop_mode)(fn, torch.zeros_like(x))
    assert isinstance(res, SolverResult)
    B = x.shape[0]
    T = res.abs_trace.shape[0]
    assert res.abs_trace.shape == (T, B) and res.rel_trace.shape == (T, B)
    assert T == int(res.nstep.max())
    assert res.nstep.shape == (B,) and res.nstep.dtype == torch.long
    assert res.converged.shape == (B,) and res.converged.dtype == torch.bool
    assert res.stop_mode == stop_mode and res.tol == tol and res.max_iter == 200 and res.solver == cls.__name__
    trace = res.rel_trace if stop_mode == "rel" else res.abs_trace
    for b in range(B):
        n = int(res.nstep[b])
        # the returned residual is the best (lowest) of the sample's own iterations ...
        assert float(res.residual[b]) == pytest.approx(float(trace[:n, b].min()), rel=1e-12)
        # ... a frozen sample repeats its last value in the traces ...
        assert torch.equal(trace[n:, b], trace[n - 1, b].expand(T - n))
    # ... the best-so-far residual is monotone non-increasing ...
    best = torch.cummin(trace, dim=0).values
    assert bool((best[1:] <= best[:-1]).all())
    assert torch.equal(best[-1], res.residual)
    # ... and it is the true residual of the returned iterate
    fz = fn(res.z)
    abs_res = (fz - res.z).norm(dim=1)
    torch.testing.assert_close(res.abs_residual, abs_res, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(res.rel_residual, abs_res / (fz.norm(dim=1) + torch.finfo(F64).eps), rtol=1e-9, atol=1e-15)
    assert torch.equal(res.converged, res.residual <= tol)
    assert res.all_converged and res.n_failed == 0
    # the result protocol shared with every iterative solve in deqkit
    from deqkit.results import IterativeResult, ResultMixin

    assert isinstance(res, ResultMixin) and isinstance(res, IterativeResult)
    assert isinstance(res.time_s, float) and res.time_s > 0
    assert res.inverse is None or isinstance(res.inverse, dk_inverse.InverseEstimate)


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_max_iter_reached_marks_not_converged(name):
    fn_for, c, x = _per_sample_problem()
    cls = {"fixed-point": FixedPoint, "anderson": Anderson, "broyden": Broyden}[name]
    res = cls(tol=1e-14, max_iter=3)(fn_for(c, x), torch.zeros_like(x))
    assert res.abs_trace.shape[0] == 3
    assert bool((res.nstep == 3).all())
    assert not bool(res.converged.any())
    assert res.n_failed == 3 and not res.all_converged
    assert "0/3 samples converged" in res.summary()
    # a mixed batch: the fast sample converges, the slow ones do not
    res = FixedPoint(tol=1e-6, max_iter=8)(fn_for(c, x), torch.zeros_like(x))
    assert res.converged.tolist() == [True, False, False]


def test_deq_info_reports_nonconvergence():
    cell = TanhCell(6, 4, rho=0.9, seed=2)
    x = randn(3, 4, seed=3)
    deq = DEQ(cell, FixedPoint(tol=1e-14, max_iter=2), state_shape=(6,), on_failure="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'ignore' must not warn
        z, info = deq(x)
    assert info.converged.tolist() == [False, False, False]
    assert info.nstep.tolist() == [2, 2, 2]
    assert torch.equal(info.abs_residual, info.forward.abs_residual)


# ---------------------------------------------------------------------------------------------
# linear (adjoint) solvers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gmres", "dense", "fixed-point", "anderson", "broyden"])
def test_linear_solvers_solve_adjoint_closed_form(name):
    """``w = wJ + v`` for a per-sample dense ``J`` (ρ(J) < 1) against ``v (I − J)⁻¹``."""
    B, d = 3, 7
    J = torch.stack([0.6 * M / torch.linalg.matrix_norm(M, ord=2) for M in randn(B, d, d, seed=5)])
    v = randn(B, d, seed=6)
    vjp = lambda u: torch.einsum("bi,bij->bj", u, J)
    w_ref = torch.linalg.solve((torch.eye(d, dtype=F64) - J).transpose(1, 2), v.unsqueeze(-1)).squeeze(-1)
    solver = as_linear_solver(tight_linear_solvers()[name])
    res = solver.solve_adjoint(vjp, v)
    assert res.all_converged, res.summary()
    assert rel_err(res.z, w_ref) < 1e-10
    # warm start at the answer: converged at once (GMRES/Dense) or within a step or two
    res2 = solver.solve_adjoint(vjp, v, w0=w_ref.clone())
    assert res2.all_converged
    assert int(res2.nstep.max()) <= (d if name == "dense" else 2)
    # one residual definition for every adjoint solver: ‖w − wJ − v‖ / ‖v‖ of the returned w
    for r in (res, res2):
        true_abs = (r.z - vjp(r.z) - v).norm(dim=1)
        torch.testing.assert_close(r.abs_residual, true_abs, rtol=1e-6, atol=1e-15)
        torch.testing.assert_close(r.rel_residual, true_abs / (v.norm(dim=1) + torch.finfo(F64).eps), rtol=1e-6, atol=1e-15)
        assert isinstance(r.time_s, float) and r.time_s >= 0


def test_gmres_respects_restart_and_cap():
    B, d = 2, 30
    J = torch.stack([0.9 * M / torch.linalg.matrix_norm(M, ord=2) for M in randn(B, d, d, seed=9)])
    v = randn(B, d, seed=10)
    vjp = lambda u: torch.einsum("bi,bij->bj", u, J)
    capped = GMRES(restart=5, tol=1e-14, max_iter=7).solve_adjoint(vjp, v)
    assert int(capped.nstep.max()) <= 7
    assert not capped.all_converged
    full = GMRES(restart=5, tol=1e-12, max_iter=400).solve_adjoint(vjp, v)
    assert full.all_converged
    w_ref = torch.linalg.solve((torch.eye(d, dtype=F64) - J).transpose(1, 2), v.unsqueeze(-1)).squeeze(-1)
    assert rel_err(full.z, w_ref) < 1e-10


def test_dense_jacobian_matches_autograd():
    cell = TanhCell(5, 3, rho=0.5, seed=4)
    x = randn(2, 3, seed=5)
    z = randn(2, 5, seed=6).requires_grad_()
    f = cell(z, x)
    vjp = lambda u: torch.autograd.grad(f, z, u, retain_graph=True)[0]
    J = Dense().jacobian(vjp, torch.zeros(2, 5, dtype=F64))
    for b in range(2):
        J_ref = torch.autograd.functional.jacobian(lambda zz: cell(zz[None], x[b : b + 1])[0], z[b].detach())
        torch.testing.assert_close(J[b], J_ref, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Broyden's inverse-Jacobian estimate
# ---------------------------------------------------------------------------------------------


def _linear_g_problem(d=6, B=2, rho=0.7, seed=20):
    A = torch.stack([rho * M / torch.linalg.matrix_norm(M, ord=2) for M in randn(B, d, d, seed=seed)])
    bias = randn(B, d, seed=seed + 1)
    fn = lambda z: torch.einsum("bij,bj->bi", A, z) + bias
    Jg = A - torch.eye(d, dtype=F64)
    return fn, Jg, bias


def test_broyden_memory_is_bounded():
    fn_for, c, x = _per_sample_problem()
    res = Broyden(memory=3, tol=1e-300, max_iter=60, stop_mode="abs")(fn_for(c, x), torch.zeros_like(x))
    assert res.inverse.U.shape == (3, 6, 3) and res.inverse.V.shape == (3, 6, 3)
    assert res.inverse.memory == 3
    assert res.inverse.n_updates > 3  # the ring buffer wrapped


def test_broyden_apply_and_apply_left_agree_with_dense():
    fn, _, _ = _linear_g_problem()
    res = Broyden(memory=4, tol=1e-14, max_iter=9)(fn, torch.zeros(2, 6, dtype=F64))
    H = res.inverse.dense()
    assert H.shape == (2, 6, 6)
    assert float((H + torch.eye(6, dtype=F64)).abs().max()) > 1e-3  # not the initial −I
    u = randn(2, 6, seed=30)
    torch.testing.assert_close(res.inverse.apply(u), torch.einsum("bij,bj->bi", H, u), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.inverse.apply_left(u), torch.einsum("bi,bij->bj", u, H), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("memory", [20, 3])
def test_broyden_secant_equation_for_latest_pair(memory):
    """After the solve, the returned ``H`` maps the last ``Δg`` to the last ``Δz``: ``H Δg = Δz``.

    For the linear ``g(z) = (A − I) z + b``, ``Δg = J_g Δz`` exactly, so the check is
    ``‖H J_g Δz − Δz‖ ≤ 1e-10 ‖Δz‖`` with ``Δz`` the difference of the last two evaluated
    iterates. It must hold also once the ring buffer has wrapped (memory=3 < number of updates).
    """
    fn, Jg, _ = _linear_g_problem()
    seen = []

    def recording(z):
        seen.append(z.clone())
        return fn(z)

    res = Broyden(memory=memory, tol=1e-300, max_iter=8, stop_mode="abs")(recording, torch.zeros(2, 6, dtype=F64))
    assert bool((res.nstep == 8).all())
    if memory == 3:
        assert res.inverse.n_updates > memory
    dz = seen[-1] - seen[-2]
    dg = torch.einsum("bij,bj->bi", Jg, dz)
    assert float(dz.norm(dim=1).min()) > 1e-8  # a genuine step, not round-off
    err = (res.inverse.apply(dg) - dz).norm(dim=1) / dz.norm(dim=1)
    assert float(err.max()) < 1e-10, err


def test_broyden_is_exact_secant_method_in_one_dimension():
    """With d = 1 the secant equation fixes ``H``: after one update ``H = J_g⁻¹`` exactly,
    so on a linear map Broyden converges at its third evaluation (z₀, z₁, then the root)."""
    a = torch.tensor([[0.3], [-0.6], [0.9]], dtype=F64)
    bias = torch.tensor([[1.0], [2.0], [-0.5]], dtype=F64)
    fn = lambda z: a * z + bias
    res = Broyden(memory=5, tol=1e-13, max_iter=10)(fn, torch.zeros(3, 1, dtype=F64))
    assert res.all_converged
    assert res.nstep.tolist() == [3, 3, 3]
    torch.testing.assert_close(res.z, bias / (1 - a), rtol=1e-13, atol=0)
    torch.testing.assert_close(res.inverse.dense()[:, 0, 0], 1 / (a[:, 0] - 1), rtol=1e-12, atol=0)


def test_broyden_state_update_skips_masked_and_degenerate_samples():
    U, V = torch.zeros(2, 3, 2, dtype=F64), torch.zeros(2, 3, 2, dtype=F64)
    st = BroydenState(U, V)
    dz = randn(2, 3, seed=40)
    dg = randn(2, 3, seed=41)
    st.update(dz, dg, torch.tensor([True, False]))
    torch.testing.assert_close(st.apply(dg)[0], dz[0], rtol=1e-12, atol=1e-14)
    assert torch.equal(st.dense()[1], -torch.eye(3, dtype=F64))  # masked sample unchanged
    st.update(torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64), torch.tensor([True, True]))
    assert torch.isfinite(st.U).all() and torch.isfinite(st.V).all()


@pytest.mark.parametrize("filled", [None, 2, 4])
def test_broyden_state_update_returns_the_product_after_it(filled):
    """``update(..., h_dg=H dg, x=x, hx=H x)`` returns ``H x`` after the update without a product
    with ``H``: equal to ``apply(x)`` afterwards, for a ring that is full (``filled=None`` or 4:
    the overwritten column leaves) or not (2), with a masked and a degenerate sample, and with
    ``h_dg`` given or computed. Columns past ``filled`` are zero, as in a solve."""
    B, d, m = 4, 5, 4
    U, V = randn(B, d, m, seed=50), randn(B, d, m, seed=51)
    if filled is not None:
        U[:, :, filled:] = 0
        V[:, :, filled:] = 0
    n = 6 if filled in (None, 4) else 2
    dz, dg, x = randn(B, d, seed=52), randn(B, d, seed=53), randn(B, d, seed=54)
    dz[3] = 0  # degenerate pair: no update
    mask = torch.tensor([True, False, True, True])
    for give_h_dg in (False, True):
        st = BroydenState(U.clone(), V.clone(), n, filled=filled)
        dense_before = st.dense()
        hx = st.apply(x)
        h_dg = st.apply(dg) if give_h_dg else None
        out = st.update(dz, dg, mask, h_dg=h_dg, x=x, hx=hx)
        torch.testing.assert_close(out, st.apply(x), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(st.apply(dg)[[0, 2]], dz[[0, 2]], rtol=1e-10, atol=1e-12)  # secant equation
        torch.testing.assert_close(st.dense()[[1, 3]], dense_before[[1, 3]], rtol=0, atol=0)  # unchanged


def test_broyden_state_products_skip_only_unwritten_columns():
    """``filled=k`` uses columns ``[0, k)``: the same products as all columns when the rest are zero."""
    U, V = randn(2, 6, 5, seed=60), randn(2, 6, 5, seed=61)
    U[:, :, 3:] = 0
    V[:, :, 3:] = 0
    x = randn(2, 6, seed=62)
    full, part = BroydenState(U, V, 3), BroydenState(U, V, 3, filled=3)
    torch.testing.assert_close(part.apply(x), full.apply(x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(part.apply_left(x), full.apply_left(x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(part.transpose().apply(x), full.apply_left(x), rtol=1e-14, atol=1e-14)
    assert torch.equal(BroydenState(U, V, 0, filled=0).apply(x), -x)


class _FreshProductsBroyden(Broyden):
    """Broyden that forgets the products it carries between hooks, so every one is recomputed."""

    def observe(self, state, z, fz, fresh):
        state.hg_prev = None
        super().observe(state, z, fz, fresh)
        state.hg = None


@pytest.mark.parametrize("memory", [30, 3])
def test_broyden_carried_products_give_the_solve_of_fresh_products(memory):
    """The solver carries ``H g`` between its hooks (one product with ``H`` per iteration instead
    of three); the iterates agree with recomputing every product, also after the ring wraps."""
    fn_for, c, x = _per_sample_problem()
    kw = dict(memory=memory, tol=1e-300, max_iter=25, stop_mode="abs")
    carried = Broyden(**kw)(fn_for(c, x), torch.zeros_like(x))
    fresh = _FreshProductsBroyden(**kw)(fn_for(c, x), torch.zeros_like(x))
    torch.testing.assert_close(carried.abs_trace, fresh.abs_trace, rtol=1e-8, atol=1e-13)
    assert float(carried.abs_trace[-1].max()) < 1e-6 * float(carried.abs_trace[0].max())  # a real solve
    if memory == 3:
        assert carried.inverse.n_updates > memory


# ---------------------------------------------------------------------------------------------
# state shapes and dtypes
# ---------------------------------------------------------------------------------------------


def test_conv_like_state_for_each_solver():
    """State ``(B, C, H, W)``: every solver finds the same fixed point; Exact backward works on it."""
    torch.manual_seed(0)
    cell = ConvCell(channels=2)
    x = randn(2, 2, 4, 5, seed=50)
    zs = {}
    for name, solver in tight_forward_solvers(1e-11).items():
        with torch.no_grad():
            res = solver(lambda z: cell(z, x), torch.zeros_like(x))
        assert res.z.shape == x.shape and res.all_converged, (name, res.summary())
        assert res.abs_trace.shape[1] == 2
        if name == "broyden":
            assert res.inverse.U.shape[:2] == (2, 2 * 4 * 5)
        zs[name] = res.z
    for name in zs:
        torch.testing.assert_close(zs[name], zs["fixed-point"], rtol=0, atol=1e-9)
    grads = {}
    for lin in (GMRES(tol=1e-12, max_iter=100), Dense(tol=1e-12)):
        cell.zero_grad()
        z, _ = DEQ(cell, Anderson(tol=1e-12, max_iter=200), Exact(lin))(x)
        (z**2).sum().backward()
        grads[type(lin).__name__] = cell.conv.weight.grad.clone()
    assert float(grads["Dense"].abs().max()) > 0
    torch.testing.assert_close(grads["GMRES"], grads["Dense"], rtol=1e-9, atol=1e-12)


def test_float32_smoke():
    cell64 = TanhCell(8, 5, rho=0.4, seed=60)
    cell32 = copy.deepcopy(cell64).float()
    x64 = randn(4, 5, seed=61)
    x32 = x64.float().requires_grad_()
    x64.requires_grad_()
    out = {}
    for key, cell, x, tol in (("32", cell32, x32, 1e-5), ("64", cell64, x64, 1e-12)):
        deq = DEQ(cell, Anderson(tol=tol, max_iter=100), Exact(GMRES(tol=tol, max_iter=100)), state_shape=(8,))
        z, info = deq(x)
        assert z.dtype == x.dtype and info.converged.all()
        (z.sum() + (z**2).sum()).backward()
        out[key] = (z.detach(), cell.W.grad, x.grad)
    for a, b in zip(out["32"], out["64"]):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# DEQ modes
# ---------------------------------------------------------------------------------------------


def test_deq_eval_mode_uses_eval_max_iter():
    cell = LinearCell(8, 5, rho=0.9, seed=70)
    x = randn(3, 5, seed=71)
    deq = DEQ(cell, FixedPoint(tol=1e-10, max_iter=300), state_shape=(8,), eval_max_iter=4, on_failure="ignore")
    z_train, info_train = deq(x)
    assert info_train.forward.max_iter == 300 and int(info_train.nstep.max()) > 4 and info_train.converged.all()
    deq.eval()
    with torch.no_grad():
        z_eval, info_eval = deq(x)
    assert info_eval.forward.max_iter == 4
    assert info_eval.nstep.tolist() == [4, 4, 4]
    assert not info_eval.converged.any()
    deq.train()
    _, info_again = deq(x)
    assert info_again.forward.max_iter == 300


def test_deq_no_grad_output_has_no_graph():
    cell = TanhCell(6, 4, seed=80)
    x = randn(2, 4, seed=81).requires_grad_()
    deq = DEQ(cell, Anderson(tol=1e-8, max_iter=50), state_shape=(6,))
    with torch.no_grad():
        z, _ = deq(x)
    assert not z.requires_grad and z.grad_fn is None
    z2, info = deq(x)
    assert z2.requires_grad and z2.grad_fn is not None
    assert torch.equal(z, z2)
    assert info.backward is None  # filled only when backward runs
    z2.sum().backward()
    assert info.backward is not None and info.backward.estimator == "exact"


@pytest.mark.parametrize("regularization", [0.0, 1e-10, 1e-6, 1e-4])
def test_anderson_with_full_memory_terminates_like_gmres_on_a_linear_map(regularization):
    """Anderson with memory ≥ d + 1 on a linear d-dimensional map is equivalent to GMRES (Walker &
    Ni 2011), so it reaches 1e-12 within about d + 2 residual evaluations; the scale-free
    regularisation must not spoil that (an absolute or mean-scaled λ did: 30 steps measured)."""
    d = 6
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    x = torch.randn(4, d, generator=g, dtype=torch.float64)
    res = Anderson(memory=10, regularization=regularization, tol=1e-12, max_iter=60)(
        lambda z: z @ A.T + x, torch.zeros(4, d, dtype=torch.float64)
    )
    assert res.converged.all()
    assert int(res.nstep.max()) <= d + 4
    fp = FixedPoint(tol=1e-12, max_iter=60)(lambda z: z @ A.T + x, torch.zeros(4, d, dtype=torch.float64))
    assert int(res.nstep.max()) < int(fp.nstep.min())


def test_a_solver_written_with_the_public_hooks():
    """init / observe / step / terminate / inverse / extras: a damped Picard that counts its evaluations
    in its own state and stops on its own criterion; the loop does the rest (freezing, best iterate, traces)."""
    from deqkit.solvers import Problem, Solver

    class Counting(Solver):
        def init(self, problem, z, fz):
            assert isinstance(problem, Problem) and problem.fn(z).shape == z.shape
            return {"evals": 0, "problem": problem}

        def observe(self, state, z, fz, fresh):
            state["evals"] += 1
            tracker = state["problem"].tracker  # the loop's residuals, read-only for the hooks
            assert torch.equal(tracker.residual, fz - z)
            torch.testing.assert_close(tracker.abs_residual, (fz - z).norm(dim=1), rtol=1e-14, atol=0)
            assert bool((tracker.best_rel <= tracker.rel_trace[-1]).all())

        def step(self, state, z, fz, active):
            return 0.5 * (z + fz)

        def terminate(self, state, measure, tol):
            return measure <= 10 * tol  # a looser stop than the tolerance

        def extras(self, state):
            return {"evals": state["evals"]}

    A = 0.5 * torch.eye(3, dtype=F64)
    x = randn(2, 3, seed=1)
    res = Counting(tol=1e-8, max_iter=200)(lambda z: z @ A.T + x, torch.zeros(2, 3, dtype=F64))
    assert res.extra["evals"] == int(res.nstep.max())
    assert bool((res.residual <= 1e-7).all())
    assert not res.all_converged or bool((res.residual <= 1e-8).all())  # stopping is not converging
    assert res.inverse is None and res.time_s > 0


@pytest.mark.parametrize("make", [GMRES, Dense, lambda: as_linear_solver(Anderson())])
def test_solve_adjoint_typo_gets_did_you_mean(make):
    v = torch.ones(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="Did you mean 'preconditioner'"):
        make().solve_adjoint(lambda u: 0.5 * u, v, preconditoner=None)


@pytest.mark.parametrize("damping", [1.0, 0.6])
def test_anderson_first_two_steps_match_the_closed_form(damping):
    """Anderson's hooks on a linear map ``f(z) = Az + b`` (float64, no regularisation): step 1 is the
    damped Picard step; step 2 mixes the two iterates with the weights ``α`` minimising
    ``‖α₀g₀ + α₁g₁‖`` under ``α₀ + α₁ = 1`` (closed form ``α₁ = −⟨g₀, g₁ − g₀⟩/‖g₁ − g₀‖²``), which a
    second Picard step would not give."""
    from deqkit.solvers.base import Problem

    g = torch.Generator().manual_seed(4)
    B, d = 3, 7
    A = 0.5 * torch.randn(B, d, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(B, d, generator=g, dtype=torch.float64)
    f = lambda z: torch.einsum("bij,bj->bi", A, z) + b  # noqa: E731
    solver = Anderson(memory=5, regularization=0.0, damping=damping)
    z0 = torch.randn(B, d, generator=g, dtype=torch.float64)
    state = solver.init(Problem(f, z0.shape, max_iter=10, tol=1e-8), z0, f(z0))
    active = torch.ones(B, dtype=torch.bool)
    solver.observe(state, z0, f(z0), active)
    z1 = solver.step(state, z0, f(z0), active)
    torch.testing.assert_close(z1, z0 + damping * (f(z0) - z0), rtol=1e-13, atol=1e-13)
    solver.observe(state, z1, f(z1), active)
    z2 = solver.step(state, z1, f(z1), active)
    g0, g1 = f(z0) - z0, f(z1) - z1
    a1 = -((g0 * (g1 - g0)).sum(1) / ((g1 - g0) ** 2).sum(1)).unsqueeze(1)
    a0 = 1 - a1
    want = a0 * (z0 + damping * g0) + a1 * (z1 + damping * g1)
    torch.testing.assert_close(z2, want, rtol=1e-9, atol=1e-9)
    picard = z1 + damping * g1
    assert float((z2 - picard).abs().max()) > 1e-3, "the second step must differ from a Picard step"
