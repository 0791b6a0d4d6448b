"""The ``deqkit bench`` job: run the chosen sections, print their tables and targets, and refresh
their sections of BENCHMARKS.md (``--write``).

Sections: ``step`` (:mod:`.step`), ``memory`` (:mod:`.memory`), ``torchdeq`` (:mod:`.torchdeq`),
``accuracy`` (:mod:`.accuracy`) — the four BENCHMARKS.md sections, ``all`` — and ``mdeq``
(:mod:`.mdeq`, the multiscale DEQ: a BENCHMARKS.md section of its own, not part of ``all``),
``sim-speed`` (:mod:`.sim_speed`) and ``sim-pruning`` (:mod:`.sim_pruning`, a small run by default), printed only. How time and memory are measured: :mod:`.measure`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from . import accuracy, mdeq, memory, step, torchdeq
from .accuracy import ACCURACY_NOTES, ACCURACY_SETS, accuracy_targets, bench_accuracy, format_accuracy_tables
from .config import HARD, REFERENCE, BenchConfig
from .krylov import KRYLOV_NOTES, bench_krylov, format_krylov_table, krylov_targets
from .mdeq import MDEQ_NOTES, MDEQBenchConfig, bench_mdeq, format_mdeq_tables, mdeq_targets
from .memory import MEMORY_NOTES, bench_memory, format_memory_table, memory_targets
from .report import header, write_sections
from .sim_pruning import SimPruningConfig, bench_sim_pruning
from .sim_speed import SimSpeedConfig, bench_sim_speed
from .step import STEP_NOTES, bench_step, format_step_table, step_targets
from .torchdeq import INSTALL_HINT, TORCHDEQ_NOTES, bench_torchdeq, format_torchdeq_tables, torchdeq_targets

__all__ = ["SECTIONS", "HEADINGS", "SuiteConfig", "run_suite", "render_sections", "SECTION_NAMES"]

#: the BENCHMARKS.md sections this suite owns: ``--section`` name → heading
SECTIONS: dict[str, str] = {"step": step.TITLE, "memory": memory.TITLE, "torchdeq": torchdeq.TITLE, "accuracy": accuracy.TITLE}

#: every section ``--write`` refreshes: those of ``all`` and ``mdeq`` (run only when asked for)
HEADINGS: dict[str, str] = {**SECTIONS, "mdeq": mdeq.TITLE}

#: ``--section`` choices: the BENCHMARKS.md sections, ``mdeq``, ``sim-speed``, ``sim-pruning`` and ``all`` (the four of :data:`SECTIONS`)
SECTION_NAMES = (*SECTIONS, "mdeq", "sim-speed", "sim-pruning", "all")
_QUICK = BenchConfig("reference-quick", batch=16)


@dataclass
class SuiteConfig:
    """Settings of :func:`run_suite` (the flags of ``deqkit bench``)."""

    section: str = "all"
    quick: bool = False
    repeats: Optional[int] = None
    seeds: int = 10
    threads: int = 1
    write: Optional[str] = None
    sim_speed: SimSpeedConfig = field(default_factory=SimSpeedConfig)
    sim_pruning: SimPruningConfig = field(default_factory=SimPruningConfig)
    #: the ``mdeq`` section's problem (``quick`` replaces it by :meth:`MDEQBenchConfig.quick`, keeping its ``seed``
    #: and ``checkpoint``; ``repeats`` by :attr:`rounds`)
    mdeq: MDEQBenchConfig = field(default_factory=MDEQBenchConfig)
    #: where every section's models and batches live (``"cpu"``, ``"cuda"``, ``"cuda:N"``)
    device: str = "cpu"

    @property
    def rounds(self) -> int:
        """Interleaved timing rounds: ``repeats``, else 15 (``quick``: 2)."""
        return self.repeats if self.repeats is not None else (2 if self.quick else 15)

    def wanted(self) -> list[str]:
        return list(SECTIONS) if self.section == "all" else [self.section]

    def command(self) -> str:
        """The command line that reproduces this run (as written into BENCHMARKS.md)."""
        c = "deqkit bench" + (" --quick" if self.quick else "") + (f" --section {self.section}" if self.section != "all" else "")
        c += f" --repeats {self.repeats}" if self.repeats is not None else ""
        c += f" --seeds {self.seeds}" if self.seeds != 10 and not self.quick else ""
        c += f" --threads {self.threads}" if self.threads != 1 else ""
        c += f" --device {self.device}" if self.device != "cpu" else ""
        if self.section == "mdeq":
            d, m = MDEQBenchConfig(), self.mdeq
            c += f" --mdeq-batch {m.batch}" if m.batch != d.batch else ""
            c += f" --mdeq-warmup-steps {m.warmup_steps}" if m.warmup_steps != d.warmup_steps else ""
            c += " --mdeq-caps " + ",".join(map(str, m.caps)) if m.caps != d.caps else ""
            c += f" --mdeq-seed {m.seed}" if m.seed != d.seed else ""
            c += f" --mdeq-checkpoint {m.checkpoint}" if m.checkpoint else ""
        c += f" --write {self.write}" if self.write else ""
        return c


def _print_targets(targets: list[str]) -> None:
    for t in targets:
        print(" -", t)


def _run_step(cfg: SuiteConfig) -> list:
    configs = (
        [_QUICK, BenchConfig("hard-quick", width=128, init_scale=0.7, tol=1e-6, max_iter=40, batch=16)]
        if cfg.quick
        else [REFERENCE, HARD]
    )
    out = []
    for bcfg in configs:
        print(f"\n== step cost: {bcfg.name} ==")
        out.append((bcfg, bench_step(bcfg, repeats=cfg.rounds, device=cfg.device)))
        _print_targets(step_targets(out[-1][1]))
    return out


def _run_memory(cfg: SuiteConfig) -> tuple:
    print("\n== memory against forward depth ==")
    bcfg = _QUICK if cfg.quick else REFERENCE
    rows = bench_memory(bcfg, (5, 10, 20) if cfg.quick else (10, 30, 100), device=cfg.device)
    _print_targets(memory_targets(rows))
    return bcfg, rows


_HARD_QUICK = BenchConfig("hard-quick", width=128, init_scale=0.7, tol=1e-6, max_iter=40, batch=16)


def _run_torchdeq(cfg: SuiteConfig) -> Optional[dict]:
    """Both configurations side by side with torchdeq, and GMRES's cost per Krylov step on each."""
    configs = [_QUICK, _HARD_QUICK] if cfg.quick else [REFERENCE, HARD]
    runs = []
    for bcfg in configs:
        print(f"\n== against torchdeq: {bcfg.name} ==")
        res = bench_torchdeq(bcfg, repeats=cfg.rounds, device=cfg.device)
        if res is None:
            return None
        _print_targets(torchdeq_targets(res))
        runs.append(res)
    print("\n== GMRES cost per Krylov step ==")
    krylov = [bench_krylov(bcfg, repeats=cfg.rounds, device=cfg.device) for bcfg in configs]
    print(format_krylov_table(krylov))
    _print_targets(krylov_targets(krylov))
    return {"runs": runs, "krylov": krylov}


def _run_accuracy(cfg: SuiteConfig) -> list:
    print("\n== accuracy (deqkit compare over seeds) ==")
    if cfg.quick:
        res = bench_accuracy(
            ACCURACY_SETS[:1], seeds=(0, 1), subset=300, epochs=1, estimators=["exact", "unrolled", "shine"], device=cfg.device
        )
    else:
        res = bench_accuracy(seeds=tuple(range(cfg.seeds)), device=cfg.device)
    print(format_accuracy_tables(res))
    _print_targets(accuracy_targets(res))
    return res


def _run_mdeq(cfg: SuiteConfig) -> dict:
    print("\n== multiscale DEQ (MDEQ): estimators, memory, torchdeq ==")
    mcfg = MDEQBenchConfig.quick(seed=cfg.mdeq.seed, checkpoint=cfg.mdeq.checkpoint) if cfg.quick else cfg.mdeq
    res = bench_mdeq(replace(mcfg, repeats=cfg.rounds), device=cfg.device)
    _print_targets(mdeq_targets(res))
    return res


def _run_sim_speed(cfg: SuiteConfig) -> dict:
    print("\n== SIM: batched ADMM against CVXPY ==")
    return bench_sim_speed(cfg.sim_speed, device=cfg.device)


def _run_sim_pruning(cfg: SuiteConfig) -> dict:
    print("\n== SIM against magnitude pruning at matched density ==")
    return bench_sim_pruning(cfg.sim_pruning)


RUNNERS: dict[str, Callable[[SuiteConfig], Any]] = {
    "step": _run_step,
    "memory": _run_memory,
    "torchdeq": _run_torchdeq,
    "accuracy": _run_accuracy,
    "mdeq": _run_mdeq,
    "sim-speed": _run_sim_speed,
    "sim-pruning": _run_sim_pruning,
}


def run_suite(cfg: SuiteConfig) -> dict[str, Any]:
    """Run the sections of ``cfg`` on ``cfg.device``; with ``cfg.write``, refresh their BENCHMARKS.md sections."""
    torch.set_num_threads(cfg.threads)
    if torch.device(cfg.device).type == "cuda":
        print(f"device {cfg.device}: {torch.cuda.get_device_name(torch.device(cfg.device))}")
    start = time.perf_counter()
    results = {name: RUNNERS[name](cfg) for name in cfg.wanted()}
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    sections = render_sections(results, cfg.command(), cfg.threads, cfg.device)
    if cfg.write and sections:
        write_sections(cfg.write, {HEADINGS[k]: v for k, v in sections.items()})
        print(f"wrote sections {', '.join(repr(HEADINGS[k]) for k in sections)} of {cfg.write}")
    return results


def _targets(targets: list[str]) -> list[str]:
    return [f"- {t}" for t in targets]


def _render_step(results: list, head: str) -> str:
    parts = [SECTIONS["step"], "", head]
    for cfg, rows in results:
        parts += [format_step_table(cfg, rows), ""]
        parts += ["Targets (" + cfg.name + "):", ""] + _targets(step_targets(rows)) + [""]
    return "\n".join(parts + [STEP_NOTES])


def _render_memory(results: tuple, head: str) -> str:
    cfg, rows = results
    parts = [SECTIONS["memory"], "", head, format_memory_table(cfg, rows), "", "Targets:", ""]
    return "\n".join(parts + _targets(memory_targets(rows)) + ["", MEMORY_NOTES])


def _render_torchdeq(res: Optional[dict], head: str) -> str:
    parts = [SECTIONS["torchdeq"], "", head]
    if res is None:
        return "\n".join(parts + [INSTALL_HINT, ""])
    for run in res["runs"]:
        parts += [format_torchdeq_tables(run), "", "Targets:", ""] + _targets(torchdeq_targets(run)) + [""]
    parts += ["GMRES cost per Krylov step against one VJP:", "", format_krylov_table(res["krylov"]), "", "Targets:", ""]
    return "\n".join(parts + _targets(krylov_targets(res["krylov"])) + ["", TORCHDEQ_NOTES, KRYLOV_NOTES])


def _render_accuracy(res: list, head: str) -> str:
    parts = [SECTIONS["accuracy"], "", head, format_accuracy_tables(res), "Targets:", ""]
    return "\n".join(parts + _targets(accuracy_targets(res)) + ["", ACCURACY_NOTES])


def _render_mdeq(res: dict, head: str) -> str:
    parts = [HEADINGS["mdeq"], "", head, format_mdeq_tables(res), "", "Targets:", ""]
    return "\n".join(parts + _targets(mdeq_targets(res)) + ["", MDEQ_NOTES])


RENDERERS: dict[str, Callable[[Any, str], str]] = {
    "step": _render_step,
    "memory": _render_memory,
    "torchdeq": _render_torchdeq,
    "accuracy": _render_accuracy,
    "mdeq": _render_mdeq,
}


def render_sections(results: dict[str, Any], command: str, threads: int, device: str = "cpu") -> dict[str, str]:
    """Markdown of each BENCHMARKS.md section that has results (keys of :data:`HEADINGS`)."""
    head = header(command, threads, device)
    return {name: render(results[name], head) for name, render in RENDERERS.items() if name in results}
