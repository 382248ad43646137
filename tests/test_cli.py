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
