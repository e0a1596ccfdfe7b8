"""The `emo` command line: the typer app and one small module per command."""
