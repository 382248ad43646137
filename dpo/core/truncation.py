"""Truncation: one table, `TRUNCATIONS` (--truncation-mode, TRL's names): how a pair longer than max_length is cut.
Pure functions of token-id lists; dpo/engine/logprobs.py applies them when it tokenizes pairs."""

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Truncation:
    """How a pair longer than max_length is cut: `cut(prompt, chosen, rejected, max_length)` gives the token lists
    kept, so that prompt + either response fits max_length and each response keeps at least one token."""
    name: str
    help: str
    cut: Callable
    need: Callable  # (prompt tokens, index of the first token where the responses differ) -> the smallest
    # max_length that keeps that pair's two responses apart
    trl_differs: str  # how TRL's truncation differs from this one (a run that cuts a pair says so, in a note)


def keep_end(prompt: list, chosen: list, rejected: list, max_length: int) -> tuple:
    """The end of each sequence survives: a response longer than max_length - 1 is cut from the right, then the
    prompt from the left, by the longer response (one prompt for both)."""
    chosen, rejected = chosen[: max_length - 1], rejected[: max_length - 1]
    room = max_length - max(len(chosen), len(rejected))
    return (prompt[-room:] if len(prompt) > room else prompt), chosen, rejected


def keep_start(prompt: list, chosen: list, rejected: list, max_length: int) -> tuple:
    """The start of each sequence survives: each response is cut from the right to what the prompt leaves; a prompt
    of max_length tokens or more is cut from the right to leave one."""
    prompt = prompt[: max_length - 1]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room]


TRUNCATIONS = {t.name: t for t in (
    Truncation("keep_end", "keep each sequence's end: the prompt is cut from the left (the question next to the "
               "responses survives), a response longer than max_length - 1 from the right", keep_end,
               need=lambda prompt, d: d + 2,
               trl_differs="TRL's default is keep_start (it keeps the prompt and cuts the responses' ends); its "
               "keep_end cuts each sequence's start on its own, here the prompt is cut once, by the longer response "
               "(for TRL's default: --truncation-mode keep_start)"),
    Truncation("keep_start", "keep each sequence's start, as TRL's default: the responses are cut from the right, "
               "the prompt only where it leaves no room for one token of them", keep_start,
               need=lambda prompt, d: len(prompt) + d + 1,
               trl_differs="TRL's keep_start scores nothing of a response when the prompt fills max_length; here "
               "the prompt is cut to leave each response its first token"),
)}
DEFAULT_TRUNCATION = "keep_end"  # this project's behaviour from the start: committed studies keep their numbers
