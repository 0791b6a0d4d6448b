"""Markdown for BENCHMARKS.md: tables, the command header, and in-place refresh of this suite's sections."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from ..._io import atomic_write_text


def machine(device: str = "cpu") -> str:
    """The machine a run's figures come from: CPU cores, and the GPU (or "no GPU")."""
    gpu = "no GPU"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return f"{os.cpu_count()}-core CPU, {gpu}"


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_range(values: Sequence[float], fmt: str = ".2f") -> str:
    """``median [min, max]``."""
    if not values:
        return "n/a"
    return f"{format(med(values), fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def kb(n: float) -> str:
    return f"{n / 1024:.1f}"


def ratio(a: float, b: float) -> float:
    return a / b if b and b > 0 and math.isfinite(a) else float("nan")


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def mark(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def header(command: str, threads: int, device: str = "cpu") -> str:
    """The line above a section's tables: today's date, the machine, the versions, the command."""
    return (
        f"Command ({datetime.date.today().isoformat()}, {machine(device)}, torch {torch.__version__}, {threads} thread(s), "
        f"Python {platform.python_version()}):\n\n"
        f"    {command}\n"
    )


def replace_sections(text: str, sections: dict[str, str]) -> str:
    """Replace (or append) each ``## Title`` section of ``text``; other sections stay byte-for-byte.

    A section runs from its ``## `` heading line to the next line starting with ``## `` (outside
    fenced code blocks) or the end of the file. ``sections`` maps the heading line to the new body
    (starting with that heading).
    """
    lines = text.splitlines(keepends=True)
    # split into chunks: (heading or None, lines)
    chunks: list[tuple[Optional[str], list[str]]] = [(None, [])]
    fence = False
    for line in lines:
        if line.lstrip().startswith("```"):
            fence = not fence
        if not fence and line.startswith("## "):
            chunks.append((line.rstrip("\n").rstrip(), [line]))
        else:
            chunks[-1][1].append(line)
    done = set()
    out: list[str] = []
    for heading, body in chunks:
        if heading in sections:
            new = sections[heading].rstrip("\n") + "\n\n"
            out.append(new)
            done.add(heading)
        else:
            out.extend(body)
    result = "".join(out)
    for heading, body in sections.items():
        if heading not in done:
            if result and not result.endswith("\n\n"):
                result = result.rstrip("\n") + "\n\n"
            result += body.rstrip("\n") + "\n\n"
    return result.rstrip("\n") + "\n"


def write_sections(path: str, sections: dict[str, str]) -> None:
    """Refresh ``sections`` (heading → markdown) in ``path`` atomically (temp file + ``os.replace``)."""
    p = Path(path)
    old = p.read_text() if p.exists() else ""
    atomic_write_text(p, replace_sections(old, sections))
