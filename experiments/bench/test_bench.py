"""Fast checks of the benchmark helpers (no model runs): `pytest -q experiments/bench`."""

import json

import precision_check
import prefix_sharing
import pytest
import suite_report
from benchlib import mfu, non_embedding_params, steady_state

from dpo.engine.logprobs import Example


def write_run(folder, lines, batch_size=16):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"batch_size": batch_size}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_steady_state_sums_pairs_and_seconds_over_the_window(tmp_path):
    # step 1 (compilation) is slow and falls outside; steps 2-3: 16 pairs in 2 s and 8 pairs (a short step) in 1 s
    lines = [{"split": "train", "step": 1, "seconds": 10.0, "pairs_per_s": 1.6, "tokens_per_s": 100.0},
             {"split": "eval", "step": 2, "loss": 0.5},
             {"split": "train", "step": 2, "seconds": 2.0, "pairs_per_s": 8.0, "tokens_per_s": 1000.0},
             {"split": "train", "step": 3, "seconds": 1.0, "pairs_per_s": 8.0, "tokens_per_s": 400.0,
              "peak_memory_mb": 7.0}]
    s = steady_state(write_run(tmp_path / "run", lines), first=2)
    assert s["steps"] == [2, 3] and s["seconds"] == 3.0 and s["pairs"] == 24 and s["tokens"] == 2400
    assert s["pairs_per_s"] == pytest.approx(8.0) and s["tokens_per_s"] == pytest.approx(800.0)
    assert s["peak_memory_mb"] == 7.0 and s["step_seconds"] == [10.0, 2.0, 1.0]


def test_steady_state_without_seconds_uses_the_step_pairs_and_checks_every_step_is_there(tmp_path):
    lines = [{"split": "train", "step": k, "pairs_per_s": 4.0 * k, "tokens_per_s": 100.0 * k} for k in (1, 2, 4)]
    run = write_run(tmp_path / "run", lines, batch_size=16)
    s = steady_state(run, first=1, last=2)
    assert s["seconds"] == pytest.approx(4 + 2) and s["pairs_per_s"] == pytest.approx(32 / 6)
    with pytest.raises(ValueError, match="steps 2..4"):
        steady_state(run, first=2, last=4)


def test_mfu_counts_six_n_flops_per_policy_token():
    assert mfu(1000.0, 708_390_400, 989e12) == pytest.approx(6 * 708_390_400 * 1000 / 989e12)


def test_non_embedding_params_of_gpt2_leave_out_token_and_position_embeddings(tmp_path):
    from transformers import GPT2Config

    d, layers = 64, 3
    GPT2Config(n_embd=d, n_layer=layers, n_head=2, vocab_size=1000, n_positions=128).save_pretrained(tmp_path)
    assert non_embedding_params(tmp_path) == layers * (12 * d * d + 13 * d) + 2 * d  # blocks + final layer norm


def test_suite_report_ratios_and_a_failed_part(tmp_path):
    (tmp_path / "parts.tsv").write_text("train_seed\tok\t0\t40\t\ntrl\tfailed\t1\t12\tCUDA error\n"
                                        "trl_precompute\tok\t0\t50\t\neval\ttimeout\t124\t150\tkilled after 150s\n")
    (tmp_path / "train_seed.json").write_text(json.dumps({"rows": [
        {"pairs_per_s": 30.0, "mfu": 0.2, "peak_memory_gib": 20.0, "reference_seconds": 2.0,
         "reference_pairs_per_s": 160.0, "tokens_per_s": 9000.0}]}))
    (tmp_path / "trl_precompute.json").write_text(json.dumps({"steady_pairs_per_s": 10.0, "n_pairs": 320,
                                                              "precompute_s": 4.0, "peak_cuda_mib": 10240}))
    (tmp_path / "eval.json").write_text(json.dumps({"ours": {"scoring_items_per_s": 90.0, "items_per_s": 30.0}}))
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "profile.json").write_text(json.dumps({"gpu_busy_fraction": 0.9, "steps": [
        {"seconds": 0.5}, {"seconds": 0.4}]}))
    report = suite_report.assemble(tmp_path)
    h = report["headline"]
    assert h["profile_gpu_default"] == {"gpu_busy_fraction": 0.9, "step_seconds": [0.5, 0.4]}
    assert h["ratios"]["dpo_seed_vs_trl_precompute"] == pytest.approx(3.0)
    assert h["ratios"]["dpo_default_vs_trl_precompute"] is None and h["ratios"]["dpo_seed_vs_trl"] is None
    assert h["ratios"]["eval_scoring_vs_harness_requests"] is None  # the harness never finished
    assert h["reference_pass"]["trl_precompute_pairs_per_s"] == pytest.approx(80.0)
    assert h["peak_gib"]["trl_4x4_gc_precompute"] == pytest.approx(10.0)
    assert [(p["part"], p["status"], p["returncode"]) for p in report["parts"]] == [
        ("train_seed", "ok", 0), ("trl", "failed", 1), ("trl_precompute", "ok", 0), ("eval", "timeout", 124)]
    assert "| trl | failed | 12 | CUDA error |" in suite_report.table(report)


def test_prefix_sharing_joins_pairs_with_a_long_common_prompt():
    shot = list(range(100, 140))  # a 40-token few-shot block
    examples = [Example(shot + [1, 2, 3], [7], [8], False, False), Example(shot + [4, 5], [7], [9], False, False),
                Example([50, 51, 52, 53], [7], [8], False, False)]
    # rows: [shot | 1 2 3 | 4 5] (40 + 3 + 2 tokens; mc answers add no input tokens), then the third pair alone
    assert prefix_sharing.rows_shared([0, 1, 2], examples, min_shared=32) == [45, 4]
    assert prefix_sharing.rows_shared([0, 1, 2], examples, min_shared=41) == [43, 42, 4]


def test_precision_check_bf16_spacing_and_what_the_compute_copy_carries():
    import torch

    w = torch.tensor([0.05, 1.0, 1.5, -0.3])
    spacing = precision_check.bf16_spacing(w)  # one step to the next bf16 value
    assert torch.equal((w + spacing).to(torch.bfloat16).float() - w.to(torch.bfloat16).float(), spacing)
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(100_000, generator=gen) * 0.05
    step = 0.3 * precision_check.bf16_spacing(w0) * torch.sign(torch.randn(100_000, generator=gen))
    stats = precision_check.weight_stats(w0, w0 + step, w0 + step, lr=1.0)
    # an update of 0.3 bf16 spacings moves about 30% of the copy's weights by one spacing: 0.3 of it on average
    assert 0.25 < stats["copy_changed_fraction_of_moved"] < 0.35 and stats["difference_over_update"] == 0
    assert stats["copy_update_projection"] == pytest.approx(1.0, abs=0.1)
    assert stats["median_master_update_over_spacing"] == pytest.approx(0.3, rel=1e-3)


def test_portable_results_name_no_machine_folders():
    from pathlib import Path

    from benchlib import ROOT, portable

    result = portable({"command": f"{ROOT}/.venv/bin/python {ROOT}/experiments/bench/x.py --model {Path.home()}/m",
                       "rows": [{"pairs": "/tmp/tmpab12_c/mc.json"}], "n": 3, "data": f"{ROOT}/../shared/h"})
    assert result == {"command": ".venv/bin/python experiments/bench/x.py --model ~/m",
                      "rows": [{"pairs": "TMP/mc.json"}], "n": 3, "data": "../shared/h"}
