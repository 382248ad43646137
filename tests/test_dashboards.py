"""`dpo train --report-to`: every dashboard gets the scalars of metrics.jsonl under TRL's names, and one that is not
installed is an error line at start. wandb, mlflow and trackio are not installed here: fakes of their modules (in
sys.modules) record what they receive, as the real ones would in their local, offline modes."""

import json
import sys
import types

import pytest
from conftest import configs, mc_like_pairs, run_argv

from dpo import cli
from dpo.core import dashboards, models
from dpo.train import train


class Recorder:
    """What a fake backend module was given: its init arguments, (scalars, step) of every log, and the finish."""

    def __init__(self):
        self.init, self.logged, self.finished = None, [], False


def fake_wandb(rec: Recorder):
    module = types.ModuleType("wandb")

    class Run:
        def log(self, scalars, step):
            rec.logged.append((dict(scalars), step))

        def finish(self):
            rec.finished = True

    module.init = lambda **kw: setattr(rec, "init", kw) or Run()
    return module


def fake_mlflow(rec: Recorder):
    module = types.ModuleType("mlflow")
    module.set_experiment = lambda name: None
    module.start_run = lambda run_name: setattr(rec, "init", {"name": run_name})
    module.log_params = lambda params: rec.init.update(params=params)
    module.log_metrics = lambda scalars, step: rec.logged.append((dict(scalars), step))
    module.end_run = lambda: setattr(rec, "finished", True)
    return module


def fake_trackio(rec: Recorder):
    module = types.ModuleType("trackio")
    module.init = lambda **kw: setattr(rec, "init", kw)
    module.log = lambda scalars, step: rec.logged.append((dict(scalars), step))
    module.finish = lambda: setattr(rec, "finished", True)
    return module


FAKES = {"wandb": fake_wandb, "mlflow": fake_mlflow, "trackio": fake_trackio}


def scalars_of(run_dir) -> list:
    """metrics.jsonl as the dashboards receive it: ({"<split>/<name>": value}, step) per line."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [({f"{r['split']}/{k}": v for k, v in r.items() if k not in ("step", "split")}, r["step"]) for r in rows]


def test_every_backend_gets_the_scalars_of_metrics_jsonl_under_trls_names(tmp_path, tiny_model_dir, monkeypatch):
    recs = {name: Recorder() for name in FAKES}
    for name, fake in FAKES.items():
        monkeypatch.setitem(sys.modules, name, fake(recs[name]))
    d, cfg = configs(tmp_path, tiny_model_dir, eval_every=2, report_to="tensorboard,wandb,mlflow,trackio",
                     run_name="dash")
    train.train(d, cfg)
    run = tmp_path / "run"
    want = scalars_of(run)
    assert {"train/loss", "train/rewards/accuracies", "train/logps/chosen"} <= set(want[0][0])
    assert any("eval/rewards/margins" in s for s, _ in want)
    for name, rec in recs.items():
        assert rec.logged == want and rec.finished, name
    assert recs["wandb"].init["name"] == recs["trackio"].init["name"] == recs["mlflow"].init["name"] == "dash"
    assert recs["wandb"].init["dir"] == str(run) and recs["wandb"].init["config"]["train"]["beta"] == 0.1
    assert recs["mlflow"].init["params"]["train.report_to"] == "tensorboard,wandb,mlflow,trackio"
    assert list(run.glob("events.out.tfevents.*"))


def test_real_wandb_offline_keeps_the_run_on_disk_with_every_scalar(tmp_path, tiny_model_dir, monkeypatch):
    """With wandb installed (skipped without it): WANDB_MODE=offline writes the run under the run folder (for `wandb
    sync` later), and its record file holds every scalar name metrics.jsonl logged and each last value (wandb keeps
    a value as its JSON text)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    d, cfg = configs(tmp_path, tiny_model_dir, eval_every=2, report_to="wandb", run_name="dash")
    train.train(d, cfg)
    run = tmp_path / "run"
    (record,) = list(run.glob("wandb/offline-run-*/*.wandb"))
    data = record.read_bytes()
    last = {}
    for scalars, _ in scalars_of(run):
        last.update(scalars)
    assert "eval/rewards/margins" in last
    for name, value in last.items():
        assert name.encode() in data and json.dumps(value).encode() in data, name


def test_report_to_none_writes_metrics_jsonl_alone(tmp_path, tiny_model_dir):
    d, cfg = configs(tmp_path, tiny_model_dir, max_steps=1, report_to="none")
    train.train(d, cfg)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() and not list((tmp_path / "run").glob("events.*"))


def test_a_backend_not_installed_is_one_error_line_before_anything_loads(tmp_path, tiny_model_dir, monkeypatch,
                                                                        capsys):
    (tmp_path / "pairs.json").write_text(json.dumps(mc_like_pairs(16)))
    monkeypatch.setitem(sys.modules, "trackio", None)  # import trackio: ImportError
    monkeypatch.setattr(models, "load_tokenizer", lambda spec: pytest.fail("loaded before the check"))
    assert cli.main(run_argv(tiny_model_dir, tmp_path, "--report-to", "tensorboard,trackio")) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert "--report-to trackio: the trackio package is not installed: pip install -e '.[trackio]'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["wandb,comet", "", "none,wandb", "tensorboard, ,x"])
def test_an_unknown_backend_is_refused_naming_the_choices(tmp_path, tiny_model_dir, capsys, value):
    (tmp_path / "pairs.json").write_text(json.dumps(mc_like_pairs(16)))
    assert cli.main(run_argv(tiny_model_dir, tmp_path, "--report-to", value)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and ", ".join(dashboards.BACKENDS) in err and not (tmp_path / "run").exists()


def test_report_to_is_read_from_a_run_file_and_a_flag_overrides_it(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train, "train", lambda data_cfg, cfg: seen.append(cfg.report_to) or {})
    (tmp_path / "run.toml").write_text('[train]\nreport_to = "wandb,mlflow"\n')
    assert cli.main(["train", "--config", str(tmp_path / "run.toml")]) == 0
    assert cli.main(["train", "--config", str(tmp_path / "run.toml"), "--report_to", "none"]) == 0
    assert seen == ["wandb,mlflow", "none"]
