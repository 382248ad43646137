"""Faults that are not bad files (issue 18, "Faults"): a full or read-only disk is one `error:` line naming the path
and a failed start leaves nothing; --threads beyond the cores, a --max-length that cuts the responses of a pair to
the same tokens, a --max-steps far beyond the data: a note, an error line, a plan computed on demand."""

import errno
import json
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import configs, finished_run, mc_like_pairs, run_argv, stopped_copy, write

from dpo import cli
from dpo.core import files, models
from dpo.train import train
from dpo.train.plan import Plan

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def error_line(code, capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "Traceback"))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def train_argv(model_dir, tmp_path, out, *extra):
    return ["train", "--model", str(model_dir), "--train-data-path", write(tmp_path / "p.json", mc_like_pairs(8)),
            "--val-data-path", "", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--max-steps",
            "1", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "1", "--device", "cpu", *extra]


def fail_writes_under(monkeypatch, folder: Path, error=NO_SPACE):
    """os.replace (every atomic write's last step) into folder fails with error."""
    real = os.replace

    def replace(src, dst, *args, **kw):
        if Path(dst).is_relative_to(folder):
            raise error
        return real(src, dst, *args, **kw)

    monkeypatch.setattr(os, "replace", replace)


# ---- 8. full or read-only disks

def test_a_read_only_run_folder_is_found_before_any_work(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Root ignores permissions, so the read-only folder is simulated where the code asks (os.access)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != read_only and real(path, mode, **kw))
    monkeypatch.setattr(train.models, "load_model", lambda *a, **kw: 1 / 0)
    line = error_line(cli.main(train_argv(tiny_model_dir, tmp_path, read_only / "run")), capsys)
    assert line.startswith(f"error: {read_only}: not writable (a read-only file system, or no permission)")
    assert not list(read_only.iterdir())


@pytest.mark.parametrize("where", ["run", "cache"])
def test_a_full_disk_at_the_start_is_one_error_and_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch, capsys,
                                                                 where):
    fail_writes_under(monkeypatch, tmp_path / where)
    line = error_line(cli.main(train_argv(tiny_model_dir, tmp_path, tmp_path / "run")), capsys)
    assert line.startswith(f"error: {tmp_path / where}/") and line.endswith(": cannot write it: no space left on "
                                                                             "device")
    assert not (tmp_path / "run").exists()


def test_a_failed_resume_leaves_the_run_folder_as_it_was(tmp_path, tiny_model_dir, monkeypatch, capsys):
    folder = stopped_copy(finished_run(tmp_path / "a", tiny_model_dir), tmp_path / "x")
    (folder / "run" / ".lock").unlink()
    before = sorted(p.name for p in (folder / "run").iterdir())
    fail_writes_under(monkeypatch, folder / "run", OSError(errno.EROFS, "Read-only file system"))
    line = error_line(cli.main(run_argv(tiny_model_dir, folder, "--resume")), capsys)
    assert line == f"error: {folder / 'run' / 'config.json'}: cannot write it: read-only file system"
    assert sorted(p.name for p in (folder / "run").iterdir()) == before  # no .lock left behind


@pytest.mark.parametrize("failure", ["save_model", "torch.save"])
def test_a_checkpoint_that_cannot_be_written_is_one_error(tmp_path, tiny_model_dir, monkeypatch, capsys, failure):
    """A full disk while saving: no half-written checkpoint is left. torch.save reports one as a RuntimeError
    without an errno: the disk's state names the cause."""
    if failure == "save_model":
        monkeypatch.setattr(train.models, "save_model", lambda *a: (_ for _ in ()).throw(NO_SPACE))
    else:
        monkeypatch.setattr(train.torch, "save", lambda *a, **kw: (_ for _ in ()).throw(
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")))
        monkeypatch.setattr(files, "disk_problem", lambda folder: "no space left on device")
    line = error_line(cli.main(train_argv(tiny_model_dir, tmp_path, tmp_path / "run")), capsys)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000001"
    assert line.startswith(f"error: {checkpoint}: cannot write it: no space left on device")
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_dpo_data_on_a_full_or_read_only_disk(tmp_path, hellaswag_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["data", "--hellaswag-dir", str(hellaswag_dir), "--out-dir", str(out), "--n", "20", "--eval-size", "50"]
    fail_writes_under(monkeypatch, out)
    line = error_line(cli.main(argv), capsys)
    assert line.startswith(f"error: {out}/mc_") and line.endswith(": cannot write it: no space left on device")
    assert not list(out.glob("*.json"))
    monkeypatch.undo()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != tmp_path and real(path, mode, **kw))
    line = error_line(cli.main([*argv[:4], str(tmp_path / "new"), *argv[5:]]), capsys)
    assert "not writable" in line and not (tmp_path / "new").exists()


def test_a_disk_error_no_writer_named_is_still_one_line(monkeypatch, capsys):
    from dpo.data import prepare

    monkeypatch.setattr(prepare, "run", lambda cfg: (_ for _ in ()).throw(
        OSError(errno.EDQUOT, "Disk quota exceeded", "/x/y")))
    assert error_line(cli.main(["data"]), capsys) == "error: /x/y: cannot write it: disk quota exceeded"


def test_a_cut_last_metrics_line_is_dropped_on_resume(tmp_path, tiny_model_dir, capsys):
    run = finished_run(tmp_path / "a", tiny_model_dir)
    folder = stopped_copy(run, tmp_path / "x")
    with open(folder / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "split": "tr')  # killed while writing step 2's line
    assert cli.main(run_argv(tiny_model_dir, folder, "--resume")) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "dropped 1 damaged lines" in warnings[0]
    steps = [json.loads(ln)["step"] for ln in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_metrics_lines_of_another_shape_are_dropped_on_resume(tmp_path, tiny_model_dir, capsys):
    """Issue 30: a line of the wrong shape (a list for the split, a bare number, nested too deeply) ended --resume in a
    traceback; it is dropped like a cut line, with the same one warning."""
    run = finished_run(tmp_path / "a", tiny_model_dir)
    folder = stopped_copy(run, tmp_path / "x")
    with open(folder / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "split": ["x"]}\n123\n' + "[" * 200_000 + "]" * 200_000 + "\n")
    assert cli.main(run_argv(tiny_model_dir, folder, "--resume")) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("warning:", "error:"))]
    assert warnings == [f"warning: {folder / 'run' / 'metrics.jsonl'}: dropped 3 damaged lines (the first: line 2)"]
    steps = [json.loads(ln)["step"] for ln in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# ---- 10. --threads

def test_threads_beyond_the_cores_are_clamped_with_a_note(tmp_path, tiny_model_dir, monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    assert cli.main(train_argv(tiny_model_dir, tmp_path, tmp_path / "run", "--threads", "100000")) == 0
    cores = models.cpu_cores()
    assert asked == [cores] and f"note: --threads 100000 is more than the {cores} CPU cores here: using {cores}" \
        in capsys.readouterr().err
    models.set_threads(1)
    assert asked == [cores, 1]


# ---- 11. a --max-length that leaves nothing to tell the responses apart

def test_a_max_length_that_cuts_the_responses_alike_is_refused(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    pairs = mc_like_pairs(8)
    for p in pairs:  # responses that share their first tokens, as " 2" and " 0" are "Ġ" + digit for SmolLM2
        p["chosen"], p["rejected"] = " the dog" + p["chosen"], " the dog" + p["rejected"]
    first = len(tiny_tokenizer(" the dog", add_special_tokens=False)["input_ids"])
    argv = train_argv(tiny_model_dir, tmp_path, tmp_path / "run")
    write(tmp_path / "p.json", pairs)
    line = error_line(cli.main([*argv, "--max-length", "2"]), capsys)
    assert line == (f"error: {tmp_path / 'p.json'}: --max-length 2 cuts chosen and rejected to the same tokens in 8 "
                    f"of 8 pairs (the first: pair 0), which then train nothing: use --max-length {first + 2} or more")
    assert cli.main([*argv, "--max-length", str(first + 2)]) == 0


# ---- 12. a plan of any length

def old_plan(lengths, batch_size, total_steps, seed):
    """The plan as it was built up front (what resumed runs and the committed studies were trained with)."""
    steps, epoch = [], 0
    while len(steps) < total_steps:
        order = list(range(len(lengths)))
        random.Random(f"{seed}/epoch{epoch}").shuffle(order)
        for start in range(0, len(order), batch_size):
            steps.append(sorted(order[start:start + batch_size], key=lambda i: lengths[i]))
        epoch += 1
    return steps[:total_steps]


@pytest.mark.parametrize("n, batch, total", [(24, 8, 3), (25, 8, 11), (7, 16, 5), (250, 8, 32), (10, 3, 1)])
def test_the_plan_is_the_same_computed_on_demand(n, batch, total):
    lengths = [random.Random(n).randrange(5, 50) for _ in range(n)]
    plan = Plan(lengths, batch, total, seed=3)
    want = old_plan(lengths, batch, total, 3)
    assert len(plan) == total and [plan[s] for s in range(total)] == want
    for start in range(total):
        assert plan.used(start) == sorted({i for step in want[start:] for i in step})


def test_a_billion_steps_are_planned_without_building_them(tmp_path, tiny_model_dir):
    plan = Plan(list(range(24)), 8, 10**9, seed=1)
    last = plan[10**9 - 1]
    assert len(plan) == 10**9 and len(last) == len(set(last)) == 8 and set(last) <= set(range(24))
    assert plan.used(10**9 - 1) == sorted(last) and plan.used(10**9 - 6) == list(range(24))
    d, cfg = configs(tmp_path, tiny_model_dir, max_steps=10**9, val_data_path="")
    run = train.setup(d, cfg)
    run.lock.close()
    assert run.total_steps == 10**9 and run.info["reference_pairs_computed"] == 24


# ---- 13. non-finite numbers in result files

def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript's JSON.parse, jq, serde) do."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


NON_FINITE = {"nan": float("nan"), "inf": [float("inf"), -float("inf")], "deep": {"x": (1.5, float("nan"))},
              "fine": 0.25, "text": "NaN"}
AS_NULL = {"nan": None, "inf": [None, None], "deep": {"x": [1.5, None]}, "fine": 0.25, "text": "NaN"}


def test_a_non_finite_number_in_a_result_file_is_written_as_null(tmp_path):
    files.atomic_write_json(tmp_path / "r.json", NON_FINITE, indent=1)
    assert strict_json((tmp_path / "r.json").read_text()) == AS_NULL
    assert strict_json(files.json_text(NON_FINITE, ensure_ascii=True)) == AS_NULL


def test_a_non_finite_metric_is_logged_as_null(tmp_path):
    from dpo.train import runfolder

    log = runfolder.Logger(tmp_path, 0)
    log.log(1, {"loss": float("nan"), "rewards/margins": 0.5}, "train")
    log.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert strict_json(line) == {"step": 1, "split": "train", "loss": None, "rewards/margins": 0.5}


def test_no_module_writes_json_but_through_the_strict_writer():
    """Every JSON file dpo/ and the benchmark scripts write goes through files.json_text / benchlib.json_text
    (NaN -> null): no json.dump to a file, no json.dumps straight into a write (tests may
    write what they like)."""
    root = Path(__file__).parents[1]
    found = []
    for path in sorted((*root.glob("dpo/*.py"), *root.glob("experiments/bench/*.py"))):
        if path.name.startswith("test_"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "json.dump(" in line or ("write" in line and "(json.dumps(" in line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not found, found


# ---- issue 30: seeds and torchrun's variables, checked before any work

@pytest.mark.parametrize("command, seed", [("data", "-1"), ("data", "99999999999999999999"), ("train", "-1"),
                                           ("train", "4294967296"), ("eval", "-1")])
def test_a_seed_outside_0_to_2_to_the_32_is_one_error_line_in_every_command(tmp_path, tiny_model_dir, hellaswag_dir,
                                                                          capsys, command, seed):
    argv = {"data": ["data", "--hellaswag-dir", str(hellaswag_dir), "--out-dir", str(tmp_path / "out"), "--n", "20",
                     "--eval-size", "50"],
            "train": train_argv(tiny_model_dir, tmp_path, tmp_path / "out"),
            "eval": ["eval", "--model", str(tiny_model_dir), "--hellaswag-dir", str(hellaswag_dir), "--out-dir",
                     str(tmp_path / "out"), "--device", "cpu"]}[command]
    line = error_line(cli.main([*argv, "--seed", seed]), capsys)
    assert line in (f"error: --seed {seed}: expected an integer from 0 to 4294967295",
                    f"error: --seed '{seed}': expected an integer from 0 to 4294967295")
    assert not (tmp_path / "out").exists()


def test_the_seed_range_is_0_to_2_to_the_32_minus_1():
    from dpo.core.config import SEED_MAX, DataConfig

    assert SEED_MAX == 2**32 - 1 and DataConfig(seed=0).validate() and DataConfig(seed=SEED_MAX).validate()
    with pytest.raises(files.InputError, match="^--seed 4294967296: expected an integer from 0 to 4294967295$"):
        DataConfig(seed=SEED_MAX + 1).validate()


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE is 'abc': expected an integer of at least 1"),
    ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE is '0': expected an integer of at least 1"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "environment variable RANK is '2': expected an integer from 0 to 1"),
    ({"WORLD_SIZE": "2"}, "environment variable RANK is unset: expected an integer from 0 to 1"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "environment variable LOCAL_RANK is 'x'"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "WORLD_SIZE=2, RANK=1: cannot join the other training processes"),
])
def test_torchrun_variables_that_make_no_sense_are_one_error_line(tmp_path, tiny_model_dir, monkeypatch, capsys, env,
                                                                   message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    line = error_line(cli.main(train_argv(tiny_model_dir, tmp_path, tmp_path / "run")), capsys)
    assert line.startswith(f"error: {message}")
    assert not (tmp_path / "run").exists()
