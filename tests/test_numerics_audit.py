"""Checks written for the mutants a sampled mutation run left alive (TESTING.md, "Mutation check").

Each test pins a behaviour that the answer-level tests do not see: Anderson's regularised mixing
weights, the clock of a linear solve, a zero right-hand side, the contraction rate AutoAdjoint
reads off its Picard phase and the hand-over it decides from it, and Broyden's buffer estimate.
"""

from __future__ import annotations

import time

import pytest
import torch

from deqkit import Anderson, Broyden, FixedPoint
from deqkit.linear import GMRES, AutoAdjoint, Dense, FixedPointAdjoint
from deqkit.solvers.base import Problem

F64 = torch.float64


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _linear_map(B: int, d: int, scale: float, seed: int):
    A = scale * randn(B, d, d, seed=seed) / d**0.5
    b = randn(B, d, seed=seed + 1)
    return lambda z: torch.einsum("bij,bj->bi", A, z) + b


@pytest.mark.parametrize("reg", [0.5, 0.05])
def test_anderson_regularised_weights_match_the_scale_free_closed_form(reg):
    """With regularisation λ the mixing weights solve ``(G + λ·diag(G)) a = 1``, ``α = a / Σa``
    (the Gram matrix ``G = [⟨gᵢ, gⱼ⟩]`` regularised relative to its own diagonal): a sign or scale
    error in the regularisation moves the step by far more than the 1e-10 checked here."""
    B, d = 2, 6
    f = _linear_map(B, d, 0.6, seed=3)
    solver = Anderson(memory=4, regularization=reg)
    z = randn(B, d, seed=9)
    state = solver.init(Problem(f, z.shape, max_iter=10, tol=1e-8), z, f(z))
    active = torch.ones(B, dtype=torch.bool)
    zs, gs = [], []
    for _ in range(3):
        fz = f(z)
        solver.observe(state, z, fz, active)
        zs.append(z)
        gs.append(fz - z)
        z_next = solver.step(state, z, fz, active)
        if len(zs) >= 2:
            X, G = torch.stack(zs, 1), torch.stack(gs, 1)  # (B, n, d)
            gram = G @ G.transpose(1, 2)
            n = gram.shape[-1]
            a = torch.linalg.solve(gram + reg * torch.diag_embed(gram.diagonal(dim1=1, dim2=2)), torch.ones(B, n, 1, dtype=F64))
            alpha = (a / a.sum(1, keepdim=True)).squeeze(-1)
            want = (alpha.unsqueeze(-1) * (X + G)).sum(1)
            torch.testing.assert_close(z_next, want, rtol=1e-10, atol=1e-10)
        z = z_next


def test_linear_solve_time_is_the_wall_clock_of_the_call():
    """``result.time_s`` lies between the VJPs' own sleep (every solve here makes at least two
    VJPs of 10 ms) and the caller's own measurement of the call."""
    J = 0.5 * torch.eye(4, dtype=F64).expand(2, 4, 4)
    v = randn(2, 4, seed=1)

    calls = []

    def slow_vjp(u):
        calls.append(1)
        time.sleep(0.01)
        return torch.einsum("bi,bij->bj", u, J)

    for solver in (GMRES(tol=1e-10), AutoAdjoint(tol=1e-10), FixedPointAdjoint(FixedPoint(tol=1e-10, max_iter=100))):
        calls.clear()
        t0 = time.perf_counter()
        res = solver.solve_adjoint(slow_vjp, v)
        wall = time.perf_counter() - t0
        assert len(calls) >= 2 and 0.01 * len(calls) <= res.time_s <= wall, (type(solver).__name__, res.time_s, wall)


@pytest.mark.parametrize(
    "solver",
    [GMRES(), AutoAdjoint(), Dense(), FixedPointAdjoint(FixedPoint(tol=1e-8, max_iter=200))],
    ids=lambda s: type(s).__name__,
)
def test_a_zero_right_hand_side_row_is_solved_at_once(solver):
    """A sample whose incoming gradient is 0 (its loss does not depend on z*) has ``w = 0``: it
    converges with ``w`` exactly 0, while the other samples are solved as usual."""
    B, d = 3, 5
    J = torch.stack([0.5 * M / torch.linalg.matrix_norm(M, ord=2) for M in randn(B, d, d, seed=2)])
    v = randn(B, d, seed=4)
    v[1] = 0.0
    res = solver.solve_adjoint(lambda u: torch.einsum("bi,bij->bj", u, J), v)
    assert bool(res.converged.all()), res.summary()
    assert float(res.z[1].abs().max()) == 0.0
    if isinstance(solver, GMRES):  # zero residual at the start: the row takes no Krylov step
        assert int(res.nstep[1]) == 0 and int(res.nstep.max()) > 0
    w_ref = torch.linalg.solve((torch.eye(d, dtype=F64) - J).transpose(1, 2), v.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(res.z, w_ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("rho, switches", [(0.5, False), (0.7, False), (0.88, True), (0.95, True)])
def test_auto_adjoint_reads_the_contraction_rate_and_hands_over_above_switch_rate(rho, switches):
    """On ``J = ρ·I`` every Picard step shrinks the residual by exactly ``ρ``: the rate AutoAdjoint
    records is ``ρ`` (to 1e-5: the last residuals, near 1e-10, carry rounding), and it hands over to GMRES after its probe steps exactly when
    ``ρ > switch_rate`` (0.8); GMRES then finishes in one step (the Krylov space of ``ρ·I`` is one-dimensional)."""
    B, d = 2, 6
    v = randn(B, d, seed=7)
    solver = AutoAdjoint(tol=1e-10, max_iter=400)
    res = solver.solve_adjoint(lambda u: rho * u, v)
    assert res.all_converged
    assert res.extra["rate"] == pytest.approx(rho, abs=1e-5)
    assert (res.extra["switched_at"] is not None) == switches
    if switches:
        assert res.extra["switched_at"] == solver.probe + 1 and res.extra["gmres_steps"] == 1
    else:  # Picard all the way: from w = v the k-th VJP shows the residual ρᵏ‖v‖
        import math

        assert res.extra["fixed_point_steps"] == math.ceil(math.log(1e-10) / math.log(rho))
    torch.testing.assert_close(res.z, v / (1 - rho), rtol=1e-9, atol=1e-12)


def test_broyden_state_estimate_covers_its_buffers():
    """``state_bytes`` counts ``U`` and ``V`` (``2·B·d·columns``) plus eight ``(B, d)`` vectors, in
    the state dtype; ``buffer_columns`` is the memory, capped by the updates a solve can make."""
    solver = Broyden(memory=30, max_iter=12)
    assert solver.buffer_columns() == 11  # max_iter − 1 secant updates
    assert Broyden(memory=5, max_iter=12).buffer_columns() == 5
    assert Broyden(memory=30, max_iter=12, opa_freq=4).buffer_columns() == 11 + 3
    z0 = torch.zeros(3, 10, dtype=torch.bfloat16)  # the state is float32 whatever the map's dtype
    assert solver.state_bytes(z0) == 4 * 3 * 10 * (2 * 11 + 8)
    f = _linear_map(3, 10, 0.5, seed=1)
    res = solver(lambda z: f(z.double()).float(), torch.zeros(3, 10))
    H = res.inverse
    assert H.U.numel() * H.U.element_size() * 2 <= solver.state_bytes(torch.zeros(3, 10))


def test_cg_started_at_the_solution_takes_no_step():
    """CG's step count is the iterations it ran: 0 from an exact start (one system and a batch)."""
    from deqkit.linear import CG

    d = 5
    M = randn(d, d, seed=3)
    S = 0.3 * (M + M.T) / float(torch.linalg.matrix_norm(M + M.T, ord=2))
    for B in (1, 3):
        v = randn(B, d, seed=B)
        w = torch.linalg.solve(torch.eye(d, dtype=F64) - S, v.T).T
        res = CG(tol=1e-8).solve_adjoint(lambda u: u @ S, v, w0=w.clone())
        assert res.nstep.tolist() == [0] * B and bool(res.converged.all())
        cold = CG(tol=1e-8).solve_adjoint(lambda u: u @ S, v)
        assert int(cold.nstep.min()) >= 1


def test_exact_tol_is_used_when_the_forward_match_is_off():
    """``Exact(linear_solver, tol=t, match_forward=False)`` solves the adjoint to ``t``, not to the
    linear solver's own tolerance."""
    import deqkit as dk

    torch.manual_seed(0)
    deq = dk.DEQ(
        dk.MLPCell(8, input_dim=4),
        dk.Anderson(tol=1e-4, max_iter=100),
        dk.Exact(GMRES(tol=1e-2), tol=1e-9, match_forward=False),
        state_shape=(8,),
    ).double()
    z, info = deq(torch.randn(5, 4, dtype=F64))
    z.square().sum().backward()
    assert info.backward.solve.tol == 1e-9 and float(info.backward.solve.rel_residual.max()) <= 1e-9
    matched = dk.DEQ(
        deq.cell, dk.Anderson(tol=1e-4, max_iter=100), dk.Exact(GMRES(tol=1e-2), tol=1e-9), state_shape=(8,)
    ).double()
    z, info = matched(torch.randn(5, 4, dtype=F64))
    z.square().sum().backward()
    assert info.backward.solve.tol > 1e-9  # matched to the forward's ~1e-4


def test_every_registered_estimator_reports_its_own_name():
    """``info.backward.estimator`` is the name the estimator is registered under (the training logs
    and ``deqkit compare`` group by it)."""
    import deqkit as dk
    from deqkit.registry import ESTIMATORS

    torch.manual_seed(0)
    cell = dk.MLPCell(6, input_dim=3).double()
    for name in ESTIMATORS.names():
        est = ESTIMATORS.make(name)
        assert est.name == name
        solver = dk.Broyden(tol=1e-8, max_iter=60)
        z, info = dk.DEQ(cell, solver, est, on_failure="ignore", state_shape=(6,))(torch.randn(4, 3, dtype=F64))
        z.square().sum().backward()
        if info.backward is not None and name != "adaptive":
            assert info.backward.estimator == name, (name, info.backward.estimator)


@pytest.mark.parametrize("n, calls", [(3, 20), (4, 7), (2, 64)])
def test_iterate_recorder_keeps_evenly_spaced_iterates(n, calls):
    """The fixed-point-correction recorder keeps every ``stride``-th map input (the stride doubling
    when ``2n`` are held): the kept inputs are ``0, s, 2s, …`` and ``select`` returns ``n``
    increasing iterates ending at ``z*``."""
    from deqkit.deq import _IterateRecorder

    rec = _IterateRecorder(n)
    for i in range(calls):
        rec(torch.tensor(float(i)))
    kept = [int(t) for t in rec.kept]
    s = rec.stride
    assert kept == list(range(0, calls, s)) and len(kept) < 2 * n and s & (s - 1) == 0
    chosen = [float(t) for t in rec.select(torch.tensor(float(calls)))]
    assert len(chosen) == min(n, len(kept)) and chosen[-1] == calls
    assert all(a < b for a, b in zip(chosen, chosen[1:]))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_auto_adjoint_forecast_does_not_depend_on_the_gradient_scale(scale):
    """The Picard steps still needed are read off the ratio target/residual, which does not change
    when ``v`` is scaled: at ρ = 0.7 with 80 VJPs allowed (65 needed) no scale hands over to GMRES."""
    v = scale * randn(2, 6, seed=7)
    res = AutoAdjoint(tol=1e-10, max_iter=80).solve_adjoint(lambda u: 0.7 * u, v)
    assert res.all_converged and res.extra["switched_at"] is None and res.extra["fixed_point_steps"] == 65


def test_auto_adjoint_hands_over_when_picard_cannot_finish_within_max_iter():
    """ρ = 0.7 is below ``switch_rate``, but Picard needs ⌈log(1e-10)/log 0.7⌉ = 65 VJPs and only
    40 are allowed: after its probe steps AutoAdjoint forecasts that and hands over to GMRES, which
    converges (Picard alone would stop unconverged at the cap)."""
    v = randn(2, 6, seed=7)
    res = AutoAdjoint(tol=1e-10, max_iter=40).solve_adjoint(lambda u: 0.7 * u, v)
    assert res.all_converged and res.extra["switched_at"] == AutoAdjoint().probe + 1
    plain = FixedPointAdjoint(FixedPoint(tol=1e-10, max_iter=40)).solve_adjoint(lambda u: 0.7 * u, v)
    assert not bool(plain.converged.any())


def test_admm_over_relaxation_reaches_the_same_solution():
    """Over-relaxed ADMM (α = 1.6) solves the same SIM row problems as plain ADMM (α = 1), to the
    solver's tolerance, and in no more iterations on this well-conditioned problem."""
    from deqkit.sim import BatchedADMM

    g = torch.Generator().manual_seed(0)
    phi = torch.randn(200, 12, generator=g, dtype=F64)
    z = phi @ (torch.randn(12, 5, generator=g, dtype=F64) * (torch.rand(12, 5, generator=g, dtype=F64) > 0.5))
    z = z + 0.01 * torch.randn(z.shape, generator=g, dtype=F64)
    plain = BatchedADMM(alpha=1.0, tol_abs=1e-10, tol=1e-9, max_iter=5000).solve(phi, z.T, 0.5)
    relaxed = BatchedADMM(alpha=1.6, tol_abs=1e-10, tol=1e-9, max_iter=5000).solve(phi, z.T, 0.5)
    assert bool(plain.converged.all()) and bool(relaxed.converged.all())
    torch.testing.assert_close(relaxed.beta, plain.beta, rtol=1e-5, atol=1e-6)
    assert int(relaxed.nstep.max()) <= int(plain.nstep.max())


def test_gradient_quality_rows_carry_the_backward_statistics():
    """``gradient_quality`` reports each estimator's VJPs and whether its adjoint solve converged
    (None for estimators without a solve), read from the call's ``info.backward``."""
    import deqkit as dk
    from deqkit.diagnostics import gradient_quality

    torch.manual_seed(0)
    deq = dk.DEQ(dk.MLPCell(8, input_dim=4), dk.Broyden(memory=20, tol=1e-6, max_iter=60), state_shape=(8,)).double()
    x = torch.randn(6, 4, dtype=F64)
    rows = gradient_quality(deq, x, lambda z: z.square().mean(), [dk.Exact(), dk.Neumann(4, 0.5), dk.Unrolled(3, 0.5)])
    exact, neumann, unrolled = rows
    assert exact.vjps > 0 and exact.backward_converged is True
    assert neumann.vjps == 3 and neumann.backward_converged is None
    assert unrolled.vjps == 3


def test_broyden_line_search_falls_back_to_its_best_trial():
    """One backtracking trial allowed. From z0 = 0 (g = f(z) − z = 1) the full step to z = 1 has
    |g| = 0.99995 (short of sufficient decrease, which needs ≤ 1 − c·1 = 0.9999) and the half step
    to z = 1/2 has |g| = 1.0 (short of 1 − c/2): the search ends without sufficient decrease and
    must return its best trial, the full step, not its last one."""
    c = Broyden.armijo_c

    def f(z):
        g = torch.where(z == 1.0, torch.full_like(z, 1 - c / 2), torch.ones_like(z))
        return z + g

    solver = Broyden(
        memory=5, max_iter=2, tol=1e-12, stop_mode="abs", line_search=True, line_search_steps=1, on_nonfinite="raise"
    )
    res = solver(f, torch.zeros(1, 1, dtype=F64))
    assert float(res.z) == 1.0, float(res.z)


def test_unrolled_pretraining_call_is_the_cell_iterated_with_its_graph():
    """``unrolled_depth = k`` in training: the DEQ returns ``f`` iterated ``k`` times from ``z0``, with
    the gradient of those iterations (checked against the same loop written out)."""
    import deqkit as dk

    torch.manual_seed(0)
    cell = dk.MLPCell(5, input_dim=3).double()
    deq = dk.DEQ(cell, dk.Anderson(tol=1e-8), state_shape=(5,), unrolled_depth=3).train()
    x = torch.randn(4, 3, dtype=F64)
    z, info = deq(x)
    z.square().sum().backward()
    got = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    w = torch.zeros(4, 5, dtype=F64)
    for _ in range(3):
        w = cell(w, x)
    torch.testing.assert_close(z, w, rtol=0, atol=0)
    w.square().sum().backward()
    for a, b in zip(got, [p.grad for p in cell.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert info.unrolled


def test_a_tuple_state_may_hold_a_one_dimensional_component():
    """A tuple state of a ``(B, 3)`` and a ``(B,)`` tensor solves like the same state flattened."""
    import deqkit as dk

    W = 0.4 * randn(4, 4, seed=1) / 2
    x = randn(6, 4, seed=2)

    def cell_tuple(z, x):
        a, b = z
        flat = torch.cat([a, b[:, None]], 1)
        out = torch.tanh(flat @ W.T + x)
        return out[:, :3], out[:, 3]

    def cell_flat(z, x):
        return torch.tanh(z @ W.T + x)

    class Wrap(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, z, x):
            return self.fn(z, x)

    z0 = (torch.zeros(6, 3, dtype=F64), torch.zeros(6, dtype=F64))
    (a, b), _ = dk.DEQ(Wrap(cell_tuple), dk.Anderson(tol=1e-10, max_iter=100))(x, z0=z0)
    flat, _ = dk.DEQ(Wrap(cell_flat), dk.Anderson(tol=1e-10, max_iter=100))(x, z0=torch.zeros(6, 4, dtype=F64))
    torch.testing.assert_close(torch.cat([a, b[:, None]], 1), flat, rtol=1e-8, atol=1e-9)


def test_lbfgs_skips_an_opa_update_along_a_zero_outer_gradient():
    """An OPA pair needs a direction ``H∇L``; with ``∇L = 0`` there is none: the update is skipped and
    counted (``n_skipped``), and the inner solve still converges."""
    from deqkit import bilevel
    from deqkit.bilevel.lbfgs import LBFGS

    a = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    inner = lambda x, lam: 0.5 * ((x - a) ** 2).sum() + 0.5 * torch.exp(lam).sum() * (x**2).sum()  # noqa: E731
    pb = bilevel.BilevelProblem(inner, lambda x: (x**2).sum(), torch.zeros(3, dtype=F64), name="quadratic")
    lam = torch.tensor([0.3], dtype=F64)
    res = LBFGS(tol=1e-10).solve(pb, lam, opa_freq=1, outer_grad=lambda x: torch.zeros_like(x))
    assert res.converged and res.n_opa == 0 and res.n_skipped >= 1
    torch.testing.assert_close(res.x, a / (1 + torch.exp(lam)), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, ValueError])
def test_atomic_open_lets_a_non_os_error_through_unchanged(tmp_path, exc):
    """An interrupt or a bug inside ``atomic_open`` propagates as itself (only OS errors are
    reworded); the previous file is unchanged and no temporary file is left."""
    from deqkit._io import atomic_open

    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(exc):
        with atomic_open(path) as fh:
            fh.write(b"new")
            raise exc()
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_label_of_a_user_estimator_with_an_unstored_option():
    """A user's estimator whose constructor takes an option it does not keep as an attribute still
    has a label (the options it keeps and that differ from their defaults)."""
    import deqkit as dk

    class TunedExact(dk.Exact):
        def __init__(self, *, tol: float = 1e-6, note: str = "mine"):
            super().__init__(tol=tol)

    assert TunedExact().label == "TunedExact"
    assert TunedExact(tol=1e-3, note="other").label == "TunedExact(tol=0.001)"


def test_label_of_a_user_estimator_that_forwards_kwargs_shows_the_parents_options():
    """``def __init__(self, **kwargs): super().__init__(**kwargs)``: the parent's options that
    differ from their defaults appear, as they do for the parent itself."""
    import deqkit as dk

    class Forwarding(dk.Exact):
        def __init__(self, *, note: str = "mine", **kwargs):
            super().__init__(**kwargs)
            self.note = note

    assert Forwarding(tol=1e-3).label == dk.Exact(tol=1e-3).label.replace("Exact", "Forwarding")
    assert Forwarding(tol=1e-3, note="x").label == "Forwarding(note=x, auto, tol=0.001)"
    assert "tol" not in Forwarding().label
