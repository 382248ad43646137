"""`dpo data`: HellaSwag -> splits -> (noisy) preference files + a manifest, all written atomically.

The manifest records, per file, the settings and source files (sha256) it was made from; `ensure_pairs` (for
`train` and sweeps) reuses a file only when they match the current ones, and rebuilds it otherwise."""

import hashlib
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from dpo import hellaswag, pairs
from dpo.config import DataConfig
from dpo.files import InputError, atomic_write_bytes, atomic_write_json, lock_file, read_json, sha256_file

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


def load_splits(cfg: DataConfig, files=None):
    files = files or source_files(cfg)
    val = hellaswag.read_items(files["val"], "val")
    train = hellaswag.read_items(files["train"], "train") if "train" in files else None
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
    return {**values, "fewshot_indices": cfg.fewshot_index_list()}


def hash_sources(files: dict) -> dict:
    return {role: {"path": str(p), "sha256": sha256_file(p)} for role, p in files.items()}


@contextmanager
def locked(out_dir: Path):
    """An exclusive lock on out_dir (parallel sweeps and trainings may write the same files and manifest)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_file(out_dir / ".manifest.lock"):
        yield


def read_manifest(out_dir: Path) -> dict:
    path = out_dir / "manifest.json"
    if not path.is_file():
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
        made = pairs.make_pairs(splits.train, splits.fewshot, fmt=cfg.format, n=cfg.n, noise=noise, seed=seed,
                                k=cfg.fewshot)
        outputs[pairs.pairs_name(cfg.format, cfg.n, noise, seed, cfg.fewshot)] = (
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
        atomic_write_bytes(out_dir / name, blob)
        entries[name] = {**info, "sha256": hashlib.sha256(blob).hexdigest()}
    manifest.update(entries)
    atomic_write_json(out_dir / "manifest.json", dict(sorted(manifest.items())), indent=1)
    return {str(out_dir / name): entry for name, entry in entries.items()}


def build(cfg: DataConfig, jobs) -> dict:
    """Write one pair file per (noise, seed) in jobs plus the clean validation pairs of each seed.

    Everything is built in memory first: a bad input leaves no file behind."""
    cfg.validate()  # before any work (a download, hashing)
    files = source_files(cfg)
    outputs = make(cfg, jobs, files, hash_sources(files))
    out_dir = Path(cfg.out_dir)
    with locked(out_dir):
        return write(out_dir, outputs)


def describe(info: dict) -> str:
    kind = "validation" if info.get("validation") else f"noise {info['noise']:g}, {info['flipped']} flipped"
    return f"{info['n']} pairs, {kind}"


def run(cfg: DataConfig) -> dict:
    jobs = [(noise, seed) for seed in GRID_SEEDS for noise in GRID_NOISE] if cfg.grid else [(cfg.noise, cfg.seed)]
    written = build(cfg, jobs)
    print(f"wrote {len(written)} preference files to {cfg.out_dir}/ (manifest: {cfg.out_dir}/manifest.json)")
    for path, info in written.items():
        print(f"  {path}  ({describe(info)})")
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


def ensure_pairs(cfg: DataConfig) -> tuple:
    """The training and validation files for cfg (used by `train` and sweeps). An existing file is reused only
    when it was made from the same settings and source files and is unchanged since (see `why_stale`); otherwise
    it is (re)built. Check and build hold the lock, so concurrent callers never build or read half a set."""
    out = Path(cfg.out_dir)
    train_path = out / pairs.pairs_name(cfg.format, cfg.n, cfg.noise, cfg.seed, cfg.fewshot)
    val_path = out / pairs.val_pairs_name(cfg.format, cfg.eval_size, cfg.seed, cfg.fewshot)
    cfg.validate()
    files = source_files(cfg)
    sources = hash_sources(files)
    with locked(out):
        manifest = read_manifest(out)
        stale = False
        for path, validation in ((train_path, False), (val_path, True)):
            if not path.is_file():
                stale = True
                continue
            why = why_stale(path, manifest.get(path.name), settings(cfg, validation), sources)
            if why:
                print(f"note: {path} {why}; rebuilding", file=sys.stderr)
                stale = True
        if stale:
            written = write(out, make(cfg, [(cfg.noise, cfg.seed)], files, sources))
            for path, info in written.items():
                print(f"made {path} ({describe(info)})", file=sys.stderr)
    return train_path, val_path
