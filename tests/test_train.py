import json
import random
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo import cli, train
from dpo.config import DataConfig, TrainConfig

WORDS = "the a man woman dog runs jumps sits on roof ball camera smiles then walks into water".split()


def mc_like_pairs(n, seed=0, noise=0.0):
    """Single-token preference pairs with an easy rule: after '... A' prefer ' yes', after '... B' prefer ' no'."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cue = rng.choice("AB")
        good, bad = (" yes", " no") if cue == "A" else (" no", " yes")
        flipped = i < round(noise * n)
        if flipped:
            good, bad = bad, good
        out.append({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + " " + cue,
                    "chosen": good, "rejected": bad, "flipped": flipped, "item": f"s/{i}"})
    return out


def write(path, pairs):
    path.write_text(json.dumps(pairs))
    return str(path)


def configs(tmp_path, model_dir, **kw):
    base = dict(model=str(model_dir), output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                train_data_path=write(tmp_path / "train.json", mc_like_pairs(24)),
                val_data_path=write(tmp_path / "val.json", mc_like_pairs(16, seed=9)),
                per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=0,
                max_steps=3, eval_every=0, save_every=0, gradient_checkpointing=False)
    base.update(kw)
    return DataConfig(seed=1), TrainConfig(**base)


def metrics(run_dir, split="train"):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["split"] == split]


def final_params(run_dir):
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    return torch.cat([p.detach().flatten() for p in model.parameters()])


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
    assert torch.allclose(runs[3], runs[9], atol=1e-5)
    assert not torch.allclose(runs[3], final_params_of_base(tiny_model_dir), atol=1e-6)


def final_params_of_base(model_dir):
    return torch.cat([p.detach().flatten() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters()])


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
    before = final_params_of_base(tiny_model_dir)
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
    assert summary["val"]["rewards/accuracy"] >= 0.9
    assert [c.name for c in sorted((run / "checkpoints").iterdir())] == ["step_000024", "step_000032"]
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    AutoTokenizer.from_pretrained(run / "final")
    assert model.num_parameters() > 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["learning_rate"] == 3e-3 and config["pairs"] == 64 and "git_commit" in config
    assert config["versions"]["torch"] == torch.__version__
    assert list(run.glob("events.out.tfevents.*"))
    steps = metrics(run)
    assert len(steps) == 32 and {"loss", "rewards/accuracy", "grad_norm", "lr", "pairs_per_s",
                                 "tokens_per_s", "peak_memory_mb", "true_accuracy/clean"} <= set(steps[0])
    assert len(metrics(run, "val")) == 8


def test_flipped_pairs_measured_against_true_label(tmp_path, tiny_model_dir):
    noisy = mc_like_pairs(32, noise=0.25)
    d, cfg = configs(tmp_path, tiny_model_dir, train_data_path=write(tmp_path / "n.json", noisy), max_steps=0,
                     epochs=1, per_device_train_batch_size=16, gradient_accumulation_steps=2, learning_rate=0.0)
    train.train(d, cfg)
    (step,) = metrics(tmp_path / "run")
    # at lr 0 the policy equals the reference: every reward is 0, nothing is preferred
    assert step["rewards/accuracy"] == 0 and step["true_accuracy/flipped"] == 1.0


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
    f = [train.lr_factor(s, 2, 10, "cosine") for s in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[2] == pytest.approx(1.0) and f[-1] < 0.05
    assert [train.lr_factor(s, 0, 4, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert train.lr_factor(7, 2, 10, "constant") == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 autocast, fused AdamW)")
def test_cuda_bf16_step_matches_cpu_closely(tmp_path, tiny_model_dir):
    d, gpu = configs(tmp_path, tiny_model_dir, device="cuda", output_dir=str(tmp_path / "gpu"),
                     gradient_checkpointing=None)
    train.train(d, gpu)
    config = json.loads((tmp_path / "gpu" / "config.json").read_text())
    assert config["gradient_checkpointing"] is True and config["device"] == "cuda"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "gpu" / "final").dtype == torch.float32
    d, cpu = configs(tmp_path, tiny_model_dir, device="cpu", output_dir=str(tmp_path / "cpu"))
    train.train(d, cpu)
    assert [m["loss"] for m in metrics(tmp_path / "gpu")] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "cpu")], abs=1e-2)
