"""`python -m emo_cli ...` is `emo ...` (torchrun and environments without the console script)."""

from emo_cli.cli.app import main

main()
