"""Reference log-probs, computed once and cached on disk: keyed, checksummed, spot-checked, locked, saved as they go.

The frozen reference is the policy before its first step, so a run computes them with its own model before
training. One cache file per combination of everything that changes the numbers (`cache_key`: the weights, the
tokenizer, the max length, the precision, the device type, --append-eos and --truncation-mode):

    {"format": 2, "key": {...}, "entries": {pair_key: [logp(lower response), logp(higher response)], ...},
     "sha256": sha256 of the entries}

An entry ignores which response is labelled chosen (`pair_key`), so the noisy variants of a dataset share it.

Trust nothing on disk: a file that does not parse, carries another key, has malformed or non-finite entries or a
wrong sha256 is reported in one `warning:` line and recomputed. The sha256 catches damage, not tampering (anyone who
can edit the file can recompute it), so `SPOT_CHECKS` of the cached pairs a run reads are then recomputed with a
fresh forward pass and compared (`tolerance`), and on a mismatch every entry is recomputed. They are drawn afresh by
every run from the OS's random source (`spot_checks`), so one who edits the cache cannot know which entries to spare:
an edit of at least `SPOT_SHARE` of the entries a run reads is caught with probability at least `SPOT_POWER`. Fewer
edited entries may go unnoticed (docs/trust.md). Writers merge their entries under a lock
(parallel sweep cells share a file) and write atomically, every `SAVE_SECONDS` and when interrupted, so Ctrl-C loses
at most that much work.
"""

import hashlib
import json
import math
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from dpo.core.files import InputError, atomic_write_json, lock_file, make_dirs, read_json
from dpo.core.truncation import DEFAULT_TRUNCATION
from dpo.engine.logprobs import Logps

FORMAT = 2
SAVE_SECONDS = 60.0
CHUNK_PAIRS = 256  # pairs computed between two chances to save
SPOT_SHARE = 0.05  # a cache with at least this share of the entries a run reads changed...
SPOT_POWER = 0.95  # ...is caught with at least this probability, by
SPOT_CHECKS = math.ceil(math.log(1 - SPOT_POWER) / math.log(1 - SPOT_SHARE))  # 59 pairs recomputed per run
_draw = random.SystemRandom()  # os.urandom: no seed, nothing a writer of the cache could predict


def cache_key(model_id: str, tokenizer, max_length: int, precision: str, device_type: str,
              append_eos: bool = False, truncation: str = DEFAULT_TRUNCATION) -> dict:
    """What the cached numbers depend on. append_eos (responses end with the EOS token) is in the key only when on,
    and the truncation mode only when it is not the default (keep_end), so the files of runs without them keep
    their names and contents."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())) + json.dumps(tokenizer.all_special_tokens)
    return {"model": model_id, "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(), "max_length": max_length,
            "precision": precision, "device": device_type, **({"append_eos": True} if append_eos else {}),
            **({"truncation_mode": truncation} if truncation != DEFAULT_TRUNCATION else {})}


def cache_path(cache_dir, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / "ref" / f"{digest}.json"


def tolerance(precision: str, value: float) -> float:
    """How far a recomputed summed log-prob may be from the cached one: batch composition changes the kernels a
    little (~1e-5 in fp32, ~1e-2 in bf16)."""
    return 1e-3 + 1e-5 * abs(value) if precision == "fp32" else 0.05 + 0.01 * abs(value)


def pair_key(pair) -> str:
    """Cache key of a pair that ignores which response is labelled chosen: a flipped pair hits the same entry."""
    low, high = sorted((pair["chosen"], pair["rejected"]))
    return hashlib.sha256(json.dumps([pair["prompt"], low, high]).encode()).hexdigest()


def entries_sha256(entries: dict) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


def _well_formed(entries) -> bool:
    return isinstance(entries, dict) and all(
        isinstance(k, str) and isinstance(v, list) and len(v) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        for k, v in entries.items())


def load(path: Path, key: dict, quiet: bool = False) -> dict:
    """The verified entries of a cache file ({} when it is absent or cannot be trusted, with a warning)."""
    if not path.is_file():
        return {}
    problem = None
    try:
        data = read_json(path, "a reference cache")
    except InputError:  # truncated, corrupted, nested too deeply, ...
        data, problem = None, "not a readable JSON cache file (truncated or corrupted)"
    if problem is None:
        if not isinstance(data, dict) or data.get("format") != FORMAT or not _well_formed(data.get("entries")):
            problem = "not a reference cache of this version, or malformed entries"
        elif data.get("key") != key:
            problem = "made for other weights, tokenizer or settings than its name says"
        elif data.get("sha256") != entries_sha256(data["entries"]):
            problem = "its checksum does not match its contents (edited or corrupted)"
    if problem:
        if not quiet:
            warn(f"{path}: {problem}; recomputing its reference log-probs")
        return {}
    return data["entries"]


@contextmanager
def locked(path: Path):
    make_dirs(path.parent)
    with lock_file(path.with_name(path.name + ".lock")):
        yield


def save(path: Path, key: dict, entries: dict, replace: bool = False) -> None:
    """Merge entries into the file under its lock (replace: drop what the file holds)."""
    with locked(path):
        merged = {} if replace else load(path, key, quiet=True)
        merged.update(entries)
        atomic_write_json(path, {"format": FORMAT, "key": key, "entries": merged, "sha256": entries_sha256(merged)})


def _oriented(pair, low_high) -> tuple:
    """(chosen, rejected) from an entry stored as (lower response, higher response)."""
    low, high = low_high
    return (low, high) if pair["chosen"] <= pair["rejected"] else (high, low)


def _entry(pair, chosen: float, rejected: float) -> list:
    return [chosen, rejected] if pair["chosen"] <= pair["rejected"] else [rejected, chosen]


def spot_checks(hits: list) -> list:
    """SPOT_CHECKS of the indices `hits` (the cached pairs a run reads), all of them when there are fewer, drawn
    without replacement from the OS's random source, afresh by every run: nobody who can write the cache knows
    which entries will be recomputed. If a share s of the hits is changed, every draw misses them with probability
    at most (1 - s) ** SPOT_CHECKS (drawing without replacement misses less often than with): 0.95 ** 59 = 0.048 at
    s = SPOT_SHARE = 0.05."""
    return _draw.sample(list(hits), min(SPOT_CHECKS, len(hits)))


def spot_check(compute, pairs, examples, hits: list, cached: dict, path: Path, key: dict) -> bool:
    """Whether the cached entries of a fresh draw of the hits (`spot_checks`) match a fresh forward pass, within
    `tolerance`. On a mismatch: False, after one warning saying how many differ."""
    checks = spot_checks(hits)
    if not checks:
        return True
    c, r = compute([examples[i] for i in checks])
    wrong = []
    for j, i in enumerate(checks):
        want = _oriented(pairs[i], cached[pair_key(pairs[i])])
        got = (c[j].item(), r[j].item())
        if any(abs(g - w) > tolerance(key["precision"], w) for g, w in zip(got, want)):
            wrong.append((want[0], got[0]))
    if wrong:
        warn(f"{path}: {len(wrong)} of {len(checks)} spot-checked reference log-probs differ from a fresh forward "
             f"pass (e.g. {wrong[0][0]:.4f} cached, {wrong[0][1]:.4f} now); recomputing every entry")
    return not wrong


class RefLogps(NamedTuple):
    """What `reference_logprobs` returns: the log-probs, and how many pairs were computed (not read from the cache)."""
    logps: Logps
    computed: int


def reference_logprobs(compute, pairs, examples, needed, path: Path, key: dict, desc: str) -> RefLogps:
    """Reference (chosen [N], rejected [N]) log-probs of pairs[i] for i in needed (NaN elsewhere), from the
    cache where it can be trusted, else computed with compute(list of examples) -> (chosen, rejected) tensors."""
    keys = [pair_key(p) for p in pairs]
    with locked(path):
        cached = load(path, key)
    replace = not spot_check(compute, pairs, examples, [i for i in needed if keys[i] in cached], cached, path, key)
    if replace:
        cached = {}
    missing = sorted({i for i in needed if keys[i] not in cached}, key=lambda i: examples[i].length)
    fresh, last_save = {}, time.monotonic()
    try:
        with tqdm(total=len(missing), desc=desc, unit="pair", disable=not missing, leave=False) as bar:
            for start in range(0, len(missing), CHUNK_PAIRS):
                chunk = missing[start:start + CHUNK_PAIRS]
                c, r = compute([examples[i] for i in chunk])
                for j, i in enumerate(chunk):
                    fresh[keys[i]] = _entry(pairs[i], c[j].item(), r[j].item())
                bar.update(len(chunk))
                if time.monotonic() - last_save > SAVE_SECONDS:
                    save(path, key, fresh, replace)
                    cached.update(fresh)
                    fresh, replace, last_save = {}, False, time.monotonic()
    finally:  # also on Ctrl-C: what was computed is kept
        if fresh or replace:
            save(path, key, fresh, replace)
    cached.update(fresh)
    chosen = torch.full((len(pairs),), float("nan"))
    rejected = torch.full((len(pairs),), float("nan"))
    for i in needed:
        chosen[i], rejected[i] = _oriented(pairs[i], cached[keys[i]])
    return RefLogps(Logps(chosen, rejected), len(missing))
