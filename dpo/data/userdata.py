"""`dpo data --pairs SRC`: your own preference data -> held-out rows (a validation split, `<stem>_heldout_n<N>.json`)
and (noisy) training pairs. The held-out rows are never flipped by `dpo data`, but they carry whatever noise the
source file already has: they are not clean, and `dpo audit` calibrates on them only with --held-out-is-clean.

The rows are read and converted by `dpo/data/sources.py`; the noise models are in `dpo/data/pairs.py`;
`dpo/data/prepare.py` writes the files and the manifest and reuses them (`ensure_pairs`) exactly as for HellaSwag.
What a file holds depends on the source's rows, the column names, --holdout, the chat template (for conversations),
and for a training file on n, the seed and the noise model: `source_settings`, recorded in the manifest."""

import math
import re
from dataclasses import dataclass, replace

from dpo.core.config import DataConfig
from dpo.core.files import InputError
from dpo.data import hubdata, pairs
from dpo.data.sources import (
    ChatTemplate,
    Fields,
    Row,
    conversations,
    data_files,
    read_rows,
    source_sha256,
    source_stem,
    to_pair,
)


@dataclass
class Source:
    """A --pairs source, read but not yet converted: its rows, where they go, and what the files depend on."""
    rows: list  # sources.Row, every row of the source
    sources: dict  # the manifest's record of the source: {"pairs": {path, sha256, files}}
    stem: str  # the output files' name stem
    val: list  # indices of the held-out rows (validation; as noisy as the source), in file order
    pool: list  # indices of the training pool, in file order; the training pairs are the first n
    n: int
    chat: ChatTemplate
    template: str | None  # sha256 of the chat template, when some rows are conversations


def load_source(cfg: DataConfig) -> Source:
    hub = [flag for flag, on in (("--pairs-split", cfg.pairs_split != "train"),
                                 ("--pairs-revision", bool(cfg.pairs_revision))) if on]
    if hub and not hubdata.is_hub_id(cfg.pairs):
        raise InputError(f"{', '.join(hub)}: only with a dataset on the hub as --pairs (OWNER/NAME[:CONFIG]); "
                         f"{cfg.pairs} is a local path (or not an id)")
    if hubdata.is_hub_id(cfg.pairs):  # a dataset on the hub (dpo/data/hubdata.py); a local path of that name wins
        rows, record = hubdata.load(cfg.pairs, cfg.pairs_split, cfg.pairs_revision)
        stem = hubdata.stem(cfg.pairs, cfg.pairs_split)
    else:
        files = data_files(cfg.pairs)
        rows = read_rows(cfg.pairs, files=files)
        record = {"path": cfg.pairs, "sha256": source_sha256(files), "files": [str(f) for f in files]}
        stem = source_stem(cfg.pairs)
    val, pool = pairs.holdout_split(len(rows), cfg.holdout, cfg.pairs)
    chat = ChatTemplate(cfg.tokenizer)
    talks = conversations(rows, fields_of(cfg))
    template = chat.sha256(talks[0].here()) if talks else None
    return Source(rows, {"pairs": record}, stem, val, pool, min(cfg.n, len(pool)), chat, template)


def fields_of(cfg: DataConfig) -> Fields:
    return Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)


def noise_tag(cfg: DataConfig) -> str:
    model = cfg.noise_model()
    if model == "length":
        return f"longer{cfg.noise_longer:g}_shorter{cfg.noise_shorter:g}"
    if model == "field":
        return "flipprob-" + re.sub(r"[^A-Za-z0-9.-]+", "-", cfg.flip_prob_field)
    return f"noise{cfg.noise:g}"


def source_names(cfg: DataConfig, src: Source) -> tuple:
    """(training file name, validation file name or None): the validation rows depend on no seed."""
    return (pairs.source_pairs_name(src.stem, src.n, noise_tag(cfg), cfg.seed),
            pairs.source_val_name(src.stem, len(src.val)) if src.val else None)


def source_settings(cfg: DataConfig, src: Source, validation: bool = False) -> dict:
    """What a --pairs file's content depends on besides the source's sha256 (recorded, and compared on reuse)."""
    values = {"prompt_field": cfg.prompt_field, "chosen_field": cfg.chosen_field,
              "rejected_field": cfg.rejected_field, "holdout": cfg.holdout, "chat_template": src.template}
    if not validation:
        values.update(n=src.n, seed=cfg.seed, noise_model=cfg.noise_model(), noise=cfg.noise,
                      noise_longer=cfg.noise_longer, noise_shorter=cfg.noise_shorter,
                      flip_prob_field=cfg.flip_prob_field)
    return values


def make_from_source(cfg: DataConfig, jobs, src: Source) -> dict:
    """name -> (pairs, manifest entry): one training file per (noise, seed) in jobs, from the first n rows of the
    pool, and the pairs of the held-out rows (never flipped by dpo data, as noisy as the source; none with
    --holdout 0)."""
    fields = fields_of(cfg)

    def pair(i: int) -> dict:
        return {**to_pair(src.rows[i], fields, src.chat), "flipped": False, "item": f"row/{i}"}

    clean = [pair(i) for i in src.pool[:src.n]]
    val = [pair(i) for i in src.val]
    common = {"sources": src.sources, "rows": len(src.rows), "holdout_rows": len(val),
              "chat_template": {"model": cfg.tokenizer, "sha256": src.template} if src.template else None}
    outputs = {}
    for noise, seed in jobs:
        job = replace(cfg, noise=noise, seed=seed)
        train_name, val_name = source_names(job, src)
        made, model = noisy(job, clean, [src.rows[i] for i in src.pool[:src.n]])
        outputs[train_name] = (made, {"n": src.n, "noise": noise, "seed": seed, "flipped": model["flipped"],
                                      "noise_model": model, "validation_file": val_name, **common,
                                      "settings": source_settings(job, src)})
    if val:
        outputs[pairs.source_val_name(src.stem, len(val))] = (
            val, {"n": len(val), "noise": 0.0, "seed": None, "flipped": 0, "validation": True, **common,
                  "settings": source_settings(cfg, src, validation=True)})
    return outputs


def noisy(cfg: DataConfig, clean: list, rows: list) -> tuple:
    """(the pairs after cfg's noise model, what the manifest records of it: the model, its settings, the expected
    and the realised number of flips)."""
    model = cfg.noise_model()
    if model == "uniform":
        made = pairs.add_noise(clean, cfg.noise, cfg.seed)
        return made, {"name": "uniform", "noise": cfg.noise, "flipped": sum(p["flipped"] for p in made)}
    if model == "length":
        probs = pairs.length_flip_probs(clean, cfg.noise_longer, cfg.noise_shorter)
        info = {"name": "length", "longer": cfg.noise_longer, "shorter": cfg.noise_shorter}
    else:
        probs = [flip_prob(row, cfg.flip_prob_field) for row in rows]
        info = {"name": "field", "field": cfg.flip_prob_field}
    made = pairs.add_row_noise(clean, probs, cfg.seed)
    longer = [len(p["chosen"]) > len(p["rejected"]) for p in clean]
    info.update(expected_flips=round(math.fsum(probs), 6), flipped=sum(p["flipped"] for p in made),
                chosen_longer=sum(longer),
                flipped_chosen_longer=sum(p["flipped"] for p, lg in zip(made, longer) if lg))
    return made, info


def flip_prob(row: Row, field: str) -> float:
    """A row's own flip probability (--flip-prob-field): a number in [0, 1], or a string of one (CSV)."""
    value = row.data.get(field)
    if field not in row.data:
        raise InputError(f"{row.here()}: field '{field}' (--flip-prob-field) missing")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"{row.here()}: field '{field}' (--flip-prob-field) {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= 1):
        raise InputError(f"{row.here()}: field '{field}' (--flip-prob-field) is {value!r}, expected a probability "
                         "in [0, 1]")
    return float(value)
