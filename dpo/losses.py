"""DPO-family losses as small pure functions of summed response log-probabilities.

All take the policy's and the reference's log-probs of the chosen and rejected responses (shape [B]) and return
per-pair losses [B]; `rewards` gives the implicit rewards beta * (log pi - log pi_ref).
"""

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "cdpo", "rdpo", "hinge")


def margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    """h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def sigmoid_loss(h, beta):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * h)."""
    return -F.logsigmoid(beta * h)


def ipo_loss(h, beta):
    """IPO (Azar et al. 2023): (h - 1 / (2 beta))^2."""
    return (h - 1 / (2 * beta)) ** 2


def cdpo_loss(h, beta, eps):
    """Conservative DPO: the sigmoid loss with label smoothing eps (the label is wrong with probability eps)."""
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def rdpo_loss(h, beta, eps):
    """Robust DPO (Chowdhury et al. 2024): unbiased under flips at rate eps < 0.5, i.e.
    (1 - eps) * rdpo(h) + eps * rdpo(-h) == sigmoid_loss(h)."""
    if not 0 <= eps < 0.5:
        raise ValueError(f"rdpo needs 0 <= eps < 0.5, got {eps}")
    return ((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def hinge_loss(h, beta):
    """SLiC-style hinge: max(0, 1 - beta * h)."""
    return torch.relu(1 - beta * h)


def dpo_loss(name, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, eps=0.0):
    """Per-pair losses of the named loss, computed in float32."""
    h = margins(*(x.float() for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)))
    if name == "sigmoid":
        return sigmoid_loss(h, beta)
    if name == "ipo":
        return ipo_loss(h, beta)
    if name == "cdpo":
        return cdpo_loss(h, beta, eps)
    if name == "rdpo":
        return rdpo_loss(h, beta, eps)
    if name == "hinge":
        return hinge_loss(h, beta)
    raise ValueError(f"unknown loss {name!r}, expected one of {LOSSES}")


def rewards(policy_logps, ref_logps, beta):
    return beta * (policy_logps.float() - ref_logps.float()).detach()
