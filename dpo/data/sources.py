"""Preference data as other tools keep it -> rows -> {prompt, chosen, rejected} strings.

Files: a JSON list, JSON Lines (.jsonl, or a .json file that does not start with '['), CSV (the standard library),
Parquet and the Arrow files `datasets.Dataset.save_to_disk` writes (those two need pyarrow: the `pairs` extra). A
folder is a saved `datasets` Dataset (state.json), a saved DatasetDict (its `train` split), or a local copy of a
dataset repository (its data files; where their names name splits, those of the train split). A glob pattern
('data/train_prefs-*.parquet') picks files by hand.

Rows are in TRL's two standard preference forms: strings, or conversations (lists of {role, content} messages), each
with an explicit prompt or an implicit one (the start that chosen and rejected share). A conversation is rendered with
a tokenizer's chat template as TRL's `maybe_extract_prompt` then `maybe_apply_chat_template` render it (`render`).
"""

import csv
import glob
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from dpo.core.files import (
    InputError,
    check_readable_together,
    parse_json,
    read_json,
    read_text,
    sha256_file,
    unicode_problem,
    where,
)

FORMATS = {".json": "JSON", ".jsonl": "JSON", ".ndjson": "JSON", ".csv": "CSV", ".parquet": "Parquet",
           ".arrow": "Arrow"}
NEEDS_PYARROW = "pip install pyarrow (or this project's extra: pip install -e '.[pairs]')"
METADATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}  # not data files
SPLITS = ("train", "test", "validation", "valid", "val", "dev", "eval")
SHARD = re.compile(r"-\d+-of-\d+$")  # data/train-00000-of-00003.parquet is a shard of the split "data/train"


@dataclass(frozen=True)
class Row:
    file: Path
    index: int  # 0-based position in its file
    line: int | None  # the line it starts on, in line-based files
    data: dict

    def here(self, noun: str = "row") -> str:
        return f"{where(self.file, self.line)}: {noun} {self.index}"


# ------------------------------------------------------------------------------------------------ which files

def data_files(spec) -> list:
    """The files a source is read from, in order (see the module doc)."""
    path = Path(spec)
    if not path.exists() and any(c in str(spec) for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(str(spec)) if Path(p).is_file())
        if not found:
            raise InputError(f"{spec}: no file matches this pattern")
        return check_formats(spec, found)
    if path.is_file():
        return check_formats(spec, [path])
    if path.exists() and not path.is_dir():
        raise InputError(f"{spec}: not a regular file or folder (a FIFO, a device or a socket; expected preference "
                         f"data: {known_formats()})")
    if not path.is_dir():
        raise InputError(f"{spec}: no such file or folder (expected preference data: {known_formats()})")
    if (path / "dataset_dict.json").is_file():
        return saved_dataset_dict(path)
    if (path / "state.json").is_file():
        return saved_dataset(path)
    return snapshot_files(path)


def known_formats() -> str:
    return "a .json, .jsonl, .csv, .parquet or .arrow file, or a folder of them"


def check_formats(spec, files: list) -> list:
    unknown = [f for f in files if f.suffix.lower() not in FORMATS]
    if unknown:
        raise InputError(f"{unknown[0]}: unknown format '{unknown[0].suffix}' (expected {known_formats()})")
    kinds = sorted({FORMATS[f.suffix.lower()] for f in files})
    if len(kinds) > 1:
        raise InputError(f"{spec}: the data files mix formats ({', '.join(kinds)}): point --pairs at one kind")
    return files


def saved_dataset_dict(folder: Path) -> list:
    info = read_json(folder / "dataset_dict.json", "the dataset_dict.json that datasets' save_to_disk writes")
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise InputError(f"{folder / 'dataset_dict.json'}: expected {{\"splits\": [names]}}")
    if "train" not in splits:
        raise InputError(f"{folder}: a saved DatasetDict without a 'train' split (it has {', '.join(splits)}): "
                         f"point --pairs at one split's folder, e.g. {folder / splits[0]}" if splits else
                         f"{folder}: a saved DatasetDict without splits")
    return saved_dataset(folder / "train")


def saved_dataset(folder: Path) -> list:
    state = read_json(folder / "state.json", "the state.json that datasets' save_to_disk writes")
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("filename"), str) for e in entries):
        raise InputError(f"{folder / 'state.json'}: expected \"_data_files\": [{{\"filename\": ...}}, ...]")
    files = [folder / e["filename"] for e in entries]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{missing[0]}: no such file (listed in {folder / 'state.json'})")
    return check_formats(folder, files)


def snapshot_files(folder: Path) -> list:
    """A dataset repository's data files: all of them when they form one split, else the train split's."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS
                   and p.name not in METADATA and not any(s.startswith(".") for s in p.relative_to(folder).parts))
    if not found:
        raise InputError(f"{folder}: no data files in this folder (expected {known_formats()})")
    groups = {}
    for p in found:
        groups.setdefault(SHARD.sub("", str(p.relative_to(folder).with_suffix(""))), []).append(p)
    if len(groups) > 1:
        train = [key for key in groups if "train" in re.split(r"[^a-z]+", key.lower())]
        if len(train) != 1:
            which = "none is a train split" if not train else f"{len(train)} are train splits"
            raise InputError(f"{folder}: its data files hold {len(groups)} splits ({', '.join(sorted(groups))}), "
                             f"{which}: point --pairs at the files of one (a glob pattern in quotes will do)")
        found = groups[train[0]]
    return check_formats(folder, found)


def source_sha256(files: list) -> str:
    """sha256 of one file; of several, the sha256 of their names and sha256s in reading order."""
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(f"{f.name}\t{sha256_file(f)}\n" for f in files).encode()).hexdigest()


def source_stem(spec) -> str:
    """A short name for output files: the file or folder name ('train' becomes '<parent>-train')."""
    path = Path(spec)
    name = path.stem if path.suffix.lower() in FORMATS else path.name
    if name.lower() in SPLITS:
        name = f"{path.resolve().parent.name}-{name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "pairs"


# ------------------------------------------------------------------------------------------------ reading rows

def read_rows(spec, noun: str = "row", files=None) -> list:
    """Every row of the source (of `files`, its data files, when given), in order, each with where it came from."""
    files = files or data_files(spec)
    check_readable_together(spec, files, f"preference data: {known_formats()}")
    rows = []
    for f in files:
        kind = FORMATS[f.suffix.lower()]
        rows += json_rows(f, noun) if kind == "JSON" else csv_rows(f, noun) if kind == "CSV" else arrow_rows(f, kind)
    if not rows:
        raise InputError(f"{spec}: no rows (expected {{prompt, chosen, rejected}} rows)")
    return rows


ROWS = "{prompt, chosen, rejected} rows"


def json_rows(path: Path, noun: str) -> list:
    text = read_text(path, f"JSON or JSON Lines of {ROWS}")
    if not text.strip():
        raise InputError(f"{path}: the file is empty (expected {{prompt, chosen, rejected}} rows)")
    if text.lstrip().startswith("["):  # a JSON list
        data = parse_json(text, path, "a JSON list of {prompt, chosen, rejected} objects, or JSON Lines")
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise InputError(f"{path}: {noun} {i}: expected an object with prompt, chosen, rejected")
        return [Row(path, i, None, obj) for i, obj in enumerate(data)]
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # JSON Lines
        if line.strip():
            obj = parse_json(line, path, "one {prompt, chosen, rejected} object per line (JSON Lines)", number)
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{number}: {noun} {len(rows)}: expected an object with prompt, chosen, "
                                 f"rejected, got {type(obj).__name__}")
            rows.append(Row(path, len(rows), number, obj))
    return rows


def csv_rows(path: Path, noun: str) -> list:
    """A CSV file with a header line; every value is a string (a cell may span lines, and be as long as the file:
    the csv module's own limit, 128 KiB, would call a long response malformed)."""
    text = read_text(path, f"CSV of {ROWS}").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    limit = csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    try:
        return csv_records(path, noun, reader)
    finally:
        csv.field_size_limit(limit)


def csv_records(path: Path, noun: str, reader) -> list:
    """The rows of a csv.reader over path's text: the header's names as keys; errors name the file and line."""
    rows, start = [], 1
    try:
        header = next(reader, None)
        if not header:
            raise InputError(f"{path}: the file is empty (expected a header line: prompt,chosen,rejected)")
        if len(set(header)) < len(header):
            raise InputError(f"{path}:1: the header names a column twice: {header}")
        start = reader.line_num + 1
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells:
                continue
            if len(cells) != len(header):
                raise InputError(f"{path}:{line}: {noun} {len(rows)}: {len(cells)} cells, the header has "
                                 f"{len(header)}")
            rows.append(Row(path, len(rows), line, dict(zip(header, cells))))
    except csv.Error as e:
        raise InputError(f"{path}:{start}: malformed CSV ({e})") from None
    return rows


def arrow_rows(path: Path, kind: str) -> list:
    """A Parquet file, or an Arrow file as datasets' save_to_disk writes it (the IPC stream format)."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise InputError(f"{path}: reading {kind} files needs pyarrow, which is not installed: "
                         f"{NEEDS_PYARROW}") from None
    try:
        if kind == "Parquet":
            table = pyarrow.parquet.read_table(path)
        else:
            try:
                table = pyarrow.ipc.open_stream(path).read_all()
            except pyarrow.ArrowInvalid:
                table = pyarrow.ipc.open_file(path).read_all()
    except (pyarrow.ArrowException, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable {kind} file ({str(e).splitlines()[0] if str(e) else e!r})") \
            from None
    return [Row(path, i, None, obj) for i, obj in enumerate(table.to_pylist())]


# ------------------------------------------------------------------------------------------ rows -> pair strings

@dataclass(frozen=True)
class Fields:
    """The columns holding prompt, chosen and rejected (--prompt-field, --chosen-field, --rejected-field)."""
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


def is_conversation(value) -> bool:
    """TRL's test: a list whose first element is a dict with a 'role'."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def is_conversational(row: Row, fields: Fields) -> bool:
    return is_conversation(row.data.get(fields.chosen))


def conversations(rows: list, fields: Fields, noun: str = "row") -> list:
    """The rows whose chosen is a conversation: all of them or none. A file mixing conversation rows with rows of
    strings is refused (rendered or not, half its prompts would be in a chat template and half not)."""
    found = [r for r in rows if is_conversational(r, fields)]
    if found and len(found) < len(rows):
        other = next(r for r in rows if not is_conversational(r, fields))
        raise InputError(f"{other.here(noun)}: field '{fields.chosen}' is not a conversation, but "
                         f"{found[0].here(noun)}'s is (a list of {{role, content}} messages): a file holds rows of one "
                         "form, expected all conversations or all strings")
    return found


def to_pair(row: Row, fields: Fields, chat=None, noun: str = "row") -> dict:
    """{prompt, chosen, rejected} strings of one row, checked (`check_pair`). As TRL does: without a prompt column,
    or with one of the other form than chosen (a string prompt beside conversations), the prompt is the start that
    chosen and rejected share; conversations are rendered with `chat` (a ChatTemplate)."""
    here, data = row.here(noun), row.data
    for key in (fields.chosen, fields.rejected):
        if key not in data:
            raise InputError(f"{here}: field '{key}' missing (name another column with --{flag_of(key, fields)})")
    prompt, chosen, rejected = data.get(fields.prompt), data[fields.chosen], data[fields.rejected]
    for key, value in ((fields.prompt, prompt), (fields.chosen, chosen), (fields.rejected, rejected)):
        if isinstance(value, list) and any(isinstance(m, dict) for m in value):  # meant as messages: check them
            check_messages(value, key, here)
    conversational = is_conversation(chosen)
    if fields.prompt not in data or is_conversation(prompt) != conversational:
        prompt, chosen, rejected = shared_start(chosen, rejected, here, fields)
    if conversational:
        for key, value in ((fields.prompt, prompt), (fields.chosen, chosen), (fields.rejected, rejected)):
            check_messages(value, key, here)
        if chat is None:
            chat = ChatTemplate("")
        prompt, chosen, rejected = chat.render(prompt, chosen, rejected, data.get("chat_template_kwargs"), here)
    return check_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected}, here, fields)


def flag_of(key: str, fields: Fields) -> str:
    return {fields.prompt: "prompt-field", fields.chosen: "chosen-field", fields.rejected: "rejected-field"}[key]


class Split(NamedTuple):
    """A pair as prompt and the two responses that follow it."""
    prompt: object  # a string, or a list of messages
    chosen: object
    rejected: object


def shared_start(chosen, rejected, here: str, fields: Fields) -> Split:
    """TRL's implicit prompt: the longest start chosen and rejected share (characters, or whole messages); for
    strings, a space just before the first difference goes with the responses. Refused where nothing is shared or
    one is the start of the other."""
    if type(chosen) is not type(rejected) or not isinstance(chosen, (str, list)):
        raise InputError(f"{here}: fields '{fields.chosen}' and '{fields.rejected}' must both be strings or both "
                         f"lists of {{role, content}} messages (got {type(chosen).__name__} and "
                         f"{type(rejected).__name__})")
    idx = next((i for i in range(min(len(chosen), len(rejected))) if chosen[i] != rejected[i]), None)
    if idx is not None and isinstance(chosen, str) and idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    if not idx:
        why = "one is the start of the other" if idx is None else "they share no start"
        raise InputError(f"{here}: no '{fields.prompt}' field of the same form as '{fields.chosen}', and the prompt "
                         f"cannot be taken from the start chosen and rejected share: {why}")
    return Split(chosen[:idx], chosen[idx:], rejected[idx:])


def check_messages(value, key: str, here: str) -> None:
    if not isinstance(value, list) or not value:
        raise InputError(f"{here}: field '{key}' is {type(value).__name__}, expected a list of {{role, content}} "
                         "messages like the other fields")
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise InputError(f"{here}: field '{key}' message {j}: expected {{\"role\": string, \"content\": string}}")
        if unicode_problem(m["content"]):
            raise InputError(f"{here}: field '{key}' message {j}: 'content' is {unicode_problem(m['content'])}")


def check_pair(p: dict, here: str, fields: Fields | None = None) -> dict:
    """p, when its prompt, chosen and rejected are strings DPO can train on; else InputError naming here and the
    field: not a string, not valid Unicode, an empty prompt, an empty or whitespace-only response, identical
    responses."""
    fields = fields or Fields()
    names = {"prompt": fields.prompt, "chosen": fields.chosen, "rejected": fields.rejected}
    for key, name in names.items():
        if not isinstance(p.get(key), str):
            raise InputError(f"{here}: field '{name}' missing or not a string")
        if unicode_problem(p[key]):
            raise InputError(f"{here}: field '{name}' is {unicode_problem(p[key])}")
    if not p["prompt"].strip():
        raise InputError(f"{here}: empty prompt (a response's first token needs a context to be scored after)")
    for key in ("chosen", "rejected"):
        if not p[key].strip():
            raise InputError(f"{here}: field '{names[key]}' is empty or only whitespace")
    if p["chosen"] == p["rejected"]:
        raise InputError(f"{here}: chosen and rejected are identical")
    return p


class ChatTemplate:
    """A tokenizer's chat template, loaded on first use: only conversational rows need it. `spec` names the model
    (--model), or `tokenizer` is one already loaded."""

    def __init__(self, spec: str = "", tokenizer=None):
        self.spec, self._tokenizer = spec, tokenizer

    def tokenizer(self, here: str):
        if self._tokenizer is None:
            if not self.spec:
                raise InputError(f"{here}: a conversation (a list of {{role, content}} messages) is rendered with a "
                                 "model's chat template: pass --model MODEL (e.g. --model smollm2-135m)")
            from dpo.core import models

            self._tokenizer = models.load_tokenizer(self.spec)
        if not getattr(self._tokenizer, "chat_template", None):
            raise InputError(f"{here}: a conversation needs a chat template, and the tokenizer of "
                             f"{self.spec or 'the model'} has none: use a chat model (e.g. smollm2-135m)")
        return self._tokenizer

    def sha256(self, here: str = "") -> str:
        """What the rendered text depends on besides the rows: the template and the special tokens it may use."""
        tok = self.tokenizer(here)
        blob = json.dumps([tok.chat_template, tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token])
        return hashlib.sha256(blob.encode()).hexdigest()

    def render(self, prompt: list, chosen: list, rejected: list, kwargs, here: str) -> Split:
        """TRL's rendering: the prompt with the generation prompt (after a user or tool turn) or continuing its final
        assistant message; prompt + response rendered whole; the prompt is the start all three share, and each
        response is its rendering minus that start."""
        last = prompt[-1]["role"]
        if last not in ("user", "tool", "assistant"):
            raise InputError(f"{here}: the prompt's last message has role {last!r}; expected user, tool or "
                             "assistant (as TRL)")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise InputError(f"{here}: field 'chat_template_kwargs' is {type(kwargs).__name__}, expected an object")
        tok, kw = self.tokenizer(here), kwargs or {}
        try:
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=last != "assistant",
                                           continue_final_message=last == "assistant", **kw)
            with_chosen = tok.apply_chat_template(prompt + chosen, tokenize=False, **kw)
            with_rejected = tok.apply_chat_template(prompt + rejected, tokenize=False, **kw)
        except Exception as e:  # the template is the model's code (Jinja): whatever it raises is this row's error
            raise InputError(f"{here}: the chat template of {self.spec or 'the model'} fails on this row "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        for full in (with_chosen, with_rejected):
            text = text[:next((i for i, (a, b) in enumerate(zip(text, full)) if a != b), min(len(text), len(full)))]
        return Split(text, with_chosen[len(text):], with_rejected[len(text):])
