"""The audit's pair scores and the fewest clean pairs it calibrates on: plain names and numbers, kept low in the
house so that the settings (`dpo/core/config.py`: --score, --audit-score and their help) name them without importing the
audit (dpo/audit/audit.py, which scores and estimates with them).

A score is how much more the reference model likes a pair's labelled chosen response than its rejected one, from
the two summed log-probs and the pair's texts; a flipped pair's score is the negative of a clean pair's.
"""

# Clean pairs the audit needs at least: with fewer, a handful of pairs decides a; and 20 is the fewest at which a
# detector of accuracy 0.75 (better than SmolLM2-135M's 0.66 on HellaSwag) is told apart from chance (15 of 20:
# Wilson interval 0.53-0.89).
MIN_CALIBRATION = 20


def chars(text: str) -> int:
    """Length of a response in characters, without leading whitespace (like lm-evaluation-harness's acc_norm)."""
    return max(1, len(text.lstrip()))


DEFAULT_SCORE = "margin_per_char"
SCORES = {  # name -> score of a pair from its summed log-probs (chosen, rejected) and texts
    "margin": lambda c, r, pair: c - r,
    "margin_per_char": lambda c, r, pair: c / chars(pair["chosen"]) - r / chars(pair["rejected"]),
}
