import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import SAME_UPDATE, configs, final_params, mc_like_pairs, metrics, update_difference, write
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo import cli
from dpo.core import models
from dpo.core.config import TrainConfig
from dpo.core.files import InputError
from dpo.engine import refcache, reference
from dpo.engine.logprobs import split_by_tokens, tokenize_pairs
from dpo.train import checkpoint, plan, runfolder, train


@pytest.mark.parametrize("multi_token", [False, True])
def test_accumulation_is_exact(tmp_path, tiny_model_dir, multi_token):
    """9 pairs per step as 3 micro-batches of 3 or one of 9; 7 pairs leave a short last micro-batch."""
    pairs = mc_like_pairs(7)
    if multi_token:
        for p in pairs:
            p["chosen"] += " the dog"
    data = write(tmp_path / "p.json", pairs)
    runs = {}
    for micro, accum in ((3, 3), (9, 1)):
        d, cfg = configs(tmp_path, tiny_model_dir, train_data_path=data, val_data_path="", max_steps=1,
                         per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                         output_dir=str(tmp_path / f"run{micro}"), max_grad_norm=0.0)
        train.train(d, cfg)
        runs[micro] = final_params(tmp_path / f"run{micro}")
    start = final_params(tiny_model_dir, "")
    assert update_difference(runs[3], runs[9], start) < SAME_UPDATE
    assert not torch.allclose(runs[3], start, atol=1e-6)


def test_the_update_check_catches_one_pair_weighted_one_percent_wrong(tmp_path, tiny_model_dir, monkeypatch):
    """The tolerance of the update comparisons (update_difference < SAME_UPDATE, which holds across processors
    and summation orders) is tight enough to see a real accumulation bug: one pair of a step weighted 1.01."""
    data = write(tmp_path / "p.json", mc_like_pairs(9))
    kw = dict(train_data_path=data, val_data_path="", max_steps=2, per_device_train_batch_size=3,
              gradient_accumulation_steps=3)
    d, right = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "right"), **kw)
    train.train(d, right)
    real = train.losses.dpo_loss

    def one_pair_off(*args, **kwargs):
        loss = real(*args, **kwargs)
        return torch.cat([loss[:1] * 1.01, loss[1:]])

    monkeypatch.setattr(train.losses, "dpo_loss", one_pair_off)
    _, wrong = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "wrong"), **kw)
    train.train(d, wrong)
    start = final_params(tiny_model_dir, "")
    wrong_by = update_difference(final_params(tmp_path / "wrong"), final_params(tmp_path / "right"), start)
    assert wrong_by > 10 * SAME_UPDATE


def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, monkeypatch):
    d, straight = configs(tmp_path, tiny_model_dir, max_steps=6, output_dir=str(tmp_path / "straight"))
    train.train(d, straight)
    want = [m["loss"] for m in metrics(tmp_path / "straight")]

    # the same run, Ctrl-C during step 3, then --resume
    calls = {"n": 0}
    real_stats = train.pair_stats

    def interrupting_stats(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # step 3's first micro-batch (2 per step)
            signal.raise_signal(signal.SIGINT)
        return real_stats(*args)

    _, cut = configs(tmp_path, tiny_model_dir, max_steps=6, output_dir=str(tmp_path / "cut"))
    monkeypatch.setattr(train, "pair_stats", interrupting_stats)
    result = train.train(d, cut)
    monkeypatch.setattr(train, "pair_stats", real_stats)
    assert result["stopped"] and result["step"] == 3 and not (tmp_path / "cut" / "final").exists()
    assert len(metrics(tmp_path / "cut")) == 3
    with pytest.raises(Exception, match="--resume"):
        train.train(d, cut)
    cut.resume = True
    train.train(d, cut)
    got = [m["loss"] for m in metrics(tmp_path / "cut")]
    assert got == pytest.approx(want, abs=1e-6)
    assert torch.allclose(final_params(tmp_path / "cut"), final_params(tmp_path / "straight"), atol=1e-6)


def test_rng_state_round_trips_exactly_through_a_weights_only_file(tmp_path):
    """Python's and numpy's RNG tuples are stored as tensors and numbers (loadable with weights_only=True) and
    restored exactly: the draws after a restore equal the draws after the save."""
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0, 1), np.random.standard_normal()  # a cached Gaussian in both
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    want = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    checkpoint.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == want


def test_weights_follow_the_umask_like_every_other_output(tmp_path, tiny_model_dir):
    """safetensors writes a temporary file (mode 0600) and renames it: final/ and checkpoints were unreadable to
    the group on a shared filesystem while every other output followed the umask."""
    old = os.umask(0o027)
    try:
        d, cfg = configs(tmp_path, tiny_model_dir, max_steps=2, save_every=1)
        train.train(d, cfg)
    finally:
        os.umask(old)
    run = tmp_path / "run"
    written = [p for p in run.rglob("*") if p.is_file() and p.name != ".lock"]
    assert (run / "final" / "model.safetensors") in written and len(written) > 10
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o640)}
    assert {oct(p.stat().st_mode & 0o777) for p in run.rglob("*") if p.is_dir()} == {oct(0o750)}


def test_sigterm_checkpoints_and_stops_like_ctrl_c(tmp_path, tiny_model_dir, monkeypatch):
    """Slurm's time limit sends SIGTERM: the step finishes, a checkpoint is saved, `dpo train` exits 130."""
    calls = {"n": 0}
    real_stats = train.pair_stats

    def terminating_stats(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # step 2's first micro-batch
            signal.raise_signal(signal.SIGTERM)
        return real_stats(*args)

    d, cfg = configs(tmp_path, tiny_model_dir, max_steps=4)
    monkeypatch.setattr(train, "pair_stats", terminating_stats)
    handler = signal.getsignal(signal.SIGTERM)
    argv = ["train", "--model", cfg.model, "--output-dir", cfg.output_dir, "--cache-dir", cfg.cache_dir,
            "--train-data-path", cfg.train_data_path, "--val-data-path", cfg.val_data_path, "--max-steps", "4",
            "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2", "--eval-every", "0"]
    assert cli.main(argv) == 130
    assert signal.getsignal(signal.SIGTERM) is handler
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "run")] == ["step_000002"]
    assert len(metrics(tmp_path / "run")) == 2 and not (tmp_path / "run" / "final").exists()


def test_save_final_false_writes_no_weights(tmp_path, tiny_model_dir):
    d, cfg = configs(tmp_path, tiny_model_dir, max_steps=2, save_final=False)
    summary = train.train(d, cfg)
    run = tmp_path / "run"
    assert summary["final"] is None and json.loads((run / "summary.json").read_text())["steps"] == 2
    assert not (run / "final").exists() and not checkpoint.checkpoints(run) and len(metrics(run)) == 2
    with pytest.raises(InputError, match="--save-final false"):
        models.run_weights(run)


def test_reference_is_frozen_and_on_the_fly_matches_cache(tmp_path, tiny_model_dir, monkeypatch):
    loaded = []
    real_load = train.models.load_model

    def recording_load(*args, **kw):
        loaded.append(real_load(*args, **kw))
        return loaded[-1]

    monkeypatch.setattr(train.models, "load_model", recording_load)
    d, cfg = configs(tmp_path, tiny_model_dir, ref_on_the_fly=True, output_dir=str(tmp_path / "fly"))
    train.train(d, cfg)
    reference = loaded[1]
    before = final_params(tiny_model_dir, "")
    assert torch.equal(torch.cat([p.flatten() for p in reference.parameters()]), before)
    assert not any(p.requires_grad for p in reference.parameters())
    d, cfg = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "cached"))
    train.train(d, cfg)
    fly, cached = metrics(tmp_path / "fly"), metrics(tmp_path / "cached")
    assert [m["loss"] for m in fly] == pytest.approx([m["loss"] for m in cached], abs=1e-5)


def test_learns_easy_preferences_and_writes_outputs(tmp_path, tiny_model_dir):
    d, cfg = configs(tmp_path, tiny_model_dir, train_data_path=write(tmp_path / "t.json", mc_like_pairs(64)),
                     val_data_path=write(tmp_path / "v.json", mc_like_pairs(64, seed=7)), max_steps=0, epochs=4,
                     per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=3e-3, beta=0.5,
                     eval_every=4, save_every=8, keep_checkpoints=2, gradient_checkpointing=True)
    summary = train.train(d, cfg)
    run = tmp_path / "run"
    assert summary["eval"]["rewards/accuracies"] >= 0.9
    assert [c.name for c in sorted((run / "checkpoints").iterdir())] == ["step_000024", "step_000032"]
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    AutoTokenizer.from_pretrained(run / "final")
    assert model.num_parameters() > 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["learning_rate"] == 3e-3 and config["pairs"] == 64 and "git_commit" in config
    assert config["versions"]["torch"] == torch.__version__
    assert list(run.glob("events.out.tfevents.*"))
    steps = metrics(run)
    assert len(steps) == 32 and {"loss", "rewards/accuracies", "grad_norm", "lr", "pairs_per_s",
                                 "tokens_per_s", "peak_memory_mb", "true_accuracy/clean"} <= set(steps[0])
    assert len(metrics(run, "eval")) == 8


def test_flipped_pairs_measured_against_true_label(tmp_path, tiny_model_dir):
    noisy = mc_like_pairs(32, noise=0.25)
    d, cfg = configs(tmp_path, tiny_model_dir, train_data_path=write(tmp_path / "n.json", noisy), max_steps=0,
                     epochs=1, per_device_train_batch_size=16, gradient_accumulation_steps=2, learning_rate=0.0)
    train.train(d, cfg)
    (step,) = metrics(tmp_path / "run")
    # at lr 0 the policy equals the reference: every margin is a tie, which counts half (chance), on clean and
    # flipped pairs alike, however the float noise between the training and the reference pass falls
    assert step["rewards/ties"] == 1.0
    assert step["rewards/accuracies"] == step["true_accuracy/flipped"] == step["true_accuracy/clean"] == 0.5


def test_the_trainer_passes_each_pairs_response_lengths_to_the_loss(tmp_path, tiny_model_dir, monkeypatch):
    """--loss ipo_avg (TRL's ipo) averages over tokens: the training step and the validation pass give the loss
    each pair's (chosen, rejected) response lengths in tokens, as tokenized, in the order of its log-probs (every
    micro-batch's pairs; the validation pairs in file order)."""
    pairs = mc_like_pairs(8)
    for i, p in enumerate(pairs):
        p["chosen"] += " the dog" * (i % 3)
    val = [(len(ex.chosen), len(ex.rejected))
           for ex in tokenize_pairs(AutoTokenizer.from_pretrained(tiny_model_dir), pairs, 1024)]
    assert len(set(val)) == 3 and any(c != r for c, r in val)  # lengths that differ, so a swap shows
    real_loss, real_collate, seen, batches = train.losses.dpo_loss, train.collate, [], []

    def recording(name, pc, pr, rc, rr, beta, eps, lengths):
        seen.append([(int(a), int(b)) for a, b in zip(*lengths)])
        return real_loss(name, pc, pr, rc, rr, beta, eps, lengths)

    def collating(examples, pad_id):
        batches.append([(len(ex.chosen), len(ex.rejected)) for ex in examples])
        return real_collate(examples, pad_id)

    monkeypatch.setattr(train.losses, "dpo_loss", recording)
    monkeypatch.setattr(train, "collate", collating)
    d, cfg = configs(tmp_path, tiny_model_dir, train_data_path=write(tmp_path / "t.json", pairs),
                     val_data_path=write(tmp_path / "v.json", pairs), loss="ipo_avg", max_steps=2,
                     per_device_train_batch_size=2, gradient_accumulation_steps=2, val_size=0)
    summary = train.train(d, cfg)
    assert [len(s) for s in seen] == [2, 2, 2, 2, 8]  # 2 steps of 2 micro-batches, then the validation pass
    assert seen[:-1] == batches and seen[-1] == val
    assert sorted(p for b in batches for p in b) == sorted(val)  # one epoch: every pair once
    assert summary["eval"]["loss"] > 0


def test_append_eos_is_recorded_and_keys_its_own_reference_cache(tmp_path, tiny_model_dir, monkeypatch):
    """--append-eos: every response trained on ends with EOS, config.json and the checkpoint's settings record it,
    and its reference log-probs go to a cache file of their own (a run without it keeps the key it always had)."""
    d, off = configs(tmp_path, tiny_model_dir, max_steps=1, output_dir=str(tmp_path / "off"))
    train.train(d, off)
    batches, real_collate = [], train.collate
    monkeypatch.setattr(train, "collate", lambda exs, pad: batches.append(exs) or real_collate(exs, pad))
    _, on = configs(tmp_path, tiny_model_dir, max_steps=1, output_dir=str(tmp_path / "on"), append_eos=True)
    train.train(d, on)
    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    assert batches and all(ex.chosen[-1] == ex.rejected[-1] == eos for b in batches for ex in b)
    rec_off, rec_on = (json.loads((tmp_path / r / "config.json").read_text()) for r in ("off", "on"))
    assert rec_off["train"]["append_eos"] is False and rec_on["train"]["append_eos"] is True
    key_off, key_on = (json.loads(Path(r["reference_cache"]).read_text())["key"] for r in (rec_off, rec_on))
    assert "append_eos" not in key_off and key_on == {**key_off, "append_eos": True}
    assert rec_on["reference_pairs_computed"] == rec_off["reference_pairs_computed"] > 0  # none reused
    settings = [json.loads((tmp_path / r / "checkpoints" / "step_000001" / "checkpoint.json").read_text())["settings"]
                for r in ("off", "on")]
    assert [s["defining"]["append_eos"] for s in settings] == [False, True]
    assert metrics(tmp_path / "on")[0]["logps/chosen"] != metrics(tmp_path / "off")[0]["logps/chosen"]


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_mode_keys_its_own_reference_cache_and_a_cut_says_how_trl_differs(tmp_path, tiny_model_dir,
                                                                                     capsys, mode):
    """--truncation-mode: recorded in config.json and the checkpoint's settings, in the reference cache key when not
    the default (keep_end: the key runs always had), and a run that cuts pairs says in its one note how TRL's
    truncation differs (keep_end: TRL's default is keep_start)."""
    from conftest import run_argv

    from dpo.core.truncation import TRUNCATIONS

    (tmp_path / "pairs.json").write_text(json.dumps(mc_like_pairs(16)))
    flags = ["--max-length", "6"] + (["--truncation-mode", mode] if mode != "keep_end" else [])
    assert cli.main(run_argv(tiny_model_dir, tmp_path, *flags)) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "pairs were cut to --max-length 6" in ln]
    assert len(notes) == 1 and notes[0].endswith(f"(--truncation-mode {mode}): {TRUNCATIONS[mode].trl_differs}")
    assert mode != "keep_end" or "--truncation-mode keep_start" in notes[0]  # the alternative, named
    rec = json.loads((tmp_path / "run" / "config.json").read_text())
    key = json.loads(Path(rec["reference_cache"]).read_text())["key"]
    assert rec["train"]["truncation_mode"] == mode and key.get("truncation_mode") == (
        None if mode == "keep_end" else mode)
    step = json.loads((tmp_path / "run" / "checkpoints" / "step_000002" / "checkpoint.json").read_text())
    assert step["settings"]["defining"]["truncation_mode"] == mode


def test_noise_sweep_reuses_reference_cache(tmp_path, tiny_model_dir):
    clean, noisy = mc_like_pairs(24), mc_like_pairs(24, noise=0.5)
    d, cfg = configs(tmp_path, tiny_model_dir, train_data_path=write(tmp_path / "c.json", clean), max_steps=1)
    train.train(d, cfg)
    d, cfg = configs(tmp_path, tiny_model_dir, train_data_path=write(tmp_path / "x.json", noisy), max_steps=1,
                     output_dir=str(tmp_path / "run2"))
    train.train(d, cfg)
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["reference_pairs_computed"] == 0


def test_nan_stops_with_step_named(tmp_path, tiny_model_dir, monkeypatch, capsys):
    real = train.losses.dpo_loss
    calls = {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        out = real(*args, **kw)
        return out * float("nan") if calls["n"] > 4 else out

    monkeypatch.setattr(train.losses, "dpo_loss", poisoned)
    d, cfg = configs(tmp_path, tiny_model_dir, max_steps=4, save_every=1)
    args = ["train", "--model", cfg.model, "--train-data-path", cfg.train_data_path, "--output-dir",
            cfg.output_dir, "--cache-dir", cfg.cache_dir, "--max-steps", "4", "--save-every", "1",
            "--gradient-checkpointing", "false", "--eval-every", "0", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "2"]
    assert cli.main(args) == 3
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 3" in err and "step_000002" in err
    assert (tmp_path / "run" / "checkpoints" / "step_000002").is_dir()


def test_bad_input_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    base = ["train", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "r")]
    assert cli.main(base + ["--train-data-path", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('[{"prompt": "x", "chosen": " a"}]')
    assert cli.main(base + ["--train-data-path", str(tmp_path / "bad.json")]) == 2
    assert "pair 0: field 'rejected'" in capsys.readouterr().err
    good = write(tmp_path / "g.json", mc_like_pairs(4))
    assert cli.main(base + ["--train-data-path", good, "--loss", "rdpo", "--eps", "0.5"]) == 2
    assert "0 <= --eps < 0.5" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_lr_schedule():
    f = [plan.lr_factor(s, 2, 10, "cosine") for s in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[2] == pytest.approx(1.0) and f[-1] < 0.05
    assert [plan.lr_factor(s, 0, 4, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert plan.lr_factor(7, 2, 10, "constant") == 1.0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_defaults_match_cpu_closely(tmp_path, tiny_model_dir):
    """The GPU defaults (bf16 compute copy, compiled, whole step at once, fused AdamW) against fp32 on the CPU."""
    d, gpu = configs(tmp_path, tiny_model_dir, device="cuda", output_dir=str(tmp_path / "gpu"),
                     gradient_checkpointing=None, per_device_train_batch_size=0, gradient_accumulation_steps=0)
    train.train(d, gpu)
    config = json.loads((tmp_path / "gpu" / "config.json").read_text())
    assert config["device"] == "cuda" and config["precision"] == "bf16" and config["compiled"] is True
    assert config["gradient_checkpointing"] is False and config["batching"]["adaptive"] is True
    assert [m["micro_batches"] for m in metrics(tmp_path / "gpu")] == [1, 1, 1]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "gpu" / "final").dtype == torch.float32
    d, cpu = configs(tmp_path, tiny_model_dir, device="cpu", output_dir=str(tmp_path / "cpu"),
                     per_device_train_batch_size=4, gradient_accumulation_steps=4)
    train.train(d, cpu)
    assert [m["loss"] for m in metrics(tmp_path / "gpu")] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "cpu")], abs=1e-2)


@cuda
def test_cuda_seed_setting_gives_the_default_update(tmp_path, tiny_model_dir):
    """4 x 4 with checkpointing (the seed's setting) and the GPU default take the same steps (bf16 tolerance)."""
    runs = {}
    for name, kw in (("default", dict(per_device_train_batch_size=0, gradient_accumulation_steps=0)),
                     ("seed", dict(per_device_train_batch_size=4, gradient_accumulation_steps=4,
                                   gradient_checkpointing=True))):
        d, cfg = configs(tmp_path, tiny_model_dir, device="cuda", output_dir=str(tmp_path / name), **kw)
        train.train(d, cfg)
        runs[name] = [m["loss"] for m in metrics(tmp_path / name)]
    assert runs["seed"] == pytest.approx(runs["default"], abs=2e-2)


# ------------------------------------------------------------------------------------ batching and precision

def test_token_budget_and_adaptive_split_give_the_same_update(tmp_path, tiny_model_dir, monkeypatch):
    """One step of 9 pairs: 3 x 3, a token budget (uneven micro-batches), and an out-of-memory retry in halves."""
    pairs = mc_like_pairs(9)
    for p in pairs[::2]:
        p["chosen"] += " the dog runs"  # mixed lengths and layouts
    data = write(tmp_path / "p.json", pairs)

    def one_step(name, **kw):
        d, cfg = configs(tmp_path, tiny_model_dir, train_data_path=data, val_data_path="", max_steps=1,
                         output_dir=str(tmp_path / name), max_grad_norm=0.0, **kw)
        train.train(d, cfg)
        return final_params(tmp_path / name), metrics(tmp_path / name)[0]

    fixed, m_fixed = one_step("fixed", per_device_train_batch_size=3, gradient_accumulation_steps=3)
    budget, m_budget = one_step("budget", per_device_train_batch_size=9, gradient_accumulation_steps=1,
                                micro_batch_tokens=40)
    assert m_fixed["micro_batches"] == 3 and m_budget["micro_batches"] >= 3
    start = final_params(tiny_model_dir, "")
    assert update_difference(budget, fixed, start) < SAME_UPDATE

    real, failures = train.accumulate, []

    def oom_when_large(run, micro_batches, *args):
        run.batching.adaptive = True
        if max(len(mb) for mb in micro_batches) > 4:
            failures.append(len(micro_batches))
            raise torch.OutOfMemoryError("simulated")
        return real(run, micro_batches, *args)

    monkeypatch.setattr(train, "accumulate", oom_when_large)
    adaptive, m_adaptive = one_step("adaptive", per_device_train_batch_size=9, gradient_accumulation_steps=1)
    assert failures and m_adaptive["micro_batches"] > 1
    assert update_difference(adaptive, fixed, start) < SAME_UPDATE


def test_batching_defaults():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = TrainConfig()
    assert plan.resolve_batching(auto, cpu) == plan.Batching(16, 4)
    assert plan.resolve_batching(auto, cuda) == plan.Batching(16, 16, adaptive=True)
    seed = TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=4)
    assert plan.resolve_batching(seed, cuda) == plan.Batching(16, 4)
    assert plan.resolve_batching(TrainConfig(per_device_train_batch_size=32), cuda) == plan.Batching(32, 32)
    assert split_by_tokens([0, 1, 2, 3], [2, 3, 5, 9], 10) == [[0, 1], [2], [3]]


def val_margins(run_dir) -> list:
    return json.loads((run_dir / "val_margins.json").read_text())["margins"]


def test_bf16_master_weights_on_cpu(tmp_path, tiny_model_dir):
    d, fp32 = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "fp32"), precision="fp32")
    train.train(d, fp32)
    d, bf16 = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "bf16"), precision="bf16")
    train.train(d, bf16)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["precision"] == "bf16" and config["precision_choice"]["reason"] == "asked for"
    assert config["reference_precision"] == config["validation_precision"] == "fp32"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "final").dtype == torch.float32
    got, want = final_params(tmp_path / "bf16"), final_params(tmp_path / "fp32")
    # the same updates, up to bf16 rounding (Adam amplifies tiny gradients)
    assert update_difference(got, want, final_params(tiny_model_dir, "")) < 0.25
    assert [m["loss"] for m in metrics(tmp_path / "bf16")] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "fp32")], abs=2e-2)
    # validated in fp32 with the master weights: the margins differ by what bf16 training changed in the weights
    # (at most 2e-4 per pair on AVX2, against margins up to 0.08; 5e-3 leaves room for other processors' bf16
    # kernels), not by bf16 rounding of the log-probs
    assert val_margins(tmp_path / "bf16") == pytest.approx(val_margins(tmp_path / "fp32"), abs=5e-3)


def test_bf16_runs_score_reference_and_validation_in_fp32(tmp_path, tiny_model_dir):
    """What the studies compare is fp32 in a bf16 run: it writes and reads the fp32 run's reference cache entries,
    and at learning rate 0 (the policy stays the reference) its validation margins are the fp32 run's, all 0."""
    kw = dict(learning_rate=0.0, max_steps=1)
    runs = {}
    for first, second in (("fp32", "bf16"), ("bf16", "fp32")):
        cache = str(tmp_path / f"cache-{first}-first")
        for precision in (first, second):
            out = tmp_path / f"{first}-first-{precision}"
            d, cfg = configs(tmp_path, tiny_model_dir, output_dir=str(out), cache_dir=cache, precision=precision,
                             **kw)
            train.train(d, cfg)
            runs[first, precision] = json.loads((out / "config.json").read_text())
            assert val_margins(out) == [0.0] * 16  # exactly: the fp32 master weights against themselves
            assert metrics(out, "eval")[0]["rewards/ties"] == 1.0
        assert runs[first, first]["reference_cache"] == runs[first, second]["reference_cache"]
        assert runs[first, first]["reference_pairs_computed"] == 8  # the pairs of its one step
        assert runs[first, second]["reference_pairs_computed"] == 0  # found every entry the other run wrote
    entries = [json.loads(open(runs[first, first]["reference_cache"]).read())["entries"] for first in ("fp32", "bf16")]
    assert entries[0] == entries[1]  # a bf16 run writes the very entries an fp32 run writes


def test_bf16_with_the_reference_on_the_fly_runs_it_in_fp32(tmp_path, tiny_model_dir):
    d, fp32 = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "fp32"), precision="fp32",
                      learning_rate=0.0, max_steps=1)
    train.train(d, fp32)
    d, bf16 = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "bf16"), precision="bf16",
                      learning_rate=0.0, max_steps=1, ref_on_the_fly=True, cache_dir=str(tmp_path / "other"))
    train.train(d, bf16)
    assert val_margins(tmp_path / "bf16") == [0.0] * 16


def test_compiled_training_matches_eager(tmp_path, tiny_model_dir):
    d, eager = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "eager"), max_steps=2, compile=False)
    train.train(d, eager)
    d, compiled = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "compiled"), max_steps=2,
                          compile=True, gradient_checkpointing=True)  # compiled blocks inside checkpointing
    train.train(d, compiled)
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compiled"] is True
    assert [m["loss"] for m in metrics(tmp_path / "compiled")] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "eager")], abs=1e-5)
    start = final_params(tiny_model_dir, "")
    assert update_difference(final_params(tmp_path / "compiled"), final_params(tmp_path / "eager"), start) < SAME_UPDATE


def test_reference_pass_covers_only_the_pairs_used(tmp_path, tiny_model_dir):
    d, cfg = configs(tmp_path, tiny_model_dir, max_steps=1, val_data_path="")  # 24 pairs, one step of 8
    train.train(d, cfg)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["reference_pairs_computed"] == 8


# ----------------------------------------------------------------------------------- run folders and caches

def test_second_train_on_a_run_folder_fails_at_once(tmp_path, tiny_model_dir, capsys):
    d, cfg = configs(tmp_path, tiny_model_dir)
    (tmp_path / "run").mkdir()
    holder = runfolder.lock_run_dir(tmp_path / "run")  # another `dpo train` holds the folder
    with pytest.raises(train.InputError, match="in use by another `dpo train`"):
        train.train(d, cfg)
    holder.close()
    train.train(d, cfg)
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1


def test_failed_start_leaves_no_run_folder(tmp_path, tiny_model_dir, capsys):
    args = ["train", "--model", str(tmp_path / "no-such-model"), "--train-data-path",
            write(tmp_path / "t.json", mc_like_pairs(4)), "--output-dir", str(tmp_path / "r")]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.count("error:") == 1
    assert not (tmp_path / "r").exists()


def cache_file(tmp_path):
    (path,) = (tmp_path / "cache" / "ref").glob("*.json")
    return path


@pytest.mark.parametrize("damage", ["edit", "truncate", "empty", "binary", "shape", "checksum-kept"])
def test_damaged_reference_cache_is_recomputed(tmp_path, tiny_model_dir, capsys, damage):
    d, cfg = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "clean"))
    train.train(d, cfg)
    want = [m["loss"] for m in metrics(tmp_path / "clean")]
    path = cache_file(tmp_path)
    data = json.loads(path.read_text())
    if damage == "edit":  # numbers changed, checksum left as it was
        data["entries"] = {k: [v[0] - 3.0, v[1]] for k, v in data["entries"].items()}
        path.write_text(json.dumps(data))
    elif damage == "checksum-kept":  # numbers changed and the checksum recomputed: the spot check catches it
        data["entries"] = {k: [v[0] - 3.0, v[1]] for k, v in data["entries"].items()}
        data["sha256"] = refcache.entries_sha256(data["entries"])
        path.write_text(json.dumps(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        data["entries"] = {k: v[:1] for k, v in data["entries"].items()}
        path.write_text(json.dumps(data))
    capsys.readouterr()
    d, cfg = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "again"))
    train.train(d, cfg)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and str(path) in err and "Traceback" not in err
    assert [m["loss"] for m in metrics(tmp_path / "again")] == pytest.approx(want, abs=1e-6)
    assert refcache.load(path, json.loads(path.read_text())["key"])  # repaired on disk


def poison(data: dict, how: str) -> None:
    """Change cache entries as someone who can write the cache folder would: the key kept, the sha256 recomputed."""
    entries = data["entries"]
    spared = sorted(entries)[:2]  # the two pairs an earlier version always spot-checked
    if how == "spare-the-two-smallest-keys":  # every other entry shifted by +-20 (issue 30)
        for i, k in enumerate(sorted(entries)):
            if k not in spared:
                entries[k] = [v + (20.0 if i % 2 else -20.0) for v in entries[k]]
    elif how == "one-entry":
        k = sorted(entries)[len(entries) // 2]
        entries[k] = [entries[k][0] - 5.0, entries[k][1]]
    else:  # swapped responses: every entry other than the spared ones says the other response is likelier
        for k in entries:
            if k not in spared:
                entries[k] = entries[k][::-1]
    data["sha256"] = refcache.entries_sha256(entries)


@pytest.mark.parametrize("how", ["spare-the-two-smallest-keys", "one-entry", "swapped-responses"])
def test_a_poisoned_cache_with_a_recomputed_checksum_is_caught_and_recomputed(tmp_path, tiny_model_dir, capsys, how):
    """A run reads 24 + 16 cached pairs, fewer than SPOT_CHECKS: every one is recomputed, any edit is caught."""
    d, cfg = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "clean"))
    train.train(d, cfg)
    want = [m["loss"] for m in metrics(tmp_path / "clean")]
    path = cache_file(tmp_path)
    data = json.loads(path.read_text())
    poison(data, how)
    path.write_text(json.dumps(data))
    capsys.readouterr()
    d, cfg = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "again"))
    train.train(d, cfg)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "spot-checked" in err and str(path) in err, err
    assert [m["loss"] for m in metrics(tmp_path / "again")] == pytest.approx(want, abs=1e-6)


class Example(NamedTuple):
    index: int
    length: int


def fake_cache(tmp_path, n: int):
    """(pairs, examples, compute, path, key) of n pairs whose true log-probs are known, no model; compute records
    which pairs it was asked for."""
    pairs = [{"prompt": f"prompt {i}", "chosen": "a", "rejected": "b"} for i in range(n)]
    examples = [Example(i, 1) for i in range(n)]
    asked = []

    def compute(exs):
        asked.append([e.index for e in exs])
        return (torch.tensor([-1.0 - e.index / n for e in exs]), torch.tensor([-2.0 - e.index / n for e in exs]))

    key = {"model": "fake", "precision": "fp32"}
    return pairs, examples, compute, asked, tmp_path / "ref" / "fake.json", key


def run_cache(cache, n: int):
    pairs, examples, compute, asked, path, key = cache
    return refcache.reference_logprobs(compute, pairs, examples, range(n), path, key, "test")


def test_each_run_spot_checks_pairs_drawn_afresh_not_the_smallest_keys(tmp_path):
    n = 1000
    cache = fake_cache(tmp_path, n)
    run_cache(cache, n)  # fills the cache
    pairs, asked = cache[0], cache[3]
    asked.clear()
    run_cache(cache, n)
    run_cache(cache, n)
    first, second = (set(a) for a in asked)
    assert len(first) == len(second) == refcache.SPOT_CHECKS
    assert first != second  # equal with probability 1 / C(1000, 59)
    smallest = set(sorted(range(n), key=lambda i: refcache.pair_key(pairs[i]))[:refcache.SPOT_CHECKS])
    assert first != smallest and second != smallest


def test_the_spot_check_catches_a_cache_with_five_percent_changed_at_the_stated_rate(tmp_path, monkeypatch, capsys):
    """SPOT_CHECKS = 59: with 5% of the entries a run reads changed, every draw misses them all with probability
    at most 0.95 ** 59 = 0.048 (exactly C(950, 59) / C(1000, 59) = 0.044 here); measured over 300 seeded runs."""
    n, changed = 1000, 50
    k = refcache.SPOT_CHECKS
    assert (1 - refcache.SPOT_SHARE) ** k <= 1 - refcache.SPOT_POWER and k == 59
    assert math.comb(n - changed, k) / math.comb(n, k) <= 1 - refcache.SPOT_POWER
    monkeypatch.setattr(refcache, "_draw", random.Random(7))  # seeded here only, so the count is reproducible
    cache = fake_cache(tmp_path, n)
    run_cache(cache, n)
    path = cache[4]
    clean = json.loads(path.read_text())
    victims = random.Random(8).sample(sorted(clean["entries"]), changed)
    data = json.loads(path.read_text())
    for v in victims:
        data["entries"][v] = [x + 20.0 for x in data["entries"][v]]
    data["sha256"] = refcache.entries_sha256(data["entries"])
    poisoned = json.dumps(data)
    caught = 0
    for _ in range(300):
        path.write_text(poisoned)
        result = run_cache(cache, n)
        caught += result.computed == n  # caught: every entry recomputed
        assert torch.equal(result.logps.chosen, torch.tensor([-1.0 - i / n for i in range(n)])) or result.computed == 0
    capsys.readouterr()
    assert caught >= 0.93 * 300


def test_interrupted_reference_pass_keeps_its_progress(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(refcache, "CHUNK_PAIRS", 4)
    real, calls = reference.logprobs_in_batches, {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(reference, "logprobs_in_batches", interrupted)
    d, cfg = configs(tmp_path, tiny_model_dir, max_steps=3, val_data_path="")  # 24 pairs
    with pytest.raises(KeyboardInterrupt):
        train.train(d, cfg)
    assert len(json.loads(cache_file(tmp_path).read_text())["entries"]) == 8
    monkeypatch.setattr(reference, "logprobs_in_batches", real)
    train.train(d, cfg)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["reference_pairs_computed"] == 16


def test_config_validation_is_one_error_line(tmp_path, tiny_model_dir, capsys):
    good = write(tmp_path / "g.json", mc_like_pairs(4))
    base = ["train", "--model", str(tiny_model_dir), "--train-data-path", good, "--output-dir", str(tmp_path / "r")]
    for flags, message in ((["--beta", "0"], "--beta"), (["--learning-rate", "nan"], "--learning-rate"),
                           (["--noise", "1.5"], "--noise"), (["--loss", "cdpo", "--eps", "0.7"], "cdpo"),
                           (["--keep-checkpoints", "0"], "--keep-checkpoints")):
        assert cli.main(base + flags) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and message in err
    assert not (tmp_path / "r").exists()


def test_a_model_that_cannot_load_stops_before_any_data_is_made(tmp_path, hellaswag_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--model", str(tmp_path / "no-such-model"), "--hellaswag-dir", str(hellaswag_dir),
                     "--n", "20", "--eval-size", "50"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "made " not in err and not (tmp_path / "data").exists()


def test_config_records_the_checkout_commit_not_an_enclosing_repositorys(tmp_path):
    """An installed copy of the package inside some other git repository records "unknown", not that commit."""
    site = tmp_path / "other-repo" / "site-packages"
    shutil.copytree(Path(train.__file__).parents[1], site / "dpo", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q", str(tmp_path / "other-repo")], check=True)
    out = subprocess.run([sys.executable, "-c", "from dpo.train.runfolder import git_commit; print(git_commit())"],
                         cwd=site, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "unknown"
    if (Path(train.__file__).parents[2] / ".git").exists():
        assert len(runfolder.git_commit()) == 40  # this checkout's


def test_the_validation_pass_has_a_progress_bar_and_no_nan_is_shown_before_it(tmp_path, tiny_model_dir, capsys):
    from conftest import run_argv

    (tmp_path / "pairs.json").write_text(json.dumps(mc_like_pairs(16)))
    (tmp_path / "val.json").write_text(json.dumps(mc_like_pairs(12, seed=5)))
    argv = run_argv(tiny_model_dir, tmp_path, "--eval-every", "2", "--val-data-path", str(tmp_path / "val.json"),
                    "--run-name", "bar")
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "bar: validation" in err and "/12 [" in err, err  # the validation pairs counted
    assert "val_acc=nan" not in err and "val_acc=" in err  # shown once there is one


@pytest.mark.parametrize("loss, noted", [("ipo", True), ("ipo_avg", False), ("sigmoid", False)])
def test_a_loss_name_that_means_another_loss_in_trl_says_so_once(tmp_path, tiny_model_dir, capsys, loss, noted):
    from conftest import run_argv

    (tmp_path / "pairs.json").write_text(json.dumps(mc_like_pairs(16)))
    assert cli.main(run_argv(tiny_model_dir, tmp_path, "--loss", loss)) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note: --loss")]
    assert notes == (["note: --loss ipo: TRL's loss_type=\"ipo\" averages each response's log-probs over its tokens; "
                      "that loss is --loss ipo_avg here (this one sums them)"] if noted else [])
