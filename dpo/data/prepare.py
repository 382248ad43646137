"""`dpo data`: HellaSwag, or your own preference data (--pairs) -> splits -> (noisy) preference files + a manifest,
all written atomically.

The manifest records, per file, the settings and source files (sha256) it was made from; `ensure_pairs` (for
`train` and sweeps) reuses a file only when they match the current ones, and rebuilds it otherwise."""

import hashlib
import os
import random
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple

from dpo.core.config import DataConfig
from dpo.core.files import (
    InputError,
    atomic_write_bytes,
    atomic_write_json,
    check_readable,
    check_writable,
    lock_file,
    make_dirs,
    read_json,
    sha256_file,
)
from dpo.data import hellaswag, pairs
from dpo.data.userdata import load_source, make_from_source, source_names, source_settings

GRID_NOISE = (0.0, 0.25, 0.5, 0.75, 1.0)
GRID_SEEDS = (1, 2, 3, 4, 5)


def source_files(cfg: DataConfig) -> dict:
    """Paths of the train / val / few-shot files: explicit files, else --hellaswag-dir, else a download."""
    folder = Path(cfg.hellaswag_dir) if cfg.hellaswag_dir else None
    if folder is not None and not folder.is_dir():
        raise InputError(f"{folder}: --hellaswag-dir is not a folder")
    files = {}
    for split, explicit in (("val", cfg.val_file), ("train", cfg.train_file)):
        if explicit:
            files[split] = Path(explicit)
        elif split == "train" and cfg.train_from_val:
            continue
        elif folder is not None:
            files[split] = folder / f"hellaswag_{split}.jsonl"
            if not files[split].is_file():
                hint = " (this copy has no train split: add --train-from-val)" if split == "train" else ""
                raise InputError(f"{files[split]}: no such file{hint}")
        else:
            files[split] = hellaswag.download(split, cfg.raw_dir)
    if cfg.fewshot_file:
        files["fewshot"] = Path(cfg.fewshot_file)
    return files


def in_order(items, order: str):
    """items as --item-order puts them: as read, or one fixed permutation (seeded by their count alone)."""
    if order == "file" or items is None:
        return items
    shuffled = list(items)
    random.Random(f"items/{len(items)}").shuffle(shuffled)
    return shuffled


def load_splits(cfg: DataConfig, files=None):
    files = files or source_files(cfg)
    val = in_order(hellaswag.read_items(files["val"], "val"), cfg.item_order)
    train = in_order(hellaswag.read_items(files["train"], "train") if "train" in files else None, cfg.item_order)
    fewshot = hellaswag.read_items(files["fewshot"], "fewshot") if "fewshot" in files else None
    splits = pairs.make_splits(train, val, fewshot, fewshot_indices=cfg.fewshot_index_list(),
                               train_start=cfg.train_start, eval_start=cfg.eval_start, eval_size=cfg.eval_size,
                               train_from_val=cfg.train_from_val)
    return splits, files


# The DataConfig fields a pair file's content depends on (besides the source files): recorded in its manifest
# entry, and a file is reused only when they and the sources' sha256 are unchanged. Validation pairs do not depend
# on the training pool (n, noise, train_start).
VAL_SETTINGS = ("format", "seed", "fewshot", "fewshot_indices", "train_from_val", "eval_start", "eval_size")
TRAIN_SETTINGS = VAL_SETTINGS + ("n", "noise", "train_start")


def settings(cfg: DataConfig, validation: bool = False) -> dict:
    values = {name: getattr(cfg, name) for name in (VAL_SETTINGS if validation else TRAIN_SETTINGS)}
    if cfg.item_order != "file":  # recorded only when not the default: files made before it stay valid
        values["item_order"] = cfg.item_order
    if cfg.seed_stride and not validation:
        values["seed_stride"] = cfg.seed_stride
    return {**values, "fewshot_indices": cfg.fewshot_index_list()}


def train_name(cfg: DataConfig, noise: float, seed: int) -> str:
    return pairs.pairs_name(cfg.format, cfg.n, noise, seed, cfg.fewshot, cfg.seed_stride)


def hash_sources(files: dict) -> dict:
    """{role: {path, sha256}} of the HellaSwag source files, each checked first (files.check_readable): a FIFO or a
    3 GB file is refused before hashing would block on it or read it all."""
    for path in files.values():
        check_readable(path, "HellaSwag JSONL")
    return {role: {"path": str(p), "sha256": sha256_file(p)} for role, p in files.items()}


@contextmanager
def locked(out_dir: Path):
    """An exclusive lock on out_dir (parallel sweeps and trainings may write the same files and manifest)."""
    make_dirs(out_dir)
    with lock_file(out_dir / ".manifest.lock"):
        yield


def read_manifest(out_dir: Path) -> dict:
    path = out_dir / "manifest.json"
    if not os.path.lexists(path):  # (a FIFO or a device in its place is refused by read_json, not replaced)
        return {}
    manifest = read_json(path, "the manifest `dpo data` writes (delete it to rebuild every file)")
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: expected a JSON object (delete it to rebuild every file)")
    return manifest


def make(cfg: DataConfig, jobs, files: dict, sources: dict) -> dict:
    """name -> (pairs, manifest entry) for one pair file per (noise, seed) in jobs plus the clean validation
    pairs of each seed, all in memory."""
    splits, _ = load_splits(cfg, files)
    common = {"format": cfg.format, "fewshot": cfg.fewshot, "sources": sources,
              "splits": pairs.split_summary(splits)}
    outputs = {}
    for noise, seed in jobs:
        job = replace(cfg, noise=noise, seed=seed)
        made = pairs.make_pairs(pairs.seed_slice(splits.train, seed, cfg.seed_stride), splits.fewshot,
                                fmt=cfg.format, n=cfg.n, noise=noise, seed=seed, k=cfg.fewshot)
        outputs[train_name(cfg, noise, seed)] = (
            made, {"n": cfg.n, "noise": noise, "seed": seed, "flipped": sum(p["flipped"] for p in made),
                   "train_items": {"source": splits.train_source, "first": made[0]["item"], "last": made[-1]["item"]},
                   **common, "settings": settings(job)})
    for seed in sorted({seed for _, seed in jobs}):
        made = [pairs.make_pair(it, cfg.format, splits.fewshot, cfg.fewshot, seed) for it in splits.eval]
        outputs[pairs.val_pairs_name(cfg.format, len(made), seed, cfg.fewshot)] = (
            made, {"n": len(made), "noise": 0.0, "seed": seed, "flipped": 0, "validation": True,
                   **common, "settings": settings(replace(cfg, seed=seed), validation=True)})
    return outputs


def write(out_dir: Path, outputs: dict) -> dict:
    """Write the pair files and merge their entries into out_dir/manifest.json; the caller holds `locked`."""
    manifest = read_manifest(out_dir)  # a malformed manifest stops us before any file is written
    entries = {}
    for name, (made, info) in outputs.items():
        blob = pairs.dump_pairs(made)
        digest = hashlib.sha256(blob).hexdigest()
        path = out_dir / name
        same = path.is_file() and not path.is_symlink() and sha256_file(path) == digest
        if not same:  # an identical file is left as it is (and reported as reused)
            atomic_write_bytes(path, blob)
        entries[name] = {**info, "sha256": digest, **({"reused": True} if same else {})}
    manifest.update({name: {k: v for k, v in entry.items() if k != "reused"} for name, entry in entries.items()})
    atomic_write_json(out_dir / "manifest.json", dict(sorted(manifest.items())), indent=1)
    return {str(out_dir / name): entry for name, entry in entries.items()}


def build(cfg: DataConfig, jobs) -> dict:
    """Write one pair file per (noise, seed) in jobs plus the validation pairs they are measured on.

    Everything is built in memory first: a bad input leaves no file behind."""
    cfg.validate()  # before any work (a download, hashing)
    check_writable(cfg.out_dir, "the preference files' folder")
    outputs = PLANS[cfg.source.name](cfg).make(jobs)
    out_dir = Path(cfg.out_dir)
    with locked(out_dir):
        return write(out_dir, outputs)


def describe(info: dict) -> str:
    model = info.get("noise_model") or {"name": "uniform"}
    if info.get("validation"):
        kind = "validation"
    elif model["name"] == "length":
        kind = f"length noise (longer {model['longer']:g}, shorter {model['shorter']:g}), {info['flipped']} flipped"
    elif model["name"] == "field":
        kind = f"per-row noise from '{model['field']}', {info['flipped']} flipped"
    else:
        kind = f"noise {info['noise']:g}, {info['flipped']} flipped"
    return f"{info['n']} pairs, {kind}"


def run(cfg: DataConfig) -> dict:
    jobs = [(noise, seed) for seed in GRID_SEEDS for noise in GRID_NOISE] if cfg.grid else [(cfg.noise, cfg.seed)]
    written = build(cfg, jobs)
    print(f"wrote {len(written)} preference files to {cfg.out_dir}/ (manifest: {cfg.out_dir}/manifest.json)")
    for path, info in written.items():
        print(f"  {path}  ({describe(info)}{', reused: identical to the file there' if info.get('reused') else ''})")
    return written


def why_stale(path: Path, entry, expected: dict, sources: dict) -> str:
    """'' when the file at path can be reused: its manifest entry records the expected settings and the same
    source files (sha256), and the file is the one recorded; else the reason it cannot."""
    if entry is None:
        return "has no entry in the manifest"
    if not (isinstance(entry, dict) and isinstance(entry.get("settings"), dict)
            and isinstance(entry.get("sources"), dict)):
        return "has no settings recorded in the manifest (made by an older version)"
    changes = [f"{key} {entry['settings'].get(key)} -> {value}" for key, value in expected.items()
               if entry["settings"].get(key) != value]
    old = {role: src.get("sha256") if isinstance(src, dict) else None for role, src in entry["sources"].items()}
    for role in sorted(set(old) | set(sources)):
        if role not in old:
            changes.append(f"no {role} file -> {sources[role]['path']}")
        elif role not in sources:
            changes.append(f"{role} file -> none")
        elif old[role] != sources[role]["sha256"]:
            changes.append(f"{role} file sha256 {str(old[role])[:12]} -> {sources[role]['sha256'][:12]}")
    if changes:
        return f"was made from other data ({', '.join(changes)})"
    if sha256_file(path) != entry.get("sha256"):
        return "was changed after it was made (its sha256 differs from the manifest's)"
    return ""


class PairFiles(NamedTuple):
    train: Path
    val: Path  # None: no validation file (--pairs with --holdout 0)


class Plan(NamedTuple):
    """What a source makes for a DataConfig, before anything is read beyond what naming the files needs."""
    files: PairFiles  # the training and validation files of cfg's (noise, seed)
    expected: list  # [(path or None, the settings its manifest entry must record)]
    sources: dict  # the source files' record (paths, sha256) each entry must name
    make: Callable  # jobs [(noise, seed)] -> name -> (pairs, manifest entry), in memory


def hellaswag_plan(cfg: DataConfig) -> Plan:
    """HellaSwag: a training file per (noise, seed) and the clean validation pairs of each seed."""
    out = Path(cfg.out_dir)
    train_path = out / train_name(cfg, cfg.noise, cfg.seed)
    val_path = out / pairs.val_pairs_name(cfg.format, cfg.eval_size, cfg.seed, cfg.fewshot)
    files = source_files(cfg)
    sources = hash_sources(files)
    return Plan(PairFiles(train_path, val_path), [(train_path, settings(cfg)), (val_path, settings(cfg, True))],
                sources, lambda jobs: make(cfg, jobs, files, sources))


def pairs_plan(cfg: DataConfig) -> Plan:
    """Your own pairs (dpo/data/userdata.py): a training file per (noise, seed) and the held-out rows (none with
    --holdout 0)."""
    src = load_source(cfg)
    train_path, val_path = (Path(cfg.out_dir) / name if name else None for name in source_names(cfg, src))
    return Plan(PairFiles(train_path, val_path), [(train_path, source_settings(cfg, src)),
                                                  (val_path, source_settings(cfg, src, validation=True))],
                src.sources, lambda jobs: make_from_source(cfg, jobs, src))


PLANS = {"hellaswag": hellaswag_plan, "pairs": pairs_plan}  # one per entry of dpo/core/datasources.py's SOURCES


def ensure_pairs(cfg: DataConfig, model: str = "") -> PairFiles:
    """The training and validation files for cfg (used by `train` and sweeps). An existing file is reused only
    when it was made from the same settings and source files and is unchanged since (see `why_stale`); otherwise
    it is (re)built. Check and build hold the lock, so concurrent callers never build or read half a set. A source
    whose conversations are rendered with a chat template uses --tokenizer's, else `model`'s (the training
    model's)."""
    if cfg.source.renders_chat and not cfg.tokenizer:
        cfg = replace(cfg, tokenizer=model)
    cfg.validate()
    plan = PLANS[cfg.source.name](cfg)
    ensure(Path(cfg.out_dir), plan.expected, plan.sources, lambda: plan.make([(cfg.noise, cfg.seed)]))
    return plan.files


def ensure(out: Path, wanted: list, sources: dict, build_outputs) -> None:
    """Under the lock: when a file of wanted [(path or None, expected settings)] is missing or stale, write
    build_outputs() (name -> (pairs, entry))."""
    with locked(out):
        manifest = read_manifest(out)
        stale = False
        for path, expected in wanted:
            if path is None:
                continue
            if not path.is_file():
                stale = True
                continue
            why = why_stale(path, manifest.get(path.name), expected, sources)
            if why:
                print(f"note: {path} {why}; rebuilding", file=sys.stderr)
                stale = True
        if stale:
            written = write(out, build_outputs())
            for path, info in written.items():
                done = "reused" if info.get("reused") else "made"
                print(f"{done} {path} ({describe(info)}{', identical to the file there' if done == 'reused' else ''})",
                      file=sys.stderr)
        else:
            names = [path for path, _ in wanted if path is not None]
            print(f"using {names[0]}" + "".join(f" and {p.name}" for p in names[1:])
                  + " (built earlier from the same settings and sources)", file=sys.stderr)


def validation_file_for(pairs_file: Path):
    """The clean validation file `dpo data` wrote with pairs_file (same folder, format, seed and few-shot count,
    from its manifest entry), or None when the manifest does not know the file or the validation file is gone."""
    folder = Path(pairs_file).parent
    if not (folder / "manifest.json").is_file():
        return None
    entry = read_manifest(folder).get(Path(pairs_file).name)
    if isinstance(entry, dict) and isinstance(entry.get("validation_file"), str):  # --pairs files name theirs
        return folder / entry["validation_file"] if (folder / entry["validation_file"]).is_file() else None
    found = entry.get("settings") if isinstance(entry, dict) else None
    if not isinstance(found, dict) or entry.get("validation"):
        return None
    try:
        name = pairs.val_pairs_name(found["format"], found["eval_size"], found["seed"], found["fewshot"])
    except (KeyError, TypeError, ValueError):
        return None
    return folder / name if (folder / name).is_file() else None

