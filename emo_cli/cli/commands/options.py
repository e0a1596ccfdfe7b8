"""Options shared by several commands: the pass options of profile, eval and prune, and the
choices built from the registries (experts/methods.py for --method, gguf/quants.py for --quant)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Optional

import typer

from emo_cli.experts.methods import (
    ALLOCATIONS,
    METHODS,
    REPORT_METHODS,
    Method,
    check_allocation,
    method_named,
    report_method_named,
)
from emo_cli.gguf.quants import QUANTS, quant_types

STREAMING = typer.Option("auto", "--streaming", help="auto: keep the whole model in memory when it fits, else "
                         "stream it one layer at a time from the mapped checkpoint (decided before loading); "
                         "on: always stream; off: never.")
MAX_MEMORY: Optional[float] = typer.Option(None, "--max-memory", help="GiB of memory emo may use (default: what "
                                           "the machine has available now).")
DEVICE = typer.Option("cpu", "--device")
DTYPE = typer.Option("auto", "--dtype")


def _choices(name: str, values: Iterable[str], check: Callable[[str], object]):
    """A str-valued Enum of `values`, which typer lists in --help and completes, and the parser of
    its option. A bad value ends in `check`'s one-line error and exit status 1, like any bad input,
    where typer would print a usage box and exit with 2; either way before anything is loaded."""
    choice = enum.Enum(name, {v: v for v in values}, type=str)

    def parse(value):
        if isinstance(value, choice):
            return value
        check(value)
        return choice(value)

    return choice, parse


def method_labels(methods: Iterable[Method]) -> str:
    """What each of `methods` ranks by, for an option's help."""
    return "; ".join(f"{m.name}: {m.label}" for m in methods) + "."


MethodChoice, parse_method = _choices("MethodChoice", (m.name for m in METHODS), method_named)
ReportMethodChoice, parse_report_method = _choices("ReportMethodChoice", (m.name for m in REPORT_METHODS),
                                                   report_method_named)
QuantChoice, parse_quant = _choices("QuantChoice", QUANTS, quant_types)
AllocationChoice, parse_allocation = _choices("AllocationChoice", ALLOCATIONS, check_allocation)
