"""Preference pairs from HellaSwag items: splits, the two prompt formats, label noise, reading and writing.

Everything an item contributes (its prompt, its few-shot draw, its rejected ending) depends only on the item and
the seed, never on the noise level, so the noisy variants of a dataset differ only in which pairs are swapped.
Flips follow one seeded permutation of the pairs: noise 0.25 flips a superset of what noise 0.1 flips.
"""

import json
import random
from dataclasses import dataclass
from typing import NamedTuple

from dpo.core.config import FEWSHOT_INDICES, FORMATS
from dpo.core.files import InputError
from dpo.data import sources


@dataclass
class Splits:
    fewshot: list  # items shown as solved examples in `mc` prompts
    train: list  # the training pool: pairs for N are made from train[:N]
    eval: list  # the evaluation set (validation pairs and the scorer)
    train_source: str  # how the pool was drawn, for the manifest


def make_splits(train_items, val_items, fewshot_items=None, *, fewshot_indices=FEWSHOT_INDICES, train_start=50,
                eval_start=0, eval_size=1000, train_from_val=False) -> Splits:
    """Few-shot pool, training pool and evaluation set, deterministically.

    The default mirrors the original study: few-shot = train[indices], pool = train[train_start:],
    eval = val[eval_start:eval_start+eval_size]. With `train_from_val` the "train" source is the validation
    items outside the evaluation set, in file order (for a local copy of HellaSwag without its train split).
    """
    if eval_start < 0 or eval_size < 1 or eval_start + eval_size > len(val_items):
        raise InputError(f"evaluation set val[{eval_start}:{eval_start + eval_size}] does not fit the "
                         f"{len(val_items)} validation items")
    eval_items = val_items[eval_start:eval_start + eval_size]
    if train_from_val:
        source = val_items[:eval_start] + val_items[eval_start + eval_size:]
        desc = f"validation items outside val[{eval_start}:{eval_start + eval_size}]"
    else:
        if train_items is None:
            raise InputError("no training items: give a train file, or --train-from-val")
        source, desc = train_items, "train"
    if fewshot_items is None:
        bad = [i for i in fewshot_indices if not 0 <= i < len(source)]
        if bad:
            raise InputError(f"few-shot indices {bad} are outside the {len(source)} {desc} items")
        fewshot_items = [source[i] for i in fewshot_indices]
    pool = [it for it in source[train_start:] if it not in fewshot_items]
    eval_ids = {it.id for it in eval_items}
    leaked = [it.id for it in pool + list(fewshot_items) if it.id in eval_ids]
    if leaked:
        raise InputError(f"training or few-shot items overlap the evaluation set: {leaked[:5]}")
    return Splits(list(fewshot_items), pool, eval_items, f"{desc}[{train_start}:]")


class Holdout(NamedTuple):
    val: list  # the validation rows' indices
    pool: list  # the training pool's


def holdout_split(count: int, holdout: float, where: str) -> Holdout:
    """(validation row indices, training pool indices) of a source with `count` rows, both in file order: the
    validation rows are round(holdout * count) of them (or `holdout` rows, for holdout >= 1), the first of a
    permutation seeded by the row count alone, so that every seed, noise level and N share them."""
    k = int(holdout) if holdout >= 1 else int(holdout * count + 0.5)
    if k >= count:
        raise InputError(f"{where}: --holdout {holdout:g} holds out {k} of its {count} rows, leaving none to train on")
    order = list(range(count))
    random.Random(f"holdout/{count}").shuffle(order)
    return Holdout(sorted(order[:k]), sorted(order[k:]))


def mc_block(item, answer=None) -> str:
    lines = [f'Context: "{item.ctx}"'] + [f'{i}: "{e}"' for i, e in enumerate(item.endings)]
    lines.append("Best Continuation:" + ("" if answer is None else f" {answer}"))
    return "\n".join(lines)


def mc_prompt(item, shots) -> str:
    """The original study's multiple-choice prompt: solved examples, then the item, ending at the answer slot."""
    return "\n\n".join([mc_block(s, s.label) for s in shots] + [mc_block(item)])


def item_rng(seed: int, item) -> random.Random:
    return random.Random(f"{seed}/{item.id}")


def draw(item, fewshot, k: int, seed: int) -> tuple:
    """The seeded choices of one item: its k few-shot examples and its rejected ending, never one with the gold
    ending's text (`dpo eval` draws the same shots, so its mc prompts equal the validation pairs' for the same seed)."""
    from dpo.data.hellaswag import clean

    rng = item_rng(seed, item)
    shots = rng.sample(fewshot, k) if k else []
    gold = clean(item.endings[item.label])
    wrong = rng.choice([i for i, e in enumerate(item.endings) if i != item.label and clean(e) != gold])
    return shots, wrong


def make_pair(item, fmt: str, fewshot, k: int, seed: int) -> dict:
    """The clean pair of one item: chosen is the gold answer, rejected a seeded random other one."""
    from dpo.data.hellaswag import harness_endings, harness_query

    shots, wrong = draw(item, fewshot, k, seed)
    if fmt == "mc":
        prompt, chosen, rejected = mc_prompt(item, shots), f" {item.label}", f" {wrong}"
    elif fmt == "completion":
        endings = harness_endings(item)
        prompt, chosen, rejected = harness_query(item), " " + endings[item.label], " " + endings[wrong]
    else:
        raise InputError(f"unknown format {fmt!r}, expected one of {FORMATS}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "flipped": False,
            "item": item.id, "label": item.label, "rejected_index": wrong}


def flip_count(noise: float, n: int) -> int:
    if not 0.0 <= noise <= 1.0:
        raise InputError(f"noise {noise} is outside [0, 1]")
    return int(noise * n + 0.5)  # round half up


def add_noise(pairs: list, noise: float, seed: int) -> list:
    """Swap chosen and rejected in exactly round(noise * len(pairs)) pairs, picked by a seeded permutation."""
    order = list(range(len(pairs)))
    random.Random(f"{seed}/flips/{len(pairs)}").shuffle(order)
    flip = set(order[:flip_count(noise, len(pairs))])
    out = []
    for i, p in enumerate(pairs):
        p = dict(p)
        if i in flip:
            p["chosen"], p["rejected"], p["flipped"] = p["rejected"], p["chosen"], True
        out.append(p)
    return out


NOISE_MODELS = ("uniform", "length", "field")  # --noise; --noise-longer/--noise-shorter; --flip-prob-field


def length_flip_probs(pairs: list, longer: float, shorter: float) -> list:
    """The length model: flip probability `longer` for a pair whose chosen response has more characters than its
    rejected one, else `shorter` (an annotator who favours long answers flips the pairs whose better answer is the
    shorter one)."""
    return [longer if len(p["chosen"]) > len(p["rejected"]) else shorter for p in pairs]


def add_row_noise(pairs: list, probs: list, seed: int) -> list:
    """Swap chosen and rejected of pair i when u_i < probs[i], u_0, u_1, ... one seeded uniform draw per pair in
    order. u_i depends only on the seed and i: a higher probability flips a superset of the pairs, and the flips of
    the first N pairs do not depend on how many follow. Each pair records its probability as `flip_prob`."""
    rng = random.Random(f"{seed}/row-flips")
    out = []
    for p, prob in zip(pairs, probs, strict=True):
        p = {**p, "flip_prob": prob}
        if rng.random() < prob:
            p["chosen"], p["rejected"], p["flipped"] = p["rejected"], p["chosen"], True
        out.append(p)
    return out


def make_pairs(pool, fewshot, *, fmt="mc", n=1000, noise=0.0, seed=1, k=1) -> list:
    if n < 1 or n > len(pool):
        raise InputError(f"N={n} pairs asked for, but the training pool has {len(pool)} items")
    if k > len(fewshot):
        raise InputError(f"{k} few-shot examples asked for, but the few-shot pool has {len(fewshot)}")
    clean_pairs = [make_pair(item, fmt, fewshot, k, seed) for item in pool[:n]]
    return add_noise(clean_pairs, noise, seed)


def pairs_name(fmt: str, n: int, noise: float, seed: int, k: int = 1, stride: int = 0) -> str:
    shots = "" if k == 1 else f"_k{k}"
    sliced = f"_stride{stride}" if stride else ""
    return f"{fmt}_n{n}_noise{noise:g}_seed{seed}{shots}{sliced}.json"


def seed_slice(pool: list, seed: int, stride: int) -> list:
    """The part of the training pool a seed draws from: all of it, or with a stride, from item stride x (seed - 1)
    on (seeds 1, 2, ... then train on disjoint items while N <= stride)."""
    return pool[stride * (seed - 1):] if stride else pool


def val_pairs_name(fmt: str, n: int, seed: int, k: int = 1) -> str:
    shots = "" if k == 1 else f"_k{k}"
    return f"{fmt}_val_n{n}_seed{seed}{shots}.json"


def source_pairs_name(stem: str, n: int, noise_tag: str, seed: int) -> str:
    return f"{stem}_n{n}_{noise_tag}_seed{seed}.json"


def source_val_name(stem: str, n: int) -> str:
    return f"{stem}_heldout_n{n}.json"


def dump_pairs(pairs: list) -> bytes:
    return (json.dumps(pairs, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def read_pairs(path, chat=None) -> list:
    """Read a preference file for training or an audit: a JSON list (this project's files and the original
    project's alike) or JSON Lines, or any source `dpo data --pairs` reads, of {prompt, chosen, rejected, ...} rows
    as strings or in TRL's conversational form (rendered with `chat`, a sources.ChatTemplate: the training model's).
    Other fields are kept; a `flipped` of 0/1 becomes false/true, and a missing one stays missing (the truth is not
    known).

    Refused, naming the file and pair: a missing or non-string prompt/chosen/rejected, an empty or whitespace-only
    one, chosen identical to rejected, a `flipped` that is not true/false/0/1, text with lone surrogates."""
    pairs, rows = [], sources.read_rows(path, noun="pair")
    sources.conversations(rows, sources.Fields(), "pair")  # one form: all conversations or all strings
    for i, row in enumerate(rows):
        p = {"item": f"pair/{i}", **row.data, **sources.to_pair(row, sources.Fields(), chat, noun="pair")}
        if "flipped" in p:
            p["flipped"] = read_flipped(p["flipped"], row.here("pair"))
        pairs.append(p)
    return pairs


def read_flipped(value, here: str) -> bool:
    """true/false, or 0/1 as other tools write booleans; never 2, 1.0 or "1"."""
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    shown = value if type(value) is int else type(value).__name__
    raise InputError(f"{here}: field 'flipped' is {shown}, expected true or false (or 0/1)")


def split_summary(splits: Splits) -> dict:
    return {
        "fewshot": [it.id for it in splits.fewshot],
        "train_pool": {"source": splits.train_source, "size": len(splits.train),
                       "first": splits.train[0].id if splits.train else None},
        "eval": {"size": len(splits.eval), "first": splits.eval[0].id, "last": splits.eval[-1].id},
        "eval_overlap_checked": True,
    }

