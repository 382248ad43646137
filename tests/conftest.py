import json
import random
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "hellaswag"
WORDS = "the a man woman dog runs jumps sits on roof ball camera smiles then walks into water".split()


def synthetic_items(n, seed=0, start=0, wikihow_every=0):
    """HellaSwag-format items with random words; every `wikihow_every`-th has WikiHow bracket tags."""
    rng = random.Random(seed)

    def sentence(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    items = []
    for i in range(start, start + n):
        ctx_a, ctx_b = sentence(8).capitalize() + ".", sentence(2)
        if wikihow_every and i % wikihow_every == 0:
            ctx_a = "[header] How to " + sentence(3) + " [title] " + sentence(4) + " [step] " + sentence(3)
        items.append({"ind": i, "activity_label": sentence(2).title(), "ctx_a": ctx_a, "ctx_b": ctx_b,
                      "ctx": ctx_a + " " + ctx_b, "endings": [sentence(6) + "." for _ in range(4)],
                      "label": rng.randrange(4), "split": "val", "split_type": rng.choice(["indomain", "zeroshot"])})
    return items


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def hellaswag_dir(tmp_path):
    """A folder shaped like HellaSwag's data/: 300 train items, 200 val items."""
    d = tmp_path / "hellaswag"
    d.mkdir()
    write_jsonl(d / "hellaswag_train.jsonl", synthetic_items(300, seed=1))
    write_jsonl(d / "hellaswag_val.jsonl", synthetic_items(200, seed=2))
    return d


@pytest.fixture
def shared_hellaswag():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the original project's files are not on this machine")
    return SHARED
