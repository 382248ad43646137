"""`--pairs OWNER/NAME[:CONFIG]`: preference data from a dataset on the Hugging Face hub
(trl-lib/ultrafeedback_binarized), read with the `datasets` library (the `datasets` extra: pip install -e
'.[datasets]'), its --pairs-split (default train) at --pairs-revision (default: the newest).

A local path always wins: a hub id is only what names no file or folder here and looks like one (OWNER/NAME with an
optional :CONFIG, no glob pattern, no suffix of a file format `dpo/data/sources.py` reads). Local files and
folders are always read by the hand-written readers of `dpo/data/sources.py`, `datasets` installed or not: they need
nothing for JSON and CSV, name the file and line of a bad row, hash the exact files they read, and write no cache.
The hub's rows become `sources.Row`s (named `OWNER/NAME: row i` in errors); the manifest records the id, split and
revision and the sha256 of the rows themselves, so a new revision of the dataset rebuilds the files made from it.

As for models (dpo/core/models.py), the hub is asked only when it answers within seconds; otherwise `datasets` reads its
local cache alone, and a dataset not there is one `error:` line that says how to use a local copy.
"""

import hashlib
import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from dpo.core.files import InputError
from dpo.data.sources import FORMATS, Row

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")


def is_hub_id(spec: str) -> bool:
    """Whether --pairs names a hub dataset: no local file or folder of that name, and the shape of an id."""
    if not spec or Path(spec).exists() or spec.startswith((".", "/", "~")) or not HUB_ID.fullmatch(spec):
        return False
    return Path(spec.partition(":")[0]).suffix.lower() not in FORMATS


def stem(spec: str, split: str) -> str:
    """The output files' name stem: the dataset's name (and config), and the split unless it is train."""
    name, _, config = spec.partition(":")
    parts = (name.rsplit("/", 1)[-1], config, "" if split == "train" else split)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(p for p in parts if p)).strip("._-") or "pairs"


def rows_sha256(rows: list) -> str:
    """sha256 of the rows' content (what a file's sha256 is for a local source)."""
    blob = "".join(json.dumps(r.data, sort_keys=True, ensure_ascii=True, default=str) + "\n" for r in rows)
    return hashlib.sha256(blob.encode()).hexdigest()


def local_copy(name: str) -> str:
    return (f"use a local copy: where the hub is reachable, `hf download {name} --repo-type dataset --local-dir DIR` "
            "(or datasets' `load_dataset(...).save_to_disk(DIR)`), then --pairs DIR")


def load(spec: str, split: str = "train", revision: str = "") -> tuple:
    """(rows, the manifest's record of the source) of the hub dataset spec = NAME[:CONFIG]."""
    from dpo.core import models

    name, _, config = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise InputError(f"{spec}: no such file or folder here, so a dataset on the Hugging Face hub, which needs the "
                         "datasets library: pip install -e '.[datasets]' (make data and make train install it); or "
                         + local_copy(name)) from None
    offline = models.hub_offline() or not models.hub_reachable(hub_endpoint())
    try:
        with cache_only(offline):
            loaded = datasets.load_dataset(name, config or None, split=split, revision=revision or None)
    except Exception as e:  # datasets raises many kinds (connection, not found, no such split or config)
        where = "not in the local datasets cache and the hub is unreachable" if offline else "could not be loaded"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InputError(f"{spec}: no such file or folder here, and as a hub dataset (split {split}"
                         f"{', revision ' + revision if revision else ''}) {where} ({type(e).__name__}: {first}); "
                         + local_copy(name)) from None
    rows = [Row(Path(spec), i, None, dict(r)) for i, r in enumerate(loaded)]
    if not rows:
        raise InputError(f"{spec}: split {split} has no rows (expected {{prompt, chosen, rejected}} rows)")
    hub = {"id": name, "config": config or None, "split": split, "revision": revision or None}
    return rows, {"path": spec, "sha256": rows_sha256(rows), "files": [], "hub": hub}


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextmanager
def cache_only(on: bool):
    """While on, `datasets` and `huggingface_hub` in their offline mode (their caches alone, no retries): the flag
    they read from HF_HUB_OFFLINE when imported, set for this call and restored after."""
    found = [m for m in (sys.modules.get("datasets.config"), sys.modules.get("huggingface_hub.constants"))
             if m is not None and hasattr(m, "HF_HUB_OFFLINE")]
    before = [m.HF_HUB_OFFLINE for m in found]
    for m in found:
        m.HF_HUB_OFFLINE = m.HF_HUB_OFFLINE or on
    try:
        yield
    finally:
        for m, value in zip(found, before):
            m.HF_HUB_OFFLINE = value
