"""The `emo` command line: a thin typer shell; each command lives in emo_cli/cli/commands/."""

from __future__ import annotations

import sys

import typer

from emo_cli.cli.commands import chat, demo, export, finetune, info, merge, pretrain, profile, prune, report
from emo_cli.cli.commands import eval as eval_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build small task-specific models out of one EMO mixture of experts, and run them locally.\n\n"
                       "  emo profile data/med.jsonl\n  emo prune --budget 25%\n  emo chat --model slim-med.gguf")

app.command("info")(info.info)
app.command("eval")(eval_command.eval_cmd)
app.command("pretrain")(pretrain.pretrain_cmd)
app.command("profile")(profile.profile)
app.command("prune")(prune.prune)
app.command("report")(report.report)
app.command("export")(export.export)
app.command("chat")(chat.chat)
app.command("demo")(demo.demo)
app.command("finetune")(finetune.finetune_cmd)
app.command("merge-back")(merge.merge_back)


def _join_world():
    """Under torchrun: join the process group; ranks other than 0 print nothing (rank 0 reports)."""
    import os

    from emo_cli import ui
    from emo_cli.model.distributed import init_from_env

    w = init_from_env()
    if w.size > 1 and not w.writer:
        from rich.console import Console

        sys.stdout = open(os.devnull, "w")
        ui.out, ui.err = Console(file=sys.stdout), Console(file=sys.stdout)
    return w


def _leave_world() -> None:
    """Finish together, then tear the group down before the interpreter does: a rank that exits
    while a peer still talks to it, or whose Gloo context dies in interpreter teardown, can abort."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _fail_rank(w, message: str) -> None:
    """One line naming the rank, then exit at once: the others wait in a collective, and torchrun
    stops them when it sees this rank gone."""
    import os

    print(f"error: rank {w.rank}: {message}", file=sys.__stderr__, flush=True)
    os._exit(1)


def main() -> None:
    from emo_cli.errors import EmoError

    try:
        w = _join_world()
    except EmoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if w.size > 1:
        try:
            app()
        except SystemExit as e:
            if e.code:
                _fail_rank(w, "interrupted" if e.code == 130 else f"exit status {e.code}")
            _leave_world()
            raise
        except EmoError as e:
            _fail_rank(w, " ".join(str(e).split("\n")))
        except KeyboardInterrupt:
            _fail_rank(w, "interrupted")
        except Exception as e:  # a crash on one rank must not leave the others waiting
            _fail_rank(w, f"{type(e).__name__}: {e}")
        _leave_world()
        return
    try:
        app()
    except EmoError as e:
        from emo_cli.ui import err

        err.print("error: " + " ".join(str(e).split("\n")), markup=False, highlight=False, soft_wrap=True, style="red")
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `emo ... | head`: the reader left; nothing to report
        sys.exit(141)
    except OSError as e:  # the system refused (disk full, no permission, read-only): say what, once
        from emo_cli.ui import err

        where = f"{e.filename}: " if e.filename else ""
        err.print(f"error: {where}{e.strerror or e}", markup=False, highlight=False, soft_wrap=True, style="red")
        sys.exit(1)


if __name__ == "__main__":
    main()
