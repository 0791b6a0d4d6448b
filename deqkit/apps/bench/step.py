"""Step cost per gradient estimator: one training step's forward and backward time, the solver
work behind it, its memory and the gradient's cosine to Exact."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...diagnostics import gradient_quality
from ...models import DEQClassifier
from ...solvers import Solver
from ..compare import ESTIMATOR_PRESETS, OPA_FREQ, preset_label
from .config import BenchConfig, DeviceLike, build_model, digits_batch
from .measure import interleaved, memory_of_step, quiet, timed_step
from .report import fmt_range, kb, mark, md_table, med, ratio

__all__ = [
    "TITLE",
    "STEP_ESTIMATORS",
    "bench_step",
    "step_rows",
    "flat_grad",
    "vjps_cell",
    "format_step_table",
    "step_targets",
    "STEP_NOTES",
]

#: this section's heading in BENCHMARKS.md
TITLE = "## DEQ gradient estimators: step cost"

#: the preset the "bwd ÷ Exact" column and the targets divide by (GMRES to 1e-6, 60 steps: the
#: baseline the targets were set against; the default ``Exact()`` is the ``exact`` row)
BASELINE = "exact-gmres"

#: estimators of the step-cost table, keys of :data:`deqkit.apps.compare.ESTIMATOR_PRESETS`
STEP_ESTIMATORS = (
    "exact-gmres",
    "exact",
    "exact-broyden",
    "exact-warm",
    "exact-precond",
    "unrolled",
    "neumann",
    "jacobian-free",
    "shine",
    "shine-opa",
    "broyden-reuse",
    "shine-refine",
)

_PER_ROUND = (
    "fwd_ms",
    "bwd_ms",
    "total_ms",
    "fwd_steps",
    "fwd_converged",
    "bwd_vjps",
    "bwd_iters",
    "n_fallback",
    "amplification",
)


def flat_grad(model: nn.Module) -> Tensor:
    """Every parameter's ``.grad`` (zeros where none), flattened and concatenated, in float64."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in model.parameters()])


class _StepRun:
    """One model (same weights) whose estimator and solver are swapped per preset name.

    ``solver_for(opa_freq)``: the forward solver, with OPA every ``opa_freq`` steps when not
    ``None``. ``keep_grad``: keep each preset's parameter gradient of its last step (``"grad"``).
    """

    def __init__(
        self,
        model: DEQClassifier,
        x: Tensor,
        y: Tensor,
        estimators: Sequence[str],
        solver_for: Callable[[Optional[int]], Solver],
        *,
        keep_grad: bool = False,
    ) -> None:
        self.model, self.x, self.y, self.keep_grad = model, x, y, keep_grad
        self.grads = {name: ESTIMATOR_PRESETS[name]() for name in estimators}
        # OPA presets swap in a Broyden with outer-problem awareness
        self.solvers = {name: solver_for(OPA_FREQ.get(name)) for name in estimators}
        self.rows = {
            name: {"estimator": name, "label": preset_label(name, self.grads[name]), **{k: [] for k in _PER_ROUND}}
            for name in estimators
        }
        self.warm: set[str] = set()

    def use(self, name: str) -> None:
        self.model.deq.grad, self.model.deq.solver = self.grads[name], self.solvers[name]

    def __call__(self, name: str) -> None:
        """One timed step of preset ``name`` (its first call is the warm-up, not recorded)."""
        self.use(name)
        fwd, bwd, info = timed_step(self.model, self.x, self.y, opa=name in OPA_FREQ)
        if name not in self.warm:
            self.warm.add(name)
            return
        r = self.rows[name]
        r["fwd_ms"].append(1e3 * fwd)
        r["bwd_ms"].append(1e3 * bwd)
        r["total_ms"].append(1e3 * (fwd + bwd))
        r["fwd_steps"].append(float(info.nstep.float().mean()))
        r["fwd_converged"].append(float(info.converged.float().mean()))
        back = info.backward
        r["bwd_vjps"].append(back.vjps if back is not None else 0)
        if back is not None and back.solve is not None:
            r["bwd_iters"].append(float(back.solve.nstep.float().mean()))
        r["n_fallback"].append(back.n_fallback if back is not None else 0)
        if back is not None and back.amplification is not None:
            r["amplification"].append(back.amplification)
        if self.keep_grad:
            r["grad"] = flat_grad(self.model)

    def summary(self, name: str, memory: bool) -> dict[str, Any]:
        """The row of ``name``: medians of the per-round counts (times stay lists), memory."""
        r = self.rows[name]
        for key in ("fwd_steps", "fwd_converged", "bwd_vjps", "n_fallback"):
            r[key] = med(r[key])
        r["bwd_iters"] = med(r["bwd_iters"]) if r["bwd_iters"] else None
        r["amplification"] = med(r["amplification"]) if r["amplification"] else None
        if memory:
            self.use(name)
            r["graph_bytes"], r["peak_bytes"] = memory_of_step(self.model, self.x, self.y, opa=name in OPA_FREQ)
        return r

    def add_cosines(self, rows: list[dict[str, Any]]) -> None:
        """Each row's gradient cosine to Exact, on a float64 copy (reference: GMRES to 1e-10)."""
        m64 = copy.deepcopy(self.model).double()
        with torch.no_grad():
            u = m64.injection(self.x.double())
        y = self.y
        loss_fn = lambda z: nn.functional.cross_entropy(m64.head(z), y)  # noqa: E731
        groups: dict[Optional[int], list[dict[str, Any]]] = {}  # by OPA frequency: one solver each
        for r in rows:
            groups.setdefault(OPA_FREQ.get(r["estimator"]), []).append(r)
        for group in groups.values():  # gradient_quality hands loss_fn to the forward: OPA uses it
            m64.deq.solver = self.solvers[group[0]["estimator"]]
            quality = gradient_quality(m64.deq, u, loss_fn, [self.grads[r["estimator"]] for r in group], repeats=1)
            for r, q in zip(group, quality):
                r["cosine"] = q.cosine


def bench_step(
    cfg: BenchConfig,
    estimators: Sequence[str] = STEP_ESTIMATORS,
    *,
    repeats: int = 7,
    memory: bool = True,
    cosine: bool = True,
    log: Callable[[str], None] = print,
    device: DeviceLike = "cpu",
) -> list[dict[str, Any]]:
    """Step cost of each estimator (keys of ``ESTIMATOR_PRESETS``) on ``cfg``: one row per estimator.

    Row keys: ``estimator``, ``label``, ``fwd_ms``/``bwd_ms``/``total_ms`` (lists of per-step
    milliseconds), ``fwd_steps`` (mean per-sample Broyden steps), ``fwd_converged`` (fraction),
    ``bwd_vjps`` (VJPs or graph evaluations in the backward), ``bwd_iters`` (mean per-sample
    adjoint-solve steps, solve-based estimators only), ``n_fallback``, ``amplification``
    (median over rounds of ``info.backward.amplification``; ``None`` without an adjoint hook),
    ``graph_bytes``, ``peak_bytes``, ``cosine``, ``bwd_vs_exact``. Model and batch live on ``device``.
    """
    x, y, _ = digits_batch(cfg.batch, cfg.seed, device=device)
    model = build_model(cfg, ESTIMATOR_PRESETS[estimators[0]](), device=device)
    out = step_rows(
        model, x, y, estimators, lambda opa_freq: cfg.solver(opa_freq=opa_freq), repeats=repeats, memory=memory, cosine=cosine
    )
    log(format_step_table(cfg, out))
    return out


def step_rows(
    model: DEQClassifier,
    x: Tensor,
    y: Tensor,
    estimators: Sequence[str],
    solver_for: Callable[[Optional[int]], Solver],
    *,
    repeats: int = 7,
    memory: bool = True,
    cosine: bool = True,
    keep_grad: bool = False,
    baseline: str = BASELINE,
) -> list[dict[str, Any]]:
    """The rows of :func:`bench_step` for any classifier ``model`` (tensor or tuple state) on ``(x, y)``:
    its estimator and forward solver (``solver_for(opa_freq)``) swapped per preset, weights fixed;
    ``bwd_vs_exact`` divides by the ``baseline`` preset's backward; ``keep_grad`` adds each row's
    parameter gradient of its last step (``"grad"``, float64, flat)."""
    with quiet():
        run = _StepRun(model, x, y, estimators, solver_for, keep_grad=keep_grad)
        interleaved(estimators, repeats, run)
        out = [run.summary(name, memory) for name in estimators]
        if cosine:
            run.add_cosines(out)
        exact = next((r for r in out if r["estimator"] == baseline), None)
        for r in out:
            r["bwd_vs_exact"] = ratio(med(r["bwd_ms"]), med(exact["bwd_ms"])) if exact else float("nan")
    return out


def vjps_cell(row: dict[str, Any]) -> str:
    """The ``bwd VJPs (iters)`` cell of a step row: VJPs, mean per-sample adjoint steps, fallbacks."""
    vj = f"{row['bwd_vjps']:g}" + (f" ({row['bwd_iters']:.1f})" if row.get("bwd_iters") is not None else "")
    if row.get("n_fallback"):
        vj += f", {row['n_fallback']:g} fallback"
    return vj


def format_step_table(cfg: BenchConfig, rows: Sequence[dict[str, Any]]) -> str:
    head = [
        "estimator",
        "fwd ms",
        "bwd ms",
        "total ms",
        "bwd ÷ Exact",
        "fwd steps",
        "bwd VJPs (iters)",
        "graph KB",
        "peak KB",
        "cos to Exact",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r["label"],
                fmt_range(r["fwd_ms"]),
                fmt_range(r["bwd_ms"]),
                fmt_range(r["total_ms"]),
                f"{r['bwd_vs_exact']:.2f}",
                f"{r['fwd_steps']:.1f}",
                vjps_cell(r),
                kb(r["graph_bytes"]) if "graph_bytes" in r else "-",
                kb(r["peak_bytes"]) if "peak_bytes" in r else "-",
                f"{r['cosine']:.4f}" if "cosine" in r else "-",
            ]
        )
    return (
        f"{cfg.name}: {cfg.describe()}; forward converged {med([r['fwd_converged'] for r in rows]):.0%} of samples\n\n"
        + md_table(head, body)
    )


def step_targets(rows: Sequence[dict[str, Any]]) -> list[str]:
    by = {r["estimator"]: r for r in rows}
    out = []
    for name in ("shine", "broyden-reuse"):
        if name in by and BASELINE in by:
            v = by[name]["bwd_vs_exact"]
            out.append(f"{by[name]['label']} backward ≤ 0.15 × Exact: {v:.2f}× — {mark(v <= 0.15)}")
    if "unrolled" in by and BASELINE in by:
        v = by["unrolled"]["bwd_vs_exact"]
        out.append(f"Unrolled(5, 0.5) backward ≤ 0.6 × Exact: {v:.2f}× — {mark(v <= 0.6)}")
    cold_name = "exact-broyden" if "exact-broyden" in by else BASELINE  # same adjoint solver, cold
    if "exact-warm" in by and cold_name in by:
        w, c = by["exact-warm"], by[cold_name]
        out.append(
            f"Exact warm-started by SHINE needs fewer backward iterations than cold ({c['label']}): "
            f"{w['bwd_vjps']:g} vs {c['bwd_vjps']:g} VJPs (per-sample steps {w['bwd_iters'] or 0:.1f} vs "
            f"{c['bwd_iters'] or 0:.1f}) — {mark(w['bwd_vjps'] < c['bwd_vjps'])}"
        )
    if "exact-precond" in by and BASELINE in by:
        p, e = by["exact-precond"], by[BASELINE]
        out.append(
            f"GMRES preconditioned by the forward H: fewer VJPs than plain GMRES ({p['bwd_vjps']:g} vs "
            f"{e['bwd_vjps']:g}) and backward ≤ 1.0 × Exact ({p['bwd_vs_exact']:.2f}×) — "
            f"{mark(p['bwd_vjps'] < e['bwd_vjps'] and p['bwd_vs_exact'] <= 1.0)}"
        )
    return out


STEP_NOTES = """\
What is measured: one training step (forward call = injection + Broyden solve + estimator
attach + head + cross-entropy; backward = `loss.backward()`), no optimiser update, same weights
and batch every time; 1 warm-up per estimator, then interleaved rounds; cells are median [min, max].
`bwd VJPs (iters)`: vector–Jacobian products (Unrolled: graph evaluations) spent on the adjoint,
and in brackets the mean per-sample steps of the adjoint solve (a forward solver used for the
adjoint, as in `Exact(broyden)`, iterates the whole batch until its last sample converges, so its
count is the batch's). `fwd steps`: the forward's mean step count, the batch's since the
forward runs every sample until the last one converges. `graph KB`: tensors autograd saves
during the forward call (parameters excluded); `peak KB`: peak torch CPU allocation over the
whole step above its start (see the module docstring of `deqkit/apps/bench/measure.py`).
Cosines: float64 copy, reference GMRES to 1e-10.

Reading the numbers. The forward solve is the same for every estimator (it dominates the step
on these small cells); Unrolled's forward is larger because its k graph evaluations run at attach
time. The reuse estimators' backward is one low-rank product plus the single VJP to the
parameters that every estimator pays: that VJP and autograd's fixed overhead (~0.3–0.5 ms here)
are their floor. The `exact-gmres` preset (the "÷ Exact" baseline) is GMRES to 1e-6: each Krylov
step is one VJP plus four batched Gram–Schmidt products against the stacked basis (the small
least squares is brought up to date only at scheduled checks; see the GMRES per-step table in the
torchdeq section); `exact` is `Exact()`: Picard steps on the
adjoint while they contract fast, GMRES when they do not, to a tolerance matched to the
forward's residual.
`peak KB` is dominated by the Broyden buffers `U, V` (batch × width × memory × 2 floats:
960 KB at width 64, 3.75 MB at width 256). The DEQ keeps them until backward only for the
estimators that reuse them (SHINE, BroydenReuse, WarmExact); WarmExact's Broyden adjoint adds
its own 30 columns to the forward ones, hence its larger peak.

Warm-started Exact (`WarmExact`) runs the Broyden adjoint solve from `w₀ = −vH` with the
forward `Hᵀ` as its initial inverse estimate; the comparison is against the same Broyden adjoint
started cold (`Exact(broyden)`). It saves VJPs (the counts above), but on the hard configuration
not time: each Broyden step works on a 60-column buffer. Started from `−vH` alone, GMRES gains
about one step per sample (the SHINE start has relative error ~0.2 and GMRES shrinks the error
~0.3 per step) and pays one VJP for the initial residual, so the batch total does not drop.
Used as GMRES's right preconditioner instead (`WarmExact(GMRES())`, preset `exact-precond`:
GMRES on `y ↦ −yH(I − J)`, `w = −yH`), the forward `H` cuts the Krylov steps on every sample
for one extra low-rank product per step; no extra memory beyond keeping `H`.

`SHINE + OPA/5` (preset `shine-opa`, no fallback) runs its forward Broyden with an OPA update
every 5 steps (one loss gradient and one cell VJP each), so its forward costs more and its
backward is SHINE's; its `graph KB` counts the transient graphs of those evaluations, which are
freed inside the forward call (its `peak KB` is what stays).

Where the step time went before it was fixed (torch.profiler, hard configuration, forward
solve): 70 % of the CPU time was `aten::bmm` called from the einsums of `BroydenState.apply` /
`apply_left`, batched matrix–*vector* products for which CPU `bmm` takes a slow path. Written as
batched row-vector–matrix products (`deqkit/solvers.py` now), the hard forward solve dropped
from 173–197 ms to ~45 ms with the same step counts, and SHINE's backward with it.
"""
