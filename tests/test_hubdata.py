"""`--pairs OWNER/NAME[:CONFIG]`: a preference dataset on the Hugging Face hub, through `datasets` (not installed
here: a fake module in sys.modules stands for it, its `load_dataset` answering as the hub or the local cache would).
A local path of the same name always wins."""

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from test_sources import read, run_data, string_rows, write_source

from dpo.core import models
from dpo.data import hubdata


class FakeDatasets:
    """A fake `datasets` module and what its load_dataset was asked; `rows` answer, an exception is raised; offline
    records whether datasets' own offline flag was on during the call."""

    def __init__(self, answer):
        self.calls, self.answer = [], answer
        self.module = types.ModuleType("datasets")
        self.module.config = types.ModuleType("datasets.config")
        self.module.config.HF_HUB_OFFLINE = False
        self.module.load_dataset = self.load_dataset

    def load_dataset(self, name, config=None, split=None, revision=None):
        self.calls.append({"name": name, "config": config, "split": split, "revision": revision,
                           "offline": self.module.config.HF_HUB_OFFLINE})
        if isinstance(self.answer, Exception):
            raise self.answer
        return list(self.answer)


@pytest.fixture
def hub(monkeypatch):
    """install(answer, reachable=True): the fake datasets module in sys.modules, the hub (un)reachable."""

    def install(answer, reachable=True):
        fake = FakeDatasets(answer)
        monkeypatch.setitem(sys.modules, "datasets", fake.module)
        monkeypatch.setitem(sys.modules, "datasets.config", fake.module.config)
        monkeypatch.setattr(models, "hub_reachable", lambda url, timeout=3.0: reachable)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        return fake

    return install


def test_a_hub_dataset_gives_the_files_its_rows_give_from_a_local_file(tmp_path, hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = string_rows()
    fake = hub(rows)
    assert run_data("--pairs", write_source(tmp_path / "j", "jsonl", rows), "--noise", 0.25, out=tmp_path / "ref") == 0
    assert run_data("--pairs", "org/prefs:plain", "--pairs-split", "test", "--pairs-revision", "v1.0", "--noise", 0.25,
                    out=tmp_path / "out") == 0
    assert fake.calls == [{"name": "org/prefs", "config": "plain", "split": "test", "revision": "v1.0",
                           "offline": False}]
    made = sorted(p.name for p in (tmp_path / "out").glob("prefs-plain-test_*.json"))
    want = sorted(p.name for p in (tmp_path / "ref").glob("prefs_*.json"))
    assert [re.sub(r"^[^_]+", "", n) for n in made] == [re.sub(r"^[^_]+", "", n) for n in want] and len(made) == 2
    for m, w in zip(made, want):
        assert read(tmp_path / "out" / m) == read(tmp_path / "ref" / w)
    entry = read(tmp_path / "out" / "manifest.json")[made[0]]
    assert entry["sources"]["pairs"]["hub"] == {"id": "org/prefs", "config": "plain", "split": "test",
                                                "revision": "v1.0"}
    assert entry["sources"]["pairs"]["sha256"] == hubdata.rows_sha256([hubdata.Row(None, 0, None, r) for r in rows])


def test_offline_a_hub_id_is_one_error_line_that_says_how_to_use_a_local_copy(tmp_path, hub, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = hub(ConnectionError("Couldn't reach 'org/prefs' on the Hub (LocalEntryNotFoundError)"), reachable=False)
    assert run_data("--pairs", "org/prefs", out=tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    line = err.strip()
    assert line.startswith("error: org/prefs: no such file or folder here, and as a hub dataset (split train) not in "
                           "the local datasets cache and the hub is unreachable (ConnectionError: Couldn't reach")
    assert "hf download org/prefs --repo-type dataset --local-dir DIR" in line and line.endswith("then --pairs DIR")
    assert fake.calls[0]["offline"] and not fake.module.config.HF_HUB_OFFLINE  # the cache alone, then restored
    assert not (tmp_path / "out").exists()


def test_without_datasets_a_hub_id_is_one_error_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert run_data("--pairs", "trl-lib/ultrafeedback_binarized", out=tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "pip install -e '.[datasets]'" in err and "--pairs DIR" in err, err


def test_a_local_path_of_the_same_name_always_wins(tmp_path, hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = hub(AssertionError("the hub was asked"))
    write_source(tmp_path / "org" / "prefs", "jsonl", string_rows())  # a folder org/prefs/ holding prefs.jsonl
    assert run_data("--pairs", "org/prefs", out=tmp_path / "out") == 0
    assert not fake.calls and list((tmp_path / "out").glob("prefs_n*.json"))


@pytest.mark.parametrize("spec, is_id", [
    ("trl-lib/ultrafeedback_binarized", True), ("org/name:config", True), ("org/name.v2", True),
    ("prefs.jsonl", False), ("org/prefs.parquet", False), ("./org/name", False), ("/org/name", False),
    ("data/*.parquet", False), ("a/b/c", False), ("name", False), ("", False)])
def test_what_counts_as_a_hub_id(tmp_path, monkeypatch, spec, is_id):
    monkeypatch.chdir(tmp_path)
    assert hubdata.is_hub_id(spec) is is_id


def test_split_and_revision_are_refused_with_a_local_source(tmp_path, capsys):
    source = write_source(tmp_path / "j", "jsonl", string_rows())
    assert run_data("--pairs", source, "--pairs-split", "test", out=tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--pairs-split: only with a dataset on the hub" in err, err
    assert run_data("--pairs-revision", "v1", out=tmp_path / "out") == 2
    assert "--pairs-revision: only with --pairs" in capsys.readouterr().err


def test_a_dataset_built_here_loads_through_the_hub_path_as_from_its_saved_folder(tmp_path, monkeypatch):
    """Where `datasets` is installed: a Dataset made here, answered by the hub path's load_dataset, gives the files
    its save_to_disk folder gives through the hand-written reader."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    rows = string_rows()
    monkeypatch.setattr(models, "hub_reachable", lambda url, timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None, revision=None:
                        datasets.Dataset.from_list(rows))
    assert run_data("--pairs", write_source(tmp_path / "d", "datasets", rows), out=tmp_path / "ref") == 0
    assert run_data("--pairs", "org/prefs", out=tmp_path / "out") == 0
    made, want = (sorted(p.glob("*_n*.json")) for p in (tmp_path / "out", tmp_path / "ref"))
    assert [json.loads(p.read_text()) for p in made] == [json.loads(p.read_text()) for p in want]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_installs_the_datasets_extra_on_demand_for_a_hub_id_only():
    root = Path(__file__).resolve().parents[1]

    def plan(target, pairs):
        return subprocess.run(["make", "-n", target, f"PAIRS={pairs}"], cwd=root, capture_output=True, text=True,
                              check=True, env={"PATH": os.environ["PATH"]}).stdout

    assert "-e '.[datasets]'" in plan("data", "org/prefs:plain") and "-e '.[datasets]'" in plan("train", "org/p")
    for local in ("p.jsonl", "org/p.parquet", "tests", "'data/*.csv'"):
        assert "datasets" not in plan("data", local), local
