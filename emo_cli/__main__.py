"""`python -m emo_cli ...` is `emo ...` (torchrun and environments without the console script)."""

from .cli import main

main()
