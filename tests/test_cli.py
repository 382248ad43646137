"""The command line itself: every help page prints, whatever its text holds."""

import subprocess
import sys

import pytest

from dpo import cli

COMMANDS = [[], *([name] for name in cli.COMMANDS)]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "dpo")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_help_page_prints_without_a_traceback(command, flag, capsys):
    with pytest.raises(SystemExit) as ended:
        cli.main([*command, flag])
    out, err = capsys.readouterr()
    assert ended.value.code == 0 and "usage: dpo" in out and not err
    for name in ([] if command else cli.COMMANDS):  # the program's page lists every command
        assert name in out


def test_a_percent_sign_in_a_help_text_is_printed_as_written(capsys):
    with pytest.raises(SystemExit):
        cli.main(["audit", "--help"])
    assert "95% interval" in capsys.readouterr().out


def test_the_installed_program_prints_its_help():
    done = subprocess.run([sys.executable, "-m", "dpo", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: dpo" in done.stdout and "Traceback" not in done.stderr


def run_file_argv(tmp_path, tiny_model_dir, text, *flags):
    import json

    from conftest import mc_like_pairs, run_argv

    (tmp_path / "pairs.json").write_text(json.dumps(mc_like_pairs(16)))
    (tmp_path / "run.toml").write_text(text)
    return run_argv(tiny_model_dir, tmp_path, "--config", str(tmp_path / "run.toml"), *flags)


def test_a_run_file_sets_a_runs_settings_under_either_name_and_flags_override_it(tmp_path, tiny_model_dir):
    import json

    text = "[train]\nlearning_rate = 3e-4\nbeta = 0.2\nlora_r = 2\nlora_target_modules = \"c_attn\"\n"
    argv = run_file_argv(tmp_path, tiny_model_dir, text, "--beta", "0.3", "--save-total-limit", "2")
    i = argv.index("--keep-checkpoints")
    del argv[i:i + 2]  # run_argv's own: set here under HF's name instead
    assert cli.main(argv) == 0
    train = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (train["learning_rate"], train["beta"], train["lora_r"], train["lora_targets"]) == (3e-4, 0.3, 2, "c_attn")
    assert train["keep_checkpoints"] == 2


@pytest.mark.parametrize("text, message", [
    ("[eval]\nlimit = 3\n", "[eval] is not a run file's table"),
    ("[train]\neval_steps = 2\neval_every = 3\n", "eval_steps and eval_every are the same setting"),
    ("[train]\nlearnig_rate = 1\n", "[train] unknown key 'learnig_rate'"),
    ("[data]\ngrid = true\n", "[data] grid: not a setting of one run"),
    ("[train]\nbeta = 'x'\n", "beta = 'x': expected a number"),
])
def test_a_bad_run_file_is_one_error_line_before_any_work(tmp_path, tiny_model_dir, capsys, text, message):
    assert cli.main(run_file_argv(tmp_path, tiny_model_dir, text)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err and str(tmp_path / "run.toml") in err, err
    assert not (tmp_path / "run").exists()


def test_the_help_names_both_spellings_of_a_setting(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for ours, hf in (("--eval-every", "--eval-steps"), ("--save-every", "--save-steps"),
                     ("--keep-checkpoints", "--save-total-limit"), ("--lora-targets", "--lora-target-modules")):
        assert f"{ours} {ours[2:].upper().replace('-', '_')}, {hf}" in out


# ---- the last net (issue 30): an unexpected exception is one `error:` line naming a file with its traceback

def broken_data_command(monkeypatch):
    """`dpo data` raising an exception no part of dpo expects (a stand-in for a bug)."""
    from dpo.data import prepare

    monkeypatch.setattr(prepare, "run", lambda cfg: {}["a bug"])


def test_an_unexpected_exception_is_one_error_line_naming_its_traceback_file(tmp_path, monkeypatch, capsys):
    from dpo.core import models

    broken_data_command(monkeypatch)
    monkeypatch.delenv("DPO_DEBUG")
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    assert cli.main(["data", "--n", "5"]) == 1
    err = capsys.readouterr().err
    (crash,) = (tmp_path / "cache" / "crashes").iterdir()
    assert err.splitlines() == [f"error: KeyError: 'a bug' -- an unexpected error, a bug in dpo-noise: its traceback "
                                f"is in {crash}; please report it with that file"]
    text = crash.read_text()
    assert "command: dpo data --n 5" in text and "Traceback (most recent call last)" in text
    assert text.rstrip().endswith("KeyError: 'a bug'")


def test_without_a_writable_cache_the_traceback_goes_to_the_temporary_folder(tmp_path, monkeypatch, capsys):
    from dpo.core import models

    broken_data_command(monkeypatch)
    monkeypatch.delenv("DPO_DEBUG")
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "file")  # no folder can be made under it
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)
    assert cli.main(["data"]) == 1
    (crash,) = (tmp_path / "tmp").iterdir()
    assert f"its traceback is in {crash}" in capsys.readouterr().err and "KeyError" in crash.read_text()


def test_under_dpo_debug_the_net_lets_the_exception_through(monkeypatch):
    """What the tests rely on (tests/conftest.py sets DPO_DEBUG=1): a traceback a test provokes fails it."""
    broken_data_command(monkeypatch)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["data"])
