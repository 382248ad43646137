import json
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import synthetic_items, write_jsonl

from dpo import cli
from dpo.core import files
from dpo.core.config import DataConfig
from dpo.core.files import InputError
from dpo.data import hellaswag, pairs, prepare
from dpo.data.hellaswag import Item
from dpo.data.prepare import build, ensure_pairs, load_splits


def cfg_for(d, tmp_path, **kw):
    return DataConfig(hellaswag_dir=str(d), out_dir=str(tmp_path / "out"), eval_size=100, **kw)


@pytest.mark.parametrize("n,noise,seed", [(100, 0.1, 1), (100, 0.25, 2), (200, 0.5, 3), (37, 0.3, 4),
                                          (50, 0.0, 1), (50, 1.0, 5), (10, 0.05, 7)])
def test_exact_flip_count_and_flips_are_swaps(hellaswag_dir, tmp_path, n, noise, seed):
    splits, _ = load_splits(cfg_for(hellaswag_dir, tmp_path))
    clean = pairs.make_pairs(splits.train, splits.fewshot, n=n, noise=0.0, seed=seed)
    noisy = pairs.make_pairs(splits.train, splits.fewshot, n=n, noise=noise, seed=seed)
    assert sum(p["flipped"] for p in noisy) == int(noise * n + 0.5)
    for c, p in zip(clean, noisy):
        assert p["prompt"] == c["prompt"] and p["item"] == c["item"]
        if p["flipped"]:
            assert (p["chosen"], p["rejected"]) == (c["rejected"], c["chosen"])
        else:
            assert (p["chosen"], p["rejected"]) == (c["chosen"], c["rejected"])


def test_flips_nest_and_prefix_property(hellaswag_dir, tmp_path):
    splits, _ = load_splits(cfg_for(hellaswag_dir, tmp_path))
    low = pairs.make_pairs(splits.train, splits.fewshot, n=200, noise=0.1, seed=3)
    high = pairs.make_pairs(splits.train, splits.fewshot, n=200, noise=0.4, seed=3)
    assert {i for i, p in enumerate(low) if p["flipped"]} < {i for i, p in enumerate(high) if p["flipped"]}
    small = pairs.make_pairs(splits.train, splits.fewshot, n=100, seed=3, fmt="completion")
    big = pairs.make_pairs(splits.train, splits.fewshot, n=200, seed=3, fmt="completion")
    assert big[:100] == small
    other_seed = pairs.make_pairs(splits.train, splits.fewshot, n=100, seed=4)
    assert [p["prompt"] for p in other_seed] != [p["prompt"] for p in low[:100]]


def test_files_are_byte_identical_and_manifest(hellaswag_dir, tmp_path):
    cfg = cfg_for(hellaswag_dir, tmp_path, n=120, noise=0.25, seed=2)
    first = build(cfg, [(0.25, 2)])
    blobs = {p: open(p, "rb").read() for p in first}
    build(cfg, [(0.25, 2)])
    assert {p: open(p, "rb").read() for p in first} == blobs
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    entry = manifest["mc_n120_noise0.25_seed2.json"]
    assert entry["flipped"] == 30 and entry["n"] == 120 and entry["seed"] == 2
    assert entry["splits"]["fewshot"] == [f"train/{i}" for i in pairs.FEWSHOT_INDICES]
    assert set(entry["sources"]) == {"train", "val"}
    val = json.loads((tmp_path / "out" / "mc_val_n100_seed2.json").read_text())
    assert len(val) == 100 and not any(p["flipped"] for p in val)
    assert [p["item"] for p in val] == [f"val/{i}" for i in range(100)]


def test_train_from_val_never_overlaps_eval(hellaswag_dir, tmp_path):
    cfg = DataConfig(val_file=str(hellaswag_dir / "hellaswag_val.jsonl"), train_from_val=True, eval_size=100,
                     train_start=10, fewshot_indices="0,1,2")
    splits, files = load_splits(cfg)
    assert "train" not in files
    eval_ids = {it.id for it in splits.eval}
    assert eval_ids == {f"val/{i}" for i in range(100)}
    assert [it.id for it in splits.fewshot] == ["val/100", "val/101", "val/102"]
    assert splits.train[0].id == "val/110" and len(splits.train) == 90
    assert not eval_ids & {it.id for it in splits.train + splits.fewshot}


def train_items(path) -> list:
    return [p["item"] for p in json.loads(Path(path).read_text())]


def test_seeds_with_a_stride_train_on_disjoint_items_and_without_one_on_the_same(hellaswag_dir, tmp_path):
    kw = dict(format="completion", n=40, noise=0.25)
    strided = [ensure_pairs(cfg_for(hellaswag_dir, tmp_path, seed=seed, seed_stride=50, **kw)).train
               for seed in (1, 2, 3)]
    shared = [ensure_pairs(cfg_for(hellaswag_dir, tmp_path, seed=seed, **kw)).train for seed in (1, 2)]
    items = [set(train_items(p)) for p in strided]
    assert all(len(s) == 40 for s in items)
    assert not (items[0] & items[1] or items[0] & items[2] or items[1] & items[2])
    assert items[0] == set(train_items(shared[0])) == set(train_items(shared[1]))  # seed 1's slice starts the pool
    assert len({p.name for p in strided + shared}) == 5  # a strided file never takes an unstrided file's name


@pytest.mark.parametrize("kw, message", [
    (dict(n=60, seed_stride=50), "--n 60 is more than --seed-stride 50"),
    (dict(n=10, seed_stride=50, seed=0), "expected a seed of 1 or more"),
    (dict(n=10, seed_stride=-1), "--seed-stride -1"),
])
def test_a_stride_that_would_share_items_is_refused(hellaswag_dir, tmp_path, kw, message):
    with pytest.raises(InputError, match=re.escape(message)):
        ensure_pairs(cfg_for(hellaswag_dir, tmp_path, format="completion", **kw))
    assert not (tmp_path / "out").exists()


def test_a_seed_past_the_pool_end_is_one_error(hellaswag_dir, tmp_path):
    with pytest.raises(InputError, match="the training pool has"):
        ensure_pairs(cfg_for(hellaswag_dir, tmp_path, format="completion", n=40, seed=6, seed_stride=50))


def test_shuffled_item_order_is_one_fixed_permutation_for_every_seed_and_command(hellaswag_dir, tmp_path):
    plain = load_splits(DataConfig(hellaswag_dir=str(hellaswag_dir), train_from_val=True, eval_size=50))[0]
    shuffled = [load_splits(DataConfig(hellaswag_dir=str(hellaswag_dir), train_from_val=True, eval_size=50, seed=seed,
                                       train_start=0,
                                       item_order="shuffled"))[0] for seed in (1, 2)]
    ids = [[it.id for it in sp.eval] for sp in (plain, *shuffled)]
    assert ids[1] == ids[2] != ids[0]  # the same permutation whatever the seed, and not the file's order
    assert ids[0] == [f"val/{i}" for i in range(50)]
    assert max(int(i.split("/")[1]) for i in ids[1]) > 100  # the evaluation set reaches into the whole file
    every = [it.id for it in shuffled[0].eval + shuffled[0].train + shuffled[0].fewshot]
    assert len(every) == len(set(every)) == 200  # a permutation: disjoint splits, nothing lost
    strided = ensure_pairs(cfg_for(hellaswag_dir, tmp_path, format="completion", n=40, item_order="shuffled"))
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())[strided.train.name]
    assert entry["settings"]["item_order"] == "shuffled"


HAND = Item("val/7", 'A man sits on a roof. he', ("is using wrap.", "rips tiles off.", "holds a cube.",
            "starts pulling up roofing."), 3, "Roof shingle removal", "A man sits on a roof.", "he")
SHOT = Item("train/0", "The boy runs. the boy", ("runs into a car.", "gets in a mat.", "jumps.", "stands."), 2)


def test_mc_prompt_by_hand():
    expected = ('Context: "The boy runs. the boy"\n0: "runs into a car."\n1: "gets in a mat."\n2: "jumps."\n'
                '3: "stands."\nBest Continuation: 2\n\n'
                'Context: "A man sits on a roof. he"\n0: "is using wrap."\n1: "rips tiles off."\n2: "holds a cube."\n'
                '3: "starts pulling up roofing."\nBest Continuation:')
    assert pairs.mc_prompt(HAND, [SHOT]) == expected
    p = pairs.make_pair(HAND, "mc", [SHOT], 1, seed=1)
    assert p["prompt"] == expected and p["chosen"] == " 3" and p["rejected"] in (" 0", " 1", " 2")


def test_completion_prompt_by_hand():
    p = pairs.make_pair(HAND, "completion", [SHOT], 1, seed=1)
    assert p["prompt"] == "Roof shingle removal: A man sits on a roof. He"
    assert p["chosen"] == " starts pulling up roofing."
    assert p["rejected"] in (" is using wrap.", " rips tiles off.", " holds a cube.")


def test_bracket_cleanup():
    # exactly the harness: strip first, then drop tags (a leading tag leaves its space behind)
    assert hellaswag.clean("[header] How to paint [title] Buy paint. [step] Go  home.") == \
        " How to paint. Buy paint. Go home."
    assert hellaswag.clean("  plain text  ") == "plain text"
    item = Item("x/0", "", ("a",) * 4, 0, "Home", "[header] Fix it [title] Now.", "[step] then")
    assert hellaswag.harness_query(item) == "Home: Fix it. Now. then"  # capitalize() sees "[" first


def test_seed_format_items(tmp_path):
    path = write_jsonl(tmp_path / "seed.jsonl", [{"context": "A b", "choices": ["w", "x", "y", "z"], "answer": 2}])
    (item,) = hellaswag.read_items(path, "train")
    assert item == Item("train/0", "A b", ("w", "x", "y", "z"), 2)


BAD_LINES = [
    ("{not json", "malformed JSON"),
    ('{"ctx": "a", "endings": ["a", "b", "c", "d"]}', "missing field 'label'"),
    ('{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": 4}', "out of range"),
    ('{"ctx": "a", "endings": ["a", "b", "c"], "label": 1}', "expected 4 string endings"),
    ('{"endings": ["a", "b", "c", "d"], "label": 1}', "missing field 'ctx'"),
    ('{"prompt": "a"}', "unknown item format"),
    ('[1, 2]', "expected a JSON object"),
    ('{"ctx": "a", "endings": ["a", " ", "c", "d"], "label": 1}', "endings[1] is empty"),
    ('{"ctx": "a", "endings": ["a", "b", "[title]", "d"], "label": 1}', "endings[2] is empty"),
    ('{"ctx": "a", "endings": ["a", 2, "c", "d"], "label": 1}', "endings[1] is int, expected a string"),
    ('{"ctx": "a", "endings": ["a", "a", "a", "a"], "label": 1}', "all 4 endings are the same text"),
    ('{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": true}', "field 'label' is bool"),
    ('{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": 1.5}', "field 'label' is float"),
    ('{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": "²"}', "field 'label' '²' is not an integer"),
    ('{"ctx": " ", "endings": ["a", "b", "c", "d"], "label": 1}', "field 'ctx' is empty"),
    ('{"ctx_a": 5, "endings": ["a", "b", "c", "d"], "label": 1}', "field 'ctx_a' is int"),
    ('{"ctx": "\\ud83d", "endings": ["a", "b", "c", "d"], "label": 1}', "field 'ctx' is not valid Unicode"),
    ('{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": 1, "activity_label": 3}',
     "field 'activity_label' is int"),
    ('{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": 1, "ind": [5]}', "field 'ind' is list"),
    ('{"context": "", "choices": ["a", "b", "c", "d"], "answer": 1}', "field 'context' is empty"),
    ('{"context": "a", "choices": ["a", "b", "", "d"], "answer": 1}', "choices[2] is empty"),
    ('{"context": "a", "choices": ["a", "b", "c", "d"], "answer": false}', "field 'answer' is bool"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_line_names_file_and_line(hellaswag_dir, tmp_path, capsys, line, message):
    val = hellaswag_dir / "hellaswag_val.jsonl"
    rows = val.read_text().splitlines()
    rows.insert(4, line)
    val.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = cli.main(["data", "--hellaswag-dir", str(hellaswag_dir), "--out-dir", str(out), "--eval-size", "100"])
    err = capsys.readouterr().err
    assert code == 2 and f"{val}:5:" in err and message in err
    assert not out.exists() or not any(out.iterdir())


def test_empty_file_and_big_n_and_bad_noise(hellaswag_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["data", "--hellaswag-dir", str(hellaswag_dir), "--out-dir", str(out), "--eval-size", "100"]
    assert cli.main(base + ["--n", "100000"]) == 2
    assert "N=100000 pairs asked for, but the training pool has 250 items" in capsys.readouterr().err
    assert cli.main(base + ["--noise", "1.5"]) == 2
    assert "outside [0, 1]" in capsys.readouterr().err
    assert cli.main(base + ["--fewshot-indices", "0,x"]) == 2
    assert "--fewshot-indices '0,x': expected comma-separated integers" in capsys.readouterr().err
    with pytest.raises(InputError, match="--format 'letters': expected one of mc, completion"):
        ensure_pairs(DataConfig(format="letters", hellaswag_dir=str(hellaswag_dir), out_dir=str(out)))
    (hellaswag_dir / "hellaswag_train.jsonl").write_text("")
    assert cli.main(base) == 2
    assert "hellaswag_train.jsonl: the file is empty" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_missing_train_split_hint(hellaswag_dir, tmp_path, capsys):
    (hellaswag_dir / "hellaswag_train.jsonl").unlink()
    assert cli.main(["data", "--hellaswag-dir", str(hellaswag_dir), "--out-dir", str(tmp_path)]) == 2
    assert "--train-from-val" in capsys.readouterr().err


def test_an_explicit_train_file_wins_over_the_environment(hellaswag_dir, tmp_path, capsys, monkeypatch):
    """README's Offline section exports DPO_TRAIN_FROM_VAL=1; its `--train-file` command must still train on that
    file's items, and the manifest must say which items the pairs came from."""
    monkeypatch.setenv("DPO_TRAIN_FROM_VAL", "1")
    out = tmp_path / "out"
    argv = ["data", "--train-file", str(hellaswag_dir / "hellaswag_train.jsonl"), "--val-file",
            str(hellaswag_dir / "hellaswag_val.jsonl"), "--train-start", "0", "--fewshot-indices", "0,1",
            "--eval-size", "100", "--n", "8", "--out-dir", str(out)]
    assert cli.main(argv) == 0
    made = json.loads((out / "mc_n8_noise0_seed1.json").read_text())
    assert [p["item"] for p in made] == [f"train/{i}" for i in range(2, 10)]
    entry = json.loads((out / "manifest.json").read_text())["mc_n8_noise0_seed1.json"]
    assert entry["settings"]["train_from_val"] is False
    assert entry["train_items"] == {"source": "train[0:]", "first": "train/2", "last": "train/9"}
    assert set(entry["sources"]) == {"train", "val"}
    monkeypatch.delenv("DPO_TRAIN_FROM_VAL")
    capsys.readouterr()
    assert cli.main(argv + ["--train-from-val"]) == 2  # both given explicitly: which one was meant?
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--train-file" in err and "--train-from-val" in err


def test_the_environment_still_draws_from_validation_without_a_train_file(hellaswag_dir, monkeypatch):
    monkeypatch.setenv("DPO_TRAIN_FROM_VAL", "1")
    assert DataConfig().train_from_val is True and DataConfig(train_file="x.jsonl").train_from_val is False
    assert DataConfig(train_from_val=False).train_from_val is False
    monkeypatch.setenv("DPO_TRAIN_FROM_VAL", "0")
    assert DataConfig().train_from_val is False


def test_cli_writes_one_file_and_accepts_underscores(hellaswag_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["data", "--hellaswag_dir", str(hellaswag_dir), "--out_dir", str(out), "--eval-size", "100",
                     "--n", "40", "--noise", "0.25", "--seed", "3", "--format", "completion"])
    assert code == 0
    written = json.loads((out / "completion_n40_noise0.25_seed3.json").read_text())
    assert len(written) == 40 and sum(p["flipped"] for p in written) == 10
    assert "completion_n40_noise0.25_seed3.json" in capsys.readouterr().out


def test_seed_project_files_load(shared_hellaswag):
    for name in ("dpo_000-1.json", "dpo_050-1.json", "val-1.json"):
        loaded = pairs.read_pairs(shared_hellaswag / "seed" / name)
        assert len(loaded) == 1000
        assert loaded[0]["chosen"] in (" 0", " 1", " 2", " 3") and "flipped" not in loaded[0]
    items = hellaswag.read_items(shared_hellaswag / "seed" / "data_val.jsonl", "val")
    full = hellaswag.read_items(shared_hellaswag / "hellaswag_val.jsonl", "val")
    assert len(full) == 10042
    assert [it.label for it in items] == [it.label for it in full[:1000]]


def test_non_utf8_line_names_file_and_line(hellaswag_dir, tmp_path, capsys):
    val = hellaswag_dir / "hellaswag_val.jsonl"
    rows = val.read_bytes().splitlines(keepends=True)
    rows[4] = rows[4].replace(b"the", b"th\xe9", 1)  # Latin-1, not UTF-8
    val.write_bytes(b"".join(rows))
    with pytest.raises(InputError, match=re.escape(f"{val}:5: not UTF-8 text (byte ")):
        hellaswag.read_items(val)
    out = tmp_path / "out"
    assert cli.main(["data", "--hellaswag-dir", str(hellaswag_dir), "--out-dir", str(out)]) == 2
    assert f"{val}:5: not UTF-8 text" in capsys.readouterr().err
    assert not out.exists()


def test_read_pairs_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "p", "chosen": " 1"}]')
    with pytest.raises(InputError, match="pair 0: field 'rejected'"):
        pairs.read_pairs(bad)
    bad.write_text('[{"prompt": "p",\n "chosen": }]')
    with pytest.raises(InputError, match="bad.json:2: malformed JSON"):
        pairs.read_pairs(bad)
    blob = b'[{"prompt": "p",\n "chosen": " 1",\n "rejected": "caf\xe9"}]'
    bad.write_bytes(blob)
    offset = blob.index(b"\xe9")
    with pytest.raises(InputError, match=re.escape(f"{bad}:3: not UTF-8 text (byte {offset} of the file")):
        pairs.read_pairs(bad)


GOOD_PAIR = {"prompt": "Q: 1 + 1?", "chosen": " 2", "rejected": " 3"}
BAD_PAIRS = [
    ({"prompt": ""}, "pair 1: empty prompt (a response's first token needs a context to be scored after)"),
    ({"prompt": " \n\t"}, "pair 1: empty prompt"),
    ({"chosen": " "}, "pair 1: field 'chosen' is empty or only whitespace"),
    ({"rejected": "\n"}, "pair 1: field 'rejected' is empty or only whitespace"),
    ({"rejected": " 2"}, "pair 1: chosen and rejected are identical"),
    ({"flipped": "false"}, "pair 1: field 'flipped' is str, expected true or false"),
    ({"flipped": "1"}, "pair 1: field 'flipped' is str, expected true or false (or 0/1)"),
    ({"flipped": 2}, "pair 1: field 'flipped' is 2, expected true or false (or 0/1)"),
    ({"flipped": 1.0}, "pair 1: field 'flipped' is float"),
    ({"prompt": "Q\udc80"}, "pair 1: field 'prompt' is not valid Unicode text (a lone surrogate \\udc80"),
]


@pytest.mark.parametrize("change,message", BAD_PAIRS)
def test_read_pairs_refuses_pairs_that_would_train_wrong(tmp_path, change, message):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([GOOD_PAIR, {**GOOD_PAIR, **change}]))
    with pytest.raises(InputError) as e:
        pairs.read_pairs(path)
    assert str(e.value).startswith(f"{path}: {message}")


def test_read_pairs_takes_0_and_1_as_flipped_and_leaves_a_missing_one_missing(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{**GOOD_PAIR, "flipped": 1}, {**GOOD_PAIR, "flipped": 0}, GOOD_PAIR]))
    loaded = pairs.read_pairs(path)
    assert [p.get("flipped", "missing") for p in loaded] == [True, False, "missing"]
    assert type(loaded[0]["flipped"]) is bool


def test_rejected_never_has_the_gold_text():
    item = Item("val/3", "A man", ("sits down.", "runs.", "sits  down.", " sits down. "), 0)  # 2, 3 clean to 0
    for seed in range(30):
        assert pairs.draw(item, [], 0, seed)[1] == 1
        p = pairs.make_pair(item, "completion", [], 0, seed)
        assert p["chosen"] == " sits down." and p["rejected"] == " runs."


def test_synthetic_fixture_is_valid(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", synthetic_items(20, wikihow_every=3))
    assert len(hellaswag.read_items(path)) == 20


# ---- atomic writes


def test_atomic_write_honours_umask(tmp_path):
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            files.atomic_write_bytes(tmp_path / "out.json", b"{}")
        finally:
            os.umask(old)
        assert (tmp_path / "out.json").stat().st_mode & 0o777 == mode


def test_atomic_write_fsyncs_before_rename_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    calls = []
    fsync, rename = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or rename(a, b))
    files.atomic_write_bytes(tmp_path / "a.json", b"new")
    assert calls == ["fsync", "replace"]

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(files.InputError, match="a.json: cannot write it: no space left on device"):
        files.atomic_write_bytes(tmp_path / "a.json", b"newer")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"] and (tmp_path / "a.json").read_bytes() == b"new"


# ---- ensure_pairs: reuse a file only when it was made from the same data


def made_lines(err):
    return [line for line in err.splitlines() if line.startswith("made ")]


def test_ensure_pairs_says_what_it_makes_and_what_it_reuses(hellaswag_dir, tmp_path, capsys):
    cfg = cfg_for(hellaswag_dir, tmp_path, n=40, noise=0.25)
    train_path, val_path = ensure_pairs(cfg)
    assert made_lines(capsys.readouterr().err) == [f"made {train_path} (40 pairs, noise 0.25, 10 flipped)",
                                                   f"made {val_path} (100 pairs, validation)"]
    before = train_path.stat().st_mtime_ns, val_path.stat().st_mtime_ns
    assert ensure_pairs(cfg) == (train_path, val_path)
    assert capsys.readouterr().err == (f"using {train_path} and {val_path.name} (built earlier from the same "
                                       "settings and sources)\n")
    assert (train_path.stat().st_mtime_ns, val_path.stat().st_mtime_ns) == before
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())[train_path.name]
    assert entry["settings"] == {"format": "mc", "seed": 1, "fewshot": 1, "train_from_val": False,
                                 "fewshot_indices": list(pairs.FEWSHOT_INDICES), "eval_start": 0, "eval_size": 100,
                                 "n": 40, "noise": 0.25, "train_start": 50}


def test_a_second_training_file_reuses_the_identical_validation_file_and_says_so(hellaswag_dir, tmp_path, capsys):
    _, val_path = ensure_pairs(cfg_for(hellaswag_dir, tmp_path, n=40, noise=0.25))
    capsys.readouterr()
    before = val_path.stat().st_mtime_ns
    train_path, same_val = ensure_pairs(cfg_for(hellaswag_dir, tmp_path, n=40, noise=0.5))  # another noise level
    err = capsys.readouterr().err
    assert same_val == val_path and val_path.stat().st_mtime_ns == before  # not rewritten
    assert f"made {train_path} (40 pairs, noise 0.5" in err
    assert f"reused {val_path} (100 pairs, validation, identical to the file there)" in err
    assert "reused" not in json.loads((tmp_path / "out" / "manifest.json").read_text())[val_path.name]


@pytest.mark.parametrize("change,why", [
    ({"train_start": 60}, "train_start 50 -> 60"),
    ({"fewshot_indices": "1,2,3"}, "fewshot_indices [0, 4, 36, 13, 21, 41, 29, 26] -> [1, 2, 3]"),
    ({"eval_start": 50}, "eval_start 0 -> 50"),
    ({"eval_size": 90}, "eval_size 100 -> 90"),
    ({"train_from_val": True}, "train_from_val False -> True, train file -> none"),
    ({"fewshot_file": "FEWSHOT"}, "no fewshot file -> "),
])
def test_ensure_pairs_rebuilds_a_file_made_from_other_settings(hellaswag_dir, tmp_path, capsys, change, why):
    cfg = cfg_for(hellaswag_dir, tmp_path, n=40)
    train_path, _ = ensure_pairs(cfg)
    if change.get("fewshot_file"):
        change["fewshot_file"] = str(write_jsonl(tmp_path / "shots.jsonl", synthetic_items(3, seed=9, start=900)))
    capsys.readouterr()
    assert ensure_pairs(replace(cfg, **change))[0] == train_path
    err = capsys.readouterr().err
    assert err.startswith(f"note: {train_path} was made from other data ({why}")
    assert err.splitlines()[0].endswith("; rebuilding")
    assert re.search(rf"^(made|reused) {re.escape(str(train_path))} \(40 pairs", err, re.M)  # reused: same bytes
    splits, _ = load_splits(replace(cfg, **change))
    assert pairs.read_pairs(train_path) == pairs.make_pairs(splits.train, splits.fewshot, n=40)


def test_ensure_pairs_rebuilds_after_its_sources_or_the_file_change(hellaswag_dir, tmp_path, capsys):
    cfg = cfg_for(hellaswag_dir, tmp_path, n=40)
    train_path, val_path = ensure_pairs(cfg)
    clean, old_val = train_path.read_bytes(), val_path.read_bytes()
    val = hellaswag_dir / "hellaswag_val.jsonl"
    val.write_text(val.read_text().replace('"label": 0', '"label": 1', 1))  # one gold answer corrected
    capsys.readouterr()
    ensure_pairs(cfg)
    note = f"note: {val_path} was made from other data (val file sha256 "
    assert note in capsys.readouterr().err
    assert val_path.read_bytes() != old_val and train_path.read_bytes() == clean  # train items did not change

    train_path.write_text(train_path.read_text().replace('"flipped": false', '"flipped": true', 1))
    ensure_pairs(cfg)
    err = capsys.readouterr().err
    assert f"note: {train_path} was changed after it was made (its sha256 differs from the manifest's); " \
           "rebuilding" in err
    assert train_path.read_bytes() == clean

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    del manifest[train_path.name]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    ensure_pairs(cfg)
    assert f"note: {train_path} has no entry in the manifest; rebuilding" in capsys.readouterr().err
    ensure_pairs(cfg)
    assert capsys.readouterr().err.startswith("using ")  # nothing rebuilt


def test_concurrent_ensure_pairs_build_once(hellaswag_dir, tmp_path, capsys, monkeypatch):
    make = prepare.make

    def slow_make(*args):
        time.sleep(0.3)  # the second caller arrives while the first is building
        return make(*args)

    monkeypatch.setattr(prepare, "make", slow_make)
    cfg = cfg_for(hellaswag_dir, tmp_path, n=40)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_pairs(cfg))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert len(made_lines(capsys.readouterr().err)) == 2  # the training and the validation file, made once
    assert len(pairs.read_pairs(results[0][0])) == 40


# ---- the Makefile passes only what was given: every default lives in dpo/core/config.py

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_makefile_passes_only_the_variables_given():
    def flags(target, *variables, **environment):
        out = subprocess.run(["make", "-n", target, *variables], cwd=ROOT, capture_output=True, text=True,
                             check=True, env={"PATH": os.environ["PATH"], **environment}).stdout
        (line,) = [line for line in out.replace("\\\n", " ").splitlines() if f"/dpo {target}" in line]
        return line.split(f"/dpo {target}", 1)[1].split()

    assert flags("train") == []
    assert flags("train", "NOISE=0.1") == ["--noise", "0.1"]
    assert flags("train", "MODEL=smollm2-135m", "LOSS=rdpo", "EPS=0.2", "RUN=r", N="500") == [
        "--model", "smollm2-135m", "--n", "500", "--loss", "rdpo", "--eps", "0.2", "--run-name", "r"]
    assert flags("data") == ["--grid"]
    assert flags("data", "N=100") == ["--n", "100"]
    assert flags("data", "SEED=2", "TRAIN_FROM_VAL=0") == ["--seed", "2", "--train-from-val", "0"]
    assert flags("data", "PAIRS=p.jsonl") == ["--pairs", "p.jsonl"]  # one file from your data, not the grid
    assert flags("data", "PAIRS=p.jsonl", "NOISE=0.2", "MODEL=m", "ARGS=--holdout 5") == [
        "--noise", "0.2", "--pairs", "p.jsonl", "--model", "m", "--holdout", "5"]
    assert flags("train", "PAIRS=p.jsonl") == ["--pairs", "p.jsonl"]
    assert flags("eval") == []
    assert flags("eval", "LIMIT=5", "SEED=2") == ["--limit", "5", "--seed", "2"]
