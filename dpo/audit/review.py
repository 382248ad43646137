"""`dpo audit --review K` / `--reviewed review.csv`: a person judges a random sample of the file's pairs, and the
verdicts estimate the flip rate with no assumption at all, calibrate the score-based estimate on the file's own
distribution, and fix the labels of the pairs they cover.

The sample is drawn uniformly at random (without replacement, seeded): every pair is equally likely to be reviewed,
so the share of 'no' verdicts is an unbiased estimate of the file's flip rate, with a binomial (Wilson) interval.
No score is shown to the reviewer, so it cannot sway the verdict.
"""

import csv
import io
import json
from pathlib import Path

import numpy as np

from dpo.core.files import InputError, read_text

COLUMNS = ("index", "item", "prompt", "chosen", "rejected", "verdict")
VERDICTS = {"yes": False, "no": True}  # verdict -> flipped; 'unsure' and empty rows are left out
INSTRUCTIONS = ("For each row, read the prompt and both responses and write in the verdict column: yes (chosen is "
                "the better response), no (rejected is better: the pair is swapped) or unsure. Keep the other "
                "columns as they are. Then: dpo audit FILE --model M --reviewed review.csv")


def draw(n: int, k: int, seed: int) -> list:
    """k of the n pair indices, uniformly at random without replacement, in file order."""
    if k > n:
        raise InputError(f"--review {k}: the file has only {n} pairs (expected --review at most {n})")
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=k, replace=False))


def review_rows(pairs: list, indices) -> list:
    return [{"index": i, "item": pairs[i].get("item", ""), "prompt": pairs[i]["prompt"],
             "chosen": pairs[i]["chosen"], "rejected": pairs[i]["rejected"], "verdict": ""} for i in indices]


def csv_text(rows: list) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def read_rows(path) -> list:
    """The rows of a review file: CSV with a header, or JSON Lines."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such review file (expected the review.csv that --review K wrote)")
    text = read_text(path, "a review file (the review.csv that --review K wrote)")
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{line_no}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{line_no}: not JSON ({e.msg}): expected one review row per "
                                     "line") from None
        return rows
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("index", "verdict") if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r}: expected the columns {', '.join(COLUMNS)} that --review "
                         "wrote")
    return [(f"{path}: row {row_no}", row) for row_no, row in enumerate(reader, 2)]


def verdicts(path, pairs: list) -> dict:
    """index -> flipped (a 'no' verdict) for each row judged yes or no; 'unsure' and empty verdicts are left out.
    Refused, naming the row: an index that is not a pair of the file, a row whose prompt or responses are not
    that pair's (a review of another file), a verdict other than yes / no / unsure, a pair reviewed twice."""
    out = {}
    for here, row in read_rows(path):
        index = str(row.get("index", "")).strip()
        if not index.isdigit() or int(index) >= len(pairs):
            raise InputError(f"{here}: index {index!r}: expected the number of a pair of the file (0 to "
                             f"{len(pairs) - 1})")
        i, pair = int(index), pairs[int(index)]
        for key in ("prompt", "chosen", "rejected"):
            if key in row and row[key] != pair[key]:
                raise InputError(f"{here}: its {key} is not that of pair {i} of the audited file: expected a review "
                                 "of this file, with the prompt and responses as --review wrote them")
        verdict = str(row.get("verdict") or "").strip().lower()
        if verdict not in (*VERDICTS, "unsure", ""):
            raise InputError(f"{here}: verdict {row.get('verdict')!r}: expected yes (chosen is better), no "
                             "(rejected is better) or unsure")
        if i in out:
            raise InputError(f"{here}: pair {i} is reviewed twice: expected one row per pair")
        if verdict in VERDICTS:
            out[i] = VERDICTS[verdict]
    return out


def apply_verdicts(pairs: list, judged: dict) -> list:
    """The pairs with each reviewed one marked (`reviewed`: yes / no) and a pair judged 'no' swapped."""
    out = []
    for i, pair in enumerate(pairs):
        if i in judged:
            if judged[i]:
                pair = {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]}
                if "flipped" in pair:
                    pair["flipped"] = not pair["flipped"]
            pair = {**pair, "reviewed": "no" if judged[i] else "yes"}
        out.append(pair)
    return out
