"""HellaSwag items: reading (HellaSwag's own fields or the seed project's), validation, clean-up, download."""

import json
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dpo.files import InputError, where

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
EXPECTED_COUNTS = {"train": 39905, "val": 10042}
N_ENDINGS = 4


@dataclass(frozen=True)
class Item:
    id: str  # "<role>/<ind>": HellaSwag's `ind` where present, else the 0-based line number
    ctx: str  # the whole context (ctx_a + " " + ctx_b in HellaSwag's files)
    endings: tuple
    label: int
    activity_label: str = ""
    ctx_a: str | None = None  # None when the file has no ctx_a/ctx_b split
    ctx_b: str | None = None
    split_type: str = ""  # "indomain" / "zeroshot" where the file says


def clean(text: str) -> str:
    """lm-evaluation-harness's HellaSwag pre-processing: drop WikiHow bracket tags, fold double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def harness_query(item: Item) -> str:
    """The completion-style query, exactly as lm-evaluation-harness builds it for `hellaswag`."""
    if item.ctx_a is not None:
        ctx = item.ctx_a + " " + (item.ctx_b or "").capitalize()
    else:
        ctx = item.ctx
    return clean(item.activity_label + ": " + ctx) if item.activity_label else clean(ctx)


def harness_endings(item: Item) -> list:
    return [clean(e) for e in item.endings]


def _field(obj, key, kinds, path, line, expected):
    if key not in obj:
        raise InputError(f"{where(path, line)}: missing field '{key}' (expected {expected})")
    value = obj[key]
    if not isinstance(value, kinds):
        raise InputError(f"{where(path, line)}: field '{key}' is {type(value).__name__}, expected {expected}")
    return value


def parse_item(obj, role: str, path, line: int) -> Item:
    """One JSON object in either HellaSwag's format or the seed project's {context, choices, answer}."""
    if not isinstance(obj, dict):
        raise InputError(f"{where(path, line)}: expected a JSON object, got {type(obj).__name__}")
    if "endings" in obj:
        expected = "HellaSwag fields ctx (or ctx_a/ctx_b), endings, label"
        endings = _field(obj, "endings", list, path, line, "a list of 4 strings")
        label = _field(obj, "label", (int, str), path, line, "an integer label 0-3")
        ctx_a, ctx_b = obj.get("ctx_a"), obj.get("ctx_b")
        if "ctx" in obj:
            ctx = _field(obj, "ctx", str, path, line, "a string")
        elif ctx_a is not None:
            ctx = ctx_a + (" " + ctx_b if ctx_b else "")
        else:
            raise InputError(f"{where(path, line)}: missing field 'ctx' (expected {expected})")
        ind = obj.get("ind", line - 1)
        activity, split_type = obj.get("activity_label", ""), obj.get("split_type", "")
    elif "choices" in obj:
        ctx = _field(obj, "context", str, path, line, "a string")
        endings = _field(obj, "choices", list, path, line, "a list of 4 strings")
        label = _field(obj, "answer", (int, str), path, line, "an integer answer 0-3")
        ind, activity, split_type, ctx_a, ctx_b = line - 1, "", "", None, None
    else:
        raise InputError(
            f"{where(path, line)}: unknown item format, expected HellaSwag fields (ctx, endings, label) "
            "or the seed project's (context, choices, answer)"
        )
    if len(endings) != N_ENDINGS or not all(isinstance(e, str) for e in endings):
        raise InputError(f"{where(path, line)}: expected {N_ENDINGS} string endings, got {len(endings)}")
    if isinstance(label, str):
        if not label.strip().isdigit():
            raise InputError(f"{where(path, line)}: label {label!r} is not an integer 0-3")
        label = int(label)
    if not 0 <= label < N_ENDINGS:
        raise InputError(f"{where(path, line)}: label {label} out of range, expected 0-3")
    if (ctx_a is not None and not isinstance(ctx_a, str)) or (ctx_b is not None and not isinstance(ctx_b, str)):
        raise InputError(f"{where(path, line)}: ctx_a and ctx_b must be strings")
    if ctx_a is None or ctx_b is None:
        ctx_a = ctx_b = None
    return Item(f"{role}/{ind}", ctx, tuple(endings), label, activity, ctx_a, ctx_b, split_type)


def read_items(path, role: str = "items") -> list:
    """Read a JSONL file of items (either format, see `parse_item`). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected HellaSwag JSONL)")
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                expected = f"malformed JSON ({e.msg}), expected one item per line"
                raise InputError(f"{where(path, line_no)}: {expected}") from None
            items.append(parse_item(obj, role, path, line_no))
    if not items:
        raise InputError(f"{path}: the file is empty (expected HellaSwag JSONL, one item per line)")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: item ids (`ind`) are not unique")
    return items


def download(split: str, dest_dir) -> Path:
    """Fetch hellaswag_{split}.jsonl into dest_dir (progress bar, temporary file renamed when complete,
    then validated). An existing complete file is reused."""
    dest = Path(dest_dir) / f"hellaswag_{split}.jsonl"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    url = URL.format(split=split)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))
        n = len(read_items(tmp, split))
        if n != EXPECTED_COUNTS[split]:
            raise InputError(f"{url}: got {n} items, expected {EXPECTED_COUNTS[split]}")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(
            f"could not download {url} ({e}). Offline? Point at local files with --train-file/--val-file "
            "or --hellaswag-dir (see README, 'Offline')."
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dest)
    return dest
