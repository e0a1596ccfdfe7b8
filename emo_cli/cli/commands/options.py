"""Options shared by the commands that run passes over data (profile, eval, prune)."""

from __future__ import annotations

from typing import Optional

import typer

STREAMING = typer.Option("auto", "--streaming", help="auto: keep the whole model in memory when it fits, else "
                         "stream it one layer at a time from the mapped checkpoint (decided before loading); "
                         "on: always stream; off: never.")
MAX_MEMORY: Optional[float] = typer.Option(None, "--max-memory", help="GiB of memory emo may use (default: what "
                                           "the machine has available now).")
DEVICE = typer.Option("cpu", "--device")
DTYPE = typer.Option("auto", "--dtype")
