"""GMRES cost per Krylov step against one vector–Jacobian product, on a benchmark configuration.

At the configuration's fixed point (float32, its forward solver), with ``v = ∂L/∂z*`` of the
cross-entropy loss: the median time of one VJP ``u ↦ uJ`` (the same autograd call the adjoint
solvers make), and of a GMRES solve forced to run ``steps`` Krylov steps (``tol`` far below
reach, one restart cycle); the ratio is the solve's time per VJP it spent (the Krylov steps and
the true residual at the end of the cycle) over one VJP's time. 1.0 means the Krylov bookkeeping
(orthogonalisation, least squares, checks) is free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..._timing import synced_perf_counter
from ...estimators import Exact
from ...linear import GMRES
from .config import BenchConfig, DeviceLike, build_model, digits_batch
from .report import mark, md_table, med

__all__ = ["bench_krylov", "format_krylov_table", "krylov_targets", "KRYLOV_NOTES"]


def _problem(cfg: BenchConfig, device: DeviceLike = "cpu") -> tuple[Callable[[Tensor], Tensor], Tensor]:
    x, y, _ = digits_batch(cfg.batch, cfg.seed, device=device)
    model = build_model(cfg, Exact(), device=device)
    with torch.no_grad():
        u = model.injection(x)
        z = model.deq.solver(lambda z: model.cell(z, u), torch.zeros_like(u)).z
    z_in = z.detach().requires_grad_()
    f_z = model.cell(z_in, u.detach())
    zz = z.detach().requires_grad_()
    (v,) = torch.autograd.grad(nn.functional.cross_entropy(model.head(zz), y), zz)

    def vjp(w: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(f_z, z_in, w.reshape(f_z.shape), retain_graph=True)
        return g

    return vjp, v.detach()


def bench_krylov(cfg: BenchConfig, *, steps: int = 20, repeats: int = 15, device: DeviceLike = "cpu") -> dict[str, Any]:
    """Median ms of one VJP and of a ``steps``-step GMRES solve on ``cfg`` (on ``device``); their per-VJP ratio."""
    vjp, v = _problem(cfg, device)
    gmres = GMRES(restart=steps, tol=1e-30, max_iter=steps, stop_mode="abs")  # absolute: never raised to a dtype floor
    vjp_ms, gm_ms = [], []
    used = steps + 1
    for r in range(repeats + 1):  # the first round is a warm-up
        t0 = synced_perf_counter(v.device)
        for _ in range(steps):
            vjp(v)
        t1 = synced_perf_counter(v.device)
        res = gmres.solve_adjoint(vjp, v)
        t2 = synced_perf_counter(v.device)
        used = int(res.nstep.max()) + 1
        if r:
            vjp_ms.append(1e3 * (t1 - t0) / steps)
            gm_ms.append(1e3 * (t2 - t1))
    per_step = med(gm_ms) / used
    return {
        "cfg": cfg,
        "steps": steps,
        "vjps": used,
        "vjp_ms": vjp_ms,
        "gmres_ms": gm_ms,
        "per_step_ms": per_step,
        "ratio": per_step / med(vjp_ms),
    }


def format_krylov_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "configuration",
        "one VJP ms",
        f"GMRES solve ms ({rows[0]['steps']} Krylov steps)",
        "VJPs in the solve",
        "GMRES ms per VJP",
        "÷ one VJP",
    ]
    body = [
        [
            f"{r['cfg'].name} (width {r['cfg'].width}, batch {r['cfg'].batch})",
            f"{med(r['vjp_ms']):.3f}",
            f"{med(r['gmres_ms']):.2f}",
            str(r["vjps"]),
            f"{r['per_step_ms']:.3f}",
            f"{r['ratio']:.2f}",
        ]
        for r in rows
    ]
    return md_table(head, body)


def krylov_targets(rows: list[dict[str, Any]]) -> list[str]:
    return [
        f"GMRES cost per Krylov step ≤ 1.3 × one VJP ({r['cfg'].name}): {r['ratio']:.2f}× — {mark(r['ratio'] <= 1.3)}"
        for r in rows
    ]


KRYLOV_NOTES = """\
GMRES per Krylov step: the median time of a GMRES solve forced to take 20 Krylov steps (one
restart cycle, `tol` out of reach) divided by the VJPs it spent (20 + the true residual), over
the median time of one VJP at the same fixed point. Per step GMRES does one VJP, four batched
products against the stacked basis (classical Gram–Schmidt with reorthogonalisation), a norm
and a division; the float64 least squares is extended by a block QR only at the scheduled
checks, which are also its only host synchronisations. On a CPU at
these sizes each of those small tensor operations costs about as much as launching it, so the
ratio is bounded below by the operation count, not the arithmetic.

Tried and not kept (2026-11-30): delayed reorthogonalisation (DCGS2; Świrydowicz, Langou,
Ananthan, Yang & Thomas, "Low synchronization Gram–Schmidt and GMRES algorithms", Numer. Linear
Algebra Appl. 2021), which folds the reorthogonalisation of basis vector j into step j+1 and so
reads the basis twice per step instead of four times, each time against two vectors. On this
CPU torch's batched product against two vectors costs about twice the product against one
(0.49 against 0.24 ms at batch 64, 15 basis vectors, width 2048), so nothing was saved: over
20 Arnoldi steps at batch 64 (a one-off timing, `/tmp` prototype, two other jobs running) the
orthogonalisation took 0.28 against 0.15 ms per step at width 64, 0.32 against 0.28 at width
256 and 3.0 against 2.1 at width 2048, slower everywhere, at the same orthogonality (1e-16 in
float64 on the ill-conditioned test problem). On a GPU, where the cost is launches and
synchronisations, it may still pay; not measured (no GPU here).
"""


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m deqkit.apps.bench.krylov [--steps N] [--repeats N] [--threads N]``: the table on
    the reference and hard configurations."""
    import argparse

    from .config import HARD, REFERENCE

    parser = argparse.ArgumentParser(
        prog="python -m deqkit.apps.bench.krylov", description="GMRES cost per Krylov step against one VJP."
    )
    parser.add_argument("--steps", type=int, default=20, help="Krylov steps per solve (default 20)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [bench_krylov(cfg, steps=args.steps, repeats=args.repeats) for cfg in (REFERENCE, HARD)]
    print(format_krylov_table(rows))
    for line in krylov_targets(rows):
        print(" -", line)


if __name__ == "__main__":
    main()
