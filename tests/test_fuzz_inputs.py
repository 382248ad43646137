"""Corrupted input files, at random (seeded): each is either read correctly or refused with an InputError naming
the file (`dpo data`: exit status 2, one `error:` line, no output file); never another exception."""

import itertools
import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
from conftest import synthetic_items, write_jsonl

from dpo import cli
from dpo.core import files
from dpo.core.files import InputError
from dpo.data import hellaswag, pairs
from dpo.engine import refcache

WRONG_VALUES = [None, 0, 1, -1, 7, 2.5, 1.0, True, False, "", " ", "\t\n", "x", "²", [], ["a"], {}, {"a": 1}]
BAD_BYTES = [b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\xe9t\xe9"]  # none of them UTF-8


def corrupt_bytes(blob: bytes, rng: random.Random) -> bytes:
    action = rng.choice(["truncate", "flip", "not utf-8", "lone surrogate", "drop line"])
    i = rng.randrange(len(blob))
    if action == "truncate":
        return blob[:i]
    if action == "flip":
        out = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if action == "not utf-8":
        return blob[:i] + rng.choice(BAD_BYTES) + blob[i:]
    if action == "lone surrogate":  # a JSON escape that decodes to text no UTF-8 file can hold
        i = blob.find(b'"', i) + 1
        return blob[:i] + rng.choice([b"\\ud800", b"\\udfff"]) + blob[i:]
    lines = blob.splitlines(keepends=True)
    del lines[rng.randrange(len(lines))]
    return b"".join(lines)


def corrupt_rows(rows: list, rng: random.Random) -> list:
    """Drop a key of one row, or give it (or one element of a list in it) a value of another type or content."""
    rows = json.loads(json.dumps(rows))
    row = rng.choice(rows)
    key = rng.choice(sorted(row))
    action = rng.choice(["drop", "wrong", "element", "copy"])
    if action == "drop":
        del row[key]
    elif action == "element" and isinstance(row[key], list):
        row[key][rng.randrange(len(row[key]))] = rng.choice(WRONG_VALUES + [row[key][0]])
    elif action == "copy":
        row[key] = row[rng.choice(sorted(row))]
    else:
        row[key] = rng.choice(WRONG_VALUES)
    return rows


def corrupt(rows: list, dump, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return dump(corrupt_rows(rows, rng))
    return corrupt_bytes(dump(rows), rng)


def assert_valid_pairs(loaded):
    for p in loaded:
        for key in ("prompt", "chosen", "rejected"):
            assert isinstance(p[key], str) and p[key].strip()
            p[key].encode("utf-8")
        assert p["chosen"] != p["rejected"] and isinstance(p.get("flipped", False), bool)


def assert_valid_items(items):
    assert len({it.id for it in items}) == len(items)
    for it in items:
        assert isinstance(it.ctx, str) and it.ctx.strip() and isinstance(it.activity_label, str)
        assert len(it.endings) == 4 and all(isinstance(e, str) and hellaswag.clean(e).strip() for e in it.endings)
        assert type(it.label) is int and 0 <= it.label < 4
        json.dumps(it.__dict__, ensure_ascii=False).encode("utf-8")


PAIRS = [{"prompt": f"Q: {i} + 1?", "chosen": f" {i + 1}", "rejected": f" {i + 2}", "flipped": i == 2,
          "item": f"val/{i}"} for i in range(4)]


@pytest.mark.parametrize("case", range(50))
def test_corrupted_pair_file(tmp_path, case):
    rng = random.Random(f"pairs/{case}")
    path = tmp_path / "pairs.json"
    path.write_bytes(corrupt(PAIRS, pairs.dump_pairs, rng))
    try:
        loaded = pairs.read_pairs(path)
    except InputError as e:
        assert str(e).startswith(str(path))
        return
    assert_valid_pairs(loaded)


def dump_jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


@pytest.mark.parametrize("case", range(50))
def test_corrupted_hellaswag_file(tmp_path, capsys, case):
    rng = random.Random(f"hellaswag/{case}")
    folder = tmp_path / "hellaswag"
    folder.mkdir()
    train = write_jsonl(folder / "hellaswag_train.jsonl", synthetic_items(40, seed=1, wikihow_every=5))
    val = write_jsonl(folder / "hellaswag_val.jsonl", synthetic_items(30, seed=2))
    target = rng.choice([train, val])
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    target.write_bytes(corrupt(rows, dump_jsonl, rng))
    try:
        assert_valid_items(hellaswag.read_items(target))
    except InputError as e:
        assert str(e).startswith(str(target))

    out = tmp_path / "out"
    code = cli.main(["data", "--hellaswag-dir", str(folder), "--out-dir", str(out), "--eval-size", "20",
                     "--n", "8", "--noise", "0.25", "--fewshot-indices", "0,1,2", "--train-start", "3"])
    err = capsys.readouterr().err.splitlines()
    if code == 0:
        assert err == []
        for name, n in (("mc_n8_noise0.25_seed1.json", 8), ("mc_val_n20_seed1.json", 20)):
            loaded = pairs.read_pairs(out / name)
            assert len(loaded) == n
            assert_valid_pairs(loaded)
    else:
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
        assert not out.exists() or not any(out.iterdir())


# ---- the same corruptions through `dpo train` (pair files, reference caches) and `dpo eval` (HellaSwag files)

def one_error_or_success(code, err_lines, out):
    assert "Traceback" not in "\n".join(err_lines)
    if code != 0:
        assert code == 2 and [ln for ln in err_lines if ln.startswith("error:")] == err_lines[-1:]
        assert not out.exists() or not any(out.iterdir())


def train_args(tiny_model_dir, pairs_path, out, cache):
    return ["train", "--model", str(tiny_model_dir), "--train-data-path", str(pairs_path), "--val-data-path", "",
            "--output-dir", str(out), "--cache-dir", str(cache), "--max-steps", "1", "--eval-every", "0",
            "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1", "--device", "cpu"]


def error_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("error:", "warning:", "Traceback"))]


@pytest.mark.parametrize("case", range(12))
def test_corrupted_pair_file_through_train(tmp_path, tiny_model_dir, capsys, case):
    rng = random.Random(f"train/{case}")
    path = tmp_path / "pairs.json"
    path.write_bytes(corrupt(PAIRS, pairs.dump_pairs, rng))
    code = cli.main(train_args(tiny_model_dir, path, tmp_path / "run", tmp_path / "cache"))
    one_error_or_success(code, error_lines(capsys), tmp_path / "run")
    if code == 0:
        assert (tmp_path / "run" / "final").is_dir()


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory, tiny_model_dir):
    """A reference cache made by a clean run, and that run's step-1 loss."""
    folder = tmp_path_factory.mktemp("cache-fuzz")
    (folder / "pairs.json").write_bytes(pairs.dump_pairs(PAIRS))
    assert cli.main(train_args(tiny_model_dir, folder / "pairs.json", folder / "run", folder / "cache")) == 0
    loss = json.loads((folder / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    (cache,) = (folder / "cache" / "ref").glob("*.json")
    return folder, cache, loss


@pytest.mark.parametrize("case", range(12))
def test_corrupted_reference_cache_is_recomputed(tmp_path, tiny_model_dir, capsys, clean_cache, case):
    rng = random.Random(f"cache/{case}")
    folder, cache, loss = clean_cache
    data = json.loads(cache.read_text())
    if rng.random() < 0.5:
        blob = corrupt_bytes(cache.read_bytes(), rng)
    else:
        key = rng.choice(sorted(data))
        if key == "entries" and rng.random() < 0.7:
            entry = rng.choice(sorted(data["entries"]))
            data["entries"][entry] = rng.choice(WRONG_VALUES + [[-1.0, -2.0], [0.0, float("nan")]])
        else:
            data[key] = rng.choice(WRONG_VALUES)
        blob = json.dumps(data).encode()
    (tmp_path / "cache" / "ref").mkdir(parents=True)
    (tmp_path / "cache" / "ref" / cache.name).write_bytes(blob)
    code = cli.main(train_args(tiny_model_dir, folder / "pairs.json", tmp_path / "run", tmp_path / "cache"))
    lines = error_lines(capsys)
    assert code == 0 and len(lines) <= 1 and all(ln.startswith("warning:") for ln in lines)
    got = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert got == pytest.approx(loss, abs=1e-6)


@pytest.mark.parametrize("case", range(6))
def test_a_cache_edited_with_its_checksum_recomputed_is_recomputed(tmp_path, tiny_model_dir, capsys, clean_cache,
                                                                   case):
    """Tampering, not damage: random entries shifted by a random amount (or their responses swapped) and the sha256
    recomputed. The run reads fewer than SPOT_CHECKS cached pairs, so the spot check recomputes them all."""
    rng = random.Random(f"tamper/{case}")
    folder, cache, loss = clean_cache
    data = json.loads(cache.read_text())
    entries = data["entries"]
    for key in rng.sample(sorted(entries), rng.randint(1, len(entries))):
        shift = rng.choice([-20.0, -1.0, 0.5, 3.0])
        entries[key] = entries[key][::-1] if rng.random() < 0.3 else [v + shift for v in entries[key]]
    data["sha256"] = refcache.entries_sha256(entries)
    (tmp_path / "cache" / "ref").mkdir(parents=True)
    (tmp_path / "cache" / "ref" / cache.name).write_text(json.dumps(data))
    code = cli.main(train_args(tiny_model_dir, folder / "pairs.json", tmp_path / "run", tmp_path / "cache"))
    lines = error_lines(capsys)
    assert code == 0 and len(lines) == 1 and lines[0].startswith("warning:") and "spot-checked" in lines[0], lines
    got = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert got == pytest.approx(loss, abs=1e-6)


@pytest.mark.parametrize("case", range(12))
def test_corrupted_hellaswag_file_through_eval(tmp_path, tiny_model_dir, capsys, case):
    rng = random.Random(f"eval/{case}")
    folder = tmp_path / "hellaswag"
    folder.mkdir()
    write_jsonl(folder / "hellaswag_train.jsonl", synthetic_items(20, seed=1))
    val = write_jsonl(folder / "hellaswag_val.jsonl", synthetic_items(12, seed=2))
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    val.write_bytes(corrupt(rows, dump_jsonl, rng))
    out = tmp_path / "eval"
    code = cli.main(["eval", "--model", str(tiny_model_dir), "--hellaswag-dir", str(folder), "--eval-size", "6",
                     "--fewshot-indices", "0,1", "--metrics", "completion,mc", "--device", "cpu", "--out-dir",
                     str(out)])
    one_error_or_success(code, error_lines(capsys), out)
    if code == 0:
        assert json.loads((out / "results.json").read_text())["n"] == 6


# ---- run folders and checkpoints: truncated, bytes flipped, files swapped with another run's, given to
# `dpo train --resume` and `dpo eval`: the result of the undamaged run, or exit status 2 with one `error:` line

CHECKPOINT = "run/checkpoints/step_000001"
RESUMED_FILES = [f"{CHECKPOINT}/{name}" for name in ("trainer_state.pt", "model.safetensors", "checkpoint.json",
                                                     "config.json", "tokenizer.json")] + \
    ["run/config.json", "run/metrics.jsonl"]
SCORED_FILES = [f"run/final/{name}" for name in ("model.safetensors", "config.json", "tokenizer.json",
                                                 "tokenizer_config.json")] + ["run/config.json"]
DAMAGES = ("truncate", "flip", "swap")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """Finished 2-step runs of two models of different shapes (a GPT-2 and a Llama), same data and settings."""
    from conftest import finished_run, tiny_model

    llama = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", len(tiny_tokenizer), seed=1).save_pretrained(llama)
    tiny_tokenizer.save_pretrained(llama)
    return {"a": finished_run(tmp_path_factory.mktemp("run-a"), tiny_model_dir),
            "b": finished_run(tmp_path_factory.mktemp("run-b"), llama)}


def damage(path, other, action: str, rng: random.Random) -> None:
    blob = path.read_bytes()
    if action == "truncate":
        path.write_bytes(blob[:rng.randrange(len(blob))])
    elif action == "flip":
        out = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(out))
    else:
        path.write_bytes(other.read_bytes())


def error_or_nothing(code, capsys):
    """Exit status 0, or 2 with one `error:` line; never a traceback (warnings are fine)."""
    lines = error_lines(capsys)
    assert "Traceback" not in "\n".join(lines) and code in (0, 2), lines
    assert [ln for ln in lines if ln.startswith("error:")] == ([lines[-1]] if code else []), lines


@pytest.mark.parametrize("case", range(14))
def test_damaged_run_folder_through_resume(tmp_path, tiny_model_dir, two_runs, capsys, case):
    """Resumed, the run ends with exactly the weights of the undamaged run (checkpoints are checksummed, so a
    damaged or foreign checkpoint file is refused); a damaged metrics line is dropped with a warning."""
    from conftest import run_argv, stopped_copy

    rng = random.Random(f"resume/{case}")
    name, action = random.Random(0).sample(sorted(itertools.product(RESUMED_FILES, DAMAGES)), 14)[case]
    folder = stopped_copy(two_runs["a"], tmp_path / "x")
    damage(folder / name, two_runs["b"] / name, action, rng)
    code = cli.main(run_argv(tiny_model_dir, folder, "--resume"))
    error_or_nothing(code, capsys)
    if code == 0:
        weights = Path("run", "final", "model.safetensors")
        assert (folder / weights).read_bytes() == (two_runs["a"] / weights).read_bytes(), (name, action)


def eval_run(folder, out, capsys):
    """`dpo eval` of folder/run on 6 synthetic items into out: (exit status, results or None)."""
    data = out.parent / "hellaswag"
    data.mkdir(exist_ok=True)
    write_jsonl(data / "hellaswag_train.jsonl", synthetic_items(20, seed=1))
    write_jsonl(data / "hellaswag_val.jsonl", synthetic_items(12, seed=2))
    code = cli.main(["eval", "--model", str(folder / "run"), "--hellaswag-dir", str(data), "--eval-size", "6",
                     "--fewshot-indices", "0,1", "--metrics", "completion,mc", "--device", "cpu", "--out-dir",
                     str(out)])
    if capsys is not None:
        error_or_nothing(code, capsys)
    return code, json.loads((out / "results.json").read_text()) if code == 0 else None


@pytest.fixture(scope="module")
def undamaged_eval(two_runs, tmp_path_factory):
    code, results = eval_run(two_runs["a"], tmp_path_factory.mktemp("eval") / "out", None)
    assert code == 0
    return {k: results[k] for k in ("n", "acc", "acc_norm", "mc_acc")}


@pytest.mark.parametrize("case", range(10))
def test_damaged_run_folder_through_eval(tmp_path, two_runs, undamaged_eval, capsys, case):
    """Scored, the run gives the undamaged run's accuracies, or is refused (never a model with weights initialized at
    random because its weights file is another architecture's)."""
    rng = random.Random(f"eval-run/{case}")
    name, action = random.Random(1).sample(sorted(itertools.product(SCORED_FILES, DAMAGES)), 10)[case]
    folder = tmp_path / "x"
    shutil.copytree(two_runs["a"], folder)
    damage(folder / name, two_runs["b"] / name, action, rng)
    code, results = eval_run(folder, tmp_path / "eval", capsys)
    if code == 0:
        assert {k: results[k] for k in undamaged_eval} == undamaged_eval, (name, action)
    else:
        assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("case", range(6))
def test_damaged_model_folder_through_train(tmp_path, tiny_model_dir, two_runs, capsys, case):
    """A model folder with a truncated, flipped or foreign (another architecture's) weights or config file, given to
    `dpo train` as --model: trained as it is, or one error line (never a traceback)."""
    rng = random.Random(f"model/{case}")
    name, action = sorted(itertools.product(("model.safetensors", "config.json"), DAMAGES))[case]
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model / name, two_runs["b"] / "run" / "final" / name, action, rng)
    (tmp_path / "pairs.json").write_bytes(pairs.dump_pairs(PAIRS))
    code = cli.main(train_args(model, tmp_path / "pairs.json", tmp_path / "run", tmp_path / "cache"))
    one_error_or_success(code, error_lines(capsys), tmp_path / "run")


@pytest.mark.parametrize("case", range(6))
def test_damaged_finished_run_through_resume(tmp_path, tiny_model_dir, two_runs, capsys, case):
    """A finished run given to `dpo train --resume`: nothing to do, its files left as they are, or one error line
    (its summary.json damaged, or a checkpoint.json whose recorded settings are another run's)."""
    from conftest import run_argv

    rng = random.Random(f"finished/{case}")
    last = "run/checkpoints/step_000002/checkpoint.json"  # the one a resume reads
    name, action = sorted(itertools.product(("run/summary.json", last), DAMAGES))[case]
    folder = tmp_path / "x"
    shutil.copytree(two_runs["a"], folder)
    damage(folder / name, two_runs["b"] / name, action, rng)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    code = cli.main(run_argv(tiny_model_dir, folder, "--resume"))
    error_or_nothing(code, capsys)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


# ---- hostile files (issue 30): every file the tool reads, nested 200,000 deep, holding a 5000-digit integer, or a
# FIFO, /dev/zero, a 3 GB sparse file or a folder in its place: one `error:` line naming it, at once, nothing written

DEEP = 200_000
HOSTILE = ("nested arrays", "nested objects", "huge integer", "fifo", "dev zero", "sparse giant", "folder")


def make_hostile(path: Path, content: str) -> None:
    """A hostile file at path (a TOML one when path ends in .toml: its nesting is arrays, or a dotted key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    toml = path.suffix == ".toml"
    if content == "nested arrays":
        path.write_text(("[sweep]\nx = " if toml else "") + "[" * DEEP + "]" * DEEP + "\n")
    elif content == "nested objects":
        path.write_text("[sweep]\n" + "a." * 50_000 + "b = 1\n" if toml else '{"a": ' * DEEP + "1" + "}" * DEEP)
    elif content == "huge integer":
        path.write_text(f"[grid]\nseeds = [{'9' * 5000}]\n" if toml else '{"n": ' + "9" * 5000 + "}\n")
    elif content == "fifo":
        os.mkfifo(path)
    elif content == "dev zero":
        path.symlink_to("/dev/zero")
    elif content == "sparse giant":  # 3 GB that take no disk (and must not be read)
        with open(path, "wb") as f:
            f.truncate(3 << 30)
    else:
        path.mkdir()


@pytest.fixture
def no_hang():
    """A test that blocks (a FIFO opened for reading waits for a writer) fails after 60 s instead."""
    def stop(signum, frame):
        raise TimeoutError("blocked reading a special file")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def hostile_target(target: str, tmp: Path, model: Path, hellaswag: Path) -> tuple:
    """(the file made hostile, the command that reads it): every file `dpo data`, `dpo train` and `dpo sweep` read."""
    out, good = tmp / "out", tmp / "good.json"
    good.write_bytes(pairs.dump_pairs(PAIRS * 10))
    data = ["data", "--out-dir", str(out), "--holdout", "4"]
    if target in ("prefs.json", "prefs.jsonl", "prefs.csv"):
        return tmp / target, [*data, "--pairs", str(tmp / target)]
    if target == "hellaswag_val.jsonl":
        shutil.copytree(hellaswag, tmp / "hs")
        (tmp / "hs" / target).unlink()
        return tmp / "hs" / target, ["data", "--hellaswag-dir", str(tmp / "hs"), "--n", "20", "--eval-size", "50",
                                     "--out-dir", str(out)]
    if target == "--val-file":  # given explicitly: hashed before it is read
        return tmp / "val.jsonl", ["data", "--hellaswag-dir", str(hellaswag), "--val-file", str(tmp / "val.jsonl"),
                                   "--n", "20", "--eval-size", "50", "--out-dir", str(out)]
    if target == "manifest.json":
        return out / target, [*data, "--pairs", str(good)]
    if target == "sweep.toml":
        return tmp / target, ["sweep", str(tmp / target), "--dry-run"]
    if target == "cells file":
        sweep_file = tmp / "s.toml"
        sweep_file.write_text(f'[sweep]\nmodel = "{model}"\nruns_dir = "{tmp / "runs"}"\n[data]\nhellaswag_dir = '
                              f'"{hellaswag}"\n')
        return tmp / "cells.json", ["sweep", str(sweep_file), "--cells-file", str(tmp / "cells.json"),
                                    "--only-index", "0", "--dry-run"]
    if target == "model config.json":
        shutil.copytree(model, tmp / "m")
        (tmp / "m" / "config.json").unlink()
        return tmp / "m" / "config.json", train_args(tmp / "m", good, out, tmp / "cache")
    return tmp / "train.json", train_args(model, tmp / "train.json", out, tmp / "cache")  # --train-data-path


HOSTILE_TARGETS = ("prefs.json", "prefs.jsonl", "prefs.csv", "hellaswag_val.jsonl", "--val-file", "manifest.json",
                   "sweep.toml", "cells file", "model config.json", "train data")


@pytest.mark.parametrize("content", HOSTILE)
@pytest.mark.parametrize("target", HOSTILE_TARGETS)
def test_a_hostile_file_is_one_error_line_naming_it(tmp_path, tiny_model_dir, hellaswag_dir, capsys, no_hang,
                                                    target, content):
    path, argv = hostile_target(target, tmp_path, tiny_model_dir, hellaswag_dir)
    make_hostile(path, content)
    code = cli.main(argv)
    lines = error_lines(capsys)
    assert code == 2 and [ln for ln in lines if ln.startswith("error:")] == lines[-1:], lines
    named = path.parent if target == "model config.json" and content in ("fifo", "dev zero", "folder") else path
    assert f"{named}" in lines[-1], lines  # (a config.json that is no file: "not a model folder", naming it)
    made = [p for p in (tmp_path / "out").rglob("*") if p.name != "manifest.json"] if target != "manifest.json" \
        else [p for p in (tmp_path / "out").glob("*.json") if p != path]
    assert not made


def test_a_file_too_large_to_read_whole_is_refused_at_once_naming_the_limit(tmp_path, capsys, monkeypatch):
    """A 3 GB JSON Lines file ended in a MemoryError after 77 s; now: one line, before reading a byte. The limit
    holds for several files of one source together."""
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate(3 << 30)
    assert cli.main(["data", "--pairs", str(big), "--out-dir", str(tmp_path / "out")]) == 2
    assert error_lines(capsys) == [f"error: {big}: 3.0 GiB, more than the 1.0 GiB a file may have to be read into "
                                   "memory (expected preference data: a .json, .jsonl, .csv, .parquet or .arrow file, "
                                   "or a folder of them): use a smaller file, e.g. the rows you need"]
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(3):
        write_jsonl(folder / f"train-0000{i}-of-00003.jsonl", PAIRS)
    monkeypatch.setattr(files, "MAX_READ_BYTES", 2 * (folder / "train-00000-of-00003.jsonl").stat().st_size)
    assert cli.main(["data", "--pairs", str(folder), "--out-dir", str(tmp_path / "out")]) == 2
    assert error_lines(capsys)[0].startswith(f"error: {folder}: its 3 files hold ")


@pytest.mark.parametrize("content", ["nested arrays", "huge integer", "fifo"])
def test_a_hostile_reference_cache_is_recomputed_with_one_warning(tmp_path, tiny_model_dir, capsys, clean_cache,
                                                                 no_hang, content):
    """Issue 30: a cache nested too deeply ended every later `dpo train` in a RecursionError; it is recomputed like
    any damaged cache (docs/trust.md's promise), with the clean run's loss."""
    folder, cache, loss = clean_cache
    make_hostile(tmp_path / "cache" / "ref" / cache.name, content)
    code = cli.main(train_args(tiny_model_dir, folder / "pairs.json", tmp_path / "run", tmp_path / "cache"))
    lines = error_lines(capsys)
    assert code == 0 and len(lines) <= 1 and all(ln.startswith("warning:") for ln in lines), lines
    got = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert got == pytest.approx(loss, abs=1e-6)
    assert json.loads((tmp_path / "cache" / "ref" / cache.name).read_text())["entries"]  # rewritten
