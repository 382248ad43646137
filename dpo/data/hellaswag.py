"""HellaSwag items: reading (HellaSwag's own fields or the seed project's), validation, clean-up, download."""

import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dpo.core.files import InputError, check_readable, decode_utf8, open_nofollow, parse_json, unicode_problem, where

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
    return _typed(obj[key], f"field '{key}'", kinds, path, line, expected)


def _typed(value, what, kinds, path, line, expected):
    """value, when it is one of kinds (never a bool, which Python counts as an int) and, if a string, valid Unicode."""
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise InputError(f"{where(path, line)}: {what} is {type(value).__name__}, expected {expected}")
    if isinstance(value, str) and unicode_problem(value):
        raise InputError(f"{where(path, line)}: {what} is {unicode_problem(value)}")
    return value


def _label(obj, key, path, line) -> int:
    """An integer 0-3, or a string of one ("2", as some copies of HellaSwag write it); never a bool or a float."""
    value = _field(obj, key, (int, str), path, line, "an integer label 0-3")
    if isinstance(value, str):
        if not re.fullmatch(r"\d+", value.strip(), re.ASCII):
            raise InputError(f"{where(path, line)}: field '{key}' {value!r} is not an integer 0-3")
        value = int(value)
    if not 0 <= value < N_ENDINGS:
        raise InputError(f"{where(path, line)}: field '{key}' {value} out of range, expected 0-3")
    return value


def parse_item(obj, role: str, path, line: int) -> Item:
    """One JSON object in either HellaSwag's format or the seed project's {context, choices, answer}.

    Refused, naming the file, line and field: a missing field or one of the wrong type (a bool label, a float
    label, a non-string ending), an empty context, not exactly 4 endings, an empty ending (after the harness's
    clean-up), 4 identical endings, a label outside 0-3, text with lone surrogates."""
    if not isinstance(obj, dict):
        raise InputError(f"{where(path, line)}: expected a JSON object, got {type(obj).__name__}")
    if "endings" in obj:
        expected = "HellaSwag fields ctx (or ctx_a/ctx_b), endings, label"
        ctx_key, endings_key, label_key = "ctx", "endings", "label"
        ctx_a, ctx_b = obj.get("ctx_a"), obj.get("ctx_b")
        for key, value in (("ctx_a", ctx_a), ("ctx_b", ctx_b)):
            if value is not None:
                _typed(value, f"field '{key}'", str, path, line, "a string")
        if "ctx" in obj:
            ctx = _field(obj, "ctx", str, path, line, "a string")
        elif ctx_a is not None:
            ctx, ctx_key = ctx_a + (" " + ctx_b if ctx_b else ""), "ctx_a"
        else:
            raise InputError(f"{where(path, line)}: missing field 'ctx' (expected {expected})")
        ind = _typed(obj.get("ind", line - 1), "field 'ind'", (int, str), path, line, "an integer or a string")
        activity = _typed(obj.get("activity_label", ""), "field 'activity_label'", str, path, line, "a string")
        split_type = _typed(obj.get("split_type", ""), "field 'split_type'", str, path, line, "a string")
    elif "choices" in obj:
        ctx_key, endings_key, label_key = "context", "choices", "answer"
        ctx = _field(obj, "context", str, path, line, "a string")
        ind, activity, split_type, ctx_a, ctx_b = line - 1, "", "", None, None
    else:
        raise InputError(
            f"{where(path, line)}: unknown item format, expected HellaSwag fields (ctx, endings, label) "
            "or the seed project's (context, choices, answer)"
        )
    endings = _field(obj, endings_key, list, path, line, f"a list of {N_ENDINGS} strings")
    label = _label(obj, label_key, path, line)
    if not ctx.strip():
        raise InputError(f"{where(path, line)}: field '{ctx_key}' is empty (expected the item's context)")
    if len(endings) != N_ENDINGS:
        raise InputError(f"{where(path, line)}: expected {N_ENDINGS} string endings in field '{endings_key}', "
                         f"got {len(endings)}")
    for i, ending in enumerate(endings):
        _typed(ending, f"{endings_key}[{i}]", str, path, line, "a string")
        if not clean(ending).strip():
            raise InputError(f"{where(path, line)}: {endings_key}[{i}] is empty")
    if len({clean(e) for e in endings}) == 1:
        raise InputError(f"{where(path, line)}: all {N_ENDINGS} {endings_key} are the same text")
    if ctx_a is None or ctx_b is None:
        ctx_a = ctx_b = None
    return Item(f"{role}/{ind}", ctx, tuple(endings), label, activity, ctx_a, ctx_b, split_type)


def read_items(path, role: str = "items") -> list:
    """Read a JSONL file of items (either format, see `parse_item`). Errors name the file and line."""
    path = Path(path)
    check_readable(path, "HellaSwag JSONL")
    items = []
    with open(path, "rb") as f:
        for line_no, blob in enumerate(f, start=1):
            line = decode_utf8(blob, path, line_no)
            if not line.strip():
                continue
            obj = parse_json(line, path, "one HellaSwag item per line", line_no)
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
        with urllib.request.urlopen(url, timeout=60) as response, open_nofollow(tmp, "wb") as out:
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
