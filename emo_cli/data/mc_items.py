"""Multiple-choice items (question, choices, answer), their few-shot prompts, and the text EMO's
selection protocol profiles: the few-shot prompt plus the gold answer (docs/design.md#selection-methods).

Shared by the data readers (profiling MC rows) and multiple-choice scoring, so the prompt an
expert set is chosen on is the prompt it is evaluated on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from emo_cli.errors import EmoError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_FIELDS = ("question", "choices", "answer")


@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int
    prefix: str = ""  # the in-context examples before the question

    @property
    def context(self) -> str:
        return self.prefix + self.question

    @property
    def solved(self) -> str:
        """The item with its gold answer, as a shot and as the text selection profiles."""
        return f"{self.context} {self.choices[self.answer]}"


def is_mc_table(columns: list[str]) -> bool:
    return set(MC_FIELDS) <= set(columns)


def mc_item(row: dict, where: str) -> MCItem:
    """One table row as an item; one-line errors name `where` (file and row)."""
    question, choices, ans = row.get("question"), row.get("choices"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise EmoError(f"{where}: question is not text")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, (str, int, float)) for c in choices):
        raise EmoError(f"{where}: needs a list of at least two choices")
    if isinstance(ans, str):
        a = ans.strip()
        idx = LETTERS.index(a.upper()) if len(a) == 1 and a.upper() in LETTERS else (int(a) if a.isdigit() else -1)
    elif isinstance(ans, int) and not isinstance(ans, bool):
        idx = ans
    else:
        idx = -1
    if not 0 <= idx < len(choices):
        raise EmoError(f"{where}: answer {ans!r} is not one of its {len(choices)} choices")
    return MCItem(question, [str(c) for c in choices], idx)


def with_shots(items: list[MCItem], shots: int, seed: int = 0) -> list[MCItem]:
    """Each item preceded by `shots` solved items drawn from the others (never itself), with a
    generator seeded by (seed, position), so a prompt does not depend on which items are kept."""
    if shots < 0:
        raise EmoError("--shots must not be negative")
    if shots == 0:
        return list(items)
    if shots >= len(items):
        raise EmoError(f"--shots {shots} needs more than {shots} items; the data has {len(items)}")
    out = []
    for i, it in enumerate(items):
        rng = random.Random(f"emo-shots:{seed}:{i}")
        picks = rng.sample([j for j in range(len(items)) if j != i], shots)
        prefix = "".join(items[j].solved + "\n\n" for j in picks)
        out.append(MCItem(it.question, it.choices, it.answer, prefix))
    return out
