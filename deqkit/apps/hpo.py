"""The ``deqkit hpo`` job: HOAG hyperparameter search of ℓ2-regularised logistic regression with
SHINE-family hypergradients (Ramzi et al., ICLR 2022, arXiv 2106.00553; Pedregosa, ICML 2016).

Prints, per estimator, the held-out (validation and test) loss against wall-clock time, a
summary table with each estimator's time to reach the Exact variant's final validation loss
(within 1%), and the hypergradient's agreement with Exact (CG to 1e-12) at the estimator's
final λ. With an output directory, writes ``hpo_<dataset>.png`` and ``hpo_<dataset>.json``
(atomically).

The bi-level names this job uses are imported once, at the top.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .._io import atomic_write_text, read_json_file, save_figure
from .._options import check_choice, check_int, check_number, unknown_option_message, validated_options
from ..bilevel.data import HPO_DATASETS as DATASETS
from ..bilevel.data import load_hpo_dataset, logistic_hpo_problem
from ..bilevel.hoag import HOAG, hypergradient_cosine
from ..bilevel.hypergrad import HYPERGRADIENT_NAMES, HypergradientEstimator, make_hypergradient
from ..errors import ConvergenceWarning, OptionError
from .common import prepare_out

__all__ = ["DATASETS", "HYPERGRADIENTS", "HPOConfig", "run_hpo", "make_preset"]

#: the names ``--grad`` accepts (the built-in hypergradient presets)
HYPERGRADIENTS: tuple[str, ...] = tuple(HYPERGRADIENT_NAMES)
#: ``grad_opts`` keys and the preset each one configures
PRESET_OPTIONS: dict[str, str] = {"refine": "shine-refine", "opa_freq": "shine-opa"}


def hypergradient_names() -> tuple[str, ...]:
    """The names ``--grad`` accepts."""
    return HYPERGRADIENTS


def make_preset(name: str, grad_opts: dict[str, Any]) -> HypergradientEstimator:
    """The estimator ``name`` with the options of ``grad_opts`` that configure it (``refine`` for
    ``shine-refine``, ``opa_freq`` for ``shine-opa``)."""
    opts = {k: v for k, v in grad_opts.items() if PRESET_OPTIONS.get(k) == name}
    return make_hypergradient(name, **opts)


@validated_options
@dataclass
class HPOConfig:
    """Settings of :func:`run_hpo`.

    ``grad``: the hypergradient estimators, one run each; ``grad_opts``: their options
    (``refine``, ``opa_freq``, ...); ``out``: directory for the PNG and JSON (``None``: none).
    """

    dataset: str = "breast_cancer"
    grad: list[str] = field(default_factory=lambda: list(hypergradient_names()))
    grad_opts: dict[str, Any] = field(default_factory=lambda: {"refine": 5, "opa_freq": 5})
    outer_steps: int = 30
    seed: int = 0
    out: Optional[str] = None
    per_feature: bool = False
    lam0: float = 0.0
    threads: int = 1
    progress: bool = True
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_int("HPOConfig", "outer_steps", self.outer_steps)
        check_int("HPOConfig", "threads", self.threads)
        check_number("HPOConfig", "lam0", self.lam0)
        if self.resume and not self.out:
            raise OptionError("HPOConfig: resume continues the run saved in out; give out (--out).")
        for name in self.grad:
            check_choice("HPOConfig", "grad", name, HYPERGRADIENTS)
        valid = list(PRESET_OPTIONS)
        for key in self.grad_opts:
            if key not in valid:
                raise OptionError(unknown_option_message("HPOConfig: grad_opts", key, valid))


def _progress_line(name: str) -> Callable[[dict], None]:
    def progress(rec: dict) -> None:
        print(
            f"  [{name:>13}] step {rec['step']:3d}  t={rec['time_s']:7.3f}s  "
            f"val={rec['val_loss']:.5f}  test={rec['test_loss']:.5f}  "
            f"|g|={rec['grad_norm']:.2e}  λ̄={rec['lam_mean']:+.3f}  "
            f"inner={rec['inner_nstep']:4d}{'' if rec['inner_converged'] else '!'}  "
            f"hvp={rec['n_hvp']:4d}{'' if rec['linear_converged'] else '!'}"
            f"{'' if rec['accepted'] else '  (rejected)'}",
            flush=True,
        )

    return progress


def _run_one(cfg: HPOConfig, name: str, problem: Any, lam0: torch.Tensor, d: int) -> dict:
    """One HOAG run with estimator ``name``; its summary (history, final losses, agreement)."""
    est = make_preset(name, cfg.grad_opts)
    callback = _progress_line(name) if cfg.progress else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # counted in the result
        res = HOAG(est, outer_steps=cfg.outer_steps, callback=callback).run(problem, lam0)
    # agreement with Exact at this estimator's final λ; for a scalar λ the cosine is
    # taken on the per-feature hypergradient at λ·1 (its sum is the scalar one)
    tol = res.history[-1]["inner_tol"]
    lam_vec = res.lam.expand(d).clone() if res.lam.dim() == 0 else res.lam
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        agree = hypergradient_cosine(problem, lam_vec, est, tol=tol)
    return {
        "history": res.history,
        "final_lam": res.lam.tolist(),
        "final_val_loss": res.history[-1]["val_loss"],
        "final_test_loss": res.history[-1]["test_loss"],
        "best_val_loss": res.best_val_loss,
        "total_time": res.history[-1]["time_s"],
        "cosine_to_exact": agree["cosine"],
        "rel_error_to_exact": agree["rel_error"],
        "n_inner_not_converged": res.n_inner_not_converged,
        "n_linear_not_converged": res.n_linear_not_converged,
        "n_rejected": res.n_rejected,
    }


def _time_to_exact(runs: dict[str, dict]) -> Optional[float]:
    """Adds each run's time to reach 1.01 × Exact's final validation loss; returns that target."""
    if "exact" not in runs:
        return None
    target = 1.01 * runs["exact"]["final_val_loss"]
    for r in runs.values():
        t = next((h["time_s"] for h in r["history"] if h["val_loss"] <= target), None)
        r["time_to_exact_final_1pct"] = t
        r["time_ratio_vs_exact_total"] = t / runs["exact"]["total_time"] if t is not None else None
    return target


def _fmt(v: Optional[float], spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_curves(runs: dict[str, dict]) -> str:
    """Held-out loss against wall-clock time, per estimator (about 7 points each)."""
    lines = ["\nheld-out loss against wall-clock time"]
    for name, r in runs.items():
        hist = r["history"]
        idx = sorted(set(list(range(0, len(hist), max(1, len(hist) // 6))) + [len(hist) - 1]))
        pts = "  ".join(f"{hist[i]['time_s']:.2f}s:{hist[i]['val_loss']:.4f}/{hist[i]['test_loss']:.4f}" for i in idx)
        lines.append(f"  {name:>13}  (time: val/test)  {pts}")
    return "\n".join(lines)


def format_summary(runs: dict[str, dict], target: Optional[float]) -> str:
    """The summary table and its legend."""
    hdr = (
        f"\n{'estimator':>13} | {'final val':>9} | {'best val':>9} | {'test':>8} | "
        f"{'time (s)':>8} | {'t→exact+1%':>10} | {'ratio':>6} | {'cos(exact)':>10} | "
        f"{'rel err':>8} | {'inner NC':>8} | {'CG NC':>5}"
    )
    lines = [hdr, "-" * (len(hdr) - 1)]
    for name, r in runs.items():
        lines.append(
            f"{name:>13} | {r['final_val_loss']:9.5f} | {r['best_val_loss']:9.5f} | "
            f"{r['final_test_loss']:8.5f} | {r['total_time']:8.3f} | "
            f"{_fmt(r.get('time_to_exact_final_1pct'), '.3f'):>10} | "
            f"{_fmt(r.get('time_ratio_vs_exact_total'), '.2f'):>6} | "
            f"{r['cosine_to_exact']:10.5f} | {r['rel_error_to_exact']:8.2e} | "
            f"{r['n_inner_not_converged']:8d} | {r['n_linear_not_converged']:5d}"
        )
    if target is not None:
        lines.append(
            f"(t→exact+1%: first time the validation loss ≤ 1.01 × Exact's final "
            f"{runs['exact']['final_val_loss']:.5f}; ratio: that time / Exact's total time)"
        )
    lines.append(
        "(cos(exact): cosine to Exact-CG(1e-12) of the per-feature hypergradient at the final λ;"
        " rel err: ‖g − g_exact‖/‖g_exact‖ of that vector)"
    )
    return "\n".join(lines)


def _plot(path: str, runs: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in runs.items():
        t = [h["time_s"] for h in r["history"]]
        axes[0].plot(t, [h["val_loss"] for h in r["history"]], marker=".", label=name)
        axes[1].plot(t, [h["test_loss"] for h in r["history"]], marker=".", label=name)
    for ax, lab in zip(axes, ("validation loss", "test loss")):
        ax.set_xlabel("wall-clock time (s)")
        ax.set_ylabel(lab)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)


#: the settings that shape an estimator's run: a resumed search must have the same
RESULT_SETTINGS = ("dataset", "seed", "per_feature", "outer_steps", "lam0")


def _settings(cfg: HPOConfig, d: int) -> dict:
    return {**{k: getattr(cfg, k) for k in RESULT_SETTINGS}, "n_features": d}


def _write(cfg: HPOConfig, runs: dict[str, dict], d: int, complete: bool = True) -> str:
    """``hpo_<dataset>.json`` (atomically) with the finished runs; with ``complete`` also the PNG.
    Called after every estimator, so an interrupted search keeps its finished runs."""
    os.makedirs(cfg.out, exist_ok=True)  # type: ignore[arg-type]
    base = os.path.join(cfg.out, f"hpo_{cfg.dataset}")  # type: ignore[arg-type]
    payload = {
        **_settings(cfg, d),
        "grad_opts": {n: cfg.grad_opts for n in runs},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "complete": complete,
        "estimators": runs,
    }
    atomic_write_text(base + ".json", json.dumps(payload, indent=1))
    if complete:
        _plot(base + ".png", runs, f"HOAG on {cfg.dataset} ({'per-feature' if cfg.per_feature else 'scalar'} λ)")
    return base


def _resumed_runs(cfg: HPOConfig, d: int) -> dict[str, dict]:
    """The finished runs of an earlier search in ``cfg.out`` (``--resume``), after checking that
    it was made with the same settings (OptionError otherwise)."""
    path = os.path.join(cfg.out, f"hpo_{cfg.dataset}.json")  # type: ignore[arg-type]
    if not os.path.exists(path):
        return {}
    advice = "delete it (or use --overwrite) to start over"
    old = read_json_file(path, what="deqkit hpo results file", advice=advice)
    if not isinstance(old, dict) or not isinstance(old.get("estimators"), dict):
        raise OptionError(f"{path} is not a deqkit hpo results file; {advice}")
    now = _settings(cfg, d)
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in now.items() if old.get(k) != v]
    if changed:
        raise OptionError(
            f"--resume: {path} was written with other settings ({'; '.join(changed)}); "
            f"use another --out, or --overwrite to start over."
        )
    kept = {}
    for name, run in old["estimators"].items():
        if name in cfg.grad and old.get("grad_opts", {}).get(name) == cfg.grad_opts:
            run = {k: v for k, v in run.items() if k not in ("time_to_exact_final_1pct", "time_ratio_vs_exact_total")}
            kept[name] = run
    return kept


def run_hpo(cfg: HPOConfig, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run HOAG once per estimator of ``cfg.grad``; print the curves and the table; write the files.

    With ``cfg.out`` the JSON is rewritten (atomically) after every estimator; ``cfg.resume``
    keeps the estimators an interrupted search finished (same settings) and runs the rest.
    """
    if cfg.out:
        prepare_out(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
    torch.set_num_threads(cfg.threads)
    splits = load_hpo_dataset(cfg.dataset, seed=cfg.seed)
    problem = logistic_hpo_problem(splits)
    d = splits.n_features
    lam0 = torch.full((d,) if cfg.per_feature else (), float(cfg.lam0), dtype=torch.float64)
    log(
        f"deqkit hpo: dataset={cfg.dataset} (train {len(splits.y_train)}, val "
        f"{len(splits.y_val)}, test {len(splits.y_test)}, d={d}), λ "
        f"{'per feature' if cfg.per_feature else 'scalar'}, outer steps {cfg.outer_steps}, "
        f"seed {cfg.seed}, threads {cfg.threads}"
    )
    done = _resumed_runs(cfg, d) if cfg.resume else {}
    todo = [name for name in cfg.grad if name not in done]
    # warm-up (torch/autograd first-call overheads) so that the first timed run is not penalised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name in todo:
            HOAG(make_preset(name, cfg.grad_opts), outer_steps=1).run(problem, lam0)
    runs: dict[str, dict] = {}
    for name in cfg.grad:
        if name in done:
            log(f"  [{name:>13}] kept from the earlier run (--resume)")
            runs[name] = done[name]
            continue
        runs[name] = _run_one(cfg, name, problem, lam0, d)
        if cfg.out:  # every finished estimator is on disk: an interrupted search keeps it for --resume
            _write(cfg, {n: runs[n] for n in cfg.grad if n in runs}, d, complete=False)
    log(format_curves(runs))
    log(format_summary(runs, _time_to_exact(runs)))
    if cfg.out:
        base = _write(cfg, runs, d)
        log(f"wrote {base}.json and {base}.png")
    return runs
