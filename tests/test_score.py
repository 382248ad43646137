import json
import math
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_items, write_jsonl

from dpo import cli
from dpo.core import metrics, stats
from dpo.core.config import DataConfig, EvalConfig
from dpo.core.files import InputError
from dpo.data import pairs
from dpo.data.hellaswag import Item, harness_endings, harness_query, parse_item
from dpo.engine.logprobs import Request, block_causal_mask, collate_packed, gather_logprobs, hidden_states, pack
from dpo.eval import score

UNICODE = ["Café crème brûlée, naïve façade", "Ünïcödé ✓ — “quotes”", "日本語 テキスト"]


def train_tokenizer(vocab_size=400, texts=()):
    """A byte-level BPE (GPT-2 style) trained on synthetic HellaSwag text, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def corpus(items):
    out = [" 0 1 2 3"] * 50 + UNICODE
    for it in items:
        out += [pairs.mc_block(it, it.label), harness_query(it)] + [" " + e for e in harness_endings(it)]
    return out


def as_items(rows, role="val"):
    return [parse_item(r, role, "test", i + 1) for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def items():
    return as_items(synthetic_items(40, seed=3, wikihow_every=5))


@pytest.fixture(scope="module")
def tokenizer(items):
    return train_tokenizer(texts=corpus(items))


def tiny_model(arch, vocab_size, attn="sdpa", seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=32, n_layer=2, n_head=4,
                            bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    model.config._attn_implementation = attn
    return model.eval()


def max_diff(fast, slow):
    return max(abs(f - s) for fr, sr in zip(fast, slow) for f, s in zip(fr, sr))


# --- packing -----------------------------------------------------------------------------------------------

def test_pack_layout_and_mask_against_hand_made():
    packed = pack(Request([10, 11, 12], [[20, 21, 22], [30], [40, 41]]))
    assert packed.tokens == [10, 11, 12, 20, 21, 40]
    assert packed.positions == [0, 1, 2, 3, 4, 3]
    assert packed.segments == [0, 0, 0, 1, 1, 3]
    # (col, target): every continuation's first token is scored at the prefix's last position (2)
    assert list(zip(packed.cols, packed.targets, packed.owner)) == [
        (2, 20, 0), (3, 21, 0), (4, 22, 0), (2, 30, 1), (2, 40, 2), (5, 41, 2)]
    segments = torch.tensor([packed.segments + [-1]])
    allowed = block_causal_mask(segments)[0, 0] == 0
    expected = [[1, 0, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 1, 0, 0],
                [1, 1, 1, 0, 0, 1, 0],
                [1, 1, 1, 0, 0, 0, 1]]  # padding sees the prefix and itself
    assert allowed.int().tolist() == expected


def test_pack_computes_the_common_leading_tokens_once():
    """Continuations that start alike (SmolLM2's mc answers " " + digit): the common tokens join the prefix and
    count for each continuation; a continuation's last token is never an input."""
    packed = pack(Request([10, 11], [[5, 6, 7], [5, 6, 8], [5, 9]]))
    assert packed.tokens == [10, 11, 5, 6, 6] and packed.positions == [0, 1, 2, 3, 3]
    assert packed.segments == [0, 0, 0, 1, 2]
    assert list(zip(packed.cols, packed.targets, packed.owner)) == [
        (1, 5, 0), (2, 6, 0), (3, 7, 0), (1, 5, 1), (2, 6, 1), (4, 8, 1), (1, 5, 2), (2, 9, 2)]
    one_token = [pack(Request([1, 2, 3], [[7], [8], [9], [10]])),
                 pack(Request([4], [[7], [8]]))]
    batch = collate_packed(one_token)
    assert not batch["block"] and batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]  # GPT-2's mc rows: causal
    assert collate_packed(one_token + [packed])["block"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fast_path_with_common_leading_tokens_equals_naive(arch):
    model = tiny_model(arch, 64)
    requests = [Request([3, 4, 5], [[7, 8], [7, 9], [7, 10], [7, 11]]),  # " " + digit
                Request([6], [[7, 8, 9], [7, 8], [7, 8, 9, 12], [13]]),  # one is a prefix of another
                Request([3, 4], [[20], [21], [22], [23]]),  # one-token answers
                Request([1, 2, 3, 4, 5, 6], [[7, 8, 9, 10], [7, 8, 11, 12]])]
    fast = score.score(model, requests, batch_size=2)
    assert max_diff(fast, [score.naive_logliks(model, r) for r in requests]) < 1e-5
    fast = score.score(model, requests[2:3] + requests[2:3], batch_size=2)  # a batch without the block mask
    assert max_diff(fast, [score.naive_logliks(model, requests[2])] * 2) < 1e-5


def test_fit_cuts_like_the_harness():
    request = Request(list(range(10)), [[100, 101], [200, 201, 202, 203]])
    assert score.fit(request, 16) == [([0, 1], request)]
    # max_length 8: the harness feeds (prefix + cont)[-9:][:-1]; the prefix keeps 9 - len(cont) tokens
    assert score.fit(request, 8) == [([0], Request(list(range(3, 10)), [[100, 101]])),
                                     ([1], Request(list(range(5, 10)), [[200, 201, 202, 203]]))]
    with pytest.raises(InputError, match="does not fit"):
        score.fit(request, 3)


# --- the fast path equals one full forward per continuation ---------------------------------------------------

@pytest.mark.parametrize("arch,attn", [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager")])
def test_fast_path_equals_naive(items, tokenizer, arch, attn):
    model = tiny_model(arch, len(tokenizer), attn)
    fewshot, evals = items[:8], items[8:20]
    completion = [score.completion_request(tokenizer, it) for it in evals]
    answers = score.mc_answer_tokens(tokenizer)
    mc = [score.mc_request(tokenizer, it, fewshot, 2, 1, answers) for it in evals]
    for requests in (completion, mc):
        fast = score.score(model, requests, batch_size=5)  # uneven batches: padding and sorting
        slow = [score.naive_logliks(model, r) for r in requests]
        assert max_diff(fast, slow) < 1e-5
    # inputs longer than max_length are cut from the left, per continuation, as the harness does
    long_prefix = [Request(r.prefix * 3, r.continuations) for r in completion[:4]]
    max_length = max(len(r.prefix) for r in completion[:4]) + 4
    fast = score.score(model, long_prefix, batch_size=3, max_length=max_length)
    slow = [score.naive_logliks(model, r, max_length) for r in long_prefix]
    assert max_diff(fast, slow) < 1e-5


def test_gather_logprobs_with_a_padding_mask_matches_logits(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    ids = torch.tensor([tokenizer.encode("the man runs on the roof then walks"), [5] * 8])
    attention = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    targets = ids[:, 1:]
    select = attention[:, 1:].bool()
    with torch.no_grad():
        hidden = hidden_states(model, ids, attention)
        got = gather_logprobs(model, hidden[:, :-1], select, targets[select])
        full = model(ids, attention_mask=attention).logits.float().log_softmax(-1)[:, :-1]
    want = full.gather(-1, targets[..., None]).squeeze(-1)[select]
    assert torch.allclose(got, want, atol=1e-5)


# --- tokenization ----------------------------------------------------------------------------------------------

def test_encode_pair_moves_trailing_space_and_splits_after_the_context(tokenizer):
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    ctx, cont = score.encode_pair(tokenizer, "the man ", " runs.")
    assert ctx == enc("the man") and cont == enc("the man  runs.")[len(ctx):]
    assert tokenizer.decode(cont) == "  runs."
    for context, ending in [("Café crème", " brûlée."), ("日本語", " テキスト"), ("the dog", " ✓ naïve")]:
        ctx, cont = score.encode_pair(tokenizer, context, ending)
        assert ctx == enc(context) and cont == enc(context + ending)[len(ctx):]
        assert tokenizer.decode(ctx + cont) == context + ending
    assert score.encode_pair(tokenizer, "", " runs.") == ([tokenizer.bos_token_id], enc(" runs."))


def test_completion_request_of_an_item_with_empty_ctx_b(tokenizer):
    item = Item("val/1", "A man sits on a roof.", ("runs.", "jumps.", "sits.", "walks."), 2, "Roof", "A man sits on "
                "a roof.", "")
    request = score.completion_request(tokenizer, item)
    assert harness_query(item) == "Roof: A man sits on a roof."  # the trailing space of "ctx_a + ' '" is cleaned
    assert tokenizer.decode(request.prefix) == harness_query(item)
    assert [tokenizer.decode(c) for c in request.continuations] == [" runs.", " jumps.", " sits.", " walks."]


def test_mc_prompt_is_the_validation_pair_prompt(items, tokenizer):
    fewshot = items[:8]
    answers = score.mc_answer_tokens(tokenizer)
    for item in items[8:14]:
        pair = pairs.make_pair(item, "mc", fewshot, 2, 3)
        request = score.mc_request(tokenizer, item, fewshot, 2, 3, answers)
        assert request.prefix == tokenizer.encode(pair["prompt"], add_special_tokens=False)
        assert request.continuations[item.label] == tokenizer.encode(pair["chosen"], add_special_tokens=False)


def test_mc_with_answers_of_two_tokens(items):
    """SmolLM2's tokenizer splits ' 2' into ' ' + '2'; the answers are then scored as two-token continuations."""
    chars = train_tokenizer(vocab_size=300, texts=corpus(items)[50:])  # few merges: ' 0' stays ' ' + '0'
    answers = score.mc_answer_tokens(chars)
    assert all(len(a) == 2 for a in answers) and len({a[0] for a in answers}) == 1
    model = tiny_model("llama", len(chars))
    requests = [score.mc_request(chars, it, items[:8], 1, 1, answers) for it in items[8:12]]
    fast = score.score(model, requests, batch_size=3)
    assert max_diff(fast, [score.naive_logliks(model, r) for r in requests]) < 1e-5


# --- metrics on hand-made numbers -------------------------------------------------------------------------------

def test_predictions_acc_and_acc_norm():
    def predict(logliks, chars):
        found = metrics.predictions({"completion_logliks": logliks, "ending_chars": chars})
        return found["pred_acc"], found["pred_acc_norm"]

    # lengths in characters of the endings (no leading space): per-char logliks -1, -0.6, -0.5, -0.3
    assert predict([-10, -12, -20, -30], [10, 20, 40, 100]) == (0, 3)
    assert predict([-5, -5, -9, -9], [5, 5, 9, 9]) == (0, 0)  # ties: the first
    assert predict([-1, -2, -3, -4], [0, 2, 3, 4]) == (0, 1)  # 0 chars: -inf
    assert metrics.predictions({"mc_logprobs": [-3.0, -1.0, -1.0, -2.0]}) == {"pred_mc": 1}
    item = as_items(synthetic_items(1))[0]
    assert [len(e) for e in harness_endings(item)] == [len(e) for e in item.endings]


def test_accuracy_and_stderr_like_the_harness():
    values = [1, 0, 0, 1, 1]
    p = stats.accuracy(values)
    assert p == 0.6
    assert math.isclose(stats.stderr(p, 5), statistics.stdev(values) / math.sqrt(5))  # harness: mean_stderr
    assert math.isclose(stats.stderr(0.5, 5), 0.25)


def test_mcnemar_exact():
    a = [1] * 10 + [0] * 5
    b = [0] * 10 + [1] * 5
    assert math.isclose(stats.mcnemar(a, b), 2 * sum(math.comb(15, i) for i in range(6)) / 2 ** 15)
    assert stats.mcnemar([1, 0, 1], [1, 0, 1]) == 1.0
    assert math.isclose(stats.mcnemar([0] * 5, [1] * 5), 2 / 32)
    a, b = [1] * 2 + [0] * 10 + [1] * 7, [0] * 2 + [1] * 10 + [1] * 7  # 2 vs 10 discordant
    assert math.isclose(stats.mcnemar(a, b), 2 * (1 + 12 + 66) / 4096)


def test_clustered_mcnemar_is_mcnemar_for_single_units_and_ignores_copies_of_a_cluster():
    singles = [1] * 20 + [-1] * 10  # 20 units only B gets right, 10 only A
    assert math.isclose(stats.clustered_mcnemar(singles), math.erfc(math.sqrt(100 / 30 / 2)))  # X^2 = 10^2 / 30
    assert stats.clustered_mcnemar([]) == stats.clustered_mcnemar([0, 0]) == 1.0
    five_seeds = [5 * d for d in singles]  # every seed agrees on every item: five copies, no new evidence
    assert math.isclose(stats.clustered_mcnemar(five_seeds), stats.clustered_mcnemar(singles))
    assert stats.mcnemar_counts(5 * 10, 5 * 20) < stats.clustered_mcnemar(five_seeds) / 10  # unclustered: far too small
    mixed = [3, -1, 0, 2, -2, 1, 1, 4, 0, -1]  # seeds disagreeing within items widen the test
    assert math.isclose(stats.clustered_mcnemar(mixed), math.erfc(math.sqrt(7 ** 2 / 37 / 2)))


def test_student_t_tails_and_quantiles_match_the_tables():
    for df, q975, q80 in ((1, 12.706, 1.376), (4, 2.776, 0.941), (10, 2.228, 0.879), (30, 2.042, 0.854)):
        assert math.isclose(stats.t_quantile(0.975, df), q975, abs_tol=2e-3)
        assert math.isclose(stats.t_quantile(0.8, df), q80, abs_tol=2e-3)
        assert math.isclose(stats.t_sf2(q975, df), 0.05, abs_tol=2e-4)
    assert math.isclose(stats.t_sf2(1.959964, 10 ** 7), 0.05, abs_tol=1e-5)  # the normal limit
    assert stats.betainc(2, 3, 0.0) == 0 and stats.betainc(2, 3, 1.0) == 1
    assert math.isclose(stats.betainc(2, 3, 0.4), 0.5248, abs_tol=1e-4)  # 1 - sum of binomial(4, 0.4) up to 1


def test_paired_t_and_its_detectable_difference():
    d = [1.0, 2.0, 3.0, 4.0, 5.0]  # t = 3 / (sd 1.581 / sqrt 5) = 4.243, df 4
    assert math.isclose(stats.paired_t(d), 0.01324, abs_tol=1e-4)
    assert stats.paired_t([2.0, 2.0]) == 0.0 and stats.paired_t([0.0, 0.0]) == 1.0 and stats.paired_t([1.0]) == 1.0
    assert math.isclose(stats.detectable_t(d), (2.776 + 0.941) * statistics.stdev(d) / math.sqrt(5), rel_tol=1e-3)
    assert stats.detectable_t([1.0]) is None


def test_the_crossed_test_is_the_seed_t_test_without_item_spread_and_the_item_t_test_with_identical_seeds():
    shifts = [0.5, 2.0, 1.0]  # each seed moves every item alike: only the seeds vary
    by_seed = stats.crossed_t([[s] * 40 for s in shifts])
    assert math.isclose(by_seed.p, stats.paired_t(shifts)) and math.isclose(by_seed.df, 2)
    assert math.isclose(by_seed.half, stats.mean_ci(shifts).half, rel_tol=1e-3)
    items = [1, 0, 0, -1, 1, 1, 0, 1, 0, 1] * 3  # every seed the same model: only the items vary
    same = stats.crossed_t([items] * 3)
    assert math.isclose(same.p, stats.paired_t(items)) and math.isclose(same.df, len(items) - 1)
    assert stats.crossed_t([items]) is None and stats.crossed_t([[1], [0]]) is None


def test_the_crossed_interval_widens_with_the_seeds_spread_and_counts_both_sources():
    rng = np.random.default_rng(0)
    items = np.tile(rng.choice([-1.0, 0.0, 1.0], size=500, p=[0.1, 0.7, 0.2]), (3, 1))  # seeds that agree
    calm, spread = stats.crossed_t(items), stats.crossed_t(items + np.array([[-0.1], [0.0], [0.1]]))
    assert math.isclose(calm.mean, spread.mean) and spread.half > 2 * calm.half and spread.p > calm.p
    assert calm.df > 100 and spread.df < 10  # three seeds that disagree leave few degrees of freedom


def test_cluster_effect_counts_an_items_seeds_once():
    one = stats.cluster_effect([1] * 30 + [-1] * 10 + [0] * 60, units=100)  # one seed: +0.2 accuracy
    five = stats.cluster_effect([5 * d for d in [1] * 30 + [-1] * 10 + [0] * 60], units=500)  # five copies
    assert math.isclose(one.diff, 0.2) and math.isclose(five.diff, 0.2)
    assert math.isclose(one.half, five.half)  # copies of the same items are no new evidence
    assert math.isclose(one.detectable / one.half, (1.96 + 0.8416) / 1.96)


def test_paired_bootstrap():
    assert stats.paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0], 500) == (0.0, 0.0)
    assert stats.paired_bootstrap([0] * 20, [1] * 20, 500) == (1.0, 1.0)
    a = [1] * 60 + [0] * 40 + [0] * 100
    b = [0] * 60 + [1] * 40 + [0] * 100  # diff -0.1; sd of the mean difference sqrt(0.5 - 0.01) / sqrt(200)
    lo, hi = stats.paired_bootstrap(a, b, 4000, seed=1)
    half = 1.96 * math.sqrt(0.49 / 200)
    assert lo < -0.1 < hi and abs((hi - lo) / 2 - half) < 0.15 * half
    assert stats.paired_bootstrap(a, b, 4000, seed=1) == (lo, hi)  # seeded


def test_compare_and_table():
    rec = lambda preds: [{"id": str(i), "gold": 0, "pred_acc": p} for i, p in enumerate(preds)]  # noqa: E731
    comparison = stats.compare(rec([0, 1, 0, 1]), rec([0, 0, 0, 1]), 200)
    c = comparison["acc"]
    assert (c["a"], c["b"], c["diff"], c["only_a_right"], c["only_b_right"]) == (0.5, 0.75, -0.25, 0, 1)
    assert c["ci95"][0] <= -0.25 <= c["ci95"][1]
    table = stats.format_comparison(comparison, "run", "base")
    assert "A = run" in table and "A - B > 0: A scores higher" in table and "-0.2500" in table


# --- the command -----------------------------------------------------------------------------------------------

def save_model(folder, arch, tokenizer, seed):
    tiny_model(arch, len(tokenizer), seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, items):
    d = tmp_path_factory.mktemp("hellaswag")
    write_jsonl(d / "hellaswag_val.jsonl", synthetic_items(80, seed=3, wikihow_every=5))
    return d


def data_flags(d):
    return ["--hellaswag-dir", str(d), "--train-from-val", "--eval-size", "12", "--fewshot-indices", "0,1,2",
            "--train-start", "3", "--device", "cpu", "--bootstrap", "300", "--batch-size", "5"]


def test_eval_writes_results_and_predictions(tmp_path, eval_data, tokenizer, capsys):
    model = save_model(tmp_path / "gpt2", "gpt2", tokenizer, 0)
    out = tmp_path / "out"
    assert cli.main(["eval", "--model", str(model), "--out-dir", str(out), "--limit", "10",
                     *data_flags(eval_data)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(model) and results["n"] == 10
    assert results["data"]["val"]["sha256"] and results["items_per_s"] > 0
    for metric in ("acc", "acc_norm", "mc_acc"):
        assert 0 <= results[metric] <= 1 and results[metric + "_stderr"] >= 0
    assert set(results["by_split_type"]) <= {"indomain", "zeroshot"}
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and lines[0]["id"] == "val/0"
    for key in ("completion_logliks", "ending_chars", "mc_logprobs", "pred_acc", "pred_acc_norm", "pred_mc", "gold"):
        assert key in lines[0]
    assert results["acc"] == sum(r["pred_acc"] == r["gold"] for r in lines) / 10
    assert "acc " in capsys.readouterr().out


def test_eval_default_compares_newest_run_with_its_base(tmp_path, eval_data, tokenizer, monkeypatch, capsys):
    base = save_model(tmp_path / "base", "gpt2", tokenizer, 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", *data_flags(eval_data)]) == 2
    assert "--model" in capsys.readouterr().err
    for name, seed in (("old", 1), ("new", 2)):
        run = tmp_path / "runs" / name
        save_model(run / "final", "llama", tokenizer, seed)
        (run / "config.json").write_text(json.dumps({"run": name, "data": {}, "train": {"model": str(base)}}))
        (run / "summary.json").write_text("{}")
    # "new" started first (its config.json is older) but finished last (its summary.json is newer): it is scored
    os.utime(tmp_path / "runs" / "new" / "config.json", (1, 1))
    os.utime(tmp_path / "runs" / "old" / "summary.json", (50, 50))
    os.utime(tmp_path / "runs" / "new" / "summary.json", (100, 100))
    assert cli.main(["eval", "--metrics", "completion", *data_flags(eval_data)]) == 0
    printed = capsys.readouterr()
    assert "scoring runs/new, the run that finished last" in printed.err and "McNemar" in printed.out
    comparison = json.loads((tmp_path / "runs" / "new" / "eval" / "comparison.json").read_text())
    assert comparison["a"] == "runs/new" and comparison["b"] == str(base) and comparison["n"] == 12
    assert set(comparison["metrics"]) == {"acc", "acc_norm"}
    lo, hi = comparison["metrics"]["acc"]["ci95"]
    assert lo <= comparison["metrics"]["acc"]["diff"] <= hi
    (base_results,) = (tmp_path / "runs" / "eval" / score.default_out_dir(str(base)).name).glob("*/results.json")
    assert base_results.parent.name.startswith("completion_12items_seed1_")  # kept per setting
    results = json.loads((tmp_path / "runs" / "new" / "eval" / "results.json").read_text())
    assert (results["weights"], results["checkpoint_step"]) == ("final", None)
    assert results["model_path"] == "runs/new/final"


def test_eval_bad_data_line_names_file_and_line(tmp_path, capsys):
    d = tmp_path / "hs"
    d.mkdir()
    rows = synthetic_items(60)
    text = "".join(json.dumps(r) + "\n" for r in rows[:6]) + '{"ind": 6, "ctx": "x"\n'
    (d / "hellaswag_val.jsonl").write_text(text)
    assert cli.main(["eval", "--model", str(tmp_path), "--hellaswag-dir", str(d), "--train-from-val"]) == 2
    assert f"{d / 'hellaswag_val.jsonl'}:7: malformed JSON" in capsys.readouterr().err


def test_bad_flags():
    with pytest.raises(InputError, match="--metrics"):
        EvalConfig(metrics="completion,letters").validate()
    with pytest.raises(InputError, match="--limit"):
        EvalConfig(limit=-1).validate()
    with pytest.raises(InputError, match="--split"):
        score.select_items(as_items(synthetic_items(3)), "nosuch", 0)


def make_run(folder, tokenizer, final=True, steps=(), train=None, data=None):
    """A run folder as `dpo train` leaves it: config.json, checkpoints/step_N (tiny GPT-2s), final/ when done."""
    for step in steps:
        save_model(folder / "checkpoints" / f"step_{step:06d}", "gpt2", tokenizer, step)
    if final:
        save_model(folder / "final", "gpt2", tokenizer, 0)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"run": folder.name, "data": data or {},
              "train": {"model": "base", "train_data_path": "", **(train or {})}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def one_error_line(capsys) -> str:
    """The one `error:` line on stderr (progress bars aside), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_eval_of_a_run_still_training(tmp_path, eval_data, tokenizer, capsys):
    run = make_run(tmp_path / "run", tokenizer, final=False, steps=(2, 4))
    flags = ["eval", "--model", str(run), "--metrics", "completion", "--limit", "4", *data_flags(eval_data)]
    assert cli.main(flags) == 2
    assert one_error_line(capsys) == (f"error: {run} is stopped at step 4 (no final/; continue it with dpo train "
                                      "--resume): pass --allow-partial to score that checkpoint")
    assert not (run / "eval").exists()
    assert cli.main([*flags, "--allow-partial"]) == 0
    results = json.loads((run / "eval" / "step_000004" / "results.json").read_text())
    assert (results["checkpoint_step"], results["weights"]) == (4, "checkpoints/step_000004")
    assert results["model_path"] == str(run / "checkpoints" / "step_000004") and results["n"] == 4
    assert not (run / "eval" / "results.json").exists()  # never mistaken for the final model's
    assert "(checkpoint step 4)" in capsys.readouterr().out


def test_data_notes_only_for_runs_made_from_the_data_flags(tmp_path, tokenizer, capsys):
    data = DataConfig(hellaswag_dir="/data/hs", train_from_val=True, eval_size=12)
    trained = {"hellaswag_dir": "", "train_from_val": False, "eval_size": 12, "seed": 3, "train_start": 7}
    pairs_run = make_run(tmp_path / "pairs", tokenizer, final=False, data=trained,
                         train={"train_data_path": "data/mine.json"})
    score.warn_data_mismatch(str(pairs_run), data, ["completion", "mc"])
    assert capsys.readouterr().err == ""  # its pairs came from a file: the data flags say nothing about them
    flags_run = make_run(tmp_path / "flags", tokenizer, final=False, data=trained)
    score.warn_data_mismatch(str(flags_run), data, ["completion"])
    notes = capsys.readouterr().err.splitlines()
    assert notes == [f"note: {flags_run} was trained with --hellaswag-dir '', this evaluation uses '/data/hs'"]
    score.warn_data_mismatch(str(flags_run), data, ["mc"])  # the mc prompts' shots: seed, few-shot pool
    notes = capsys.readouterr().err
    assert "--seed 3" in notes and "--train-from-val False" in notes and "--train-start" not in notes


@pytest.mark.parametrize("content,expected", [
    (b'{"run": "x", "train": {"model": ', "config.json:1: malformed JSON"),
    (b'{"run": "\xff"}', "config.json:1: not UTF-8 text"),
    (b'{"run": "x", "data": [1]}', 'config.json: "data" is a list, expected a JSON object'),
])
def test_eval_of_a_corrupt_run_folder_is_one_error_line(tmp_path, eval_data, tokenizer, capsys, content, expected):
    run = make_run(tmp_path / "run", tokenizer)
    (run / "config.json").write_bytes(content)
    assert cli.main(["eval", "--model", str(run), *data_flags(eval_data)]) == 2
    assert expected in one_error_line(capsys)


def test_eval_default_run_with_a_base_of_the_wrong_type(tmp_path, eval_data, tokenizer, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "runs" / "a", tokenizer, train={"model": 5})
    assert cli.main(["eval", *data_flags(eval_data)]) == 2
    assert "no train.model (the base model); pass --model-b" in one_error_line(capsys)


def test_eval_of_a_run_without_its_tokenizer(tmp_path, eval_data, tokenizer, capsys):
    run = make_run(tmp_path / "run", tokenizer)
    (run / "final" / "tokenizer.json").unlink()
    assert cli.main(["eval", "--model", str(run), *data_flags(eval_data)]) == 2
    assert one_error_line(capsys) == f"error: {run / 'final'}: no tokenizer file (tokenizer.json, vocab.json, " \
        "tokenizer.model) next to its config.json"


def test_eval_outputs_that_cannot_be_written(tmp_path, eval_data, tokenizer, monkeypatch, capsys):
    model = save_model(tmp_path / "m", "gpt2", tokenizer, 0)
    out = tmp_path / "out"
    (out / "results.json").mkdir(parents=True)
    flags = ["eval", "--model", str(model), "--metrics", "completion", "--limit", "3", *data_flags(eval_data)]
    assert cli.main([*flags, "--out-dir", str(out)]) == 2  # found before any scoring
    assert "out/results.json: a folder is in the way" in one_error_line(capsys)
    assert os.listdir(out) == ["results.json"]
    monkeypatch.chdir(tmp_path)
    assert cli.main([*flags, "--model-b", str(model)]) == 2  # both to runs/eval/<m>: B would overwrite A
    assert "--model and --model-b would both write to runs/eval/" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()

    def disk_full(path, text):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(score, "atomic_write_text", disk_full)
    assert cli.main([*flags, "--out-dir", str(tmp_path / "full")]) == 2
    assert one_error_line(capsys) == f"error: {tmp_path / 'full' / 'predictions.jsonl'}: cannot write it (No " \
        "space left on device)"


def test_a_second_eval_with_the_same_settings_reuses_the_results(tmp_path, eval_data, tokenizer, monkeypatch,
                                                                  capsys):
    model = save_model(tmp_path / "gpt2", "gpt2", tokenizer, 0)
    monkeypatch.chdir(tmp_path)
    flags = ["eval", "--model", str(model), "--metrics", "completion", "--limit", "6", *data_flags(eval_data)]
    assert cli.main(flags) == 0
    (first,) = (tmp_path / "runs" / "eval").rglob("results.json")
    loads = []
    monkeypatch.setattr(score.models, "load_model", lambda *a, **kw: loads.append(a) or 1 / 0)
    assert cli.main(flags) == 0 and not loads
    assert "reusing" in capsys.readouterr().out
    # other settings: their own folder, the first results kept
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert cli.main([*flags, "--limit", "8"]) == 0  # the last --limit counts
    assert len(list((tmp_path / "runs" / "eval").rglob("results.json"))) == 2 and first.is_file()


def test_results_that_do_not_match_their_predictions_are_not_reused(tmp_path, eval_data, tokenizer, capsys):
    """results.json is written last with the sha256 and count of predictions.jsonl: a kill between the two writes
    (here: predictions of another run) means not done, and the items are scored again."""
    model = save_model(tmp_path / "gpt2", "gpt2", tokenizer, 0)
    out = tmp_path / "out"
    flags = ["eval", "--model", str(model), "--metrics", "completion", "--out-dir", str(out), *data_flags(eval_data)]
    assert cli.main([*flags, "--limit", "4"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["predictions"]["n"] == 4 and len(results["predictions"]["sha256"]) == 64
    with open(out / "predictions.jsonl", "a") as f:
        f.write(json.dumps({"id": "val/99"}) + "\n")
    capsys.readouterr()
    assert cli.main([*flags, "--limit", "4"]) == 0
    assert "reusing" not in capsys.readouterr().out
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4


def test_a_read_only_output_folder_fails_before_scoring(tmp_path, eval_data, tokenizer, monkeypatch, capsys):
    model = save_model(tmp_path / "gpt2", "gpt2", tokenizer, 0)
    out = tmp_path / "ro"
    out.mkdir()
    monkeypatch.setattr(score.os, "access", lambda path, mode: Path(path) != out)  # root ignores chmod
    monkeypatch.setattr(score, "score_items", lambda *a, **kw: 1 / 0)
    assert cli.main(["eval", "--model", str(model), "--out-dir", str(out), *data_flags(eval_data)]) == 2
    assert "not writable" in one_error_line(capsys) and not list(out.iterdir())


def test_a_noisy_cell_is_worth_the_clean_pairs_that_reach_its_accuracy():
    from dpo.study.report_task import clean_equivalent, exchange_rates

    clean = {250: 45.0, 500: 49.0, 1000: 51.0}
    assert math.isclose(clean_equivalent(clean, 47.0), math.sqrt(250 * 500))  # half way in log N
    assert math.isclose(clean_equivalent(clean, 50.0), math.sqrt(500 * 1000))
    assert clean_equivalent(clean, 44.0) == (250, "<") and clean_equivalent(clean, 52.0) == (1000, ">")
    rates = exchange_rates({1: {(0.0, 250): 45.0, (0.0, 500): 49.0, (0.0, 1000): 51.0, (0.4, 1000): 49.0,
                                (0.4, 500): 44.0},
                            2: {(0.0, 500): 49.0, (0.4, 500): 47.0},  # one clean N: no curve, left out
                            3: {(0.0, 250): 40.0, (0.0, 1000): 50.0, (0.4, 1000): 45.0}})
    assert rates[(0.4, 1000)] == {1: pytest.approx(0.5), 3: pytest.approx(0.5)}  # 500 clean pairs (seed 3: 45 is
    # half way from 250 to 1000 in log N)
    assert rates[(0.4, 500)] == {1: (250, "<")}


def test_with_the_base_model_as_0_clean_pairs_a_cell_below_every_clean_cell_still_gets_a_rate():
    from dpo.study.report_task import clean_equivalent, exchange_rates

    clean = {250: 45.0, 500: 49.0}
    assert clean_equivalent(clean, 43.0) == (250, "<")  # without the base model: a bound
    assert math.isclose(clean_equivalent(clean, 43.0, base=41.0), 125.0)  # half way from 0 to 250 pairs, in N
    assert clean_equivalent(clean, 40.0, base=41.0) == (0, "<")  # below the base model: worth nothing
    assert math.isclose(clean_equivalent(clean, 47.0, base=41.0), math.sqrt(250 * 500))  # above: log N as before
    rates = exchange_rates({1: {(0.0, 250): 45.0, (0.0, 500): 49.0, (0.4, 500): 43.0, (0.4, 1000): 40.0}}, base=41.0)
    assert rates[(0.4, 500)] == {1: pytest.approx(0.25)} and rates[(0.4, 1000)] == {1: (0, "<")}


@pytest.mark.parametrize("damage", ["[]", '"done"', "[" * 200_000 + "]" * 200_000, '{"key": ' + "9" * 5000 + "}"])
def test_a_damaged_results_json_is_scored_again_not_a_traceback(tmp_path, damage):
    """Issue 30: results.json is what lets a finished evaluation be reused; one of another shape means: not done."""
    (tmp_path / "results.json").write_text(damage)
    (tmp_path / "predictions.jsonl").write_text("")
    assert score.finished_results(tmp_path, "a key") is None
