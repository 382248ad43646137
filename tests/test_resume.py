"""`dpo train --resume` continues exactly the run it is given (issue 18, "Exactness on resume"): the settings that
define a run are compared with those its checkpoint recorded (a difference is one error line naming each), others
may change with a note; a finished run is left as it is; a run stopped after its last step is validated and
saved."""

import hashlib
import json
import shutil

import pytest
from conftest import configs, finished_run, metrics, run_argv, stopped_copy, tiny_model, with_earlier_names

from dpo import cli
from dpo.train import train

FINAL = ("run", "final", "model.safetensors")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    return finished_run(tmp_path_factory.mktemp("finished"), tiny_model_dir)


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def one_line(code, capsys, prefix="error: ") -> str:
    """The one line of stderr that starts with prefix (and no traceback)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith((prefix, "error:", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flags, listed", [
    (["--learning-rate", "1e-05", "--loss", "ipo"], ["learning_rate 5e-06 -> 1e-05", "loss sigmoid -> ipo"]),
    (["--beta", "0.2", "--max-steps", "3"], ["beta 0.1 -> 0.2", "max_steps 2 -> 3"]),
    (["--per-device-train-batch-size", "2"], ["step_pairs 4 -> 2"]),
    (["--max-length", "64", "--seed", "2", "--precision", "bf16"],
     ["max_length 1024 -> 64", "seed 1 -> 2", "precision fp32 -> bf16"]),
    (["--append-eos"], ["append_eos False -> True"]),
    (["--truncation-mode", "keep_start"], ["truncation_mode keep_end -> keep_start"]),
])
def test_resume_with_other_settings_is_refused_naming_each(tmp_path, tiny_model_dir, finished, capsys, flags,
                                                           listed):
    folder = stopped_copy(finished, tmp_path / "x")
    before = snapshot(folder)
    line = one_line(cli.main(run_argv(tiny_model_dir, folder, "--resume", *flags)), capsys)
    assert line.startswith(f"error: {folder / 'run'} was trained with other settings: ")
    assert line.endswith("; start a new run (another --run-name) or resume with the same settings")
    assert all(change in line for change in listed) and line.count(" -> ") == len(listed), line
    assert snapshot(folder) == before


def test_other_data_or_another_model_of_the_same_shape_is_refused(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                  finished, capsys):
    folder = stopped_copy(finished, tmp_path / "x")
    pairs = json.loads((folder / "pairs.json").read_text())
    pairs[3]["chosen"], pairs[3]["rejected"] = pairs[3]["rejected"], pairs[3]["chosen"]  # one label edited
    (folder / "pairs.json").write_text(json.dumps(pairs))
    line = one_line(cli.main(run_argv(tiny_model_dir, folder, "--resume")), capsys)
    assert "train_data " in line and line.count(" -> ") == 1
    other = tmp_path / "same-shape"  # another GPT-2 of the same shape: its weights fit the checkpoint's
    tiny_model("gpt2", len(tiny_tokenizer), seed=3).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    shutil.copy(finished / "pairs.json", folder / "pairs.json")
    line = one_line(cli.main(run_argv(other, folder, "--resume")), capsys)
    assert f"model {tiny_model_dir.resolve()}#" in line and f" -> {other.resolve()}#" in line
    assert not (folder / "run" / "final").exists()


def test_settings_that_cannot_change_the_numbers_may_change(tmp_path, tiny_model_dir, finished, capsys):
    folder = stopped_copy(finished, tmp_path / "x")
    code = cli.main(run_argv(tiny_model_dir, folder, "--resume", "--eval-every", "1", "--save-every", "2",
                             "--keep-checkpoints", "3", "--threads", "1"))
    assert code == 0
    assert capsys.readouterr().out.count("note: ") == 1
    assert (folder.joinpath(*FINAL)).read_bytes() == finished.joinpath(*FINAL).read_bytes()
    folder = stopped_copy(finished, tmp_path / "y")  # the same pairs per step, split otherwise
    code = cli.main(run_argv(tiny_model_dir, folder, "--resume", "--per-device-train-batch-size", "2",
                             "--gradient-accumulation-steps", "2", "--micro-batch-tokens", "64"))
    out = capsys.readouterr().out
    assert code == 0 and (f"note: resuming {folder / 'run'} with other settings that do not change its numbers: "
                          "per_device_train_batch_size 4 -> 2, gradient_accumulation_steps 1 -> 2, "
                          "micro_batch_tokens 0 -> 64") in out


def test_a_checkpoint_that_records_no_settings_is_refused(tmp_path, tiny_model_dir, finished, capsys):
    """Written by an older version: whether the resume continues the same run cannot be checked."""
    folder = stopped_copy(finished, tmp_path / "x")
    info_path = folder / "run" / "checkpoints" / "step_000001" / "checkpoint.json"
    info = json.loads(info_path.read_text())
    assert set(info["settings"]) == {"defining", "other"}
    del info["settings"]
    info_path.write_text(json.dumps(info))
    line = one_line(cli.main(run_argv(tiny_model_dir, folder, "--resume")), capsys)
    assert "step_000001: this checkpoint does not record the settings of its run" in line


def test_a_checkpoint_from_before_append_eos_resumes_as_a_run_without_it(tmp_path, tiny_model_dir, finished,
                                                                         capsys):
    """Its recorded settings lack append_eos (the setting came later): such runs had none, so a resume without
    --append-eos continues them (to the same weights), and one with it is refused."""
    folder = stopped_copy(finished, tmp_path / "x")
    info_path = folder / "run" / "checkpoints" / "step_000001" / "checkpoint.json"
    info = json.loads(info_path.read_text())
    del info["settings"]["defining"]["append_eos"]
    info_path.write_text(json.dumps(info))
    before = snapshot(folder)
    line = one_line(cli.main(run_argv(tiny_model_dir, folder, "--resume", "--append-eos")), capsys)
    assert line.count(" -> ") == 1 and "append_eos False -> True" in line and snapshot(folder) == before
    assert cli.main(run_argv(tiny_model_dir, folder, "--resume")) == 0
    assert (folder.joinpath(*FINAL)).read_bytes() == finished.joinpath(*FINAL).read_bytes()


def test_resuming_a_finished_run_changes_nothing(tmp_path, tiny_model_dir, finished, capsys):
    folder = tmp_path / "x"
    shutil.copytree(finished, folder)
    (folder / "run" / ".lock").unlink()  # (committed sweep cells have none: it is not made either)
    before = snapshot(folder)
    assert cli.main(run_argv(tiny_model_dir, folder, "--resume")) == 0
    assert f"{folder / 'run'} finished training earlier (summary.json): nothing to do" in capsys.readouterr().out
    assert snapshot(folder) == before


@pytest.mark.parametrize("earlier_version", [False, True])
def test_a_run_stopped_after_its_last_step_is_validated_and_saved(tmp_path, tiny_model_dir, earlier_version):
    """Killed between its last checkpoint and its final save: --resume trains nothing, validates (once in
    metrics.jsonl, also when a version before TRL's names logged the validation: "val", rewards/accuracy) and
    writes final/ and summary.json, as the uninterrupted run did."""
    d, cfg = configs(tmp_path, tiny_model_dir, max_steps=2, save_every=1)
    done = train.train(d, cfg)
    run = tmp_path / "run"
    weights = (run / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    if earlier_version:
        with_earlier_names(run)
        assert len(metrics(run, "val")) == 1
    cfg.resume = True
    summary = train.train(d, cfg)
    assert summary["eval"] == done["eval"] and summary["eval"]["rewards/accuracies"] is not None
    assert summary["resumed_at"] == 2 and json.loads((run / "summary.json").read_text())["eval"] == done["eval"]
    assert summary["pairs_trained"] == done["pairs_trained"] > 0 and summary["pairs_this_session"] == 0
    assert (run / "final" / "model.safetensors").read_bytes() == weights
    validated = metrics(run, "val") + metrics(run, "eval")
    assert [m["step"] for m in validated] == [2] and len(metrics(run)) == 2
