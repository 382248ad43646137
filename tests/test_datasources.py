"""The data-source table (dpo/core/datasources.py): one entry per kind of source, asked instead of branched on.

Every source has a plan that writes its files and every plan a source; a config chooses exactly one; a setting only
another source takes is refused naming it; the modules that once tested `pairs` ask the source; and a source planted
in the table (with its plan) is chosen, built and reused by `dpo data` and `ensure_pairs` without any other change.
"""

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest

from dpo.core import datasources
from dpo.core.config import DataConfig
from dpo.core.files import InputError
from dpo.data import prepare
from dpo.data.prepare import PairFiles, Plan

ROOT = Path(__file__).resolve().parents[1]
ASKERS = ["dpo/core/config.py", "dpo/data/prepare.py", "dpo/study/sweep.py", "dpo/study/runner.py",
          "dpo/study/report.py", "dpo/train/train.py", "dpo/train/runsettings.py", "dpo/cli.py"]


def test_every_source_has_a_plan_and_every_plan_a_source():
    assert set(prepare.PLANS) == set(datasources.SOURCES)
    assert all(name == source.name for name, source in datasources.SOURCES.items())


@pytest.mark.parametrize("settings, name", [({}, "hellaswag"), ({"pairs": "prefs.jsonl"}, "pairs")])
def test_a_config_chooses_exactly_one_source(settings, name):
    cfg = DataConfig(**settings)
    assert [s.name for s in datasources.SOURCES.values() if s.selected(cfg)] == [name]
    assert cfg.source.name == name


@pytest.mark.parametrize("settings, flags", [
    ({"prompt_field": "q"}, "--prompt-field"),
    ({"holdout": 0.1, "flip_prob_field": "p", "chosen_field": "good"}, "--flip-prob-field, --chosen-field"),
])
def test_a_setting_only_another_source_takes_is_refused_naming_it(settings, flags):
    with pytest.raises(InputError, match=f"^{flags}: only with --pairs"):
        DataConfig(**settings).validate()


def test_the_sources_own_checks_run_only_for_it():
    DataConfig(pairs="prefs.jsonl", holdout=0.5).validate()
    with pytest.raises(InputError, match="--holdout 1.5: expected a fraction"):
        DataConfig(pairs="prefs.jsonl", holdout=1.5).validate()
    with pytest.raises(InputError, match="--seed-stride slices HellaSwag's training pool"):
        DataConfig(pairs="prefs.jsonl", seed_stride=100, n=10).validate()
    DataConfig(seed_stride=100, n=10).validate()  # HellaSwag's


def conditions_on_pairs(path: Path) -> list:
    """Lines where a condition tests `<config>.pairs` itself (if, a conditional expression, and/or, not, bool(),
    a comparison), outside AuditConfig (whose `pairs` is the file to audit, not a choice of source)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "AuditConfig":
            node.body = []
    conditions = [n.test for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp, ast.While))]
    conditions += [v for n in ast.walk(tree) if isinstance(n, ast.BoolOp) for v in n.values]
    conditions += [n.operand for n in ast.walk(tree) if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not)]
    conditions += [n.args[0] for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                   and n.func.id == "bool" and n.args]
    conditions += [side for n in ast.walk(tree) if isinstance(n, ast.Compare) for side in (n.left, *n.comparators)]
    return sorted({c.lineno for c in conditions if isinstance(c, ast.Attribute) and c.attr == "pairs"})


@pytest.mark.parametrize("module", ASKERS)
def test_the_modules_that_use_a_source_ask_it_instead_of_testing_pairs(module):
    assert conditions_on_pairs(ROOT / module) == [], f"{module} branches on `.pairs`: ask `cfg.source` (datasources.py)"


def test_the_branch_finder_sees_a_test_of_pairs(tmp_path):
    planted = tmp_path / "m.py"
    planted.write_text("def f(data):\n    if data.pairs:\n        return 1\n    x = 2 if not cfg.pairs else 3\n"
                       "    y = bool(cfg.pairs) or cfg.pairs != ''\n    return data.pairs and x\n"
                       "class AuditConfig:\n    def validate(self):\n        check(bool(self.pairs))\n")
    assert conditions_on_pairs(planted) == [2, 4, 5, 6]


# ------------------------------------------------------------------------------------------- a planted source

def toy_plan(cfg: DataConfig) -> Plan:
    """A source of three fixed pairs per seed, validated on two."""
    out = Path(cfg.out_dir)
    train, val = out / f"toy_seed{cfg.seed}.json", out / "toy_val.json"
    record = {"toy": {"path": cfg.pairs, "sha256": "0" * 64}}

    def make(jobs):
        pair = {"prompt": "p", "chosen": " a", "rejected": " b", "flipped": False, "item": "toy/0"}
        outputs = {f"toy_seed{seed}.json": ([pair] * 3, {"n": 3, "noise": noise, "seed": seed, "flipped": 0,
                                                         "sources": record, "settings": {"seed": seed}})
                   for noise, seed in jobs}
        outputs["toy_val.json"] = ([pair] * 2, {"n": 2, "noise": 0.0, "seed": None, "flipped": 0,
                                                "validation": True, "sources": record, "settings": {}})
        return outputs

    return Plan(PairFiles(train, val), [(train, {"seed": cfg.seed}), (val, {})], record, make)


@pytest.fixture
def toy_source(monkeypatch):
    toy = replace(datasources.HELLASWAG, name="toy", selected=lambda cfg: cfg.pairs.startswith("toy:"),
                  needs="--pairs toy:NAME", own=(), check=lambda cfg: None, validation="n",
                  validation_count=lambda cfg: 2, shared_validation=False, renders_chat=False,
                  hellaswag_items=False, origin=lambda cfg: "from the toy source")
    pairs = replace(datasources.PAIRS, selected=lambda cfg: bool(cfg.pairs) and not cfg.pairs.startswith("toy:"))
    monkeypatch.setattr(datasources, "SOURCES", {"toy": toy, "pairs": pairs, "hellaswag": datasources.HELLASWAG})
    monkeypatch.setattr(prepare, "PLANS", {**prepare.PLANS, "toy": toy_plan})
    return toy


def test_a_source_planted_in_the_table_is_built_and_reused_through_its_plan(toy_source, tmp_path, capsys):
    cfg = DataConfig(pairs="toy:x", out_dir=str(tmp_path / "out"), seed=4)
    assert [s for s in datasources.SOURCES.values() if s.selected(cfg)] == [toy_source] == [cfg.source]
    written = prepare.build(cfg, [(0.0, 4), (0.0, 5)])
    assert sorted(Path(p).name for p in written) == ["toy_seed4.json", "toy_seed5.json", "toy_val.json"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["toy_seed5.json"]["settings"] == {"seed": 5}
    files = prepare.ensure_pairs(cfg)
    assert files == PairFiles(tmp_path / "out" / "toy_seed4.json", tmp_path / "out" / "toy_val.json")
    assert "built earlier from the same settings and sources" in capsys.readouterr().err
