import json
import math

import pytest
import torch

from dpo.core import losses


def naive(name, pc, pr, rc, rr, beta, eps, n_chosen, n_rejected):
    h = (pc - rc) - (pr - rr)
    if name == "ipo_avg":  # TRL's ipo: each response's log-ratio averaged over its tokens
        return ((pc - rc) / n_chosen - (pr - rr) / n_rejected - 1 / (2 * beta)) ** 2
    ls = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
    if name == "sigmoid":
        return -ls(beta * h)
    if name == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if name == "cdpo":
        return -(1 - eps) * ls(beta * h) - eps * ls(-beta * h)
    if name == "rdpo":
        return (-(1 - eps) * ls(beta * h) + eps * ls(-beta * h)) / (1 - 2 * eps)
    if name == "hinge":
        return max(0.0, 1 - beta * h)


@pytest.mark.parametrize("name", losses.LOSSES)
@pytest.mark.parametrize("beta,eps", [(0.1, 0.1), (0.5, 0.3), (2.0, 0.0)])
def test_loss_matches_naive_formula(name, beta, eps):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 20 - 40 for _ in range(4))
    lengths = [torch.randint(1, 30, (64,), generator=g) for _ in range(2)]
    got = losses.dpo_loss(name, pc, pr, rc, rr, beta, eps, lengths)
    want = [naive(name, *(float(t[i]) for t in (pc, pr, rc, rr)), beta, eps, *(int(n[i]) for n in lengths))
            for i in range(64)]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.4])
def test_rdpo_is_unbiased_under_flips(eps):
    h = torch.randn(1000, dtype=torch.float64) * 5
    expected_over_flips = (1 - eps) * losses.rdpo_loss(h, 0.5, eps) + eps * losses.rdpo_loss(-h, 0.5, eps)
    assert torch.allclose(expected_over_flips, losses.sigmoid_loss(h, 0.5), atol=1e-10)
    # and the plain loss is not: its expectation over flips differs
    biased = (1 - eps) * losses.sigmoid_loss(h, 0.5) + eps * losses.sigmoid_loss(-h, 0.5)
    assert not torch.allclose(biased, losses.sigmoid_loss(h, 0.5), atol=1e-3)


def test_rdpo_rejects_eps_at_half():
    with pytest.raises(ValueError):
        losses.rdpo_loss(torch.zeros(1), 0.1, 0.5)


def test_rewards_and_zero_margin_at_init():
    lp = torch.randn(8)
    assert torch.allclose(losses.dpo_loss("sigmoid", lp, lp + 1, lp, lp + 1, 0.1), torch.full((8,), math.log(2)))
    assert torch.allclose(losses.rewards(lp + 2, lp, 0.5), torch.ones(8))


def grad_wrt_margin(name, h, beta, eps):
    h = h.clone().requires_grad_(True)
    losses.dpo_loss(name, h, torch.zeros_like(h), torch.zeros_like(h), torch.zeros_like(h), beta, eps).sum().backward()
    return h.grad


@pytest.mark.parametrize("eps", [0.2, 0.4])
def test_robust_losses_are_rescaled_sigmoid_near_zero_margin(eps):
    """Why a short run cannot tell the losses apart: while beta * h stays near 0, every pair's gradient under
    cdpo / rdpo / ipo is the sigmoid loss's times one constant, which Adam and gradient clipping divide out.
    They part only once margins grow (cdpo stops pushing at beta * h = log((1 - eps) / eps))."""
    beta = 0.1
    small = torch.linspace(-0.05, 0.05, 11, dtype=torch.float64)  # beta * h within +-0.005
    g = {name: grad_wrt_margin(name, small, beta, eps) for name in ("sigmoid", "cdpo", "rdpo", "ipo")}
    for name, scale in (("cdpo", 1 - 2 * eps), ("rdpo", 1 / (1 - 2 * eps)), ("ipo", 2 / beta**2)):
        assert torch.allclose(g[name] / g["sigmoid"], torch.full_like(small, scale), rtol=0.02), name

    large = torch.tensor([20.0, 40.0], dtype=torch.float64)  # beta * h = 2, 4
    g = {name: grad_wrt_margin(name, large, beta, eps) for name in ("sigmoid", "cdpo", "rdpo")}
    assert (g["cdpo"] > 0).all() and (g["sigmoid"] < 0).all()  # cdpo pushes back, sigmoid keeps pushing
    assert not torch.allclose(g["rdpo"] / g["sigmoid"], torch.full_like(large, 1 / (1 - 2 * eps)), rtol=0.02)


@pytest.mark.parametrize("name", ["cdpo", "rdpo"])
def test_per_pair_eps_equal_everywhere_is_the_constant_eps_loss(name):
    h = torch.linspace(-30, 30, 41)
    per_pair = losses.get(name).fn(h, 0.1, torch.full_like(h, 0.2))
    assert torch.allclose(per_pair, losses.get(name).fn(h, 0.1, 0.2))


def test_rdpo_per_pair_eps_above_half_is_the_swapped_pair():
    h = torch.linspace(-30, 30, 41)
    assert torch.allclose(losses.rdpo_loss(h, 0.1, torch.full_like(h, 0.8)), losses.rdpo_loss(-h, 0.1, 0.2))
    near_half = losses.rdpo_loss(h, 0.1, torch.full_like(h, 0.49))
    assert torch.allclose(near_half, losses.rdpo_loss(h, 0.1, losses.RDPO_MAX_EPS))  # held away from 0.5


def test_response_lengths_reach_only_the_per_token_loss():
    """ipo_avg is ipo on log-probs averaged over tokens (TRL's ipo): equal lengths n are ipo at margin h / n; the
    lengths change no other loss; without them a per-token loss refuses to guess."""
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(16, generator=g) * 20 - 40 for _ in range(4))
    lengths = [torch.randint(1, 30, (16,), generator=g) for _ in range(2)]
    for name, spec in losses.LOSSES.items():
        with_lengths = losses.dpo_loss(name, pc, pr, rc, rr, 0.1, 0.2, lengths)
        if spec.per_token:
            assert not torch.allclose(with_lengths, losses.dpo_loss("ipo", pc, pr, rc, rr, 0.1)), name
            with pytest.raises(ValueError, match="needs the responses' lengths"):
                losses.dpo_loss(name, pc, pr, rc, rr, 0.1, 0.2)
        else:
            assert torch.equal(with_lengths, losses.dpo_loss(name, pc, pr, rc, rr, 0.1, 0.2)), name
    n = torch.full((16,), 4)
    assert torch.allclose(losses.dpo_loss("ipo_avg", pc, pr, rc, rr, 0.1, lengths=(n, n)),
                          losses.ipo_loss(losses.margins(pc, pr, rc, rr) / 4, 0.1))
    assert [n for n, s in losses.LOSSES.items() if s.per_token] == ["ipo_avg"]


def test_registry_drives_names_and_aliases():
    assert losses.get("robust").name == "rdpo" and "robust" in losses.names()
    assert {n for n, s in losses.LOSSES.items() if s.takes_eps} == {"cdpo", "rdpo"}
    with pytest.raises(ValueError, match="unknown loss"):
        losses.get("nope")


def test_trl_loss_names_reach_the_same_loss_from_the_command_line_and_sweep_files(tmp_path):
    """TRL's loss_type names (robust = rdpo; sigmoid, hinge and ipo are this project's names too) are accepted by
    --loss and by sweep files, where they become the loss's own name: one cell name, one run, one setting."""
    from dpo import cli
    from dpo.core.config import DataConfig, TrainConfig, from_args
    from dpo.core.files import InputError
    from dpo.study import sweep
    from dpo.train import runsettings

    trl = {"sigmoid": "sigmoid", "hinge": "hinge", "ipo": "ipo", "robust": "rdpo"}
    for name, own in trl.items():
        args = cli.build_parser().parse_args(["train", "--loss", name])
        assert from_args(TrainConfig, args).loss == own
    path = tmp_path / "s.toml"
    path.write_text('[sweep]\nmodel = "m"\n[train]\nloss = "robust"\n')
    assert sweep.load(path).train.loss == "rdpo"
    path.write_text('[sweep]\nmodel = "m"\n[grid]\nloss = ' + json.dumps(list(trl)) + "\n")
    assert [c.settings["loss"] for c in sweep.load(path).cells] == list(trl.values())
    assert "loss=rdpo,seed=1" in [c.name for c in sweep.load(path).cells]
    path.write_text('[sweep]\nmodel = "m"\n[grid]\nloss = ["rdpo", "robust"]\n')
    with pytest.raises(InputError, match="listed twice"):
        sweep.load(path)
    record = {"data": {}, "train": {"loss": "rdpo"}}  # a run's config.json, which records the loss's own name
    assert runsettings.record_changes(record, DataConfig(), TrainConfig(loss="robust")) == []
    changed = runsettings.record_changes(record, DataConfig(), TrainConfig(loss="sigmoid"))
    assert changed[0] == "train.loss rdpo -> sigmoid"


def test_a_loss_registered_once_appears_in_the_cli_the_checks_and_a_report(tmp_path, capsys):
    """docs/architecture.md's "Extending" example: one declaration in losses.py, read everywhere."""
    from dpo import cli
    from dpo.core.config import TrainConfig
    from dpo.study import report, sweep

    before = dict(losses.LOSSES)
    try:
        @losses.register_loss("sppo", "squared margin around 1 / beta")
        def sppo_loss(h, beta):
            return (beta * h - 1) ** 2

        with pytest.raises(SystemExit):
            cli.main(["train", "--help"])
        assert "sppo: squared margin around 1 / beta" in " ".join(capsys.readouterr().out.split())
        assert TrainConfig(loss="sppo").validate().loss == "sppo"
        lp = torch.zeros(3)
        assert torch.allclose(losses.dpo_loss("sppo", lp, lp, lp, lp, 0.1), torch.ones(3))
        path = tmp_path / "s.toml"
        path.write_text('[sweep]\nmodel = "m"\n[grid]\nloss = ["sigmoid", "sppo"]\n')
        s = sweep.load(path)
        found = {"results": [], "base": None, "audits": []}
        assert any("losses: sigmoid, sppo" in line for line in report.what_was_run(s, found))
    finally:
        losses.LOSSES.clear()
        losses.LOSSES.update(before)
