"""The benchmark suite (``deqkit bench``): an application over the library, not part of it.

- :mod:`.step`: step cost per gradient estimator (time, solver work, memory, cosine to Exact);
- :mod:`.memory`: memory against the forward depth, against naive BPTT;
- :mod:`.torchdeq`: side by side with torchdeq 0.1.0;
- :mod:`.mdeq`: the multiscale DEQ on Fashion-MNIST (estimators, memory, torchdeq);
- :mod:`.accuracy`: ``deqkit compare`` over seeds, at equal epochs and equal wall-clock;
- :mod:`.sim_speed`: the SIM batched ADMM against CVXPY;
- :mod:`.sim_pruning`: SIM against magnitude pruning at matched density (clean and attacked accuracy);
- :mod:`.measure`: how time and memory are measured; :mod:`.report`: BENCHMARKS.md sections;
- :mod:`.suite`: running sections, the job behind ``deqkit bench``.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers; at run time they are imported on first use
    from .accuracy import ACCURACY_SETS, accuracy_targets, bench_accuracy, format_accuracy_tables
    from .config import HARD, REFERENCE, BenchConfig, build_model, digits_batch
    from .mdeq import MDEQ_ESTIMATORS, MDEQBenchConfig, bench_mdeq, format_mdeq_tables, mdeq_targets
    from .measure import peak_allocated_bytes, saved_tensor_bytes
    from .memory import BPTT, bench_memory, format_memory_table, memory_targets
    from .report import md_table, replace_sections, write_sections
    from .sim_pruning import SimPruningConfig, bench_sim_pruning
    from .sim_speed import SimSpeedConfig, bench_sim_speed
    from .step import STEP_ESTIMATORS, bench_step, format_step_table, step_targets
    from .suite import SECTIONS, SuiteConfig, render_sections, run_suite
    from .torchdeq import INSTALL_HINT, bench_torchdeq, format_torchdeq_tables, torchdeq_available, torchdeq_targets

__all__ = [
    "ACCURACY_SETS",
    "BPTT",
    "BenchConfig",
    "HARD",
    "INSTALL_HINT",
    "MDEQ_ESTIMATORS",
    "MDEQBenchConfig",
    "REFERENCE",
    "SECTIONS",
    "STEP_ESTIMATORS",
    "SimPruningConfig",
    "SimSpeedConfig",
    "SuiteConfig",
    "accuracy_targets",
    "bench_accuracy",
    "bench_mdeq",
    "bench_memory",
    "bench_sim_pruning",
    "bench_sim_speed",
    "bench_step",
    "bench_torchdeq",
    "build_model",
    "digits_batch",
    "format_accuracy_tables",
    "format_mdeq_tables",
    "format_memory_table",
    "format_step_table",
    "format_torchdeq_tables",
    "md_table",
    "mdeq_targets",
    "memory_targets",
    "peak_allocated_bytes",
    "render_sections",
    "replace_sections",
    "run_suite",
    "saved_tensor_bytes",
    "step_targets",
    "torchdeq_available",
    "torchdeq_targets",
    "write_sections",
]

#: the submodules that define the names above (searched in this order on first use)
_MODULES = ("accuracy", "config", "mdeq", "measure", "memory", "report", "sim_pruning", "sim_speed", "step", "suite", "torchdeq")


def __getattr__(name: str) -> Any:
    """Import a public name's submodule on first use (PEP 562): importing this package imports no
    submodule, so ``python -m deqkit.apps.bench.sim_pruning`` (or ``.krylov``, ``.scale``) finds
    its module not yet imported."""
    if name in __all__:
        for module in _MODULES:
            mod = importlib.import_module(f".{module}", __name__)
            if hasattr(mod, name):  # (a name re-imported by another submodule is the same object)
                value = getattr(mod, name)
                globals()[name] = value
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
