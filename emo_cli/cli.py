"""The `emo` command line: a thin typer shell; each command lives in emo_cli/commands/."""

from __future__ import annotations

import sys

import typer

from .commands import chat, demo, export, inspect, pretrain, profile, prune, report

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build small task-specific models out of one EMO mixture of experts, and run them locally.\n\n"
                       "  emo profile data/med.jsonl\n  emo prune --budget 25%\n  emo chat --model slim-med.gguf")

app.command("info")(inspect.info)
app.command("eval")(inspect.eval_cmd)
app.command("pretrain")(pretrain.pretrain_cmd)
app.command("profile")(profile.profile)
app.command("prune")(prune.prune)
app.command("report")(report.report)
app.command("export")(export.export)
app.command("chat")(chat.chat)
app.command("demo")(demo.demo)


def main() -> None:
    from .errors import EmoError

    try:
        app()
    except EmoError as e:
        from .ui import err

        err.print("error: " + " ".join(str(e).split("\n")), markup=False, highlight=False, soft_wrap=True, style="red")
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `emo ... | head`: the reader left; nothing to report
        sys.exit(141)
    except OSError as e:  # the system refused (disk full, no permission, read-only): say what, once
        from .ui import err

        where = f"{e.filename}: " if e.filename else ""
        err.print(f"error: {where}{e.strerror or e}", markup=False, highlight=False, soft_wrap=True, style="red")
        sys.exit(1)


if __name__ == "__main__":
    main()
