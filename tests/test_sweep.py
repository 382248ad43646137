"""Sweeps end to end on a tiny random GPT-2 and synthetic HellaSwag items: run, rerun (no work), resume one cell,
a failing cell, parallel scheduling (with a fake worker), the report from partial results, bad sweep files."""

import csv
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import synthetic_items, with_earlier_names, write_jsonl

from dpo import cli
from dpo.core import files, stats
from dpo.core.files import InputError
from dpo.eval import score
from dpo.study import report, report_audit, report_plots, results, runner, sweep
from dpo.train import runfolder, train

SWEEP = """
[sweep]
model = "{model}"
description = "A tiny test sweep."
runs_dir = "{runs}"
results_dir = "{results}"

[data]
hellaswag_dir = "{data}"
eval_size = 40
n = 12
out_dir = "{shared}/pairs"

[train]
max_steps = 2
per_device_train_batch_size = 4
gradient_accumulation_steps = 1
learning_rate = 1e-3
warmup_steps = 0
val_size = 8
eval_every = 1
gradient_checkpointing = false
cache_dir = "{shared}/cache"
device = "cpu"

[eval]
limit = 6
metrics = "mc,completion"
batch_size = 8
device = "cpu"

[grid]
loss = ["sigmoid", "rdpo"]
noise = [0.0, 0.25]
eps = "noise"
seeds = [1, 2]

[[extra]]
loss = "rdpo"
noise = 0.25
eps = 0.1
seeds = [1]
"""

GRID_CELLS = [f"loss={loss},noise={noise},eps={noise},seed={seed}" for seed in (1, 2)
              for loss in ("sigmoid", "rdpo") for noise in ("0", "0.25")]
EXTRA_CELL = "loss=rdpo,noise=0.25,eps=0.1,seed=1"


def write_sweep(folder, model, data, shared, text=SWEEP, name="tiny"):
    path = folder / f"{name}.toml"
    path.write_text(text.format(model=model, runs=folder / "runs", results=folder / "results", data=data,
                                shared=shared))
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """HellaSwag-shaped items, and the pair files and reference cache every copy of the sweep shares."""
    d = tmp_path_factory.mktemp("sweep-shared")
    (d / "hellaswag").mkdir()
    write_jsonl(d / "hellaswag" / "hellaswag_train.jsonl", synthetic_items(120, seed=1))
    write_jsonl(d / "hellaswag" / "hellaswag_val.jsonl", synthetic_items(60, seed=2))
    return d


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, shared):
    """The tiny sweep, run once: 8 grid cells + 1 extra cell + the base model."""
    folder = tmp_path_factory.mktemp("sweep")
    path = write_sweep(folder, tiny_model_dir, shared / "hellaswag", shared)
    assert runner.run(path) == 0
    return folder, path


@pytest.fixture
def copy(tmp_path, finished, tiny_model_dir, shared):
    """A private copy of the finished sweep's runs, to change."""
    shutil.copytree(finished[0] / "runs", tmp_path / "runs")
    return tmp_path, write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared)


def result(folder, cell):
    return json.loads((folder / "runs" / "tiny" / cell / "result.json").read_text())


def test_sweep_runs_every_cell(finished):
    folder, path = finished
    runs = folder / "runs" / "tiny"
    assert [c.name for c in sweep.load(path).cells] == GRID_CELLS[:4] + [EXTRA_CELL] + GRID_CELLS[4:]
    for cell in GRID_CELLS + [EXTRA_CELL]:
        r = result(folder, cell)
        assert r["cell"] == cell and set(r["eval"]) >= {"mc_acc", "acc", "acc_norm", "mc_acc_stderr"}
        assert r["eval"]["n"] == 6 and 0 <= r["val_reward_accuracy"] <= 1 and r["seconds"]["total"] > 0
        assert r["train_summary"]["steps"] == 2
        # weights deleted, metrics kept
        assert not (runs / cell / "final").exists() and not (runs / cell / "checkpoints").exists()
        for kept in ("metrics.jsonl", "config.json", "summary.json", "eval/results.json"):
            assert (runs / cell / kept).is_file()
    tied = result(folder, "loss=rdpo,noise=0.25,eps=0.25,seed=2")
    assert tied["train"]["eps"] == 0.25 and tied["data"]["noise"] == 0.25 and tied["data"]["seed"] == 2
    assert tied["eval_settings"]["model"].endswith("final") and tied["settings"]["loss"] == "rdpo"
    assert result(folder, EXTRA_CELL)["train"]["eps"] == 0.1
    base = json.loads((runs / "base" / "result.json").read_text())
    assert base["model"] == tied["model"] and base["eval"]["n"] == 6
    resolved = json.loads((runs / "sweep.json").read_text())
    assert len(resolved["cells"]) == 9 and resolved["train"]["max_steps"] == 2 and resolved["sha256"]


def test_every_cell_is_measured_on_the_eval_seeds_held_out_data(finished):
    """One rule: validation pairs and mc prompts come from eval_seed (1) for seed-2 cells too."""
    folder, _ = finished
    for cell in ("loss=sigmoid,noise=0,eps=0,seed=1", "loss=sigmoid,noise=0,eps=0,seed=2"):
        r = result(folder, cell)
        config = json.loads((folder / "runs" / "tiny" / cell / "config.json").read_text())
        assert config["files"]["val"].endswith("_val_n40_seed1.json") and r["val_seed"] == r["eval_seed"] == 1
        assert r["eval"]["settings"]["seed"] == 1
    assert result(folder, "loss=sigmoid,noise=0,eps=0,seed=2")["data"]["seed"] == 2


def test_rerun_does_no_work(finished, monkeypatch, capsys):
    def forbidden(*args, **kw):
        raise AssertionError("a finished sweep must not train or evaluate")

    monkeypatch.setattr(train, "train", forbidden)
    monkeypatch.setattr(score, "run", forbidden)
    assert runner.run(finished[1]) == 0
    assert "10 of 10 finished (skipped), 0 to run" in capsys.readouterr().out


def test_removed_result_reruns_only_that_cell(copy, monkeypatch):
    folder, path = copy
    cell = "loss=sigmoid,noise=0.25,eps=0.25,seed=2"
    before = result(folder, GRID_CELLS[0])
    (folder / "runs" / "tiny" / cell / "result.json").unlink()
    calls, real = [], train.train
    monkeypatch.setattr(train, "train", lambda d, t: calls.append(t.run_name) or real(d, t))
    assert runner.run(path) == 0
    assert calls == [cell]
    assert result(folder, cell)["eval"]["n"] == 6 and result(folder, GRID_CELLS[0]) == before


DAMAGED_RESULTS = {  # issue 30: each ended `dpo report` and a rerun of `dpo sweep` in a traceback
    "cut short": lambda text: text[: len(text) // 2],
    "a list": lambda text: "[]",
    "eval a string": lambda text: json.dumps({**json.loads(text), "eval": "x"}),
    "an accuracy a list": lambda text: json.dumps({**json.loads(text), "eval": {"n": 6, "acc": [0.5]}}),
    "nested too deeply": lambda text: "[" * 200_000 + "]" * 200_000,
}


def test_each_damaged_result_or_record_is_one_line_and_the_rest_is_reported(copy, capsys):
    """Five cells' result.json damaged five ways: each one warning and a `damaged` line, the cell unfinished (listed
    so by --dry-run). metrics.jsonl lines of the wrong shape are left out of the curves (as lines cut by a kill
    always were); damaged predictions or a config.json of the wrong types: one warning each, that file left out.
    The rest of the report is built (one report for them all: a report draws plots for seconds)."""
    folder, path = copy
    runs = folder / "runs" / "tiny"
    cells = GRID_CELLS[:4] + [EXTRA_CELL] + GRID_CELLS[4:]
    results = [runs / cell / "result.json" for cell in cells[:5]]
    for file, damage in zip(results, DAMAGED_RESULTS.values()):
        file.write_text(damage(file.read_text()))
    with open(runs / cells[5] / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "split": ["x"]}\n123\n{"step": "2", "split": "train", "loss": 1}\n'
                '{"step": 3, "split": "train", "loss": "high"}\n' + "[" * 200_000 + "\n")
    records = [runs / cells[6] / "eval" / "predictions.jsonl", runs / cells[7] / "eval" / "predictions.jsonl",
               runs / cells[8] / "config.json"]
    for file, damage in zip(records, ('{"id": "val/0", "gold": "3"}\n', "[" * 200_000 + "\n",
                                      '{"run": "x", "pairs": "many"}')):
        file.write_text(damage)
    old_summary = runs / cells[8] / "result.json"  # config.json is read for a summary before pairs_this_session
    old_summary.write_text(old_summary.read_text().replace('"pairs_this_session"', '"pairs_this_session_"'))
    assert cli.main(["report", str(path)]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("warning:", "error:", "Trace"))]
    assert len(lines) == 8 and all(ln.endswith("; left out of the report") for ln in lines), lines
    assert [next(ln for ln in lines if ln.startswith(f"warning: {file}")) for file in results + records]
    text = (folder / "results" / "tiny" / "REPORT.md").read_text()
    assert all(f"damaged  {cell}: {file}" in text for cell, file in zip(cells, results)) and "4 of 9 finished" in text
    rows = (folder / "results" / "tiny" / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + 4 and not any(r.startswith(cell) for r in rows for cell in cells[:5])
    assert cli.main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(f"damaged  {cell}\n" in out for cell in cells[:5])


def test_a_damaged_result_is_run_again_by_the_next_sweep(copy, monkeypatch, capsys):
    folder, path = copy
    bad = GRID_CELLS[1]
    damaged = folder / "runs" / "tiny" / bad / "result.json"
    damaged.write_text(damaged.read_text()[:100])
    before = result(folder, GRID_CELLS[0])
    calls, real = [], train.train
    monkeypatch.setattr(train, "train", lambda d, t: calls.append(t.run_name) or real(d, t))
    assert runner.run(path) == 0
    assert calls == [bad] and result(folder, bad)["eval"]["n"] == 6 and result(folder, GRID_CELLS[0]) == before
    out = capsys.readouterr().out
    assert "9 of 10 finished (skipped), 1 to run" in out
    assert re.search(rf"{re.escape(f'{bad}: {damaged}')}:\d+: malformed JSON .*: running it again", out)


def test_a_result_recording_settings_of_other_types_is_noted_not_a_traceback(copy, monkeypatch, capsys):
    """A result.json whose recorded settings have other types (edited by hand): its settings are unknown, so the
    sweep notes it as run with other settings (kept, as any such cell), and does no work."""
    folder, path = copy
    cell = GRID_CELLS[1]
    damaged = folder / "runs" / "tiny" / cell / "result.json"
    damaged.write_text(json.dumps({**result(folder, cell), "train": {"per_device_train_batch_size": "four"}}))
    monkeypatch.setattr(train, "train", lambda *a: pytest.fail("nothing to train"))
    assert runner.run(path) == 0
    assert f"e.g. {cell} (train.per_device_train_batch_size unreadable (a value of another type: a damaged record))" \
        in capsys.readouterr().out


def test_the_paired_sections_leave_out_damaged_margins_and_run_configs_with_a_warning(copy, capsys):
    folder, path = copy
    s = sweep.load(path)
    cell = s.cells[0]
    margins, config = (folder / "runs" / "tiny" / cell.name / name for name in ("val_margins.json", "config.json"))
    assert report_audit.val_margins(s, cell)["margins"]
    for damage in ('{"margins": [0.1, "x"], "tie": 0.01}', '{"margins": 3, "tie": 0.01}', "[" * 200_000):
        margins.write_text(damage)
        assert report_audit.val_margins(s, cell) is None
    config.write_text('{"run": "x", "flipped": [], "label_fix": {"fix": "all"}}')
    assert report_audit.trained_flipped(s, cell) is None and report_audit.fix_info(s, cell) == {}
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5 and all(ln.startswith(f"warning: {margins}") for ln in lines[:3])
    assert lines[3:] == [f'warning: {config}: "flipped" is a list, expected a number; left out of the report'] * 2


def test_half_finished_cell_resumes_from_its_checkpoint(copy, monkeypatch, capsys):
    """Weights kept this time; a cell stopped after step 1 continues with --resume; one stopped after its last
    step is validated and saved (its val reward accuracy is not lost); a trained, unevaluated one is only
    evaluated."""
    folder, path = copy
    path.write_text(path.read_text().replace('description =', 'keep_weights = true\ndescription ='))
    stopped, trained = "loss=sigmoid,noise=0,eps=0,seed=1", "loss=rdpo,noise=0,eps=0,seed=1"
    last = "loss=sigmoid,noise=0.25,eps=0.25,seed=1"
    for cell in (stopped, trained, last):
        shutil.rmtree(folder / "runs" / "tiny" / cell)
    s = sweep.load(path)
    cells = {c.name: c for c in s.cells}
    data, cfg = sweep.cell_configs(s, cells[stopped])
    train.train(data, replace(cfg, save_every=1, keep_checkpoints=2))  # as if stopped after step 1:
    shutil.rmtree(folder / "runs" / "tiny" / stopped / "final")  # (settings that do not change the numbers)
    shutil.rmtree(folder / "runs" / "tiny" / stopped / "checkpoints" / "step_000002")
    (folder / "runs" / "tiny" / stopped / "summary.json").unlink()
    train.train(*sweep.cell_configs(s, cells[trained]))  # trained, not evaluated
    want = train.train(*sweep.cell_configs(s, cells[last]))["eval"]  # killed after its last checkpoint:
    shutil.rmtree(folder / "runs" / "tiny" / last / "final")
    (folder / "runs" / "tiny" / last / "summary.json").unlink()
    calls, real = [], train.train
    monkeypatch.setattr(train, "train", lambda d, t: calls.append((t.run_name, t.resume)) or real(d, t))
    assert runner.run(path) == 0
    assert calls == [(stopped, True), (last, True)]
    assert result(folder, last)["val_reward_accuracy"] == want["rewards/accuracies"]
    assert result(folder, last)["train_summary"]["eval"] == want
    out = capsys.readouterr().out
    assert "resumed from" in out and f"{trained}: training finished earlier, evaluating it" in out
    assert "with other settings that do not change its numbers: save_every 1 -> 50, keep_checkpoints 2 -> 1" in out
    assert result(folder, stopped)["train_summary"]["steps"] == 2
    assert (folder / "runs" / "tiny" / stopped / "final").is_dir()  # keep_weights


def test_a_cell_trained_with_other_settings_is_trained_again(copy, monkeypatch, capsys):
    """Its training finished (weights kept), its evaluation not, and the file changed since: a setting that changes
    the numbers trains it again; one that does not reuses the weights, and result.json records what they were
    trained with (config.json), not what the file says now."""
    folder, path = copy
    text = path.read_text().replace('description =', 'keep_weights = true\ndescription =')
    path.write_text(text)
    cell = "loss=sigmoid,noise=0,eps=0,seed=1"
    shutil.rmtree(folder / "runs" / "tiny" / cell)
    s = sweep.load(path)
    train.train(*sweep.cell_configs(s, s.cells[0]))  # trained, not evaluated
    path.write_text(text.replace("eval_every = 1", "eval_every = 2"))
    calls, real = [], train.train
    monkeypatch.setattr(train, "train", lambda d, t: calls.append(t.max_steps) or real(d, t))
    assert runner.run(path, only=[cell]) == 0 and calls == []
    assert result(folder, cell)["train"]["eval_every"] == 1  # what the weights were trained with
    (folder / "runs" / "tiny" / cell / "result.json").unlink()
    path.write_text(text.replace("max_steps = 2", "max_steps = 3"))
    capsys.readouterr()
    assert runner.run(path, only=[cell]) == 0 and calls == [3]
    assert (f"note: {cell} was trained with other settings than {path} gives now (train.max_steps 2 -> 3): "
            "training it again") in capsys.readouterr().out
    r = result(folder, cell)
    assert r["train"]["max_steps"] == r["train_summary"]["steps"] == 3 and len(train_metrics(folder, cell)) == 3


def train_metrics(folder, cell) -> list:
    path = folder / "runs" / "tiny" / cell / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if json.loads(ln)["split"] == "train"]


def test_fields_added_later_and_paths_are_not_other_settings(copy, capsys):
    """A finished cell recorded before fields were added (with defaults that do not change the numbers) and before
    the validation file was named: no note, and a rerun of the finished sweep changes no file (sweep.json neither);
    a setting that changes the numbers is named."""
    folder, path = copy
    s = sweep.load(path)
    for cell in s.cells:
        recorded = result(folder, cell.name)
        for key in ("label_fix", "fix_threshold", "audit_score", "precision", "compile", "micro_batch_tokens"):
            del recorded["train"][key]
        for key in ("pairs", "tokenizer", "holdout", "noise_longer", "flip_prob_field"):
            del recorded["data"][key]
        recorded["train"]["val_data_path"] = ""
        (folder / "runs" / "tiny" / cell.name / "result.json").write_text(json.dumps(recorded))
    settings = json.loads((folder / "runs" / "tiny" / "sweep.json").read_text())
    del settings["train"]["label_fix"]  # as an older version wrote it
    (folder / "runs" / "tiny" / "sweep.json").write_text(json.dumps(settings))
    before = {p: p.read_bytes() for p in (folder / "runs").rglob("*") if p.is_file()}
    assert runner.stale_note(s) == ""
    assert runner.run(path) == 0 and "note:" not in capsys.readouterr().out
    assert {p: p.read_bytes() for p in (folder / "runs").rglob("*") if p.is_file()} == before
    path.write_text(path.read_text().replace("learning_rate = 1e-3", "learning_rate = 2e-3"))
    assert "e.g. loss=sigmoid,noise=0,eps=0,seed=1 (train.learning_rate 0.001 -> 0.002)" in runner.stale_note(
        sweep.load(path))


def test_a_cell_running_elsewhere_is_skipped_without_an_error_log(copy, monkeypatch, capsys):
    """The same sweep started twice: a cell another sweep holds (its lock), or a `dpo train` of its own (the run
    folder's lock, also when taken just after the check), is skipped, not failed; no error.log is left beside a
    finished result."""
    folder, path = copy
    cells = GRID_CELLS[:3]
    for cell in cells:
        (folder / "runs" / "tiny" / cell / "result.json").unlink()
    held = [files.lock_file(folder / "runs" / "tiny" / cells[0] / runner.CELL_LOCK),
            runfolder.lock_run_dir(folder / "runs" / "tiny" / cells[1])]
    real_cell = runner.run_cell

    def a_slurm_check_writes_an_error_log(s, cell):
        if cell.name == cells[2]:
            (folder / "runs" / "tiny" / cell.name / "error.log").write_text("ended without result.json\n")
        return real_cell(s, cell)

    monkeypatch.setattr(runner, "run_cell", a_slurm_check_writes_an_error_log)
    assert runner.run(path, only=cells) == 0
    out = capsys.readouterr().out
    assert f"{cells[0]}: running elsewhere (another process holds" in out
    assert f"{cells[1]}: running elsewhere (a `dpo train` holds" in out
    monkeypatch.setattr(runner, "lock_held", lambda path: False)  # taken between the check and the training
    assert runner.run(path, only=cells[1:2]) == 0
    assert "in use by another `dpo train`" in capsys.readouterr().out
    for cell in cells[:2]:
        assert sweep.status(sweep.load(path), cell) == "partial"
    assert result(folder, cells[2])["cell"] == cells[2]
    assert not list((folder / "runs" / "tiny").glob("*/error.log"))
    for lock in held:
        lock.close()


def test_a_parallel_sweep_leaves_cells_running_elsewhere_alone(tmp_path, tiny_model_dir, shared, monkeypatch, capsys):
    path = write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared)
    fake_workers(monkeypatch, "import pathlib, sys\n"  # a result of the shape a sweep reads back (dpo/study/records.py)
                 "pathlib.Path(sys.argv[1], 'result.json').write_text('{\"eval\": {\"n\": 6}}')\n")
    busy = tmp_path / "runs" / "tiny" / GRID_CELLS[0]
    busy.mkdir(parents=True)
    with files.lock_file(busy / runner.CELL_LOCK):
        assert runner.run(path, gpus="0,1") == 0
    assert f"{GRID_CELLS[0]}: running elsewhere; skipped" in capsys.readouterr().out
    assert not (busy / "worker.log").exists() and not (busy / "error.log").exists()
    assert len(list((tmp_path / "runs" / "tiny").glob("*/result.json"))) == 9


def test_failing_cell_is_logged_and_the_others_finish(copy, monkeypatch, capsys):
    folder, path = copy
    bad, good = "loss=rdpo,noise=0,eps=0,seed=2", "loss=sigmoid,noise=0,eps=0,seed=2"
    for cell in (bad, good):
        (folder / "runs" / "tiny" / cell / "result.json").unlink()
    real = train.train

    def sometimes_broken(d, t):
        if t.run_name == bad:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(d, t)

    monkeypatch.setattr(train, "train", sometimes_broken)
    assert runner.run(path) == 1
    out = capsys.readouterr().out
    assert f"FAILED {bad}: RuntimeError: CUDA out of memory (simulated)" in out
    assert "CUDA out of memory" in (folder / "runs" / "tiny" / bad / "error.log").read_text()
    assert "Traceback" in (folder / "runs" / "tiny" / bad / "error.log").read_text()
    assert result(folder, good)["cell"] == good
    assert sweep.status(sweep.load(path), bad) == "failed"

    # the report builds from what finished and names the failed cell
    assert cli.main(["report", str(path)]) == 0
    out_dir = folder / "results" / "tiny"
    text = (out_dir / "REPORT.md").read_text()
    assert "A tiny test sweep." in text and f"failed   {bad}: RuntimeError: CUDA out of memory" in text
    assert "**base model**" in text and "| sigmoid | 0.25 | 0.25 | 1, 2 |" in text
    assert "| rdpo | 0 | 0 | 1 |" in text  # the failed seed is left out
    rows = (out_dir / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("cell,loss,noise,eps,seed,extra,mc_acc,") and len(rows) == 1 + 1 + 8
    table = next(csv.DictReader(io.StringIO("\n".join([rows[0], rows[2]]))))  # the first cell after the base
    margin = result(folder, table["cell"])["train_summary"]["eval"]["rewards/margins"]
    assert float(table["val_margin"]) == pytest.approx(margin)
    assert "| val reward acc | val margin |" in text
    assert "clean validation pairs are the same for every cell;" in text  # eval_seed's, for every cell
    paired = text.split("## Against the base model")[1].split("##")[0]
    assert f"| {good} | " in paired and f"| {bad} |" not in paired and "(McNemar p, Holm)" in paired
    base, cell = (report.read_predictions(folder / "runs" / "tiny" / name) for name in ("base", good))
    a, b = stats.correct(base, "acc"), stats.correct(cell, "acc")
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in paired.splitlines() if line.startswith("| l")}
    head = [h.strip(" |") for h in paired.split("| cell | ")[1].splitlines()[0].split(" | ")]
    acc = head.index("acc − base (McNemar p, Holm)")
    raw = [stats.mcnemar(a, stats.correct(report.read_predictions(folder / "runs" / "tiny" / n), "acc"))
           for n in rows]
    holm = stats.holm(raw)[list(rows).index(good)]  # over the table's cells
    want = f"{100 * (sum(b) - sum(a)) / len(a):+.1f} (p {stats.mcnemar(a, b):.2g}, {holm:.2g})"
    assert rows[good][acc].strip(" |") == want
    pytest.importorskip("matplotlib")
    for png in ("accuracy_vs_noise.png", "training_curves.png", "clean_vs_flipped.png"):
        assert (out_dir / png).stat().st_size > 1000 and f"]({png})" in text


def test_the_report_shows_a_missing_value_as_a_dash(copy):
    """Results without a validation accuracy (both seeds of one point) or without an accuracy: tables and plots."""
    folder, path = copy
    for cell in (GRID_CELLS[0], GRID_CELLS[4]):  # loss=sigmoid, noise=0, seeds 1 and 2
        r = result(folder, cell)
        r["val_reward_accuracy"], r["train_summary"]["eval"] = None, {}
        (folder / "runs" / "tiny" / cell / "result.json").write_text(json.dumps(r))
    r = result(folder, GRID_CELLS[1])
    del r["eval"]["acc_norm"]
    (folder / "runs" / "tiny" / GRID_CELLS[1] / "result.json").write_text(json.dumps(r))
    assert cli.main(["report", str(path)]) == 0
    text = (folder / "results" / "tiny" / "REPORT.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| sigmoid | 0 | 0 | 1, 2 |"))
    assert row.endswith("| – | – |")  # val reward acc, val margin
    if importlib.util.find_spec("matplotlib"):
        assert (folder / "results" / "tiny" / "accuracy_vs_noise.png").is_file()


def test_the_report_gives_each_contrast_per_seed_and_per_item(copy, tiny_model_dir, shared):
    folder, _ = copy
    text = SWEEP + "\n[[contrast]]\na = {{noise = 0.25}}\nb = {{noise = 0.0}}\n"
    path = write_sweep(folder, tiny_model_dir, shared / "hellaswag", shared, text=text)
    assert cli.main(["report", str(path)]) == 0
    report_text = (folder / "results" / "tiny" / "REPORT.md").read_text()
    row = next(line for line in report_text.splitlines() if line.startswith("| noise=0.25 vs noise=0 |"))
    expected = []
    for seed in (1, 2):  # sigmoid only: rdpo's eps follows its noise, so its cells differ in two settings
        a, b = (results.read_predictions(folder / "runs" / "tiny" / f"loss=sigmoid,noise={n},eps={n},seed={seed}")
                for n in ("0.25", "0"))
        expected.append(100 * (stats.accuracy(stats.correct(a, "acc_norm"))
                               - stats.accuracy(stats.correct(b, "acc_norm"))))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1, 2" and cells[2] == ", ".join(f"{d:+.1f}" for d in expected)
    assert cells[3].startswith(f"{sum(expected) / 2:+.1f}")
    assert cells[10].startswith(f"{sum(expected) / 2:+.1f} ± ")  # seeds and items both random: the same mean
    assert "Contrasts on the task" in report_text


def test_holm_counts_a_contrast_whose_cells_have_not_finished(copy, tiny_model_dir, shared):
    folder, _ = copy
    text = SWEEP + ("\n[[contrast]]\na = {{noise = 0.25}}\nb = {{noise = 0.0}}\n"
                    "\n[[contrast]]\na = {{loss = \"rdpo\", noise = 0.25, eps = 0.25}}\nb = {{loss = \"sigmoid\"}}\n")
    path = write_sweep(folder, tiny_model_dir, shared / "hellaswag", shared, text=text)
    for seed in (1, 2):  # the second contrast's cells: not finished; the first's A: right on every item
        (folder / "runs" / "tiny" / f"loss=rdpo,noise=0.25,eps=0.25,seed={seed}" / "result.json").unlink()
        predictions = folder / "runs" / "tiny" / f"loss=sigmoid,noise=0.25,eps=0.25,seed={seed}" / "eval" / (
            "predictions.jsonl")
        rows = [json.loads(line) for line in predictions.read_text().splitlines()]
        write_jsonl(predictions, [{**r, "pred_acc_norm": r["gold"]} for r in rows])
    assert cli.main(["report", str(path)]) == 0
    text = (folder / "results" / "tiny" / "REPORT.md").read_text()
    lines = text[text.index("## Contrasts on the task"):].split("\n## ")[0].splitlines()
    assert not any(line.startswith("| loss=rdpo") for line in lines)  # nothing to show for it yet
    cells = [c.strip() for c in next(line for line in lines if line.startswith("| noise=0.25 vs noise=0 |"))
             .strip("|").split("|")]
    raw, adjusted = (float(v) for v in cells[8].rstrip(")").split(" ("))  # McNemar, items clustered
    assert math.isclose(adjusted, min(1.0, 2 * raw), rel_tol=5e-3)  # a family of two, not of one
    assert cells[10] == "+100.0 ± 0.0"  # every difference the same: no spread, no degrees of freedom to show


def test_the_contrast_plot_puts_each_seeds_difference_on_its_contrasts_row(copy, tiny_model_dir, shared,
                                                                          monkeypatch):
    pytest.importorskip("matplotlib")
    folder, _ = copy
    text = SWEEP + "\n[[contrast]]\na = {{noise = 0.25}}\nb = {{noise = 0.0}}\n"
    path = write_sweep(folder, tiny_model_dir, shared / "hellaswag", shared, text=text)
    for seed in (1, 2):  # A right on every item, so each seed's A − B is what B got wrong
        predictions = folder / "runs" / "tiny" / f"loss=sigmoid,noise=0.25,eps=0.25,seed={seed}" / "eval" / (
            "predictions.jsonl")
        write_jsonl(predictions, [{**json.loads(line), "pred_acc_norm": json.loads(line)["gold"]}
                                  for line in predictions.read_text().splitlines()])
    seen, real = {}, report_plots.write_png
    monkeypatch.setattr(report_plots, "write_png", lambda plt, fig, out, **kw: seen.update(
        {out.name: [[list(map(float, c.get_offsets()[:, 0])) for c in ax.collections[:1]] for ax in fig.axes]})
        or real(plt, fig, out, **kw))
    assert cli.main(["report", str(path)]) == 0
    wrong = [100 * (1 - stats.accuracy(stats.correct(results.read_predictions(
        folder / "runs" / "tiny" / f"loss=sigmoid,noise=0,eps=0,seed={seed}"), "acc_norm"))) for seed in (1, 2)]
    assert seen["contrasts.png"] == [[wrong]]
    assert (folder / "results" / "tiny" / "contrasts.png").is_file()


def test_the_accuracy_plot_ticks_only_the_values_cells_were_run_at(copy, monkeypatch):
    """Series drawn side by side at each noise level must not read as other noise levels: ticks at 0 and 0.25."""
    pytest.importorskip("matplotlib")
    folder, path = copy
    ticks, real = {}, report_plots.write_png
    monkeypatch.setattr(report_plots, "write_png", lambda plt, fig, out, **kw: ticks.update(
        {out.name: [list(ax.get_xticks()) for ax in fig.axes]}) or real(plt, fig, out, **kw))
    assert cli.main(["report", str(path)]) == 0
    assert ticks["accuracy_vs_noise.png"] and all(t == [0, 0.25] for t in ticks["accuracy_vs_noise.png"])


def test_a_noise_level_has_one_colour_in_every_panel(copy, monkeypatch):
    """The extra cell (noise 0.25 only) sits in a panel of its own: its line must not take noise 0's colour."""
    pytest.importorskip("matplotlib")
    folder, path = copy
    seen, real = {}, report_plots.write_png
    monkeypatch.setattr(report_plots, "write_png", lambda plt, fig, out, **kw: seen.update(
        {out.name: [(line.get_label().split(" ")[0].rstrip(","), line.get_color()) for ax in fig.axes
                    for line in ax.get_lines() if line.get_label().startswith("noise=")]}) or real(plt, fig, out, **kw))
    assert cli.main(["report", str(path)]) == 0
    for png in ("training_curves.png", "clean_vs_flipped.png"):
        colours = {}
        for name, colour in seen[png]:
            colours.setdefault(name, set()).add(str(colour))
        assert set(colours) == {"noise=0", "noise=0.25"}, png
        assert all(len(c) == 1 for c in colours.values()) and colours["noise=0"] != colours["noise=0.25"], png


def test_a_seed_that_trains_longer_is_drawn_past_the_common_steps(copy):
    """Seeds of one cell with different step counts (filter drops a different number of pairs per seed): the mean
    covers the steps all have; the longer seed's own curve goes on from the last of them, nothing dropped."""
    folder, path = copy
    s = sweep.load(path)
    long, short = (next(c for c in s.cells if c.name == n) for n in GRID_CELLS[:5:4])  # noise 0, seeds 1 and 2
    metrics = folder / "runs" / "tiny" / short.name / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train" and "loss" in r]
    assert len(train) >= 2
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows if r not in train[1:]))
    curve = report_plots.seed_curves(s, [long, short], "train", "loss", smooth=False)
    assert curve.steps == [train[0]["step"]]
    full = {r["step"]: r["loss"] for r in report_plots.read_metrics(
        folder / "runs" / "tiny" / long.name / "metrics.jsonl") if r["split"] == "train" and "loss" in r}
    assert curve.rest == [([s for s in full if s >= curve.steps[-1]], [v for s, v in full.items()
                                                                      if s >= curve.steps[-1]])]


def test_cells_run_before_the_eval_seed_rule_are_reported_as_validated_on_their_own_seed(copy):
    """A result without val_seed (the committed studies' first cells) was validated on its own seed's pairs."""
    folder, path = copy
    r = result(folder, GRID_CELLS[4])  # a seed-2 cell
    del r["val_seed"]
    (folder / "runs" / "tiny" / GRID_CELLS[4] / "result.json").write_text(json.dumps(r))
    assert cli.main(["report", str(path)]) == 0
    text = (folder / "results" / "tiny" / "REPORT.md").read_text()
    assert "drawn with each cell's own seed for 1 cells run before validation pairs followed eval_seed" in text
    assert "clean validation pairs are the same for every cell with the same seed;" in text


def test_a_study_logged_under_earlier_metric_names_reports_the_same(copy):
    """The committed studies logged `rewards/accuracy`, `rewards/margin` and the split "val" (versions before
    TRL's names): their reports, tables and plots come out byte for byte as from today's names."""
    folder, path = copy
    out = folder / "results" / "tiny"
    assert cli.main(["report", str(path)]) == 0
    now = {p.name: p.read_bytes() for p in out.iterdir()}
    for cell in [*GRID_CELLS, EXTRA_CELL]:
        with_earlier_names(folder / "runs" / "tiny" / cell)
    assert "rewards/accuracy" in result(folder, GRID_CELLS[0])["train_summary"]["val"]
    shutil.rmtree(out)
    assert cli.main(["report", str(path)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == now
    assert "| val reward acc | val margin |" in (out / "REPORT.md").read_text()


def test_report_of_a_quantity_sweep_draws_the_heatmap(copy, tiny_model_dir, shared):
    """An n x noise grid with one cell missing: heat map with lines of equal clean pairs, no CI for one seed."""
    pytest.importorskip("matplotlib")
    folder, _ = copy
    text = SWEEP.split("[grid]")[0].replace("n = 12\n", "") + '[grid]\nn = [8, 12]\nnoise = [0.0, 0.25]\n'
    path = write_sweep(folder, tiny_model_dir, shared / "hellaswag", shared, text=text, name="quantity")
    s = sweep.load(path)
    assert [c.name for c in s.cells] == ["n=8,noise=0,seed=1", "n=8,noise=0.25,seed=1", "n=12,noise=0,seed=1",
                                         "n=12,noise=0.25,seed=1"]
    for cell, source in zip(s.cells[:3], GRID_CELLS):  # fake results: copies of the finished cells
        shutil.copytree(folder / "runs" / "tiny" / source, sweep.job_dir(s, cell.name))
    out = report.run(path)
    assert (out / "heatmap_n_noise.png").stat().st_size > 1000
    text = (out / "REPORT.md").read_text()
    assert "missing  n=12,noise=0.25,seed=1" in text and "base model: not scored (missing)" in text
    assert not any(" ± " in line for line in text.splitlines() if line.startswith("| 8 "))  # one seed: no CI
    assert "## Quality against quantity" in text  # two clean N: the noisy cell's clean-pair worth
    assert any(line.startswith("| 0.25 | 8 | 1: ") for line in text.splitlines())


def test_report_without_matplotlib_writes_tables(finished, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    path = finished[1]
    monkeypatch.setattr(sweep, "RESULTS_DIR", str(tmp_path))
    text = path.read_text().replace(f'results_dir = "{finished[0] / "results"}"\n', "")
    (tmp_path / "tiny.toml").write_text(text)
    out = report.run(tmp_path / "tiny.toml")
    assert out == tmp_path / "tiny" and not list(out.glob("*.png"))
    assert "pip install -e '.[plots]'" in (out / "REPORT.md").read_text()
    table = [line for line in (out / "REPORT.md").read_text().splitlines() if line.startswith("| sigmoid")]
    assert len(table) == 2 and all(" ± " in line for line in table)  # two seeds: intervals


def fake_workers(monkeypatch, code):
    """Each parallel cell runs `python -c code CELL_FOLDER CELL_NAME` instead of `dpo sweep --only CELL`."""
    monkeypatch.setattr(runner, "worker_command",
                        lambda s, name: [sys.executable, "-c", code, str(sweep.job_dir(s, name)), name])
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.02)


def test_parallel_runs_one_cell_per_gpu(tmp_path, tiny_model_dir, shared, monkeypatch, capsys):
    """The scheduler with a fake worker: every job runs once, on one of the GPUs, never two at once on one."""
    path = write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared)
    code = ("import json, os, pathlib, sys, time\n"
            "t0 = time.time(); time.sleep(0.2)\n"
            "if sys.argv[2] == 'loss=rdpo,noise=0,eps=0,seed=2': print('Killed'); sys.exit(137)\n"
            "pathlib.Path(sys.argv[1], 'result.json').write_text(json.dumps({'eval': {'n': 6},\n"
            "    'gpu': os.environ['CUDA_VISIBLE_DEVICES'], 'start': t0, 'end': time.time()}))\n")
    fake_workers(monkeypatch, code)
    assert runner.run(path, gpus="0,1") == 1
    assert "FAILED loss=rdpo,noise=0,eps=0,seed=2 (gpu" in capsys.readouterr().out
    runs = tmp_path / "runs" / "tiny"
    log = (runs / "loss=rdpo,noise=0,eps=0,seed=2" / "error.log").read_text()
    assert log == "Killed\nworker exited with status 137\n"
    done = [json.loads(p.read_text()) for p in runs.glob("*/result.json")]
    assert len(done) == 9 and {d["gpu"] for d in done} == {"0", "1"}
    for gpu in ("0", "1"):
        spans = sorted((d["start"], d["end"]) for d in done if d["gpu"] == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_sigterm_reaches_the_parallel_workers(tmp_path, tiny_model_dir, shared, monkeypatch):
    """`kill` of the sweep (Slurm, a job manager) reaches only its process: it passes SIGTERM on to the running
    cells, which checkpoint and stop, and waits for them, instead of leaving them running or waiting forever."""
    path = write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared)
    code = ("import pathlib, signal, sys, time\n"
            "folder = pathlib.Path(sys.argv[1])\n"
            "signal.signal(signal.SIGTERM, lambda *a: (folder.joinpath('terminated').write_text(''), sys.exit(130)))\n"
            "folder.joinpath('started').write_text('')\n"
            "time.sleep(60)\n")
    fake_workers(monkeypatch, code)
    runs = tmp_path / "runs" / "tiny"

    def kill_when_both_started():
        while len(list(runs.glob("*/started"))) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=kill_when_both_started, daemon=True).start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        runner.run(path, gpus="0,1")
    assert time.perf_counter() - t0 < 30
    assert len(list(runs.glob("*/terminated"))) == 2 and not list(runs.glob("*/result.json"))
    assert signal.getsignal(signal.SIGTERM) is handler


def test_cell_names_ties_and_extras(tmp_path, tiny_model_dir, shared):
    text = SWEEP + ('\n[[extra]]\nloss = "sigmoid"\nnoise = 0.5\n\n[[extra]]\nloss = "ipo"\nbeta = 0.5\nseeds = [2]\n'
                    '\n[[extra]]\nloss = "sigmoid"\nnoise = 0.25\nseeds = [2]\n')  # the last: a grid cell
    s = sweep.load(write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=text))
    names = [c.name for c in s.cells]
    assert "loss=sigmoid,noise=0.5,eps=0.5,seed=1" in names  # the grid's eps = "noise" applies to extras
    assert "loss=ipo,noise=0,eps=0,beta=0.5,seed=2" in names  # [data] noise 0, the tie, its own key
    assert len(names) == len(set(names)) == 8 + 1 + 2 + 1
    assert sweep.find_cells(s, ["base", names[0]])[1].name == names[0]
    with pytest.raises(InputError, match="no cell named 'nope'"):
        sweep.find_cells(s, ["nope"])


SCORED_APART = SWEEP.replace("eval_size = 40\n", "eval_size = 20\neval_start = 10\ntrain_from_val = true\n"
                              "train_start = 10\nseed_stride = 12\nformat = \"completion\"\n"
                              "fewshot_indices = \"0,1\"\n").replace(
    "[eval]\n", "[eval]\neval_start = 0\neval_size = 10\n")


def test_items_scored_apart_share_nothing_with_validation_or_training(tmp_path, tiny_model_dir, shared):
    s = sweep.load(write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=SCORED_APART))
    cell = s.cells[0]
    data, train_cfg = sweep.cell_configs(s, cell)
    scored = sweep.eval_configs(s, "m", tmp_path, data).data
    assert (scored.eval_start, scored.eval_size, data.eval_start, data.eval_size) == (0, 10, 10, 20)
    trained, valid = runner.ensure_cell_data(s, cell, data, train_cfg)
    from dpo.data.prepare import load_splits

    scored_ids = {it.id for it in load_splits(scored)[0].eval}
    assert scored_ids == {f"val/{i}" for i in range(10)}
    used = {p["item"] for path in (trained, valid) for p in json.loads(path.read_text())}
    assert used and not scored_ids & used
    assert "none of them a validation, calibration or training item" in "\n".join(report.what_was_run(s, {
        "results": [], "base": None}))


CONTRASTS = SWEEP.replace('eps = "noise"\n', "").replace("eps = 0.1\n", "eps = 0.2\n") + """
[[contrast]]
a = {{noise = 0.25, loss = "sigmoid"}}
b = {{noise = 0.0}}

[[contrast]]
a = {{loss = "rdpo", noise = 0.25, eps = 0.1}}
b = {{loss = "sigmoid"}}
"""  # (braces doubled: write_sweep formats the text)


def test_a_contrast_pairs_each_cell_with_the_same_seeds_cell_that_differs_only_where_it_says(
        tmp_path, tiny_model_dir, shared):
    s = sweep.load(write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=CONTRASTS))
    noisier, robust = s.contrasts
    assert robust.b == {"loss": "sigmoid", "noise": 0.25, "eps": 0.1}  # b changes the loss; a's noise and eps stay
    pairs = {(a.name, b.name) for a, b in sweep.contrast_pairs(s, noisier)}
    assert pairs == {(f"loss=sigmoid,noise=0.25,seed={seed}", f"loss=sigmoid,noise=0,seed={seed}") for seed in (1, 2)}
    assert {(a.name, b.name) for a, b in sweep.contrast_pairs(s, robust)} == {
        (f"loss=rdpo,noise=0.25,seed={seed}", f"loss=sigmoid,noise=0.25,seed={seed}") for seed in (1, 2)}
    assert robust.label() == "loss=rdpo,noise=0.25,eps=0.1 vs loss=sigmoid"


@pytest.mark.parametrize("change, message", [
    (("b = {{noise = 0.0}}", "b = {{noise = 0.5}}"),
     "[[contrast]] #1 (noise=0.25,loss=sigmoid vs noise=0.5): no cell matches"),  # b: what it changes
    (("b = {{noise = 0.0}}", "b = {{}}"), "expected a = {key = value, ...} and b = {...}"),
    (("b = {{noise = 0.0}}", "b = {{noise = 0.25}}"), "[[contrast]] #1: b changes nothing of a"),
    (("b = {{noise = 0.0}}", "b = {{noise = 0.0}}\nc = 1"), "nothing else"),
    (("a = {{noise = 0.25,", "a = {{nosie = 0.25,"), "unknown key 'nosie' in [contrast #1]"),
    (("noise = 0.25, eps = 0.1", "noise = 0.25"), "[[contrast]] #2 (loss=rdpo,noise=0.25 vs loss=sigmoid): "
     "a matches 2 cells of seed 1 (loss=rdpo,noise=0.25,seed=1, loss=rdpo,noise=0.25,eps=0.2,seed=1)"),
])
def test_a_contrast_that_matches_nothing_is_refused(tmp_path, tiny_model_dir, shared, change, message):
    path = write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=CONTRASTS.replace(*change, 1))
    with pytest.raises(InputError) as e:
        sweep.load(path)
    assert message in str(e.value)


@pytest.mark.parametrize("change, message", [
    (("eval_start = 0\neval_size = 10", "eval_start = 5\neval_size = 10"), "overlaps [data]'s evaluation set"),
    (("train_start = 10", "train_start = 9"), "expected train_start >= 10 in [data]"),
    (("eval_start = 0\neval_size = 10", "eval_start = 30\neval_size = 10"), "expected train_start >= 20"),
    (("eval_start = 0\neval_size = 10", "eval_size = 0"), "expected a start >= 0 and a size >= 1"),
    (("eval_start = 0\neval_size = 10", "eval_size = '10'"), "[eval] eval_size = '10': expected an integer"),
])
def test_items_scored_apart_that_could_overlap_are_refused(tmp_path, tiny_model_dir, shared, change, message):
    path = write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=SCORED_APART.replace(*change))
    with pytest.raises(InputError) as e:
        sweep.load(path)
    assert message in str(e.value)


@pytest.mark.parametrize("change, message", [
    (("[train]\n", "[train]\nlearnig_rate = 1e-5\n"),
     "unknown key 'learnig_rate' in [train] (did you mean 'learning_rate'?)"),
    (("[eval]\n", "[evaluation]\nlimit = 3\n[eval]\n"), "unknown section [evaluation]"),
    (("[data]\n", "[data]\nseed = 3\n"), "unknown key 'seed' in [data] (use seeds = [...] in [grid])"),
    (("[train]\n", "[train]\nmodel = 'x'\n"), "unknown key 'model' in [train] (set model in [sweep])"),
    (("max_steps = 2", "max_steps = 'two'"), "[train] max_steps = 'two': expected an integer"),
    (("noise = [0.0, 0.25]", "noise = [0.0, 0.25, 0.5]"), "loss rdpo needs 0 <= --eps < 0.5"),
    (('eps = "noise"', 'eps = "nosie"'), "[grid] eps = 'nosie': a string for a number ties it"),
    (("loss = [", "lost = ["), "unknown key 'lost' in [grid] (did you mean 'loss'?)"),
    (('loss = ["sigmoid", "rdpo"]', 'loss = ["sigmoid", "dpo"]'), "[grid] loss = 'dpo': expected one of"),
    (("seeds = [1, 2]", "seeds = [1, 1]"), "a seed is listed twice"),
    (("[[extra]]\n", "[[extra]]\nwarmup = 3\n"), "unknown key 'warmup' in [extra #1]"),
    (("max_steps = 2", "max_steps = 2\nmax_steps = 3"), "not valid TOML"),
    (("[eval]\n", '[eval]\nlm_eval_tasks = "arc_easy"\n'), "[eval] lm_eval_tasks = 'arc_easy': expected a list"),
    (("[eval]\n", '[eval]\nlm_eval_tasks = ["arc_easy", ""]\n'), "expected a list of lm-evaluation-harness task"),
    (("[eval]\n", '[eval]\nlm_eval_tasks = ["arc_easy", 3]\n'), "(non-empty strings)"),
    (("[eval]\n", '[eval]\nlm_eval_tasks = ["arc\\u001b[2J"]\n'), "the control character '\\x1b' is not allowed"),
    (("[eval]\n", '[eval]\nlm_eval_tasks = ["piqa", "piqa"]\n'), "a task is listed twice"),
    (("[eval]\n", "[eval]\nlm_eval_taks = []\n"),
     "unknown key 'lm_eval_taks' in [eval] (did you mean 'lm_eval_tasks'?)"),
    # issue 30: nested 50,000 deep, huge integers, seeds outside 0..2**32-1, a cell name too long for a folder
    (("[train]\n", "[train]\nx = " + "[" * 50_000 + "]" * 50_000 + "\n"), "unreadable TOML (nested too deeply)"),
    (("[train]\n", "[train]\n" + "a." * 50_000 + "b = 1\n"), ": a key of 50001 dotted parts (nested too deeply"),
    (("seeds = [1, 2]", "seeds = [1, " + "9" * 5000 + "]"), "unreadable TOML (Exceeds the limit (4300 digits)"),
    (("max_steps = 2", "max_steps = " + "9" * 30), "[train] max_steps = 9999"),
    (("seeds = [1, 2]", "seeds = [1, -2]"), "[grid] seeds = [1, -2]: seed -2: expected an integer from 0 to 429496"),
    (("seeds = [1]\n", "seeds = [4294967296]\n"), "[extra #1] seeds = [4294967296]: seed 4294967296: expected"),
    (("[sweep]\n", "[sweep]\neval_seed = -1\n"), "[sweep] eval_seed = -1: expected an integer from 0 to 4294967295"),
    (("[[extra]]\n", '[[extra]]\ncache_dir = "' + "c" * 300 + '"\n'),
     "bytes, more than a folder name may have (255): fewer or shorter keys and values in an [[extra]] table"),
])
def test_bad_sweep_file_is_a_clear_error(tmp_path, tiny_model_dir, shared, capsys, change, message):
    path = write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=SWEEP.replace(*change, 1))
    with pytest.raises(InputError) as e:
        sweep.load(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)
    assert cli.main(["sweep", str(path)]) == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def fake_harness(monkeypatch, calls: list):
    """An `lm_eval` module whose simple_evaluate records its call (and whether the model folder was there then) and
    returns results shaped like the harness's."""
    import types

    def simple_evaluate(**kw):
        pretrained = Path(kw["model_args"]["pretrained"])
        calls.append({**kw, "had_weights": (pretrained / "config.json").is_file()})
        return {"results": {t: {"acc,none": 0.25} for t in kw["tasks"]}, "config": kw["model_args"],
                "samples": {"never": "stored"}, "versions": {t: 1.0 for t in kw["tasks"]}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    task_manager = types.SimpleNamespace(all_tasks=["arc_easy", "arc_challenge", "piqa"])
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", types.SimpleNamespace(TaskManager=lambda: task_manager))


def test_lm_eval_tasks_score_each_final_before_its_weights_go(copy, tiny_model_dir, shared, monkeypatch):
    """[eval] lm_eval_tasks: the harness runs on the cell's final/ (still there: keep_weights = false deletes it
    after), with the listed tasks and the [eval] device, batch size and limit; its results go to lm_eval.json
    beside result.json, which names them. Cells finished before are left alone."""
    folder, _ = copy
    text = SWEEP.replace("[eval]\n", '[eval]\nlm_eval_tasks = ["arc_easy", "piqa"]\n', 1)
    path = write_sweep(folder, tiny_model_dir, shared / "hellaswag", shared, text=text)
    cell = GRID_CELLS[1]
    (folder / "runs" / "tiny" / cell / "result.json").unlink()
    calls = []
    fake_harness(monkeypatch, calls)
    assert runner.run(path) == 0
    final = folder / "runs" / "tiny" / cell / "final"
    assert [(c["model"], c["model_args"], c["tasks"], c["had_weights"]) for c in calls] == [
        ("hf", {"pretrained": str(final)}, ["arc_easy", "piqa"], True)]
    assert (calls[0]["device"], calls[0]["batch_size"], calls[0]["limit"]) == ("cpu", 8, 6)
    assert not final.exists()  # keep_weights = false: deleted after the harness ran
    stored = json.loads((folder / "runs" / "tiny" / cell / "lm_eval.json").read_text())
    assert stored["results"] == {"arc_easy": {"acc,none": 0.25}, "piqa": {"acc,none": 0.25}}
    assert "samples" not in stored
    assert result(folder, cell)["lm_eval"]["file"] == "lm_eval.json"
    assert not (folder / "runs" / "tiny" / GRID_CELLS[0] / "lm_eval.json").exists()


def test_lm_eval_tasks_without_the_harness_stop_the_sweep_before_any_work(tmp_path, tiny_model_dir, shared,
                                                                         monkeypatch, capsys):
    text = SWEEP.replace("[eval]\n", '[eval]\nlm_eval_tasks = ["arc_easy"]\n', 1)
    path = write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=text)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval: ImportError
    assert cli.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and err.startswith(f"error: {path}: [eval] lm_eval_tasks runs ")
    assert err.rstrip().endswith("not installed here: pip install -e .[harness]") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    assert cli.main(["sweep", str(path), "--dry-run"]) == 0  # listing the cells needs no harness
    capsys.readouterr()
    fake_harness(monkeypatch, [])  # installed, but a task name it does not know: refused before any work too
    typo = write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared,
                       text=SWEEP.replace("[eval]\n", '[eval]\nlm_eval_tasks = ["arc_esay"]\n', 1))
    assert cli.main(["sweep", str(typo)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {typo}: [eval] lm_eval_tasks: the installed lm-evaluation-harness has no task "
                   "'arc_esay' (did you mean 'arc_easy'?)\n")
    assert not (tmp_path / "runs").exists()
    text = SWEEP.replace("[eval]\n", "[eval]\nlm_eval_tasks = []\n", 1)  # none: no harness needed
    none = write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=text)
    assert sweep.load(none).lm_eval_tasks == []


def test_dry_run_lists_cells(finished, capsys):
    assert cli.main(["sweep", str(finished[1]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "9 cells + base" in out and f"done     {EXTRA_CELL}" in out


def test_ctrl_c_stops_the_sweep_without_marking_the_cell_failed(copy, monkeypatch):
    folder, path = copy
    cell = "loss=sigmoid,noise=0,eps=0,seed=1"
    shutil.rmtree(folder / "runs" / "tiny" / cell)
    monkeypatch.setattr(train, "train", lambda d, t: {"out_dir": t.output_dir, "step": 1, "stopped": True})
    with pytest.raises(KeyboardInterrupt):
        runner.run(path)
    assert sweep.status(sweep.load(path), cell) == "partial"  # rerun resumes it


DETECT = """
[sweep]
model = "{model}"
runs_dir = "{runs}"
results_dir = "{results}"
predictions = "Relabel wins."
outcomes = '''
It did:
in 2 of 2 seeds.'''
paired = ["label_fix", "loss", "eps"]

[data]
hellaswag_dir = "{data}"
eval_size = 40
n = 12
out_dir = "{shared}/pairs"

[train]
max_steps = 2
per_device_train_batch_size = 4
gradient_accumulation_steps = 1
learning_rate = 1e-3
warmup_steps = 0
val_size = 8
eval_every = 0
gradient_checkpointing = false
cache_dir = "{shared}/cache"
device = "cpu"

[eval]
limit = 6
metrics = "completion"
device = "cpu"

[audit]
n = 20
noise = [0.25]
seeds = [1]

[grid]
noise = [0.25]
seeds = [1, 2]

[[extra]]
label_fix = "oracle-relabel"

[[extra]]
loss = "rdpo"
eps = 0.2
"""


def test_audit_cells_and_paired_comparisons(tmp_path, tiny_model_dir, shared, monkeypatch):
    """[audit] cells run `dpo audit` (the random tiny model is too weak a detector to pass its check, which is
    switched off here: this tests the plumbing); `paired` compares every method with its baseline within seed."""
    from dpo.audit import audit

    monkeypatch.setattr(audit, "check_estimate", lambda est, where: None)
    path = write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=DETECT, name="detect")
    s = sweep.load(path)
    assert [c.name for c in s.audits] == ["audit-n=20,noise=0.25,seed=1"]
    assert runner.run(path) == 0
    runs = tmp_path / "runs" / "detect"
    audited = json.loads((runs / "audit-n=20,noise=0.25,seed=1" / "result.json").read_text())
    assert audited["kind"] == "audit" and audited["audit"]["truth"]["true_eps"] == 0.25
    assert audited["audit_settings"]["val_skip"] == 8  # calibrated on the validation pairs after the first 8
    oracle = json.loads((runs / "noise=0.25,label_fix=oracle-relabel,seed=2" / "config.json").read_text())
    assert oracle["label_fix"]["fix"]["truly_flipped_after"] == 0 and oracle["flipped"] == 0
    margins = json.loads((runs / "noise=0.25,seed=1" / "val_margins.json").read_text())
    assert margins["step"] == 2 and len(margins["margins"]) == 8
    report.run(path)
    text = (tmp_path / "results" / "detect" / "REPORT.md").read_text()
    head = text.index("## Predictions (written before the study ran)")
    assert head < text.index("## What was run") and "Relabel wins." in text
    outcomes = text.index("## Outcomes (written after the cells below had run)\n\nIt did:\nin 2 of 2 seeds.\n")
    assert head < outcomes < text.index("## What was run")
    assert "beta 0.1, eps: 0.2\n" in text  # the eps the rdpo cell trained with, not the [train] default
    assert "## Audit: noise-rate estimates" in text and "## Paired comparisons within seed" in text
    assert "| noise=0.25: row above column in | baseline | label_fix=oracle-relabel |" in text
    paired = text[text.index("## Paired comparisons within seed"):]
    assert "label_fix=oracle-relabel" in paired and "loss=rdpo" in paired
    assert (tmp_path / "results" / "detect" / "audit_estimates.png").is_file()


def test_every_committed_sweep_file_loads():
    """The studies in experiments/ (multi-line descriptions and predictions included) pass the sweep checks; a study
    that trains nothing has a [study] table and its own runner (tests/test_audit_study.py)."""
    files = [p for p in sorted((Path(__file__).parents[1] / "experiments").glob("*.toml"))
             if not p.read_text().lstrip("# \n").startswith("[study]") and "\n[study]\n" not in p.read_text()]
    assert len(files) >= 7
    for path in files:
        assert sweep.load(path).cells, path


def test_a_lora_rank_grid_with_zero_trains_that_cell_in_full(tmp_path, tiny_model_dir, shared):
    """lora_r = [0, 4] beside [train] lora_alpha: the rank-0 cell is full fine-tuning, where the adapters' settings
    do not apply (not an error); without a rank on the grid, lora_alpha alone is still refused."""
    text = SWEEP.replace("[train]\n", "[train]\nlora_alpha = 8.0\nlora_dropout = 0.1\n", 1)
    s = sweep.load(write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared,
                               text=text.replace("[grid]\n", "[grid]\nlora_r = [0, 4]\n", 1)))
    configs = {c.settings["lora_r"]: sweep.cell_configs(s, c).train for c in s.cells if c.name.endswith("seed=1")}
    for cell in s.cells:
        sweep.check_cell(s, cell)
    assert (configs[0].lora_alpha, configs[0].lora_dropout) == (16.0, 0.0)
    assert (configs[4].lora_alpha, configs[4].lora_dropout) == (8.0, 0.1)
    with pytest.raises(InputError, match="--lora-alpha, --lora-dropout: only with --lora-r"):
        sweep.load(write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=text))


def test_the_report_counts_a_resumed_runs_pairs_over_the_whole_run(tmp_path):
    """A summary written before pairs_this_session counted pairs_trained from its last resume (356 of 500): the
    report takes the whole run's from config.json; a newer summary, or a run cut short by max_steps, stays as it is."""
    def reported(summary, max_steps=0):
        config = {"pairs": 500, "train": {"epochs": 2, "max_steps": max_steps}}
        (tmp_path / "config.json").write_text(json.dumps(config))
        results.whole_run_pairs(tmp_path, summary)
        return summary["pairs_trained"]
    assert reported({"pairs_trained": 356}) == 1000
    assert reported({"pairs_trained": 356}, max_steps=40) == 356
    assert reported({"pairs_trained": 320, "pairs_this_session": 0}) == 320


def test_method_against_method_counts_the_seeds_where_the_row_is_above(tmp_path, tiny_model_dir, shared):
    """The order table: row A, column B is 'k of n' over the seeds both methods ran; a method against itself '–'."""
    s = sweep.load(write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=DETECT, name="detect"))
    margin = {"": [0.01, 0.03], "label_fix=oracle-relabel": [0.05, 0.02], "loss=rdpo": [0.02]}
    results = []
    for cell in s.cells:
        key = ",".join(f"{k}={v}" for k, v in cell.settings.items() if k in ("label_fix", "loss"))
        if cell.seed <= len(margin[key]):
            results.append((cell, {"train_summary": {"eval": {"rewards/margins": margin[key][cell.seed - 1]}}}))
    rows = {line.split(" | ")[0][2:]: line.strip(" |").split(" | ")[1:]
            for line in report_audit.order_tables(s, results).splitlines()[2:]}
    assert rows == {"baseline": ["–", "1 of 2", "0 of 1"], "label_fix=oracle-relabel": ["1 of 2", "–", "1 of 1"],
                    "loss=rdpo, eps=0.2": ["1 of 1", "0 of 1", "–"]}


PAIRS_SWEEP = SWEEP.split("[grid]")[0].replace('n = 12\n', 'n = 12\npairs = "{pairs}"\nholdout = 6\n') + """
[grid]
noise = [0.0, 0.25]
seeds = [1, 2]
"""


def write_pairs_sweep(folder, model, shared, holdout=6, rows=30):
    rows = [{"prompt": f"Question {i}: which is right?", "chosen": f" answer {i} is right", "rejected": f" no {i}"}
            for i in range(rows)]
    pairs = write_jsonl(folder / "prefs.jsonl", rows)
    text = PAIRS_SWEEP.replace("{pairs}", str(pairs)).replace("holdout = 6", f"holdout = {holdout}")
    return write_sweep(folder, model, shared / "hellaswag", shared, text=text, name="own")


def test_a_sweep_of_your_own_pairs_measures_every_cell_on_the_same_held_out_rows(tmp_path, tiny_model_dir, shared):
    """[data] pairs: every cell trains on its own (noise, seed) file from the pool and is validated on the file's
    6 held-out rows, the same for every seed; HellaSwag evaluation as usual; the report builds."""
    path = write_pairs_sweep(tmp_path, tiny_model_dir, shared)
    assert runner.run(path) == 0
    configs = {c: json.loads((tmp_path / "runs" / "own" / c / "config.json").read_text())
               for c in ("noise=0,seed=1", "noise=0.25,seed=1", "noise=0,seed=2", "noise=0.25,seed=2")}
    assert len({c["files"]["val"] for c in configs.values()}) == 1
    assert len({c["files"]["val_sha256"] for c in configs.values()}) == 1
    assert len({c["files"]["train"] for c in configs.values()}) == 4
    val = json.loads(Path(next(iter(configs.values()))["files"]["val"].replace("~", str(Path.home()), 1)).read_text())
    assert len(val) == 6 and not any(p.get("flipped") for p in val)
    r = json.loads((tmp_path / "runs" / "own" / "noise=0.25,seed=2" / "result.json").read_text())
    assert r["data"]["pairs"] == str(tmp_path / "prefs.jsonl") and r["eval"] and r["val_reward_accuracy"] is not None
    assert cli.main(["report", str(path)]) == 0
    text = (tmp_path / "results" / "own" / "REPORT.md").read_text()
    assert f"- training pairs N: 12 (from `{tmp_path / 'prefs.jsonl'}`)" in text
    assert ("- validation: the first 6 clean validation pairs (reward accuracy at the end of training), of the "
            "file's held-out rows") in text  # val_size 8, but the file holds out 6
    assert "The 6 clean validation pairs are the same for every cell;" in text


def test_a_sweep_of_your_own_pairs_without_held_out_rows_is_refused(tmp_path, tiny_model_dir, shared):
    path = write_pairs_sweep(tmp_path, tiny_model_dir, shared, holdout=0)
    with pytest.raises(InputError, match="holdout = 0 leaves no validation pairs to measure the cells on"):
        sweep.load(path)


@pytest.mark.parametrize("extra, message", [
    ('[[extra]]\nlabel_fix = "relabel"\n', "after the 8 that measure the policy (val_size 8), and holdout makes 27"),
    ('[[extra]]\nloss = "rdpo"\neps = "auto"\n', "(val_size 8), and holdout makes 27: expected a val_size at least 20"),
    ('[audit]\nn = 12\nnoise = [0.25]\n', "(val_size 8), and holdout makes 27"),
])
def test_a_cell_whose_audit_would_find_too_few_calibration_pairs_is_refused_at_load(tmp_path, tiny_model_dir, shared,
                                                                                   extra, message):
    """Found before any cell runs: the audit's calibration pairs are the held-out ones after val_size (8 here), at
    least audit.MIN_CALIBRATION (20) of them."""
    path = write_pairs_sweep(tmp_path, tiny_model_dir, shared, holdout=27, rows=40)
    sweep.load(path)  # no audit: fine
    path.write_text(path.read_text() + "\n" + extra)
    with pytest.raises(InputError, match=re.escape(message)):
        sweep.load(path)
    path.write_text(path.read_text().replace("holdout = 27", "holdout = 28"))
    sweep.load(path)  # 20 left: fine


def test_a_hellaswag_cell_whose_audit_would_find_too_few_calibration_pairs_is_refused_at_load(tmp_path,
                                                                                             tiny_model_dir, shared):
    text = SWEEP.replace("val_size = 8", "val_size = 21") + '\n[[extra]]\nlabel_fix = "filter"\n'
    path = write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=text)
    with pytest.raises(InputError, match=re.escape("(val_size 21), and eval_size makes 40")):
        sweep.load(path)
    path.write_text(path.read_text().replace("val_size = 21", "val_size = 20"))
    sweep.load(path)  # 20 left: fine


def test_val_size_0_measures_a_training_cell_on_every_validation_pair_and_an_audit_cell_on_none(tmp_path,
                                                                                              tiny_model_dir, shared):
    """A training cell's audit would have no calibration pairs left (refused); an audit cell calibrates on all."""
    path = write_pairs_sweep(tmp_path, tiny_model_dir, shared, holdout=20, rows=40)
    path.write_text(path.read_text().replace("val_size = 8", "val_size = 0") + '\n[audit]\nn = 12\nnoise = [0.25]\n')
    sweep.load(path)
    path.write_text(path.read_text() + '\n[[extra]]\nlabel_fix = "filter"\n')
    with pytest.raises(InputError, match=re.escape("after the 20 that measure the policy (val_size 0)")):
        sweep.load(path)


@pytest.mark.parametrize("table", ["[grid]\nholdout = [4, 8]\n", '[[extra]]\nholdout = 4\n'])
def test_a_sweep_has_one_held_out_set(tmp_path, tiny_model_dir, shared, table):
    path = write_pairs_sweep(tmp_path, tiny_model_dir, shared)
    text = path.read_text().replace("holdout = 6\n", "")
    if table.startswith("[grid]"):
        text = text.replace("[grid]\n", table)
    path.write_text(text + "\n" + table if not table.startswith("[grid]") else text)
    with pytest.raises(InputError, match="sets holdout, but every cell of a sweep is measured on the same held-out"):
        sweep.load(path)


@pytest.mark.parametrize("holdout, extra, message", [
    (0.01, "", "[data] holdout 0.01 makes no validation pairs from `"),  # 30 rows: rounds to 0
    (0.3, '[[extra]]\nlabel_fix = "relabel"\n', "and {val} makes 9: expected a val_size at least 20 below"),
])
def test_a_fractional_holdout_is_checked_once_the_rows_are_counted(tmp_path, tiny_model_dir, shared, holdout, extra,
                                                                  message):
    """Not known at load (a fraction of the file's rows): the cell fails before training, naming the reason."""
    path = write_pairs_sweep(tmp_path, tiny_model_dir, shared, holdout=holdout)
    path.write_text(path.read_text() + "\n" + extra)
    s = sweep.load(path)
    cell = s.cells[-1]
    configs = sweep.cell_configs(s, cell)
    with pytest.raises(InputError) as e:
        runner.ensure_cell_data(s, cell, *configs)
    val = str(Path(configs.data.out_dir) / "prefs_heldout_n9.json")
    assert message.format(val=val) in str(e.value)


def test_an_audit_cell_of_your_own_pairs_calibrates_on_the_files_held_out_rows(tmp_path, tiny_model_dir, shared,
                                                                               monkeypatch):
    """[audit] with [data] pairs: dpo audit of the cell's file, calibrated on the source's validation file after
    val_size, and result.json records that file (the tiny model is too weak a detector to audit for real)."""
    from dpo.audit import audit

    path = write_pairs_sweep(tmp_path, tiny_model_dir, shared, holdout=28, rows=40)
    path.write_text(path.read_text() + "\n[audit]\nn = 12\nnoise = [0.25]\n")
    seen = []
    monkeypatch.setattr(audit, "run", lambda cfg: seen.append(cfg) or {"eps_hat": 0.2})
    s = sweep.load(path)
    result = runner.run_audit_cell(s, s.audits[0])
    (cfg,) = seen
    assert Path(cfg.val_file).name == "prefs_heldout_n28.json" and Path(cfg.val_file).is_file() and cfg.val_skip == 8
    assert result["audit_settings"]["val_file"] == cfg.val_file and result["audit"] == {"eps_hat": 0.2}


def test_every_sweep_in_the_docs_loads(tmp_path):
    """The example sweep files of the README and docs/ are what a user copies: each must load (its pair file need
    not exist yet)."""
    root = Path(__file__).parent.parent
    text = "".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    blocks = [b.split("```")[0] for b in text.split("```toml\n")[1:]]
    sweeps = [b for b in blocks if "[sweep]" in b]
    assert sweeps
    for i, block in enumerate(sweeps):
        (tmp_path / f"readme{i}.toml").write_text(block)
        assert sweep.load(tmp_path / f"readme{i}.toml").cells


def test_a_sweep_file_takes_hugging_faces_names_of_the_same_settings(tmp_path, tiny_model_dir, shared):
    text = SWEEP.replace("eval_every = 1", "eval_steps = 1\nsave_total_limit = 2")
    s = sweep.load(write_sweep(tmp_path, tiny_model_dir, shared / "hellaswag", shared, text=text))
    assert (s.train.eval_every, s.train.keep_checkpoints) == (1, 2)
