"""Several training processes (torchrun, gloo on the CPU) give the single-process run's update."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import SAME_UPDATE, configs, final_params, mc_like_pairs, metrics, update_difference, write

from dpo.train import checkpoint, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def torchrun(nproc: int, cfg, extra=()) -> subprocess.Popen:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "dpo",
            "train", "--model", cfg.model, "--train-data-path", cfg.train_data_path, "--val-data-path",
            cfg.val_data_path, "--output-dir", cfg.output_dir, "--cache-dir", cfg.cache_dir, "--max-steps",
            str(cfg.max_steps), "--per-device-train-batch-size", str(cfg.per_device_train_batch_size),
            "--gradient-accumulation-steps", str(cfg.gradient_accumulation_steps), "--learning-rate",
            str(cfg.learning_rate), "--warmup-steps", "0", "--eval-every", "0", "--save-every", str(cfg.save_every),
            "--gradient-checkpointing", "false", "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_two_processes_give_the_single_process_update(tmp_path, tiny_model_dir):
    pairs = mc_like_pairs(21)
    for p in pairs[::3]:
        p["chosen"] += " the dog"  # completion-like pairs too
    data = write(tmp_path / "p.json", pairs)
    # 9 pairs per step as 3 x 3: two ranks take 5 and 4 of them; the third step of a 21-pair epoch has 3 pairs
    kw = dict(train_data_path=data, max_steps=4, per_device_train_batch_size=3, gradient_accumulation_steps=3)
    d, single = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), **kw)
    train.train(d, single)
    _, double = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"),
                        cache_dir=str(tmp_path / "cache2"), **kw)
    finish(torchrun(2, double))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm", "tokens"):
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], rel=1e-5, abs=1e-6), key
    start = final_params(tiny_model_dir, "")
    assert update_difference(final_params(tmp_path / "two"), final_params(tmp_path / "one"), start) < SAME_UPDATE
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["processes"] == 2 and len(metrics(tmp_path / "two", "eval")) == 1


def test_killed_rank_leaves_a_checkpoint_to_resume(tmp_path, tiny_model_dir, monkeypatch):
    kw = dict(train_data_path=write(tmp_path / "p.json", mc_like_pairs(16)), max_steps=400, save_every=2,
              per_device_train_batch_size=2, gradient_accumulation_steps=2, val_data_path="")
    _, cfg = configs(tmp_path, tiny_model_dir, **kw)
    proc = torchrun(2, cfg)
    deadline = time.monotonic() + 120
    while not checkpoint.checkpoints(tmp_path / "run") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers and checkpoint.checkpoints(tmp_path / "run"), "no checkpoint appeared"
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; torchrun takes the other down
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    last = checkpoint.checkpoints(tmp_path / "run")[-1]
    assert (last / "trainer_state.pt").is_file() and not list(last.parent.glob("*.tmp"))
    step = int(last.name.split("_")[1])
    # resume with another number of processes (one), for a few more steps (then Ctrl-C: the same run, stopped)
    real_step = train.train_step

    def stop_after_three(run, i):
        if i == step + 2:
            signal.raise_signal(signal.SIGINT)
        return real_step(run, i)

    monkeypatch.setattr(train, "train_step", stop_after_three)
    d, resumed = configs(tmp_path, tiny_model_dir, **kw, resume=True)
    assert train.train(d, resumed)["stopped"]
    assert [m["step"] for m in metrics(tmp_path / "run")][-3:] == [step + 1, step + 2, step + 3]


def test_two_processes_train_lora_adapters_like_one(tmp_path, tiny_model_dir):
    """DistributedDataParallel over a model whose base weights are frozen (requires_grad False): only the adapters
    are all-reduced, and two processes give the single process's update."""
    kw = dict(train_data_path=write(tmp_path / "p.json", mc_like_pairs(16)), max_steps=2,
              per_device_train_batch_size=2, gradient_accumulation_steps=2, val_data_path="", lora_r=4)
    d, single = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), **kw)
    train.train(d, single)
    _, double = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"), **kw)
    finish(torchrun(2, double, ["--lora-r", "4"]))
    for key in ("loss", "rewards/margins", "grad_norm"):
        assert [m[key] for m in metrics(tmp_path / "two")] == pytest.approx(
            [m[key] for m in metrics(tmp_path / "one")], rel=1e-5, abs=1e-6), key
    start = final_params(tiny_model_dir, "")
    assert update_difference(final_params(tmp_path / "two"), final_params(tmp_path / "one"), start) < SAME_UPDATE
    assert json.loads((tmp_path / "two" / "config.json").read_text())["lora"]["r"] == 4
