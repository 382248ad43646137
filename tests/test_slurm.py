"""Sweeps on Slurm: the job array's script (always), and a real one-node Slurm cluster from Debian's packages
(experiments/slurm/local_cluster.sh; the tests skip where slurmctld is not installed): the same result.json values
as the local runner, a rerun submits nothing, a removed result resubmits one task."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import synthetic_items, write_jsonl

from dpo import cli
from dpo.study import runner

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "experiments" / "slurm" / "local_cluster.sh"

SWEEP = """
[sweep]
model = "{model}"
runs_dir = "{folder}/runs"
results_dir = "{folder}/results"

[data]
hellaswag_dir = "{data}"
eval_size = 30
n = 8
out_dir = "{folder}/pairs"

[train]
max_steps = 2
per_device_train_batch_size = 4
gradient_accumulation_steps = 1
learning_rate = 1e-3
warmup_steps = 0
val_size = 8
eval_every = 0
cache_dir = "{folder}/cache"
device = "cpu"
threads = 1

[eval]
limit = 4
metrics = "completion,mc"
batch_size = 8
device = "cpu"

[grid]
noise = [0.0, 0.25]
seeds = [1]

[slurm]
partition = "debug"
time = "0:10:00"
cpus_per_task = 1
{slurm}
"""
CELLS = ["noise=0,seed=1", "noise=0.25,seed=1"]


def make_sweep(folder: Path, model, slurm_extra="") -> Path:
    data = folder / "hellaswag"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "hellaswag_train.jsonl", synthetic_items(60, seed=1))
    write_jsonl(data / "hellaswag_val.jsonl", synthetic_items(40, seed=2))
    path = folder / "tiny.toml"
    path.write_text(SWEEP.format(model=model, folder=folder, data=data, slurm=slurm_extra))
    return path


def test_script_from_the_sweep_file_and_flags(tmp_path, tiny_model_dir, capsys):
    path = make_sweep(tmp_path, tiny_model_dir, 'extra = ["--constraint=h100"]\ngpus_per_task = 1')
    args = ["sweep", str(path), "--launcher", "slurm", "--dry-run", "--slurm", "partition=gpu", "--slurm", "mem=8G"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --array=0-2", "#SBATCH --partition=gpu", "#SBATCH --time=0:10:00", "#SBATCH --mem=8G",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --cpus-per-task=1", "#SBATCH --constraint=h100",
                 "#SBATCH --job-name=dpo-tiny", "sweep", "--only"):
        assert line in out, line
    assert "base, noise=0,seed=1, noise=0.25,seed=1" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_bad_slurm_options_and_missing_sbatch(tmp_path, tiny_model_dir, capsys, monkeypatch):
    path = make_sweep(tmp_path, tiny_model_dir, 'qos = "high"')
    assert cli.main(["sweep", str(path), "--launcher", "slurm", "--dry-run"]) == 2
    assert "unknown slurm option 'qos'" in capsys.readouterr().err
    path = make_sweep(tmp_path, tiny_model_dir)
    assert cli.main(["sweep", str(path), "--launcher", "slurm", "--dry-run", "--slurm", "time"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cli.main(["sweep", str(path), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "`sbatch` is not on PATH" in err


# ---- a real cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("slurmctld") is None or shutil.which("munged") is None or os.geteuid() != 0:
        pytest.skip("Slurm is not installed here (CI installs slurm-wlm and munge; see .ci/run)")
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state)}
    started = subprocess.run([str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        pytest.fail(f"local Slurm did not start: {started.stdout}{started.stderr}")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield
    subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, timeout=60)
    os.environ.pop("SLURM_CONF", None)


def wait_for_queue(timeout=240):
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "Slurm jobs did not finish in time"
        time.sleep(1)


def results(folder: Path) -> dict:
    out = {}
    for name in ["base"] + CELLS:
        r = json.loads((folder / "runs" / "tiny" / name / "result.json").read_text())
        losses = [json.loads(ln)["loss"] for ln in (folder / "runs" / "tiny" / name / "metrics.jsonl").read_text()
                  .splitlines()] if name != "base" else []
        out[name] = {"acc": r["eval"]["acc"], "acc_norm": r["eval"]["acc_norm"], "mc_acc": r["eval"]["mc_acc"],
                     "val": r.get("val_reward_accuracy"), "losses": losses}
    return out


def test_slurm_sweep_equals_the_local_run(tmp_path, tiny_model_dir, cluster, capsys):
    local = make_sweep(tmp_path / "local", tiny_model_dir)
    assert runner.run(local) == 0
    remote = make_sweep(tmp_path / "slurm", tiny_model_dir)
    assert cli.main(["sweep", str(remote), "--launcher", "slurm"]) == 0
    assert "submitted job" in capsys.readouterr().out
    wait_for_queue()
    got, want = results(tmp_path / "slurm"), results(tmp_path / "local")
    for name in want:
        assert got[name]["losses"] == pytest.approx(want[name]["losses"], abs=1e-5), name
        for key in ("acc", "acc_norm", "mc_acc", "val"):
            assert got[name][key] == pytest.approx(want[name][key], abs=1e-9), (name, key)
    # a rerun submits nothing; a removed result is submitted again, alone
    assert cli.main(["sweep", str(remote), "--launcher", "slurm"]) == 0
    assert "nothing to submit" in capsys.readouterr().out
    (tmp_path / "slurm" / "runs" / "tiny" / CELLS[1] / "result.json").unlink()
    assert cli.main(["sweep", str(remote), "--launcher", "slurm"]) == 0
    out = capsys.readouterr().out
    assert "submitted job" in out and "1 tasks" in out
    assert cli.main(["sweep", str(remote), "--launcher", "slurm"]) == 0  # queued (or done): not submitted again
    assert "nothing to submit" in capsys.readouterr().out
    wait_for_queue()
    assert results(tmp_path / "slurm")[CELLS[1]] == got[CELLS[1]]
