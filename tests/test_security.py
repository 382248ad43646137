"""Files and settings written by someone else (issue 18, "Security"): nothing the project loads runs code (a planted
pickle in each file it reads with torch), nothing from a sweep file becomes shell or a line of the Slurm script or
its cell list, no write follows a planted symbolic link, and a folder that is not a run is never written into."""

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import finished_run, run_argv, stopped_copy, synthetic_items, write_jsonl

from dpo import cli
from dpo.core import files
from dpo.core.files import InputError, sha256_file
from dpo.study import runner, slurm
from dpo.train import checkpoint, runfolder, train


def one_error(code, capsys, *named) -> str:
    """Exit status 2 with one `error:` line (naming each of `named`) and no traceback; the line."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "Traceback"))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for name in named:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under folder (links as links) -> its bytes' sha256: a folder left byte-identical compares equal."""
    return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    return finished_run(tmp_path_factory.mktemp("finished"), tiny_model_dir)


# ---- 1. nothing read from disk runs code

class RunsCode:
    """Unpickled in full, this runs a shell command: what a planted checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def plant_pickle(path: Path, marker: Path) -> None:
    """A malicious pickle at path that would create marker; checked to really run its command when loaded unsafely."""
    torch.save({"format": "dpo-noise checkpoint 2", "step": RunsCode(f"touch {shlex.quote(str(marker))}")}, path)
    with open(path, "rb") as f:  # (a file object: torch.load reads a *.safetensors path with safetensors)
        torch.load(f, weights_only=False)
    assert marker.exists(), "the planted pickle does not run code: the tests below would prove nothing"
    marker.unlink()


def fix_checksums(checkpoint: Path) -> None:
    """What an attacker who can plant a file can also do: make the checkpoint's checksums agree with it."""
    info_path = checkpoint / "checkpoint.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        info["files"] = {p.name: sha256_file(p) for p in sorted(checkpoint.iterdir()) if p.name != info_path.name}
        info_path.write_text(json.dumps(info))


@pytest.mark.parametrize("planted, listed", [("trainer_state.pt", True), ("model.safetensors", True),
                                             ("pytorch_model.bin", False), ("pytorch_model.bin", True)])
def test_a_planted_pickle_in_a_checkpoint_never_runs_on_resume(tmp_path, tiny_model_dir, finished, capsys, planted,
                                                                listed):
    """In place of the trainer state or the weights: refused (loaded with weights_only=True, or not a safetensors
    file). Beside the weights: refused when checkpoint.json does not list it, never loaded when it does."""
    folder = stopped_copy(finished, tmp_path / "x")
    checkpoint, marker = folder / "run" / "checkpoints" / "step_000001", tmp_path / "it-ran"
    plant_pickle(checkpoint / planted, marker)
    if listed:
        fix_checksums(checkpoint)
    code = cli.main(run_argv(tiny_model_dir, folder, "--resume"))
    assert not marker.exists()
    if planted == "pytorch_model.bin" and listed:  # safetensors only: the pickle beside the weights is ignored
        assert code == 0 and (folder / "run" / "final" / "model.safetensors").is_file()
        return
    line = one_error(code, capsys, checkpoint)
    if planted == "trainer_state.pt":
        assert "is not a dpo-noise trainer state (refusing to load it: UnpicklingError" in line
    assert not (folder / "run" / "final").exists()


def test_a_planted_trainer_state_never_runs_in_a_sweep(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A plain `dpo sweep` resumes a cell that has checkpoints: the same check, and the cell fails (no result).
    (The cell's own checkpoint, stopped by Ctrl-C after step 1: one of another run would be refused earlier, for
    its other settings.)"""
    path = write_sweep(tmp_path, tiny_model_dir)
    cell = tmp_path / "runs" / "tiny" / "noise=0,raw_dir=data,seed=1"
    real_step = train.train_step

    def ctrl_c_in_step_1(run, step):
        if step == 0:
            signal.raise_signal(signal.SIGINT)
        return real_step(run, step)

    monkeypatch.setattr(train, "train_step", ctrl_c_in_step_1)
    with pytest.raises(KeyboardInterrupt):
        runner.run(path, only=["noise=0,raw_dir=data,seed=1"])
    monkeypatch.undo()
    assert [p.name for p in checkpoint.checkpoints(cell)] == ["step_000001"]
    marker = tmp_path / "it-ran"
    plant_pickle(cell / "checkpoints" / "step_000001" / "trainer_state.pt", marker)
    fix_checksums(cell / "checkpoints" / "step_000001")
    assert runner.run(path, only=["noise=0,raw_dir=data,seed=1"]) == 1
    assert not marker.exists() and not (cell / "result.json").exists()
    assert "is not a dpo-noise trainer state" in (cell / "error.log").read_text()


def eval_planted(tmp_path: Path, folder: Path) -> int:
    """`dpo eval` of a planted model folder on a few synthetic items (into tmp_path/eval); its exit status."""
    hellaswag = tmp_path / "hellaswag"
    hellaswag.mkdir()
    write_jsonl(hellaswag / "hellaswag_train.jsonl", synthetic_items(20, seed=1))
    write_jsonl(hellaswag / "hellaswag_val.jsonl", synthetic_items(12, seed=2))
    return cli.main(["eval", "--model", str(folder), "--hellaswag-dir", str(hellaswag), "--eval-size", "6",
                     "--fewshot-indices", "0,1", "--device", "cpu", "--out-dir", str(tmp_path / "eval")])


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_pickled_weights_in_a_model_folder_are_never_loaded(tmp_path, tiny_model_dir, capsys, name):
    folder, marker = tmp_path / "model", tmp_path / "it-ran"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    plant_pickle(folder / name, marker)
    code = eval_planted(tmp_path, folder)
    line = one_error(code, capsys, folder)
    if name == "pytorch_model.bin":
        assert "no safetensors weights" in line and "pytorch_model.bin" in line
    (tmp_path / "pairs.json").write_text(json.dumps([{"prompt": "a b", "chosen": " yes", "rejected": " no"}] * 4))
    one_error(cli.main(run_argv(folder, tmp_path)), capsys, folder)
    assert not marker.exists() and not (tmp_path / "run").exists()


def plant_custom_code(folder: Path, marker: Path, where: str) -> None:
    """A folder that names its own Python classes in `where` (auto_map), with the module that would create marker."""
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / where).read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                          "AutoTokenizer": ["evil.EvilTokenizer", None]}
    if where == "config.json":
        config["model_type"] = "evil-unknown"
    (folder / where).write_text(json.dumps(config))


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_a_model_folder_that_names_its_own_code_is_refused_before_transformers_can_ask(
        tmp_path, tiny_model_dir, capsys, monkeypatch, where):
    import io

    folder, marker = tmp_path / "model", tmp_path / "it-ran"
    shutil.copytree(tiny_model_dir, folder)
    plant_custom_code(folder, marker, where)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # whoever asks gets a yes
    code = eval_planted(tmp_path, folder)
    line = one_error(code, capsys, folder / where)
    assert "auto_map" in line and "evil.py" in line
    assert not marker.exists() and not (tmp_path / "eval").exists()


def test_every_transformers_load_says_trust_remote_code_false(tmp_path, tiny_model_dir, monkeypatch):
    """Also for hub ids (no folder to check first): transformers then refuses custom code instead of asking."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo.core import models

    seen = []
    for auto in (AutoModelForCausalLM, AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, **k: seen.append(k) or (_ for _ in ()).throw(
            OSError("not cached")))
    monkeypatch.setattr(models, "hub_reachable", lambda url, timeout=0: False)
    for load in (models.load_model, models.load_tokenizer):
        with pytest.raises(InputError):
            load("some-org/some-model")
    assert seen and all(k.get("trust_remote_code") is False for k in seen)


def test_checkpoint_state_loads_with_weights_only(finished):
    """What the project writes is what it can read safely: tensors, numbers, strings and plain containers."""
    checkpoint = finished / "run" / "checkpoints" / "step_000002"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert json.loads((checkpoint / "checkpoint.json").read_text())["step"] == 2


# ---- 2. nothing from a sweep file becomes shell

SWEEP = """
[sweep]
model = "{model}"
name = "{name}"
runs_dir = "{runs}"

[data]
hellaswag_dir = "{data}"
eval_size = 30
n = 8
out_dir = "{folder}/pairs"

[train]
max_steps = 2
per_device_train_batch_size = 4
gradient_accumulation_steps = 1
val_size = 8
eval_every = 0
cache_dir = "{folder}/cache"
device = "cpu"

[eval]
limit = 4
device = "cpu"

[grid]
noise = [0.0, 0.25]
raw_dir = {raw_dir}

[slurm]
partition = "{partition}"
time = "0:10:00"
extra = {extra}
"""


def write_sweep(folder: Path, model, name="tiny", runs=None, raw_dir='["data"]', partition="debug",
                extra='["--constraint=h100"]') -> Path:
    """A sweep file; string values are TOML basic strings (escapes such as \\n are newlines)."""
    data = folder / "hellaswag"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "hellaswag_train.jsonl", synthetic_items(60, seed=1))
    write_jsonl(data / "hellaswag_val.jsonl", synthetic_items(40, seed=2))
    path = folder / "tiny.toml"
    path.write_text(SWEEP.format(model=model, name=name, runs=runs or folder / "runs", data=data, folder=folder,
                                 raw_dir=raw_dir, partition=partition, extra=extra))
    return path


INJECTIONS = [  # (where, the sweep file's text for it: a control character followed by a command)
    ("[sweep] name", {"name": "tiny\\ntouch PWNED"}),
    ("[sweep] runs_dir", {"runs": "runs\\ntouch PWNED"}),
    ("[slurm] partition", {"partition": "gpu\\ntouch PWNED"}),
    ("[slurm] partition", {"partition": "gpu\\rtouch PWNED"}),
    ("[slurm] partition", {"partition": "gpu\\u2028touch PWNED"}),
    ("[slurm] partition", {"partition": "gpu touch PWNED"}),
    ("[slurm] extra", {"extra": '["--constraint=h100\\ntouch PWNED"]'}),
    ("[slurm] extra", {"extra": '["--constraint=h100 --wrap=PWNED"]'}),
    ("[slurm] extra", {"extra": '["touch PWNED"]'}),
    ("[slurm] extra", {"extra": '["--comment=\'PWNED\'"]'}),
    ("[grid] raw_dir", {"raw_dir": '["data\\ntouch PWNED", "b"]'}),
    ("[grid] raw_dir", {"raw_dir": '["data\\u001b]0;PWNED", "b"]'}),
]


@pytest.mark.parametrize("where, values", INJECTIONS, ids=[f"{w}-{i}" for i, (w, _) in enumerate(INJECTIONS)])
def test_control_characters_and_stray_words_never_reach_the_script(tmp_path, tiny_model_dir, capsys, where,
                                                                   values):
    path = write_sweep(tmp_path, tiny_model_dir, **values)
    code = cli.main(["sweep", str(path), "--launcher", "slurm", "--dry-run"])
    section, key = where.split()
    line = one_error(code, capsys, path, key)
    assert section in line or "slurm option" in line
    assert "PWNED" not in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["partition=gpu\ntouch PWNED", "extra=--x=1\n#SBATCH --wrap=PWNED", "mem=8G PWNED",
                                  "extra=--begin=now --wrap=PWNED"])
def test_slurm_flags_are_checked_the_same_way(tmp_path, tiny_model_dir, capsys, flag):
    path = write_sweep(tmp_path, tiny_model_dir)
    one_error(cli.main(["sweep", str(path), "--launcher", "slurm", "--dry-run", "--slurm", flag]), capsys, "--slurm")


def sbatch_words(line: str) -> list:
    """The words sbatch reads from an `#SBATCH` line (Slurm's _get_argument: quotes group, a backslash escapes,
    an unquoted # starts a comment; no shell)."""
    words, text = [], line[len("#SBATCH"):]
    i = 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        word, quote = None, ""
        while i < len(text) and (quote or not text[i].isspace()):
            c, i = text[i], i + 1
            if c == "\\" and i < len(text):
                word, i = (word or "") + text[i], i + 1
            elif quote and c == quote:
                quote = ""
            elif not quote and c in "'\"":
                quote, word = c, word or ""
            elif not quote and c == "#":
                return words + [word] if word is not None else words
            else:
                word = (word or "") + c
        if word is not None:
            words.append(word)
    return words


def test_the_script_runs_the_task_cell_by_index_and_nothing_else(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Values full of shell syntax (legal, without control characters) are quoted: bash runs exactly the worker with
    the task's index into the JSON cell list, sbatch reads each option as one word, and nothing else runs."""
    hostile = "$(touch PWNED1) `touch PWNED2`; touch PWNED3 & it's \"q\" #x"
    cwd = tmp_path / f"repo {hostile}"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    runs = tmp_path / f"runs {hostile}"
    path = write_sweep(tmp_path, tiny_model_dir, name="tiny $(touch PWNED4) 'q'", runs=json.dumps(str(runs))[1:-1],
                       raw_dir=json.dumps(["data", hostile]), extra='["--comment=$(touch${IFS}PWNED5)"]')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    argv_file = tmp_path / "argv"
    (bin_dir / "python").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {shlex.quote(str(argv_file))}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    assert cli.main(["sweep", str(path), "--launcher", "slurm"]) == 0
    folder = runs / "tiny $(touch PWNED4) 'q'" / "slurm"
    (script,), (cells_file,) = folder.glob("sweep-*.sbatch"), folder.glob("cells-*")
    cells = json.loads(cells_file.read_text())
    assert cells == ["base", "noise=0,raw_dir=data,seed=1", f"noise=0,raw_dir={hostile},seed=1",
                     "noise=0.25,raw_dir=data,seed=1", f"noise=0.25,raw_dir={hostile},seed=1"]
    options = [sbatch_words(ln) for ln in script.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert options == [["--job-name=dpo-tiny $(touch PWNED4) 'q'"], ["--array=0-4"],
                       [f"--output={folder}/%A_%a.log"], ["--signal=B:TERM@120"], ["--partition=debug"],
                       ["--time=0:10:00"], ["--comment=$(touch${IFS}PWNED5)"]]
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_JOB_ID": "4242"}
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert argv_file.read_text().splitlines() == ["-m", "dpo", "sweep", str(path), "--cells-file", str(cells_file),
                                                  "--only-index", "2"]
    assert not [p for p in tmp_path.rglob("PWNED*")]
    monkeypatch.undo()
    assert slurm.task_cell(str(cells_file), 2) == cells[2]
    capsys.readouterr()
    assert cli.main(["sweep", str(path), "--cells-file", str(cells_file), "--only-index", "2", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [f"  missing  {cells[2]}"]


@pytest.mark.parametrize("content, index, message", [
    ('["base"]', 1, "lists 1 cells"), ('"base"', 0, "expected a JSON list of cell names"),
    ('["no-such-cell"]', 0, "no cell named 'no-such-cell'"), ("[", 0, "malformed JSON")])
def test_a_bad_cells_file_or_index_is_one_error(tmp_path, tiny_model_dir, capsys, content, index, message):
    path = write_sweep(tmp_path, tiny_model_dir)
    (tmp_path / "cells.json").write_text(content)
    code = cli.main(["sweep", str(path), "--cells-file", str(tmp_path / "cells.json"), "--only-index", str(index)])
    assert message in one_error(code, capsys)


# ---- 3. writes never follow a symbolic link

@pytest.fixture
def victim(tmp_path):
    """A file someone else owns; planted links point at it. Its bytes must never change."""
    path = tmp_path / "victim.txt"
    path.write_text('{"step": 0, "precious": true}\n')
    return path


def test_open_nofollow_and_lock_file_refuse_links_fifos_and_keep_targets(tmp_path, victim):
    link = tmp_path / "link"
    link.symlink_to(victim)
    for call in (lambda: files.open_nofollow(link, "w"), lambda: files.open_nofollow(link, "a+"),
                 lambda: files.lock_file(link)):
        with pytest.raises(InputError, match="is a symbolic link: refusing to write through it"):
            call()
    (tmp_path / "dangling").symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(InputError):
        files.open_nofollow(tmp_path / "dangling", "w")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InputError, match="not a regular file"):
        files.open_nofollow(tmp_path / "fifo", "a")  # without a reader: refused, not blocked
    assert victim.read_text() == '{"step": 0, "precious": true}\n'
    assert not (tmp_path / "created-through-the-link").exists()


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_a_linked_file_in_a_new_run_folder_is_refused(tmp_path, tiny_model_dir, victim, capsys, name):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).symlink_to(victim)
    (tmp_path / "pairs.json").write_text(json.dumps([{"prompt": "a b", "chosen": " yes", "rejected": " no"}] * 4))
    one_error(cli.main(run_argv(tiny_model_dir, tmp_path)), capsys, tmp_path / "run" / name)
    assert victim.read_text() == '{"step": 0, "precious": true}\n'


def test_linked_metrics_of_a_resumed_run_are_refused(tmp_path, tiny_model_dir, finished, victim, capsys):
    folder = stopped_copy(finished, tmp_path / "x")
    metrics = folder / "run" / "metrics.jsonl"
    metrics.unlink()
    metrics.symlink_to(victim)
    one_error(cli.main(run_argv(tiny_model_dir, folder, "--resume")), capsys, metrics)
    assert victim.read_text() == '{"step": 0, "precious": true}\n'


def test_the_logger_refuses_a_link_planted_after_the_checks(tmp_path, victim):
    """The checks at the start are for a clear message; O_NOFOLLOW is what protects the target."""
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link"):
        runfolder.Logger(tmp_path, 0)
    (tmp_path / ".lock").symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link"):
        runfolder.lock_run_dir(tmp_path)
    assert victim.read_text() == '{"step": 0, "precious": true}\n'


def test_a_linked_reference_cache_lock_is_refused(tmp_path, tiny_model_dir, finished, victim, capsys):
    folder = tmp_path / "x"
    shutil.copytree(finished, folder)
    shutil.rmtree(folder / "run")
    (lock,) = (folder / "cache" / "ref").glob("*.lock")
    lock.unlink()
    lock.symlink_to(victim)
    one_error(cli.main(run_argv(tiny_model_dir, folder)), capsys, lock)
    assert victim.read_text() == '{"step": 0, "precious": true}\n'


def test_a_linked_manifest_lock_is_refused(tmp_path, hellaswag_dir, victim, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".manifest.lock").symlink_to(victim)
    code = cli.main(["data", "--hellaswag-dir", str(hellaswag_dir), "--out-dir", str(out), "--n", "8",
                     "--eval-size", "20"])
    one_error(code, capsys, out / ".manifest.lock")
    assert victim.read_text() == '{"step": 0, "precious": true}\n'


def test_a_linked_worker_log_fails_only_its_cell(tmp_path, tiny_model_dir, victim, monkeypatch, capsys):
    path = write_sweep(tmp_path, tiny_model_dir)
    monkeypatch.setattr(runner, "worker_command", lambda s, name: [sys.executable, "-c", "print('worker output')"])
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.02)
    cell = tmp_path / "runs" / "tiny" / "noise=0,raw_dir=data,seed=1"
    cell.mkdir(parents=True)
    (cell / "worker.log").symlink_to(victim)
    assert runner.run(path, only=["noise=0,raw_dir=data,seed=1", "base"], gpus="0") == 2
    assert victim.read_text() == '{"step": 0, "precious": true}\n'
    assert "symbolic link" in (cell / "error.log").read_text()
    assert (tmp_path / "runs" / "tiny" / "base" / "worker.log").read_text() == "worker output\n"


def test_error_logs_of_dead_slurm_tasks_never_follow_links_or_leave_the_sweep(tmp_path, tiny_model_dir, capsys):
    path = write_sweep(tmp_path, tiny_model_dir)
    runs = tmp_path / "runs" / "tiny"
    cell = runs / "noise=0,raw_dir=data,seed=1"
    cell.mkdir(parents=True)
    (cell / "error.log").symlink_to(tmp_path / "created-through-the-link")
    (tmp_path / "escape").mkdir()
    (runs / "slurm").mkdir()
    (runs / "slurm" / "submitted.json").write_text(json.dumps({"77": [cell.name, "../../escape"]}))
    assert cli.main(["sweep", str(path), "--launcher", "slurm", "--dry-run"]) == 0
    assert not (tmp_path / "created-through-the-link").exists() and not (tmp_path / "escape" / "error.log").exists()
    assert "slurm task 77_0 ended without result.json" in (cell / "error.log").read_text()


# ---- 4. an output folder that is not a run

@pytest.mark.parametrize("kind", ["model", "data"])
def test_a_folder_that_is_not_a_run_is_left_byte_identical(tmp_path, tiny_model_dir, hellaswag_dir, capsys, kind):
    target = tmp_path / kind
    shutil.copytree(tiny_model_dir if kind == "model" else hellaswag_dir, target)
    before = snapshot(target)
    (tmp_path / "pairs.json").write_text(json.dumps([{"prompt": "a b", "chosen": " yes", "rejected": " no"}] * 4))
    argv = run_argv(tiny_model_dir, tmp_path)
    argv[argv.index("--output-dir") + 1] = str(target)
    assert "is not a dpo-noise run folder" in one_error(cli.main(argv), capsys, target)
    assert snapshot(target) == before


def test_what_counts_as_a_run_folder(tmp_path):
    cell = tmp_path / "cell"  # a sweep cell before training: the sweep made it and may have logged into it
    cell.mkdir()
    (cell / "worker.log").write_text("started\n")
    (cell / "error.log").write_text("a failed first try\n")
    (cell / ".lock").write_text("")
    (cell / "events.out.tfevents.1.host.2.0").write_text("")
    runfolder.check_output_dir(cell)
    runfolder.check_output_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    runfolder.check_output_dir(tmp_path / "empty")
    (cell / "config.json").write_text('{"run": "cell", "train": {}}')
    (cell / "notes.txt").write_text("a run may hold other files")
    runfolder.check_output_dir(cell)
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("")
    for path, message in (("file", "not a folder"), ("dangling", "a symbolic link to nothing"),
                          ("other", "is not a dpo-noise run folder")):
        with pytest.raises(InputError, match=message):
            runfolder.check_output_dir(tmp_path / path)


def test_recorded_paths_name_no_machine_folders(tmp_path, monkeypatch):
    from dpo.core.files import shown_path

    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert shown_path(tmp_path / "checkout" / "data" / "pairs.json") == "data/pairs.json"
    assert shown_path(tmp_path / "home" / ".cache" / "m") == "~/.cache/m"
    assert shown_path("/elsewhere/m") == "/elsewhere/m"
    assert shown_path(str(tmp_path) + "-other/x") == str(tmp_path) + "-other/x"  # a prefix of a name is not a folder
