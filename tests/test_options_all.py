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

#: (module, public name, owning branch) of every option-taking public constructor outside the registries
PUBLIC = [
    ("deqkit", "DEQ", "core"),
    ("deqkit.linear", "FixedPointAdjoint", "core"),
    ("deqkit.diagnostics", "gradient_quality", "core"),
    ("deqkit.registry", "Registry", "core"),
    ("deqkit.solvers", "IterateTracker", "core"),
    ("deqkit.models", "MLPCell", "apps"),
    ("deqkit.models", "ConvCell", "apps"),
    ("deqkit.models", "DEQClassifier", "apps"),
    ("deqkit.train", "TrainConfig", "apps"),
    ("deqkit.train", "Trainer", "apps"),
    ("deqkit.data", "load_dataset", "apps"),
    ("deqkit.linear", "CG", "bilevel"),
    ("deqkit.bilevel", "BilevelProblem", "bilevel"),
    ("deqkit.bilevel", "LBFGS", "bilevel"),
    ("deqkit.bilevel", "HOAG", "bilevel"),
    ("deqkit.bilevel", "ExactHypergradient", "bilevel"),
    ("deqkit.bilevel", "SHINEHypergradient", "bilevel"),
    ("deqkit.bilevel", "JacobianFreeHypergradient", "bilevel"),
    ("deqkit.bilevel", "load_hpo_dataset", "bilevel"),
    ("deqkit.sim", "ImplicitModel", "sim"),
    ("deqkit.sim", "BatchedADMM", "sim"),
    ("deqkit.sim", "fit_sim", "sim"),
]
#: branches of this refactor not merged here yet: their entries may be missing or not yet validated
#: on this branch (xfail with the reason); empty once every branch is merged, so that every entry is enforced
PENDING_MERGE: set[str] = set()
#: known gaps in other owners' files, each with its owner (an xfail naming it); delete an entry once fixed
KNOWN_GAPS: dict[tuple[str, str], str] = {}


def _entries() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for kind, reg in (("solver", SOLVERS), ("linear", LINEAR_SOLVERS), ("estimator", ESTIMATORS)):
        out += [(f"{kind}:{name}", factory) for name, factory in reg.items()]
    for mod, name, owner in PUBLIC:
        out.append((f"{mod}.{name}", (mod, name, owner)))
    return out


def _resolve(target: object) -> object:
    if not isinstance(target, tuple):
        return target
    mod, name, owner = target
    if (mod, name) in KNOWN_GAPS:
        pytest.xfail(KNOWN_GAPS[(mod, name)])
    obj = getattr(importlib.import_module(mod), name, None)
    if (obj is None or not hasattr(obj, "valid_options")) and owner in PENDING_MERGE:
        pytest.xfail(f"{mod}.{name}: not yet validated on this branch (the {owner} branch adds it)")
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


@pytest.mark.parametrize(
    "make, name, option",
    [
        ("deqkit:make_solver", "broyden", "memory"),
        ("deqkit:make_estimator", "neumann", "damping"),
        ("deqkit:make_linear_solver", "gmres", "restart"),
        ("deqkit.bilevel:make_hypergradient", "exact", "tol"),
    ],
)
def test_the_make_functions_pass_a_typo_to_the_constructor_check(make, name, option):
    mod, fn = make.split(":")
    factory = getattr(importlib.import_module(mod), fn)
    with pytest.raises(OptionError, match=f"Did you mean {option!r}"):
        factory(name, **{_typo(option): 1})
    with pytest.raises(OptionError, match="Did you mean"):
        factory(name + "x")  # an unknown name
