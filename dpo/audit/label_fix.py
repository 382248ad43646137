"""The label fix of `dpo train` (--label-fix relabel|filter|oracle-*) and the eps the audit estimates (--eps
auto|posterior): the training file audited with the reference model (`dpo audit`, dpo/audit/audit.py) before training,
then pairs relabelled or dropped, and what config.json and TensorBoard record of it."""

from typing import NamedTuple

import torch

from dpo.audit import audit
from dpo.core import losses
from dpo.core.config import EPS_WORDS, TrainConfig
from dpo.core.files import InputError
from dpo.core.pairscores import MIN_CALIBRATION
from dpo.data.pairs import read_pairs
from dpo.data.sources import ChatTemplate
from dpo.engine.distributed import Dist
from dpo.engine.reference import Scorer


class Corrected(NamedTuple):
    """The training pairs after the label fix, and the eps the loss takes."""
    pairs: list
    pair_eps: torch.Tensor  # [N] per-pair flip posteriors (--eps posterior), else None
    eps: float  # --eps, or the audit's estimate (--eps auto|posterior)
    info: dict  # what config.json records of the audit and the fix ("label_fix"), or None


def correct_labels(cfg: TrainConfig, scorer: Scorer, pairs: list, train_path, val_path, ranks: Dist) -> Corrected:
    """--label-fix and --eps auto|posterior: audit the training file with the reference model (the policy before
    its first step, through the reference cache; `dpo audit`), calibrated on the validation file's pairs after the
    --val-size used for validation, then relabel or drop pairs. The validation pairs are never changed."""
    words = cfg.eps in EPS_WORDS
    if cfg.label_fix == "none" and not words:
        return Corrected(pairs, None, cfg.eps, None)
    posterior, info = [0.0] * len(pairs), {}
    if cfg.label_fix in ("relabel", "filter") or words:
        if not ranks.main:
            ranks.barrier()  # rank 0 scores the pairs into the cache first
        result = audit_file(cfg, scorer, pairs, train_path, val_path)
        if ranks.main:
            ranks.barrier()
        posterior, info = result.posterior.tolist(), audit.summary(result, pairs)
    if cfg.label_fix != "none":
        flagged = [p > cfg.fix_threshold for p in posterior]
        pairs, posterior, info["fix"] = audit.apply_fix(pairs, flagged, cfg.label_fix, posterior)
    eps = cfg.eps
    if words:
        spec = losses.get(cfg.loss)
        eps = min(info["eps_hat"], spec.eps_max if spec.eps_max_inclusive else losses.RDPO_MAX_EPS)
    info["eps_used"] = eps
    pair_eps = torch.tensor(posterior, dtype=torch.float32) if cfg.eps == "posterior" else None
    return Corrected(pairs, pair_eps, eps, info)


def fix_line(info: dict) -> str:
    """One line of what the audit estimated and the label fix changed (config.json's "label_fix" has it all)."""
    parts = []
    if "eps_hat" in info:
        low, high = info.get("eps_ci95") or (None, None)
        interval = f" (95% interval {low:.3f}-{high:.3f})" if low is not None else ""
        parts.append(f"the audit estimates eps {info['eps_hat']:.3f}{interval}")
    fix = info.get("fix") or {}
    if fix:
        verb = "dropped" if "dropped" in fix else "relabelled"
        done = f"{fix['label_fix']} {verb} {fix[verb]} of {fix['pairs_before']} pairs"
        if "changed_truly_flipped" in fix:
            done += (f" ({fix['changed_truly_flipped']} of them marked flipped; pairs marked flipped "
                     f"{fix['truly_flipped_before']} -> {fix['truly_flipped_after']})")
        parts.append(done)
    if "eps_used" in info and "eps_hat" in info:
        parts.append(f"the loss uses eps {info['eps_used']:.3f}")
    return "label fix: " + "; ".join(parts)


def audit_scalars(fixed: dict) -> dict:
    """What TensorBoard shows of the audit and the label fix (config.json has all of it)."""
    out = {k: fixed[k] for k in ("eps_hat", "eps_used") if k in fixed}
    if "eps_ci95" in fixed:
        out["eps_low"], out["eps_high"] = fixed["eps_ci95"]
    fix = fixed.get("fix") or {}
    out.update({k: fix[k] for k in ("relabelled", "dropped", "changed_truly_flipped", "truly_flipped_before",
                                    "truly_flipped_after") if k in fix})
    return out


def audit_file(cfg: TrainConfig, scorer: Scorer, pairs: list, train_path, val_path) -> audit.Audit:
    """The audit of the training pairs, calibrated on the validation file's pairs after the first --val-size."""
    if val_path is None:
        raise InputError("--label-fix relabel/filter and --eps auto/posterior calibrate the audit on clean pairs: "
                         "give a validation file (--val-data-path)")
    clean_all = read_pairs(val_path, ChatTemplate(cfg.model, scorer.tokenizer))
    skip = cfg.val_size or len(clean_all)
    clean = clean_all[skip:]
    if len(clean) < MIN_CALIBRATION:
        raise InputError(f"{val_path}: the audit calibrates on the validation pairs after the first --val-size "
                         f"{skip} (those measure the policy), and {len(clean)} are left: expected at least "
                         f"{MIN_CALIBRATION} (a larger file or a smaller --val-size)")
    audit.check_calibration(pairs, clean, train_path, val_path, skip)
    scores = audit.pair_scores(cfg.audit_score, *scorer.logprobs(pairs, "audit: reference log-probs"), pairs)
    clean_scores = audit.pair_scores(cfg.audit_score, *scorer.logprobs(clean, "audit: clean pairs"), clean)
    return audit.audit_scores(scores, clean_scores, cfg.audit_score, cfg.fix_threshold, str(train_path))
