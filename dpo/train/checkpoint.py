"""Checkpoints of a training run (runs/<run>/checkpoints/step_NNNNNN/): writing them, the final policy made from the
last one, checking them, and `--resume` from the newest, which continues only the same run (the settings each
checkpoint records, compared by dpo/train/runsettings.py) and leaves a finished run as it is.
"""

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dpo.core import models
from dpo.core.files import InputError, atomic_write_json, read_json, sha256_file, writing_folder
from dpo.engine import lora
from dpo.train import runsettings

# A checkpoint folder: the policy (model.safetensors, config) and its tokenizer, or for a LoRA run its adapters alone
# (adapter_model.safetensors, adapter_config.json), trainer_state.pt (optimizer, schedule and RNG state: tensors,
# numbers, strings and plain containers only, so it loads with torch.load(weights_only=True) and nothing in a
# checkpoint can run code), and checkpoint.json, written last: the step and the sha256 of every other file, checked
# before a resume reads any of them.
TRAINER_STATE, CHECKPOINT_INFO = "trainer_state.pt", "checkpoint.json"
STATE_FORMAT = "dpo-noise checkpoint 2"


def checkpoints(out_dir: Path) -> list:
    return sorted((out_dir / "checkpoints").glob("step_*[0-9]"))


def save_checkpoint(out_dir: Path, step: int, policy, tokenizer, optimizer, scheduler, *, settings,
                    keep: int) -> Path:
    """policy (save_pretrained, fp32) + tokenizer, or a LoRA policy's adapters alone, + trainer state +
    checkpoint.json (with the run's settings), written to a temporary folder renamed when complete; only the newest
    `keep` (--keep-checkpoints) are kept."""
    final = out_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing_folder(tmp, final):  # a full or read-only disk: one error line, the half-written folder removed
        if lora.adapters(policy):
            lora.save_adapters(policy, tmp)
        else:
            models.save_model(policy, tokenizer, tmp)
        state = {"format": STATE_FORMAT, "step": step, "optimizer": optimizer.state_dict(),
                 "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
                 "rng": rng_state()}
        torch.save(state, tmp / TRAINER_STATE)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / CHECKPOINT_INFO, {"format": STATE_FORMAT, "step": step, "files": files,
                                                  "settings": settings}, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def write_final(last: Path, out_dir: Path, policy, tokenizer) -> None:
    """out_dir/final: the weights, config and tokenizer files of checkpoint `last`, a plain HF folder (loadable
    with AutoModelForCausalLM), renamed into place when complete, like checkpoints. A LoRA run's checkpoints hold
    adapters alone: its final/ is the policy (the state `last` saved) with the adapters folded into the base weights
    (`lora.merge`, in place: training is over), and the adapters alone in final/adapters/."""
    final, tmp = out_dir / "final", out_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing_folder(tmp, final):
        tmp.mkdir()
        if lora.adapters(policy):
            models.save_model(lora.merge(policy), tokenizer, tmp)
            (tmp / "adapters").mkdir()
            for name in lora.FILES:
                shutil.copy2(last / name, tmp / "adapters" / name)
        else:
            for path in sorted(last.iterdir()):
                if path.name not in (TRAINER_STATE, CHECKPOINT_INFO):
                    shutil.copy2(path, tmp / path.name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# --------------------------------------------------------------------------------------------------- reading one

def checkpoint_info(folder: Path) -> dict:
    """folder/checkpoint.json, checked: this version's format, the step its folder is named after, and a sha256
    for each of its files (names only: nothing outside the folder)."""
    path = folder / CHECKPOINT_INFO
    if not path.is_file():
        raise InputError(f"{folder}: no {CHECKPOINT_INFO}: not a checkpoint of this version of dpo-noise (an older "
                         "version's, or half written); refusing to resume from it")
    info = read_json(path, f"the {CHECKPOINT_INFO} of a dpo-noise checkpoint")
    files = info.get("files") if isinstance(info, dict) else None
    if not (isinstance(info, dict) and info.get("format") == STATE_FORMAT and type(info.get("step")) is int
            and folder.name == f"step_{info['step']:06d}" and isinstance(files, dict) and TRAINER_STATE in files
            and all(isinstance(k, str) and k == Path(k).name and k != CHECKPOINT_INFO and isinstance(v, str)
                    for k, v in files.items())):
        raise InputError(f"{path}: not this version's checkpoint.json of {folder.name} (format {STATE_FORMAT!r}, "
                         "its step, its files and their sha256); refusing to resume from it")
    return info


def verify_checkpoint(folder: Path, files: dict) -> None:
    """The checkpoint folder holds exactly the files its checkpoint.json lists, with their sha256."""
    present = {p.name for p in folder.iterdir()} - {CHECKPOINT_INFO}
    for name in sorted(present | set(files)):
        path = folder / name
        if name not in files or name not in present or not path.is_file() or sha256_file(path) != files[name]:
            why = "not listed in" if name not in files else "missing, though listed in" if name not in present \
                else "changed since it was written, per"
            raise InputError(f"{path}: {why} its {CHECKPOINT_INFO} (a damaged checkpoint, or files mixed from "
                             "another one); refusing to resume from it")


def read_trainer_state(folder: Path, step: int) -> dict:
    """folder/trainer_state.pt, loaded with torch.load(weights_only=True), and its layout checked; anything else (a
    pickle that would run code, a damaged file, another format) is one InputError."""
    path = folder / TRAINER_STATE
    try:
        state = torch.load(path, map_location=None if torch.cuda.is_available() else "cpu", weights_only=True)
        problem = trainer_state_problem(state, step)
    except Exception as e:  # UnpicklingError (an object weights_only forbids), a damaged archive, ...
        problem = f"{type(e).__name__}: {first_line(e)}"
        if type(e).__name__ == "UnpicklingError":  # torch's first line is advice; say what it found instead
            found = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
            problem = f"UnpicklingError: it holds objects that could run code, not only tensors and plain data " \
                      f"({found[0] if found else first_line(e)})"
    if problem:
        raise InputError(f"{path} is not a dpo-noise trainer state (refusing to load it: {problem})")
    return state


def trainer_state_problem(state, step: int) -> str:
    """'' when a loaded trainer state has this version's layout and is the state after `step`, else what is wrong
    (the values are checked as they are loaded)."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        return f"no \"format\": {STATE_FORMAT!r}"
    for key, kind in {"step": int, "optimizer": dict, "scheduler": dict, "rng": dict}.items():
        if type(state.get(key)) is not kind:
            return f"{key!r} is missing or not a {kind.__name__}"
    return f"the state after step {state['step']}, not {step}" if state["step"] != step else ""


def check_optimizer_state(optimizer) -> None:
    """Every loaded optimizer tensor has its parameter's shape (load_state_dict checks only the counts)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                    raise ValueError(f"optimizer {name} of shape {tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(p.shape)}")


def load_scheduler_state(scheduler, saved: dict) -> None:
    """The schedule's plain fields (step counts, learning rates); its lambda is this run's own."""
    own = scheduler.state_dict()
    for key, value in saved.items():
        if key not in own or key == "lr_lambdas" or type(value) is not type(own[key]):
            raise ValueError(f"scheduler field {key!r} = {value!r} is not one of this scheduler's")
    scheduler.load_state_dict({**saved, "lr_lambdas": own["lr_lambdas"]})


def rng_state() -> dict:
    """Every random stream as tensors and numbers (Python's and numpy's tuples taken apart)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict) -> None:
    python, npr = rng["python"], rng["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    np.random.set_state((npr["name"], npr["keys"].numpy().astype(np.uint32), npr["pos"], npr["has_gauss"],
                         npr["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


# ------------------------------------------------------------------------------------------------------ resuming

def resume(policy, optimizer, scheduler, last: Path, spec: str) -> int:
    """The master weights, optimizer, schedule and RNG streams of checkpoint `last`, once every file of it is the
    one its checkpoint.json lists (sha256); its step. spec: the model the run trains (named in an error)."""
    info = checkpoint_info(last)
    verify_checkpoint(last, info["files"])
    state = read_trainer_state(last, info["step"])
    if lora.adapters(policy):  # the base is the model spec's; the adapters are the checkpoint's
        lora.load_adapters(policy, last)
    else:
        try:
            policy.load_state_dict(models.load_model(str(last), dtype=torch.float32,
                                                     device=next(policy.parameters()).device).state_dict())
        except RuntimeError as e:  # another architecture or shape
            raise InputError(f"{last}: its weights do not fit the model {spec} ({first_line(e)})") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        check_optimizer_state(optimizer)
        load_scheduler_state(scheduler, state["scheduler"])
        restore_rng(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        raise InputError(f"{last / TRAINER_STATE} is not a dpo-noise trainer state for this run (refusing to load "
                         f"it: {type(e).__name__}: {first_line(e)})") from None
    return info["step"]


class AlreadyFinished(Exception):
    """--resume of a run that finished: nothing to do; carries its summary."""

    def __init__(self, summary: dict):
        super().__init__("finished")
        self.summary = summary


def check_resume(out_dir: Path, settings: dict, main: bool) -> None:
    """--resume: the newest checkpoint must record these settings (other defining settings: an InputError listing
    them). A run that finished (summary.json, written last) is left as it is: AlreadyFinished."""
    last = (checkpoints(out_dir) or [None])[-1]
    note = runsettings.check_checkpoint(last, checkpoint_info(last).get("settings"), settings, out_dir) \
        if last else ""
    if (out_dir / "summary.json").is_file():
        summary = read_json(out_dir / "summary.json", "the summary.json of a finished run")
        if not isinstance(summary, dict):
            raise InputError(f"{out_dir / 'summary.json'}: expected a JSON object (the summary of a finished run)")
        if main:
            gone = "" if (out_dir / "final").is_dir() or not summary.get("final") else " (its final/ was deleted)"
            print(f"{out_dir} finished training earlier (summary.json{gone}): nothing to do")
        raise AlreadyFinished(summary)
    if note and main:
        print(note)
