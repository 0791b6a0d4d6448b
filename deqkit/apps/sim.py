"""The ``deqkit sim`` job: state-driven implicit modeling end to end (Tsai et al., arXiv 2209.09389).

Trains (or loads) an MLP baseline, collects its states on ``m`` training samples, solves the
SIM program for each λ, and reports non-zeros, accuracy, well-posedness and FGSM/PGD
robustness; writes ``sim_results.json`` and ``sim.png`` (atomically) to the output directory.

:func:`run_sim` takes the parsed options of ``deqkit sim`` (any object with those attributes,
see ``deqkit.cli.sim``); each step of the job is a function of its own below.
"""

from __future__ import annotations

import copy
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .._io import atomic_write_bytes, load_torch_file, read_json_file
from ..data import DATASETS as _ALL_DATASETS
from ..data import load_dataset
from ..errors import ConvergenceWarning, OptionError
from ..sim.admm import BatchedADMM
from ..sim.attacks import accuracy, robust_accuracy
from ..sim.baseline import make_mlp, train_mlp
from ..sim.cnn import cnn_layers, cnn_support, collect_cnn_states, make_cnn
from ..sim.fit import baseline_nonzeros, count_nonzeros, finetune, fit_sim
from ..sim.model import ImplicitModel
from ..sim.robust import certified_linf_gain
from ..sim.states import collect_states

#: Data sets of :mod:`deqkit.data` the command offers: those whose raw inputs lie in [0, 1], the
#: box the attacks clip to (``mnist1d``'s signals are not scaled, so it is left out).
DATASETS: tuple[str, ...] = tuple(n for n in _ALL_DATASETS if n != "mnist1d")

_DEFAULTS = {  # per data set: samples, epochs, lr (data sets not listed use _FALLBACK)
    "digits": {"samples": 1000, "epochs": 60, "lr": 3e-3},
    "mnist5k": {"samples": 2000, "epochs": 20, "lr": 1e-3},
    "fashion-mnist": {"samples": 2000, "epochs": 10, "lr": 1e-3},
    "mnist": {"samples": 2000, "epochs": 10, "lr": 1e-3},
}
_FALLBACK = {"samples": 2000, "epochs": 10, "lr": 1e-3}

#: the options that shape the results: a run resumed with --resume must have the same
RESULT_SETTINGS = (
    "dataset",
    "hidden",
    "samples",
    "kappa",
    "mode",
    "fit_solver",
    "rho",
    "max_iter_ab",
    "max_iter_cd",
    "lam_scale",
    "penalty",
    "input_weight",
    "structure",
    "output_skip",
    "debias",
    "finetune_epochs",
    "finetune_lr",
    "seed",
    "attacks",
    "eps",
    "pgd_steps",
    "n_test",
    "n_attack",
    "density",
    "density_tol",
    "input_radius",
    "output_radius",
    "radius_scale",
    "model",
    "channels",
)
RESULTS_FILE = "sim_results.json"


def defaults(name: str) -> dict:
    """Default ``samples``, ``epochs`` and ``lr`` for data set ``name``."""
    return _DEFAULTS.get(name, _FALLBACK)


def load_data(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)`` for SIM, through :func:`deqkit.data.load_dataset`.

    Inputs are flattened and only scaled to [0, 1] (``normalize=False``): the attacks clip to
    that box and ε is in pixel units. SIM needs no validation split (``val_fraction=0``), so the
    whole training pool trains (all 60k Fashion-MNIST training images). The test split is the
    official one where there is one (fashion-mnist, mnist; in file order), else deqkit.data's
    stratified hold-out drawn with ``test_seed=0``, the same for every ``seed``. The training
    samples come in a random order drawn with ``seed``; the command takes the first ``m`` of them
    as state samples.
    """
    splits = load_dataset(name, data_dir=data_dir, val_fraction=0.0, seed=seed, test_seed=0, flatten=True, normalize=False)
    return (*splits.train.tensors, *splits.test.tensors)


def baseline_mlp(opts: Any, xtr: Tensor, ytr: Tensor) -> tuple[nn.Module, str]:
    """The MLP baseline: loaded from ``opts.baseline`` if that file exists, else trained (and
    saved there atomically when a path is given); returns it and how it was obtained."""
    d = defaults(opts.dataset)
    if getattr(opts, "model", "mlp") == "cnn":
        shape = image_shape(xtr.shape[1])
        net = nn.Sequential(
            nn.Unflatten(1, shape),
            *make_cnn(
                shape,
                list(opts.channels),
                int(ytr.max()) + 1,
                kernel_size=opts.kernel_size,
                stride=opts.stride,
                padding=opts.padding,
            ),
        )
    else:
        net = make_mlp(xtr.shape[1], list(opts.hidden), int(ytr.max()) + 1)
    if opts.baseline and os.path.exists(opts.baseline):
        state = load_torch_file(
            opts.baseline,
            what="a baseline state_dict",
            advice="pass the file deqkit sim wrote with --baseline, or another path to train a new one",
        )
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise OptionError(
                f"--baseline {opts.baseline}: its weights do not fit this network ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}); check --dataset, --model, --hidden/--channels, or pass "
                f"another --baseline path to train a new one"
            ) from exc
        net.eval()
        return net, f"loaded {opts.baseline}"
    t0 = time.perf_counter()
    epochs = opts.epochs if opts.epochs is not None else d["epochs"]
    train_mlp(net, xtr, ytr, epochs=epochs, lr=opts.lr or d["lr"], seed=opts.seed)
    how = f"trained in {time.perf_counter() - t0:.1f}s"
    if opts.baseline:
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        atomic_write_bytes(Path(opts.baseline), buf.getvalue())
    return net, how


def image_shape(p: int) -> tuple[int, int, int]:
    """``(1, H, W)`` of a square grey-scale image with ``p`` pixels (the data sets of ``deqkit sim``)."""
    side = int(round(p**0.5))
    if side * side != p:
        raise ValueError(f"--model cnn needs square grey-scale images; these inputs have {p} features")
    return (1, side, side)


def baseline_nnz(net: nn.Module, model: str, p: int) -> int:
    """Non-zero weights and biases of the baseline; for a CNN, of its unrolled (implicit) form."""
    if model == "cnn":
        return sum(
            int((lay.weight.abs() >= 1e-6).sum()) + int((lay.bias.abs() >= 1e-6).sum()) for lay in cnn_layers(net, (p,)).layers
        )
    return baseline_nonzeros(net)


class Robustness:
    """Accuracy under each attack of ``opts.attacks`` at each ε, on the first ``n_attack`` test samples,
    with the same random PGD starts for every model (and for a resumed run)."""

    def __init__(self, opts: Any, x: Tensor, y: Tensor) -> None:
        self.n = min(opts.n_attack, len(x))
        self.x, self.y = x[: self.n], y[: self.n]
        self.attacks, self.eps, self.pgd_steps, self.seed = list(opts.attacks), list(opts.eps), opts.pgd_steps, opts.seed

    def __call__(self, model: nn.Module) -> dict:
        accs: dict = {}
        if self.n == 0:
            return accs
        for att in self.attacks:
            kw = {"steps": self.pgd_steps, "seed": self.seed} if att == "pgd" else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                accs[att] = {str(k): v for k, v in robust_accuracy(model, self.x, self.y, self.eps, attack=att, **kw).items()}
        return accs

    @property
    def columns(self) -> list[tuple[str, str]]:
        """The table's (attack, ε) columns."""
        return [(a, str(float(e))) for a in self.attacks for e in self.eps if self.n]


def row_key(row: dict) -> tuple[float, int]:
    """A results row's key: ``(density target, fine-tuning epochs)`` for a run with ``--density``,
    else ``(λ, fine-tuning epochs)``."""
    target = row.get("density_target")
    return (row["lam"] if target is None else target, row["finetune_epochs"])


def resumed_rows(path: Path, results: dict) -> dict:
    """Rows of a previous run at ``path`` by ``(λ or density target, fine-tuning epochs)``, after checking that
    it was made with the same settings and baseline as ``results`` (ValueError otherwise)."""
    if not path.exists():
        return {}
    old = read_json_file(path, what="SIM results", advice="delete it or use another --out, or drop --resume to start over")
    changed = [f"{k}: {old.get(k)!r} -> {results[k]!r}" for k in RESULT_SETTINGS if old.get(k) != results[k]]
    if changed:
        raise ValueError(
            f"--resume: {path} was written with other settings ({'; '.join(changed)}); "
            "use another --out, or drop --resume to start over"
        )
    ob, nb = old.get("baseline", {}), results["baseline"]
    if (ob.get("accuracy"), ob.get("nnz")) != (nb["accuracy"], nb["nnz"]):
        raise ValueError(
            f"--resume: {path} was written for another baseline (test accuracy {ob.get('accuracy')} vs "
            f"{nb['accuracy']}); pass the same --baseline file"
        )
    return {row_key(r): r for r in old.get("sim", [])}


def _gain(model: ImplicitModel) -> float | None:
    """The model's certified ℓ∞ gain (:func:`deqkit.sim.robust.certified_linf_gain`); ``None`` if not certified."""
    g = certified_linf_gain(model)
    return g.gain if g.certified else None


def _evaluate(
    model: ImplicitModel,
    lam: float,
    res: Any,
    finetune_epochs: int,
    test: tuple[Tensor, Tensor],
    base_nnz: int,
    robust: Robustness,
) -> dict:
    """The results row of one fitted (or fine-tuned) implicit model."""
    with warnings.catch_warnings(record=True) as fwd_warn:
        warnings.simplefilter("always", ConvergenceWarning)
        acc = accuracy(model, *test)
    nnz = count_nonzeros(model)
    return {
        "lam": lam,
        "lam_scale": getattr(res, "lam_scale", None),
        "density_target": getattr(res, "density_target", None),
        "lam_path": [list(p) for p in res.search.path] if getattr(res, "search", None) is not None else None,
        "input_radius": getattr(res, "input_radius", None),  # the bounds applied (absolute)
        "output_radius": getattr(res, "output_radius", None),
        "finetune_epochs": finetune_epochs,
        "accuracy": acc,
        "nnz": nnz,
        "nnz_fraction": nnz["total"] / base_nnz,
        "A_inf_norm": model.inf_norm(),
        "wellposed": model.is_wellposed(),
        "solve_time_s": res.time_s,
        "solver_converged": res.converged,
        "forward_warnings": len(fwd_warn),
        "robust": robust(model),
        "certified_gain": _gain(model),
    }


class SimJob:
    """One ``deqkit sim`` run: the data, the baseline and its states, then one fit per λ."""

    def __init__(self, opts: Any, log: Callable[..., None] = print) -> None:
        if getattr(opts, "output_skip", True) is None:  # the default: what the baseline's output layer reads
            opts.output_skip = getattr(opts, "model", "mlp") != "cnn"
        self.opts, self.log = opts, log
        self.out = Path(opts.out)
        self.dtype = torch.float64
        self.device = torch.device(opts.device)

    def _load(self) -> None:
        o = self.opts
        xtr, ytr, xte, yte = load_data(o.dataset, o.data_dir, seed=o.seed)
        if o.n_test is not None:
            xte, yte = xte[: o.n_test], yte[: o.n_test]
        net, self.how = baseline_mlp(o, xtr, ytr)
        dev, dt = self.device, self.dtype
        self.net = net.to(device=dev, dtype=dt).eval()
        self.xtr, self.ytr = xtr.to(dev, dt), ytr.to(dev)
        self.test = (xte.to(dev, dt), yte.to(dev))
        self.robust = Robustness(o, *self.test)
        self.m = o.samples or defaults(o.dataset)["samples"]
        if self.m > len(self.xtr):
            raise OptionError(
                f"--samples {self.m}: the {o.dataset} training split has only {len(self.xtr)} images; "
                f"pass --samples {len(self.xtr)} or fewer"
            )

    def _results_header(self) -> dict:
        o = self.opts
        model = getattr(o, "model", "mlp")
        base_acc, base_nnz = accuracy(self.net, *self.test), baseline_nnz(self.net, model, self.xtr.shape[1])
        results: dict[str, Any] = {"command": " ".join(sys.argv)}
        results.update({k: getattr(o, k) for k in RESULT_SETTINGS})
        results.update(
            {
                "hidden": list(o.hidden),
                "channels": list(getattr(o, "channels", [])),
                "samples": self.m,
                "attacks": list(o.attacks),
                "eps": list(o.eps),
            }
        )
        results.update(
            {
                "baseline": {"accuracy": base_acc, "nnz": base_nnz, "how": self.how, "robust": self.robust(self.net)},
                "sim": [],
                "complete": False,
            }
        )
        arch = (
            f"CNN channels {','.join(map(str, o.channels))}"
            if model == "cnn"
            else f"MLP {self.xtr.shape[1]}-{'-'.join(map(str, o.hidden))}-{int(self.ytr.max()) + 1}"
        )
        self.log(f"baseline {arch} ({self.how}): test accuracy {100 * base_acc:.2f}%, non-zeros {base_nnz}")
        return results

    def _fit(self, target: float, warm: Optional[ImplicitModel]) -> Any:
        """One fit: at λ = ``target``, or (``--density``) at the λ the search finds for density ``target``."""
        o = self.opts
        by_density = bool(o.density)
        log = None if o.no_progress else (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            shape = {} if "support" in self.fit_extra else {"structure": o.structure, "output_skip": o.output_skip}
            res = fit_sim(
                self.states,
                None if by_density else target,
                density=target if by_density else None,
                density_tol=o.density_tol,
                method=o.fit_solver,
                mode=o.mode,
                admm_ab=self.admm_ab,
                admm_cd=self.admm_cd,
                warm_start=warm,
                lam_scale=o.lam_scale,
                penalty=o.penalty,
                input_weight=o.input_weight,
                **shape,
                debias=o.debias,
                input_radius=o.input_radius,
                output_radius=o.output_radius,
                radius_scale=o.radius_scale,
                log=log if by_density else None,
                **self.fit_extra,
            )
        for w in caught:
            print(f"  warning: {w.message}", file=sys.stderr)
        return res

    def _finetuned_row(self, model: ImplicitModel, lam: float, res: Any, base_nnz: int) -> dict:
        o = self.opts
        tuned = copy.deepcopy(model)
        progress = (
            None
            if o.no_progress
            else (
                lambda e, loss: print(
                    f"  fine-tuning λ={lam:g}: epoch {e}/{o.finetune_epochs}, train loss {loss:.4f}", file=sys.stderr, flush=True
                )
            )
        )
        t0 = time.perf_counter()
        finetune(tuned, self.xtr, self.ytr, epochs=o.finetune_epochs, lr=o.finetune_lr, seed=o.seed, log=progress)
        elapsed = time.perf_counter() - t0
        row = _evaluate(tuned, lam, res, o.finetune_epochs, self.test, base_nnz, self.robust)
        row["finetune_time_s"] = elapsed
        return row

    def _sweep(self, results: dict, done: dict) -> None:
        """Fit every λ (skipping those kept from a resumed run); the file is rewritten after each."""
        o = self.opts
        base_nnz = results["baseline"]["nnz"]
        prev = None
        for target in o.density or o.lam:
            wanted = [(target, 0)] + ([(target, o.finetune_epochs)] if o.finetune_epochs else [])
            what = f"density {100 * target:g}%" if o.density else f"λ={target:g}"
            if all(key in done for key in wanted):
                print(f"  {what}: kept from {self.out / RESULTS_FILE} (--resume)", file=sys.stderr)
                results["sim"] += [done[key] for key in wanted]
                prev = None  # the next λ's solve starts cold: same program, same solution within tolerance
                continue
            res = self._fit(target, prev)
            lam = res.lam
            model = prev = res.model.eval()
            results["sim"].append(_evaluate(model, lam, res, 0, self.test, base_nnz, self.robust))
            if o.finetune_epochs:
                results["sim"].append(self._finetuned_row(model, lam, res, base_nnz))
            # every finished λ is on disk (atomically): an interrupted run keeps it for --resume
            atomic_write_bytes(self.out / RESULTS_FILE, json.dumps(results, indent=2).encode())
        asked = {row_key(r) for r in results["sim"]}
        kept = [r for key, r in done.items() if key not in asked]  # λ of the earlier run not asked for now
        results["sim"] = sorted(results["sim"] + kept, key=row_key)

    def run(self) -> dict:
        """The whole job; returns the results written to ``sim_results.json``."""
        o = self.opts
        torch.manual_seed(o.seed)
        self._load()
        results = self._results_header()
        done = resumed_rows(self.out / RESULTS_FILE, results) if o.resume else {}
        self.fit_extra: dict[str, Any] = {}
        if getattr(o, "model", "mlp") == "cnn":
            p = self.xtr.shape[1]
            self.states = collect_cnn_states(self.net, self.xtr[: self.m], in_shape=(p,), kappa=o.kappa, dtype=self.dtype)
            self.fit_extra["support"] = cnn_support(self.net, (p,), output_skip=o.output_skip)
        else:
            self.states = collect_states(self.net, self.xtr[: self.m], kappa=o.kappa, dtype=self.dtype)
        self.admm_ab = BatchedADMM(rho=o.rho, max_iter=o.max_iter_ab, mode=o.mode)
        self.admm_cd = BatchedADMM(rho=o.rho, max_iter=o.max_iter_cd, mode=o.mode)
        self._sweep(results, done)
        self.log(format_table(results, self.robust.columns))
        results["complete"] = True
        atomic_write_bytes(self.out / RESULTS_FILE, json.dumps(results, indent=2).encode())
        if not o.no_plot:
            plot(results, self.out / "sim.png")
        self.log(f"wrote {self.out / RESULTS_FILE}" + ("" if o.no_plot else f" and {self.out / 'sim.png'}"))
        return results


def run_sim(opts: Any, log: Callable[..., None] = print) -> dict:
    """Run the SIM job for the options of ``deqkit sim``; returns the results."""
    return SimJob(opts, log).run()


def format_table(results: dict, eps_cols: list[tuple[str, str]]) -> str:
    """The printed table: the baseline, then one line per (λ, fine-tuning) row."""
    head = f"{'model':>18} {'acc %':>7} {'nnz':>7} {'nnz %':>6} {'‖A‖∞':>6} {'ok':>3} {'solve s':>7}"
    head += "".join(f" {a}@{float(e):g}".rjust(11) for a, e in eps_cols)

    def fmt(name, acc, nnz, frac, ainf, ok, t, rob):
        s = f"{name:>18} {100 * acc:7.2f} {nnz:7d} {100 * frac:6.1f} {ainf:>6} {ok:>3} {t:>7}"
        return s + "".join(f"{100 * rob[a][e]:11.1f}" for a, e in eps_cols)

    b = results["baseline"]
    lines = [head, fmt("baseline", b["accuracy"], b["nnz"], 1.0, "-", "-", "-", b["robust"])]
    for r in results["sim"]:
        name = f"SIM λ={r['lam']:.3g}" + (f" +ft{r['finetune_epochs']}" if r["finetune_epochs"] else "")
        lines.append(
            fmt(
                name,
                r["accuracy"],
                r["nnz"]["total"],
                r["nnz_fraction"],
                f"{r['A_inf_norm']:.3f}",
                "yes" if r["wellposed"] else "NO",
                f"{r['solve_time_s']:.1f}",
                r["robust"],
            )
        )
    return "\n".join(lines)


def _plot_accuracy(ax: Any, results: dict) -> None:
    rows = results["sim"]
    plain = [r for r in rows if not r.get("finetune_epochs")]
    tuned = [r for r in rows if r.get("finetune_epochs")]
    lams = [r["lam"] for r in plain]
    ax.plot(lams, [100 * r["accuracy"] for r in plain], "o-", color="C0", label="SIM accuracy")
    if tuned:
        ax.plot(
            [r["lam"] for r in tuned], [100 * r["accuracy"] for r in tuned], "o:", color="C2", label="SIM + fine-tuning accuracy"
        )
    ax.axhline(100 * results["baseline"]["accuracy"], color="C0", ls="--", label="baseline accuracy")
    ax.set_xscale("log")
    ax.set_xlabel("λ")
    ax.set_ylabel("test accuracy (%)", color="C0")
    ax2 = ax.twinx()
    ax2.plot(lams, [r["nnz"]["total"] for r in plain], "s-", color="C1", label="SIM non-zeros")
    ax2.axhline(results["baseline"]["nnz"], color="C1", ls="--", label="baseline non-zeros")
    ax2.set_ylabel("non-zeros of (A, B, C, D)", color="C1")
    ax.set_title(
        f"accuracy and non-zeros against λ ({plain[0].get('lam_scale') or 'paper'} units)"
        if plain
        else "accuracy and non-zeros against λ"
    )


def _plot_robustness(ax: Any, results: dict) -> None:
    for attack in results["attacks"]:
        ls = "-" if attack == "fgsm" else ":"
        rob = results["baseline"]["robust"].get(attack)
        if rob:
            eps = sorted(float(e) for e in rob)
            ax.plot(eps, [100 * rob[str(e)] for e in eps], "k" + ls, marker="o", label=f"baseline {attack}")
        for i, r in enumerate(results["sim"]):
            rob = r["robust"].get(attack)
            if rob:
                eps = sorted(float(e) for e in rob)
                ax.plot(
                    eps,
                    [100 * rob[str(e)] for e in eps],
                    ls,
                    color=f"C{i % 10}",
                    marker=".",
                    label=f"SIM λ={r['lam']:.3g} ({100 * r['nnz_fraction']:.0f}% nnz)"
                    f"{' +ft' if r.get('finetune_epochs') else ''} {attack}",
                )
    ax.set_xlabel("ε (ℓ∞)")
    ax.set_ylabel("accuracy under attack (%)")
    ax.set_title("robustness")
    ax.legend(fontsize=7)


def plot(results: dict, path: Path) -> None:
    """Accuracy and non-zeros against λ; accuracy under attack against ε (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _plot_accuracy(axes[0], results)
    _plot_robustness(axes[1], results)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
