"""`dpo data`: HellaSwag -> splits -> (noisy) preference files + a manifest, all written atomically."""

import fcntl
import json
from pathlib import Path

from dpo import hellaswag, pairs
from dpo.config import DataConfig
from dpo.files import InputError, atomic_write_bytes, atomic_write_json, sha256_file

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


def load_splits(cfg: DataConfig):
    files = source_files(cfg)
    val = hellaswag.read_items(files["val"], "val")
    train = hellaswag.read_items(files["train"], "train") if "train" in files else None
    fewshot = hellaswag.read_items(files["fewshot"], "fewshot") if "fewshot" in files else None
    try:
        indices = tuple(int(i) for i in cfg.fewshot_indices.split(",") if i.strip())
    except ValueError:
        raise InputError(f"--fewshot-indices {cfg.fewshot_indices!r}: expected comma-separated integers") from None
    splits = pairs.make_splits(train, val, fewshot, fewshot_indices=indices, train_start=cfg.train_start,
                               eval_start=cfg.eval_start, eval_size=cfg.eval_size,
                               train_from_val=cfg.train_from_val)
    return splits, files


def _update_manifest(out_dir: Path, entries: dict) -> Path:
    """Merge entries into out_dir/manifest.json under a lock (parallel sweeps may write at once)."""
    path = out_dir / "manifest.json"
    with open(out_dir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = json.loads(path.read_text()) if path.is_file() else {}
        manifest.update(entries)
        atomic_write_json(path, dict(sorted(manifest.items())), indent=1)
    return path


def build(cfg: DataConfig, jobs) -> dict:
    """Write one pair file per (noise, seed) in jobs plus the clean validation pairs of each seed.

    Everything is built in memory first: a bad input leaves no file behind."""
    if cfg.format not in pairs.FORMATS:
        raise InputError(f"--format {cfg.format!r}: expected one of {pairs.FORMATS}")
    for noise, _ in jobs:
        pairs.flip_count(noise, 1)  # validates the range before any work
    splits, files = load_splits(cfg)
    sources = {k: {"path": str(p), "sha256": sha256_file(p)} for k, p in files.items()}
    common = {"format": cfg.format, "fewshot": cfg.fewshot, "sources": sources,
              "splits": pairs.split_summary(splits)}
    outputs = {}
    for noise, seed in jobs:
        made = pairs.make_pairs(splits.train, splits.fewshot, fmt=cfg.format, n=cfg.n, noise=noise, seed=seed,
                                k=cfg.fewshot)
        outputs[pairs.pairs_name(cfg.format, cfg.n, noise, seed, cfg.fewshot)] = (
            made, {"n": cfg.n, "noise": noise, "seed": seed, "flipped": sum(p["flipped"] for p in made)})
    for seed in sorted({seed for _, seed in jobs}):
        made = [pairs.make_pair(it, cfg.format, splits.fewshot, cfg.fewshot, seed) for it in splits.eval]
        outputs[pairs.val_pairs_name(cfg.format, len(made), seed, cfg.fewshot)] = (
            made, {"n": len(made), "noise": 0.0, "seed": seed, "flipped": 0, "validation": True})
    out_dir = Path(cfg.out_dir)
    entries = {}
    for name, (made, info) in outputs.items():
        blob = pairs.dump_pairs(made)
        atomic_write_bytes(out_dir / name, blob)
        entries[name] = {**info, **common, "sha256": sha256_file(out_dir / name)}
    _update_manifest(out_dir, entries)
    return {str(out_dir / name): entries[name] for name in outputs}


def run(cfg: DataConfig) -> dict:
    jobs = [(noise, seed) for seed in GRID_SEEDS for noise in GRID_NOISE] if cfg.grid else [(cfg.noise, cfg.seed)]
    written = build(cfg, jobs)
    print(f"wrote {len(written)} preference files to {cfg.out_dir}/ (manifest: {cfg.out_dir}/manifest.json)")
    for path, info in written.items():
        kind = "validation" if info.get("validation") else f"noise {info['noise']:g}, {info['flipped']} flipped"
        print(f"  {path}  ({info['n']} pairs, {kind})")
    return written


def ensure_pairs(cfg: DataConfig) -> tuple:
    """The training and validation files for cfg, created when missing (used by `train` and sweeps)."""
    out = Path(cfg.out_dir)
    train_path = out / pairs.pairs_name(cfg.format, cfg.n, cfg.noise, cfg.seed, cfg.fewshot)
    val_path = out / pairs.val_pairs_name(cfg.format, cfg.eval_size, cfg.seed, cfg.fewshot)
    if not (train_path.is_file() and val_path.is_file()):
        build(cfg, [(cfg.noise, cfg.seed)])
    return train_path, val_path
