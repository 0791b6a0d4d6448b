"""Every public constructor (and option-taking public function) of deqkit rejects a typo'd keyword
with an OptionError that names the valid options and says "did you mean".

The walk covers the core (every registered solver, linear solver and estimator, plus the DEQ
layer and the helpers), the models, the trainer, the bi-level and the SIM packages, by their
final public names. ``validated_options`` checks the keywords before the constructor runs, so
no valid arguments are needed.
"""

from __future__ import annotations

import importlib

import pytest

from deqkit.errors import OptionError
from deqkit.registry import ESTIMATORS, LINEAR_SOLVERS, SOLVERS

#: (module, public name) of every option-taking public constructor outside the registries
PUBLIC = [
    ("deqkit", "DEQ"),
    ("deqkit.linear", "FixedPointAdjoint"),
    ("deqkit.diagnostics", "gradient_quality"),
    ("deqkit.registry", "Registry"),
    ("deqkit.solvers", "IterateTracker"),
    ("deqkit.models", "MLPCell"),
    ("deqkit.models", "ConvCell"),
    ("deqkit.models", "DEQClassifier"),
    ("deqkit.train", "TrainConfig"),
    ("deqkit.train", "Trainer"),
    ("deqkit.data", "load_dataset"),
    ("deqkit.linear", "CG"),
    ("deqkit.bilevel", "BilevelProblem"),
    ("deqkit.bilevel", "LBFGS"),
    ("deqkit.bilevel", "HOAG"),
    ("deqkit.bilevel", "ExactHypergradient"),
    ("deqkit.bilevel", "SHINEHypergradient"),
    ("deqkit.bilevel", "JacobianFreeHypergradient"),
    ("deqkit.bilevel", "make_hypergradient"),
    ("deqkit.bilevel", "load_hpo_dataset"),
    ("deqkit.sim", "ImplicitModel"),
    ("deqkit.sim", "BatchedADMM"),
    ("deqkit.sim", "fit_sim"),
]
#: owned by other branches of this refactor: until they are merged these may be missing or not yet
#: validated here; the lead deletes this set at merge so that every entry is enforced
PENDING_MERGE = {
    ("deqkit.train", "Trainer"),
    ("deqkit.data", "load_dataset"),
    ("deqkit.linear", "CG"),
    ("deqkit.bilevel", "BilevelProblem"),
    ("deqkit.bilevel", "LBFGS"),
    ("deqkit.bilevel", "HOAG"),
    ("deqkit.bilevel", "ExactHypergradient"),
    ("deqkit.bilevel", "SHINEHypergradient"),
    ("deqkit.bilevel", "JacobianFreeHypergradient"),
    ("deqkit.bilevel", "make_hypergradient"),
    ("deqkit.bilevel", "load_hpo_dataset"),
    ("deqkit.sim", "ImplicitModel"),
    ("deqkit.sim", "BatchedADMM"),
    ("deqkit.sim", "fit_sim"),
}


def _entries() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for kind, reg in (("solver", SOLVERS), ("linear", LINEAR_SOLVERS), ("estimator", ESTIMATORS)):
        out += [(f"{kind}:{name}", factory) for name, factory in reg.items()]
    for mod, name in PUBLIC:
        out.append((f"{mod}.{name}", (mod, name)))
    return out


def _resolve(target: object) -> object:
    if not isinstance(target, tuple):
        return target
    mod, name = target
    obj = getattr(importlib.import_module(mod), name, None)
    if (obj is None or not hasattr(obj, "valid_options")) and target in PENDING_MERGE:
        pytest.xfail(f"{mod}.{name}: not yet validated on this branch (its owner's branch adds it)")
    assert obj is not None, f"{mod}.{name} is not public"
    return obj


def _typo(option: str) -> str:
    return option + option[-1]  # 'tol' -> 'toll', 'memory' -> 'memoryy'


@pytest.mark.parametrize("label, target", _entries(), ids=[label for label, _ in _entries()])
def test_a_typo_in_any_option_gets_did_you_mean(label, target):
    obj = _resolve(target)
    valid = getattr(obj, "valid_options", None)
    assert valid is not None, f"{label} is not decorated with @validated_options"
    for option in valid:
        with pytest.raises(OptionError) as exc:
            obj(**{_typo(option): 1})  # type: ignore[operator]
        msg = str(exc.value)
        assert "unknown option" in msg and f"Did you mean {option!r}" in msg, (label, option, msg)
        for v in valid:
            assert v in msg
