"""DPO-family losses as small pure functions of summed response log-probabilities, in one registry.

Each loss is a function of the margins h = (log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected) [B], beta,
and for the losses that model label noise, eps (a number, or a tensor [B] of per-pair flip probabilities); it
returns per-pair losses [B]. `@register_loss` declares a loss once: its name, the eps it accepts, TRL's name for it,
whether it takes each response's log-prob averaged over its tokens instead of summed (`per_token`: TRL's ipo); the
CLI's choices, the config checks, `dpo train --help` and the reports all read `LOSSES`. `dpo_loss` computes any of
them from the four log-probs (and, for a per-token loss, the responses' lengths in tokens); `rewards` gives the
implicit rewards beta * (log pi - log pi_ref).

Adding a loss is one function here:

    @register_loss("sppo", help="squared margin around 1 / beta")
    def sppo_loss(h, beta):
        return (beta * h - 1) ** 2
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

RDPO_MAX_EPS = 0.45  # per-pair eps of rdpo is kept this far from 0.5, where its weight 1 / (1 - 2 eps) is unbounded


@dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable  # fn(h, beta) or, with eps, fn(h, beta, eps)
    help: str
    eps_max: float = None  # None: takes no eps; else the largest eps it accepts (eps >= 0)
    eps_max_inclusive: bool = True
    aliases: tuple = ()  # other names it answers to (TRL's loss_type)
    per_token: bool = False  # h of log-probs averaged over each response's tokens (needs the lengths)
    trl_differs: str = ""  # the name is TRL's with another meaning: what TRL's is, and its name here (a run says so)

    @property
    def takes_eps(self) -> bool:
        return self.eps_max is not None

    def eps_problem(self, eps: float) -> str:
        """'' when eps is valid for this loss, else what is wrong."""
        ok = 0 <= eps <= self.eps_max if self.eps_max_inclusive else 0 <= eps < self.eps_max
        bound = "<=" if self.eps_max_inclusive else "<"
        return "" if ok else f"--loss {self.name} needs 0 <= --eps {bound} {self.eps_max}, got {eps}"


LOSSES = {}  # name -> Loss, in the order declared


def register_loss(name: str, help: str, eps_max: float = None, eps_max_inclusive: bool = True, aliases=(),
                  per_token: bool = False, trl_differs: str = ""):
    def declare(fn):
        LOSSES[name] = Loss(name, fn, help, eps_max, eps_max_inclusive, tuple(aliases), per_token, trl_differs)
        return fn
    return declare


def names() -> tuple:
    """Every accepted name: the losses, then their aliases."""
    return tuple(LOSSES) + tuple(a for spec in LOSSES.values() for a in spec.aliases)


def get(name: str) -> Loss:
    for spec in LOSSES.values():
        if name == spec.name or name in spec.aliases:
            return spec
    raise ValueError(f"unknown loss {name!r}, expected one of {', '.join(names())}")


def margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    """h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


@register_loss("sigmoid", "DPO (Rafailov et al. 2023): -log sigmoid(beta h)")
def sigmoid_loss(h, beta):
    return -F.logsigmoid(beta * h)


@register_loss("ipo", "IPO (Azar et al. 2023): (h - 1 / (2 beta))^2, on summed log-probs (TRL's ipo averages them: "
               "ipo_avg)", trl_differs="TRL's loss_type=\"ipo\" averages each response's log-probs over its tokens; "
               "that loss is --loss ipo_avg here (this one sums them)")
def ipo_loss(h, beta):
    return (h - 1 / (2 * beta)) ** 2


@register_loss("ipo_avg", "IPO on log-probs averaged over each response's tokens (TRL's ipo)", per_token=True)
def ipo_avg_loss(h, beta):
    return ipo_loss(h, beta)


@register_loss("cdpo", "conservative DPO: the sigmoid loss with label smoothing eps (TRL: sigmoid with "
               "label_smoothing)", eps_max=0.5)
def cdpo_loss(h, beta, eps):
    """The label is wrong with probability eps (a number, or per pair: the expected loss under a soft label)."""
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


@register_loss("rdpo", "robust DPO (Chowdhury et al. 2024), unbiased under flips at rate eps < 0.5",
               eps_max=0.5, eps_max_inclusive=False, aliases=("robust",))
def rdpo_loss(h, beta, eps):
    """(1 - eps) * rdpo(h) + eps * rdpo(-h) == sigmoid_loss(h). Per-pair eps (a tensor): a pair with eps > 0.5 is
    the swapped pair at 1 - eps (the same loss: rdpo(h, eps) == rdpo(-h, 1 - eps)), and eps is held within
    RDPO_MAX_EPS of 0, away from 0.5."""
    if torch.is_tensor(eps):
        h = torch.where(eps > 0.5, -h, h)
        eps = torch.minimum(eps, 1 - eps).clamp(max=RDPO_MAX_EPS)
    elif not 0 <= eps < 0.5:
        raise ValueError(f"rdpo needs 0 <= eps < 0.5, got {eps}")
    return ((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


@register_loss("hinge", "SLiC-style hinge: max(0, 1 - beta h)")
def hinge_loss(h, beta):
    return torch.relu(1 - beta * h)


def dpo_loss(name, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, eps=0.0, lengths=None):
    """Per-pair losses of the named loss, computed in float32. lengths: the (chosen, rejected) responses' lengths
    in tokens, [B] each, which a per-token loss divides each response's log-probs by (others ignore them)."""
    spec = get(name)
    chosen, rejected = policy_chosen.float(), policy_rejected.float()
    ref_c, ref_r = ref_chosen.float(), ref_rejected.float()
    if spec.per_token:
        if lengths is None:
            raise ValueError(f"loss {name} averages log-probs over tokens: it needs the responses' lengths")
        n_chosen, n_rejected = (n.to(chosen.device, torch.float32) for n in lengths)
        chosen, ref_c, rejected, ref_r = chosen / n_chosen, ref_c / n_chosen, rejected / n_rejected, ref_r / n_rejected
    h = margins(chosen, rejected, ref_c, ref_r)
    return spec.fn(h, beta, eps) if spec.takes_eps else spec.fn(h, beta)


def rewards(policy_logps, ref_logps, beta):
    return beta * (policy_logps.float() - ref_logps.float()).detach()
