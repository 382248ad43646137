"""Where a bf16 run's validation numbers come from: the same study cell trained in fp32 and in bf16 (both with
`keep_weights = true`), measured every way the two precisions could be mixed, so that the cause of a difference is
a measurement, not a guess.

    .venv/bin/python experiments/bench/precision_check.py --fp32-run RUNS/noise-cpu-fp32/noise=0.25,seed=1 \\
        --bf16-run RUNS/noise-cpu-bf16/noise=0.25,seed=1 --out experiments/bench/results/precision_check.json

The validation pairs, beta and the base model come from the runs' config.json. It reports
  margins    the mean margin beta * h and reward accuracy on the validation pairs for each policy (the fp32-trained
             and the bf16-trained master weights) against reference log-probs of the base model, each scored in
             fp32, in bf16 (a bf16 copy, as dpo train's compute copy) or with bf16-rounded weights computed in fp32
             (the weights' rounding alone): (bf16 master weights, bf16 / bf16) is what dpo train reported before
             validation was fp32, (fp32 / fp32) what it reports now; ties counted at both tolerances
  rounding   per pair, how far a bf16 summed log-prob and a bf16 margin h are from fp32's (the base model against
             its own fp32 reference: h is exactly 0 in fp32), in bf16 and with bf16 weights alone
  weights    how far the bf16 run's master weights are from the fp32 run's, relative to the update; how much of
             the master weights' update the bf16 compute copy carries (the copy is re-rounded from the fp32 masters
             every step, so updates accumulate in fp32 even where one step is below bf16's spacing); how many
             weights one step at the peak learning rate can move in the copy at all
Forward passes only; bf16 ones are slow on a CPU without native bf16 (~6x fp32 there).
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from benchlib import portable

from dpo.core import losses, models
from dpo.core.files import atomic_write_json
from dpo.data.pairs import read_pairs
from dpo.engine.logprobs import logprobs_in_batches, tokenize_pairs
from dpo.engine.precision import TIE
from dpo.engine.reference import token_budget

ROOT = Path(__file__).resolve().parents[2]


MODES = ("fp32", "bf16-weights", "bf16")  # how a model is scored (see `scored`)
COMBINATIONS = (("fp32", "fp32"), ("bf16-weights", "bf16-weights"), ("fp32", "bf16"), ("bf16", "fp32"),
                ("bf16", "bf16"))  # (policy, reference) modes of the margins table


def scored(model, examples, pad_id: int, mode: str) -> tuple:
    """(chosen [N], rejected [N]) summed log-probs under model: fp32; bf16-weights (its weights rounded to bf16,
    computed in fp32: the rounding of the weights alone); bf16 (a bf16 copy, computed in bf16: what dpo train's
    compute copy computes)."""
    if mode != "fp32":
        model = copy.deepcopy(model).to(torch.bfloat16)
        model = model.float() if mode == "bf16-weights" else model
    return logprobs_in_batches(model, examples, token_budget(torch.device("cpu")), pad_id)


def margin_stats(pc, pr, rc, rr, beta: float) -> dict:
    """Mean margin beta * h, reward accuracy (ties half) at the fp32 and the bf16 tie, and how many pairs tie."""
    h = losses.margins(pc, pr, rc, rr)
    out = {"margin": beta * h.mean().item(), "margin_sd": beta * h.std().item()}
    for name, tie in (("fp32", TIE["fp32"]), ("bf16", TIE["bf16"])):
        ties = h.abs() <= tie
        out[f"accuracy_tie_{name}"] = ((h > tie).float() + 0.5 * ties.float()).mean().item()
        out[f"ties_{name}"] = int(ties.sum())
    return out


def rounding(base32: tuple, base16: tuple) -> dict:
    """How far bf16 log-prob sums and margins are from fp32's, per pair, for the same (base) weights."""
    err_c, err_r = base16[0] - base32[0], base16[1] - base32[1]
    h = err_c - err_r  # the base model against its fp32 reference log-probs: exactly 0 in fp32
    magnitude = base32[0].abs() + base32[1].abs()
    return {"logp_error_sd": torch.cat([err_c, err_r]).std().item(),
            "logp_error_mean": torch.cat([err_c, err_r]).mean().item(),
            "logp_mean": torch.cat(list(base32)).mean().item(),
            "h_error_sd": h.std().item(), "h_error_median_abs": h.abs().median().item(),
            "h_error_max_abs": h.abs().max().item(),
            "h_error_over_logp_magnitude_median": (h.abs() / magnitude).median().item(),
            "within_tie_bf16": (h.abs() <= TIE["bf16"]).float().mean().item()}


def training_side(fp32_trained: tuple, bf16_trained: tuple, reference: tuple, beta: float) -> dict:
    """Per validation pair, the bf16-trained master weights' margin against the fp32-trained one's (both fp32)."""
    m32 = beta * losses.margins(*fp32_trained, *reference)
    m16 = beta * losses.margins(*bf16_trained, *reference)
    d = m16 - m32
    return {"margin_difference_mean": d.mean().item(), "margin_difference_sd": d.std().item(),
            "margin_difference_max_abs": d.abs().max().item(), "margin_sd_over_pairs": m32.std().item(),
            "sign_changes": int(((m32 > 0) != (m16 > 0)).sum()),
            "fp32_margins_of_the_changed": m32[(m32 > 0) != (m16 > 0)].tolist()}


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def bf16_spacing(w: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values around each weight: |w| in [2^(e-1), 2^e) has 2^7 values, 2^(e-8) apart."""
    _, exponent = torch.frexp(w.float())
    spacing = torch.ldexp(torch.ones_like(w, dtype=torch.float32), exponent - 8)
    return torch.where(w == 0, torch.finfo(torch.bfloat16).tiny, spacing)  # any step moves a zero


def weight_stats(w0, w32, w16, lr: float) -> dict:
    """The bf16 run's master weights against the fp32 run's, and what the bf16 compute copy carries of them."""
    w0, w32, w16 = (t.double() for t in (w0, w32, w16))
    d16 = w16 - w0
    q16 = w16.float().to(torch.bfloat16).double() - w0.float().to(torch.bfloat16).double()
    spacing = bf16_spacing(w0.float()).double()
    moved = d16 != 0  # weights the master update moved at all (unused token embeddings get no gradient)
    return {"update_norm_fp32": (w32 - w0).norm().item(), "update_norm_bf16": d16.norm().item(),
            "difference_over_update": ((w16 - w32).norm() / (w32 - w0).norm()).item(),
            "cosine_updates": torch.nn.functional.cosine_similarity(w16 - w0, w32 - w0, dim=0).item(),
            "master_moved_fraction": moved.double().mean().item(),
            "copy_changed_fraction_of_moved": (q16[moved] != 0).double().mean().item(),
            "copy_update_projection": ((q16 * d16).sum() / (d16 * d16).sum()).item(),
            "copy_update_cosine": torch.nn.functional.cosine_similarity(q16, d16, dim=0).item(),
            "one_step_can_move_fraction_of_moved": (lr / spacing[moved]).clamp(max=1).mean().item(),
            "median_master_update_over_spacing": (d16[moved].abs() / spacing[moved]).median().item()}


def measure(args) -> dict:
    cfg32 = json.loads((Path(args.fp32_run) / "config.json").read_text())
    cfg16 = json.loads((Path(args.bf16_run) / "config.json").read_text())
    for key in ("resolved_model", "files"):
        if cfg32[key] != cfg16[key]:
            sys.exit(f"error: the two runs differ in {key}: not the same cell")
    beta, val_size = cfg32["train"]["beta"], cfg32["train"]["val_size"]
    torch.set_num_threads(args.threads)
    base = str(Path(cfg32["resolved_model"]).expanduser())  # records write paths as shown_path does: ~/..., relative
    tokenizer = models.load_tokenizer(base)
    pairs = read_pairs(Path(cfg32["files"]["val"]).expanduser())[:val_size or None]
    examples = tokenize_pairs(tokenizer, pairs, cfg32["train"]["max_length"], cfg32["train"].get("append_eos", False))
    cpu, pad = torch.device("cpu"), tokenizer.pad_token_id
    weights, logps = {}, {}
    for name, spec in (("base", base), ("fp32-trained", str(Path(args.fp32_run) / "final")),
                       ("bf16-trained", str(Path(args.bf16_run) / "final"))):
        model = models.load_model(spec, dtype=torch.float32, device=cpu)
        weights[name] = flat(model)
        for mode in MODES:
            t0 = time.perf_counter()
            logps[name, mode] = scored(model, examples, pad, mode)
            print(f"{name} in {mode}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    margins = [{"policy": name, "policy_precision": pp, "reference_precision": rp,
                **margin_stats(*logps[name, pp], *logps["base", rp], beta)}
               for name in ("fp32-trained", "bf16-trained") for pp, rp in COMBINATIONS]
    return {"fp32_run": args.fp32_run, "bf16_run": args.bf16_run, "val_pairs": len(pairs), "beta": beta,
            "threads": args.threads, "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "margins": margins,
            "rounding": rounding(logps["base", "fp32"], logps["base", "bf16"]),
            "rounding_weights_only": rounding(logps["base", "fp32"], logps["base", "bf16-weights"]),
            "training": training_side(logps["fp32-trained", "fp32"], logps["bf16-trained", "fp32"],
                                      logps["base", "fp32"], beta),
            "weights": weight_stats(weights["base"], weights["fp32-trained"], weights["bf16-trained"], args.lr)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp32-run", required=True, help="the cell trained with precision fp32 (its final/ kept)")
    p.add_argument("--bf16-run", required=True, help="the same cell trained with precision bf16")
    p.add_argument("--lr", type=float, default=1e-5, help="the peak learning rate (one step's largest update)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "experiments/bench/results/precision_check.json"))
    args = p.parse_args()
    result = measure(args)
    atomic_write_json(args.out, portable(result), indent=1)
    print("| policy | scored in | reference in | val margin | reward acc (tie 1e-4) | ties 1e-4 / 2e-2 |")
    print("|---|---|---|---|---|---|")
    for m in result["margins"]:
        print(f"| {m['policy']} | {m['policy_precision']} | {m['reference_precision']} | {m['margin']:.4f} | "
              f"{m['accuracy_tie_fp32']:.3f} | {m['ties_fp32']} / {m['ties_bf16']} |")
    print(json.dumps({k: result[k] for k in ("rounding", "rounding_weights_only", "training", "weights")}, indent=1))


if __name__ == "__main__":
    main()
