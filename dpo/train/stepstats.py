"""What a training step and the validation pass log: per-pair sums of the loss, rewards, accuracies and log-probs,
accumulated over micro-batches on the device (`pair_stats`, in `STATS` order: no host sync), and turned into means
and accuracies once a step is done (`summarize`). Rewards are beta * (log pi - log pi_ref) of a response; accuracy
against the *true* label counts the flipped pairs (known from the data file) apart from the clean ones.

The names are TRL's (`rewards/accuracies`, `rewards/margins`, `logps/chosen`, ...; torchtune's too, but for its
`log_probs/*`), plus this project's `rewards/ties` and `true_accuracy/*`; validation logs them under the split
`eval` (dpo/core/metrics.py reads the names of earlier versions too).
"""

import torch

from dpo.core import losses
from dpo.engine.logprobs import Logps

STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/ties", "rewards/margins",
         "logps/chosen", "logps/rejected", "true_accuracy/clean", "true_accuracy/flipped", "pairs",
         "pairs/flipped")


def pair_stats(loss, policy: Logps, ref: Logps, beta, flipped, tie: float) -> torch.Tensor:
    """Sums over the pairs of a micro-batch, in STATS order, as one tensor (no host sync; divided by counts when
    a step is logged). A margin |h| <= tie is a tie and counts half in every accuracy (0.5 = chance)."""
    (pc, pr), (rc, rr) = policy, ref
    with torch.no_grad():
        h = losses.margins(pc.float(), pr.float(), rc.float(), rr.float())
        chosen_r, rejected_r = losses.rewards(pc, rc, beta), losses.rewards(pr, rr, beta)
        ties = (h.abs() <= tie).float()
        prefers_label = (h > tie).float() + 0.5 * ties  # the label's chosen response
        prefers_other = (h < -tie).float() + 0.5 * ties
        # accuracy against the *true* label: on clean pairs the label, on flipped pairs its opposite
        return torch.stack([loss.sum(), chosen_r.sum(), rejected_r.sum(), prefers_label.sum(), ties.sum(),
                            (chosen_r - rejected_r).sum(), pc.float().sum(), pr.float().sum(),
                            (prefers_label * (1 - flipped)).sum(), (prefers_other * flipped).sum(),
                            torch.tensor(float(len(flipped)), device=h.device), flipped.sum()])


def summarize(sums: list) -> dict:
    """STATS sums (floats) -> means and accuracies."""
    values = dict(zip(STATS, sums))
    n, n_flipped = values.pop("pairs"), values.pop("pairs/flipped")
    clean, flipped = values.pop("true_accuracy/clean"), values.pop("true_accuracy/flipped")
    out = {k: v / n for k, v in values.items()}
    if n > n_flipped:
        out["true_accuracy/clean"] = clean / (n - n_flipped)
    if n_flipped:
        out["true_accuracy/flipped"] = flipped / n_flipped
    return out
