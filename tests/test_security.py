"""Files and settings written by someone else (issue 18, "Security"): nothing the project loads runs code (a planted
pickle in each file it reads with torch), nothing from a sweep file becomes shell or a line of the Slurm script or
its cell list, no write follows a planted symbolic link, and a folder that is not a run is never written into."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import finished_run, run_argv, stopped_copy

from dpo import cli, files, train
from dpo.files import InputError


def one_error(code, capsys, *named) -> str:
    """Exit status 2 with one `error:` line (naming each of `named`) and no traceback; the line."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "Traceback"))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for name in named:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under folder (links as links) -> its bytes' sha256: a folder left byte-identical compares equal."""
    return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    return finished_run(tmp_path_factory.mktemp("finished"), tiny_model_dir)


# ---- 3. writes never follow a symbolic link

@pytest.fixture
def victim(tmp_path):
    """A file someone else owns; planted links point at it. Its bytes must never change."""
    path = tmp_path / "victim.txt"
    path.write_text('{"step": 0, "precious": true}\n')
    return path


def test_open_nofollow_and_lock_file_refuse_links_fifos_and_keep_targets(tmp_path, victim):
    link = tmp_path / "link"
    link.symlink_to(victim)
    for call in (lambda: files.open_nofollow(link, "w"), lambda: files.open_nofollow(link, "a+"),
                 lambda: files.lock_file(link), lambda: files.write_text_nofollow(link, "x")):
        with pytest.raises(InputError, match="is a symbolic link: refusing to write through it"):
            call()
    (tmp_path / "dangling").symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(InputError):
        files.open_nofollow(tmp_path / "dangling", "w")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InputError, match="not a regular file"):
        files.open_nofollow(tmp_path / "fifo", "a")  # without a reader: refused, not blocked
    assert victim.read_text() == '{"step": 0, "precious": true}\n'
    assert not (tmp_path / "created-through-the-link").exists()


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_a_linked_file_in_a_new_run_folder_is_refused(tmp_path, tiny_model_dir, victim, capsys, name):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).symlink_to(victim)
    (tmp_path / "pairs.json").write_text(json.dumps([{"prompt": "a b", "chosen": " yes", "rejected": " no"}] * 4))
    one_error(cli.main(run_argv(tiny_model_dir, tmp_path)), capsys, tmp_path / "run" / name)
    assert victim.read_text() == '{"step": 0, "precious": true}\n'


def test_linked_metrics_of_a_resumed_run_are_refused(tmp_path, tiny_model_dir, finished, victim, capsys):
    folder = stopped_copy(finished, tmp_path / "x")
    metrics = folder / "run" / "metrics.jsonl"
    metrics.unlink()
    metrics.symlink_to(victim)
    one_error(cli.main(run_argv(tiny_model_dir, folder, "--resume")), capsys, metrics)
    assert victim.read_text() == '{"step": 0, "precious": true}\n'


def test_the_logger_refuses_a_link_planted_after_the_checks(tmp_path, victim):
    """The checks at the start are for a clear message; O_NOFOLLOW is what protects the target."""
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link"):
        train.Logger(tmp_path, 0)
    (tmp_path / ".lock").symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link"):
        train.lock_run_dir(tmp_path)
    assert victim.read_text() == '{"step": 0, "precious": true}\n'


def test_a_linked_reference_cache_lock_is_refused(tmp_path, tiny_model_dir, finished, victim, capsys):
    folder = tmp_path / "x"
    shutil.copytree(finished, folder)
    shutil.rmtree(folder / "run")
    (lock,) = (folder / "cache" / "ref").glob("*.lock")
    lock.unlink()
    lock.symlink_to(victim)
    one_error(cli.main(run_argv(tiny_model_dir, folder)), capsys, lock)
    assert victim.read_text() == '{"step": 0, "precious": true}\n'


def test_a_linked_manifest_lock_is_refused(tmp_path, hellaswag_dir, victim, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".manifest.lock").symlink_to(victim)
    code = cli.main(["data", "--hellaswag-dir", str(hellaswag_dir), "--out-dir", str(out), "--n", "8",
                     "--eval-size", "20"])
    one_error(code, capsys, out / ".manifest.lock")
    assert victim.read_text() == '{"step": 0, "precious": true}\n'
