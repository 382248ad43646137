import json
import os
import random
from pathlib import Path

import pytest

# A local copy of HellaSwag (the validation split, and the original project's files under seed/), named only by
# DPO_HELLASWAG_DIR; taken out of the environment so that every test decides its own data
SHARED = Path(os.environ.pop("DPO_HELLASWAG_DIR", "") or "/nonexistent").resolve()
WORDS = "the a man woman dog runs jumps sits on roof ball camera smiles then walks into water".split()


def synthetic_items(n, seed=0, start=0, wikihow_every=0):
    """HellaSwag-format items with random words; every `wikihow_every`-th has WikiHow bracket tags."""
    rng = random.Random(seed)

    def sentence(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    items = []
    for i in range(start, start + n):
        ctx_a, ctx_b = sentence(8).capitalize() + ".", sentence(2)
        if wikihow_every and i % wikihow_every == 0:
            ctx_a = "[header] How to " + sentence(3) + " [title] " + sentence(4) + " [step] " + sentence(3)
        items.append({"ind": i, "activity_label": sentence(2).title(), "ctx_a": ctx_a, "ctx_b": ctx_b,
                      "ctx": ctx_a + " " + ctx_b, "endings": [sentence(6) + "." for _ in range(4)],
                      "label": rng.randrange(4), "split": "val", "split_type": rng.choice(["indomain", "zeroshot"])})
    return items


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session", autouse=True)
def unexpected_errors_raise():
    """dpo's last net (dpo/cli.py `main`) turns an unexpected exception into one `error:` line: in the tests, and in
    the processes they start, it raises instead (DPO_DEBUG=1), so a test that provokes a traceback fails on it."""
    before = os.environ.get("DPO_DEBUG")
    os.environ["DPO_DEBUG"] = "1"
    yield
    if before is None:
        del os.environ["DPO_DEBUG"]
    else:
        os.environ["DPO_DEBUG"] = before


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and spinning threads crawl on a machine shared with other jobs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def cpu_auto_is_fp32(monkeypatch):
    """`--precision auto` on the CPU is fp32 in every test, in this process and in the processes it starts,
    whatever this processor's bf16 speed (tests/test_precision.py checks the choice itself, with the probe mocked)."""
    monkeypatch.setenv("DPO_CPU_PRECISION", "fp32")


@pytest.fixture
def hellaswag_dir(tmp_path):
    """A folder shaped like HellaSwag's data/: 300 train items, 200 val items."""
    d = tmp_path / "hellaswag"
    d.mkdir()
    write_jsonl(d / "hellaswag_train.jsonl", synthetic_items(300, seed=1))
    write_jsonl(d / "hellaswag_val.jsonl", synthetic_items(200, seed=2))
    return d


@pytest.fixture
def shared_hellaswag():
    if not SHARED.is_dir():
        pytest.skip("no local HellaSwag copy: set DPO_HELLASWAG_DIR to a folder with hellaswag_val.jsonl and the "
                    "original project's seed/ files to run this test")
    return SHARED


def train_tokenizer(texts, vocab_size=400):
    """A byte-level BPE tokenizer trained here (no download), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_model(kind, vocab_size, seed=0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                                          bos_token_id=0, eos_token_id=0))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0))


def tokenizer_texts():
    from dpo.data import pairs
    from dpo.data.hellaswag import parse_item

    items = [parse_item(obj, "x", "synthetic", i) for i, obj in enumerate(synthetic_items(60, seed=5))]
    texts = [pairs.mc_prompt(it, items[:1]) + f" {it.label}" for it in items]
    return texts + [" yes no A B" * 20] * 5


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(tokenizer_texts())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A folder with a tiny randomly initialised GPT-2 and the tokenizer trained above."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_model("gpt2", len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


# ---- training runs (tests/test_train.py, tests/test_distributed.py)

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
    """(DataConfig, TrainConfig) of a short training run on mc-like pairs, written into tmp_path."""
    from dpo.core.config import DataConfig, TrainConfig

    base = dict(model=str(model_dir), output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                train_data_path=write(tmp_path / "train.json", mc_like_pairs(24)),
                val_data_path=write(tmp_path / "val.json", mc_like_pairs(16, seed=9)),
                per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=0,
                max_steps=3, eval_every=0, save_every=0, keep_checkpoints=2, gradient_checkpointing=False)
    base.update(kw)
    return DataConfig(seed=1), TrainConfig(**base)


def metrics(run_dir, split="train"):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["split"] == split]


def earlier_names(row: dict) -> dict:
    """A metrics.jsonl line, or a training summary, as versions before TRL's metric names wrote it
    (dpo.core.metrics.RENAMED backwards: rewards/accuracies -> rewards/accuracy, split and summary key eval -> val)."""
    from dpo.core.metrics import RENAMED

    back = {now: earlier for earlier, now in RENAMED.items()}
    out = {back.get(k, k): earlier_names(v) if isinstance(v, dict) else v for k, v in row.items()}
    if "split" in out:
        out["split"] = back.get(out["split"], out["split"])
    return out


def with_earlier_names(run_dir) -> None:
    """Rewrite a run's metrics.jsonl, summary.json and result.json's train_summary under the earlier names."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(earlier_names(json.loads(ln))) + "\n" for ln in lines))
    if (run_dir / "summary.json").is_file():
        summary = earlier_names(json.loads((run_dir / "summary.json").read_text()))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if (run_dir / "result.json").is_file():
        result = json.loads((run_dir / "result.json").read_text())
        result["train_summary"] = earlier_names(result["train_summary"])
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))


def final_params(run_dir, sub="final"):
    """All weights of run_dir/final (or of the model folder run_dir itself, sub=""), flattened."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / sub)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# update_difference below this: the same update up to rounding. Measured on AVX2: 3e-6 (two processes vs one,
# token-budget splits), ~1e-4 (one Adam step, whose first update is ~lr * sign(g), so a gradient that is zero up to
# rounding can flip a weight's step); one pair of a step weighted 1% wrong: 3e-2.
SAME_UPDATE = 1e-3


def update_difference(got, want, start) -> float:
    """How far two trainings from the same start end apart, relative to how far training moved the weights:
    ||got - want|| / ||want - start|| (2-norms over all weights, in float64).

    Comparing weights with a fixed absolute tolerance is not a property of the code: one process and an all-reduce,
    or two micro-batch splits, add the same gradients in another order, and processors with other vector widths
    (AVX2, AVX-512) round differently, so single weights differ by ~1e-6 after a few Adam steps. Relative to the
    size of the update, rounding stays below SAME_UPDATE; a real bug (one pair weighted 1% wrong) is far above it."""
    got, want, start = (t.double() for t in (got, want, start))
    return ((got - want).norm() / (want - start).norm()).item()


# ---- run folders given back to `dpo train --resume` (tests/test_security.py, tests/test_fuzz_inputs.py)

def run_argv(model_dir, folder, *extra):
    """`dpo train` of 2 steps with a checkpoint after each, into folder/run (pairs: folder/pairs.json)."""
    return ["train", "--model", str(model_dir), "--train-data-path", str(folder / "pairs.json"), "--val-data-path", "",
            "--output-dir", str(folder / "run"), "--cache-dir", str(folder / "cache"), "--max-steps", "2",
            "--save-every", "1", "--eval-every", "0", "--per-device-train-batch-size", "4",
            "--gradient-accumulation-steps", "1", "--keep-checkpoints", "2", "--device", "cpu", *extra]


def finished_run(folder, model_dir):
    """folder/run: a finished 2-step run of model_dir (checkpoints step_000001, step_000002 and final/)."""
    from dpo import cli

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.json").write_text(json.dumps(mc_like_pairs(16)))
    assert cli.main(run_argv(model_dir, folder)) == 0
    return folder


def stopped_copy(folder, dest):
    """A copy of finished_run's folder as it was when stopped after step 1: what `--resume` continues."""
    import shutil

    shutil.copytree(folder, dest)
    run = dest / "run"
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_000002")
    (run / "summary.json").unlink()
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    return dest
