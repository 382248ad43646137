"""dpo.core.models: spec resolution, run folders, tokenizer fallback, model ids, GGUF conversion (a tiny local file)."""

import fcntl
import json
import os
import random
import time

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers import models as tok_models
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from dpo.core import models
from dpo.core.files import InputError

TEXT = ["hello world, the cat sat on the mat", "a man is sitting on a roof and he starts pulling up roofing"] * 5


def bpe(vocab_size=300) -> Tokenizer:
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return tok


def tiny_gpt2(folder, seed=0):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=8, n_layer=1, n_head=2))
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def make_run(root, final=True, steps=(2, 10)):
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"run": {"name": "x"}, "train": {"lr": 1e-6}}))
    if final:
        tiny_gpt2(root / "final")
    for step in steps:
        tiny_gpt2(root / "checkpoints" / f"step_{step:06d}", seed=step)
    return root


def test_local_folder_resolves_to_itself(tmp_path):
    folder = tiny_gpt2(tmp_path / "m")
    assert models.resolve(str(folder)) == str(folder)
    assert isinstance(models.load_model(str(folder)), GPT2LMHeadModel)


def test_run_folder_prefers_final(tmp_path):
    run = make_run(tmp_path / "run")
    assert models.resolve(str(run)) == str(run / "final")


def test_run_folder_without_final_is_refused_naming_its_newest_checkpoint(tmp_path):
    run = make_run(tmp_path / "run", final=False, steps=(2, 10))
    (run / "checkpoints" / "step_000099.tmp").mkdir()  # an unfinished write: not a checkpoint
    (run / "checkpoints" / "step_9").mkdir()  # numeric order, not string order
    assert models.run_weights(run) == (run / "checkpoints" / "step_000010", 10)
    assert models.run_weights(make_run(tmp_path / "done")) == (tmp_path / "done" / "final", None)
    with pytest.raises(InputError, match=r"stopped at step 10 \(no final/"):
        models.resolve(str(run))  # never silently the checkpoint; no `dpo train` holds its lock: stopped
    with open(run / ".lock", "w") as lock:  # as a running `dpo train` does
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(InputError, match=r"still training \(newest checkpoint step 10\)"):
            models.resolve(str(run))
    assert models.load_model(str(run / "checkpoints" / "step_000010")).config.n_embd == 8


@pytest.mark.parametrize("make_ckpts", [True, False])
def test_run_folder_without_checkpoints_yet(tmp_path, make_ckpts):
    run = make_run(tmp_path / "run", final=False, steps=())
    if make_ckpts:
        (run / "checkpoints").mkdir()
    with pytest.raises(InputError, match="neither final/ nor any checkpoints"):
        models.resolve(str(run))


@pytest.mark.parametrize("content,expected", [
    (b'{"run": "x", "train": {', r"config.json:1: malformed JSON"),
    (b'{"run": "caf\xe9"}', "not UTF-8"),
    (b'["run"]', "a JSON list, expected a JSON object"),
    (b'{"run": "x", "train": "gpt2"}', '"train" is a str, expected a JSON object'),
    (b"[" * 200_000 + b"]" * 200_000, r"config.json: unreadable JSON \(nested too deeply\)"),
    (b'{"run": ' + b"9" * 5000 + b"}", r"config.json: unreadable JSON \(Exceeds the limit \(4300 digits\)"),
])
def test_corrupt_config_json_is_one_error_line(tmp_path, content, expected):
    folder = tiny_gpt2(tmp_path / "m")
    (folder / "config.json").write_bytes(content)
    for load in (models.resolve, models.load_tokenizer, models.load_model):
        with pytest.raises(InputError, match=expected) as e:
            load(str(folder))
        assert str(folder / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_model_folder_with_final_subfolder_is_not_a_run(tmp_path):
    folder = tiny_gpt2(tmp_path / "m")  # its config.json has no "run" key
    (folder / "final").mkdir()
    assert models.resolve(str(folder)) == str(folder)


def test_hub_ids_pass_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("gpt2-large", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert models.resolve(spec) == spec
        assert models.model_id(spec) == spec


@pytest.mark.parametrize("spec", ["./missing", "/no/such/folder", "runs/a/b", "missing.gguf", "~/no-such-dpo-x"])
def test_missing_paths_raise(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="no such"):
        models.resolve(spec)


def test_missing_path_under_an_existing_folder_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(InputError, match="runs/exp1"):
        models.resolve("runs/exp1")


def test_a_plain_file_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a model folder"):
        models.resolve(str(tmp_path / "notes.txt"))


# --- load failures: one InputError line, fast, no network -------------------------------------------------------

def test_folders_are_checked_before_transformers(tmp_path):
    (tmp_path / "empty").mkdir()
    for load in (models.load_tokenizer, models.load_model):
        with pytest.raises(InputError, match=r"empty: not a model folder \(no config.json\)$"):
            load(str(tmp_path / "empty"))
    folder = tiny_gpt2(tmp_path / "m")  # config.json and weights, no tokenizer
    with pytest.raises(InputError, match=r"m: no tokenizer file \(tokenizer.json, vocab.json, tokenizer.model\)"):
        models.load_tokenizer(str(folder))
    (folder / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"m: no safetensors weights \(\*.safetensors\) next to its config.json"):
        models.load_model(str(folder))


def test_what_transformers_rejects_is_one_error_line(tmp_path):
    folder = tiny_gpt2(tmp_path / "m")
    PreTrainedTokenizerFast(tokenizer_object=bpe(), eos_token="<|endoftext|>").save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"truncated": ')
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    for load, what in ((models.load_tokenizer, "tokenizer"), (models.load_model, "model")):
        with pytest.raises(InputError, match=f"m: cannot load the {what}: ") as e:
            load(str(folder))
        assert "\n" not in str(e.value)


def test_weights_that_do_not_fit_the_config_are_refused_not_initialized_at_random(tmp_path):
    """transformers fills tensors missing from the weights file with random values and only logs it: a model folder
    whose weights are another architecture's (a swapped file) would be scored or trained as a random model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tiny_gpt2(tmp_path / "m")
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    (folder / "model.safetensors").write_bytes((tmp_path / "llama" / "model.safetensors").read_bytes())
    with pytest.raises(InputError, match=r"m: its weights do not match its config.json \(\d+ tensors missing"):
        models.load_model(str(folder))


OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture
def no_hub(monkeypatch):
    """No offline variable set, and a probe that must not be reached unless a test replaces it."""
    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)

    def unexpected(*args, **kwargs):
        raise AssertionError("the hub was probed")
    monkeypatch.setattr(models, "hub_reachable", unexpected)


@pytest.mark.parametrize("var", OFFLINE_VARS)
def test_hub_id_offline_fails_at_once(no_hub, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    for load in (models.load_tokenizer, models.load_model):
        t0 = time.perf_counter()
        with pytest.raises(InputError) as e:
            load("gpt2-large")
        assert time.perf_counter() - t0 < 3
        message = str(e.value)
        assert message.startswith("gpt2-large: ") and "not in the local Hugging Face cache" in message
        assert "offline mode" in message and models.OFFLINE_HINT in message and "\n" not in message


def test_hub_id_not_cached_and_hub_unreachable_fails_at_once(no_hub, monkeypatch):
    probed = []
    monkeypatch.setattr(models, "hub_reachable", lambda url: probed.append(url) or False)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"is unreachable \(no answer within 3 s\): use MODEL=smollm2-135m"):
        models.load_model("dpo-noise-tests/no-such-model")  # never in any cache
    assert time.perf_counter() - t0 < 3 and probed == [constants.ENDPOINT]


def test_hub_errors_are_one_line(no_hub, monkeypatch):
    calls = []

    class Auto:
        @staticmethod
        def from_pretrained(target, local_files_only=False, **kwargs):
            calls.append(local_files_only)
            raise OSError(f"{target} is not a local folder and is not a valid model identifier\nmore lines")

    monkeypatch.setattr(models, "hub_reachable", lambda url: True)
    with pytest.raises(InputError, match=r"^org/x: cannot load the model from \S+: org/x is not a local folder "
                       r"and is not a valid model identifier$"):
        models._from_pretrained(Auto, "org/x", "model")
    assert calls == [True, False]  # the cache first, then the hub


class Server:
    """A local HTTP server answering every HEAD with 404, or (answer=False) a socket that never answers."""

    def __init__(self, answer=True):
        import http.server
        import socket
        import threading

        if answer:
            class Handler(http.server.BaseHTTPRequestHandler):
                def do_HEAD(self):
                    self.send_response(404)
                    self.end_headers()

                def log_message(self, *args):
                    pass
            self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
            self.port, self.close = self.server.server_address[1], self.server.shutdown
        else:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen()
            self.port, self.close = self.sock.getsockname()[1], self.sock.close


def test_hub_probe_answers_quickly_either_way(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    answering, silent = Server(), Server(answer=False)
    try:
        assert models.hub_reachable(f"http://127.0.0.1:{answering.port}/", timeout=2)  # a 404 is an answer
        t0 = time.perf_counter()
        assert not models.hub_reachable(f"http://127.0.0.1:{silent.port}/", timeout=0.5)
        assert time.perf_counter() - t0 < 1.5
    finally:
        answering.close()
        silent.close()


def test_tokenizer_pad_falls_back_to_eos(tmp_path):
    PreTrainedTokenizerFast(tokenizer_object=bpe(), eos_token="<|endoftext|>").save_pretrained(tmp_path / "t")
    tok = models.load_tokenizer(str(tmp_path / "t"))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok(["the cat", "a man is sitting"], padding=True)["input_ids"][0][-1] == tok.eos_token_id


def test_model_id_tracks_the_weights(tmp_path):
    folder = tiny_gpt2(tmp_path / "m")
    first = models.model_id(str(folder))
    assert first.startswith(str(folder.resolve()) + "#")
    assert models.model_id(str(folder)) == first
    tiny_gpt2(folder, seed=1)
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert models.model_id(str(folder)) != first


def write_tiny_gguf(path):
    """A 1-layer llama with a BPE tokenizer, in GGUF, float32 tensors: enough to exercise the conversion."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    spec = json.loads(bpe().to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    n, hidden, ffn = len(tokens), 16, 32
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1), w.add_context_length(64), w.add_embedding_length(hidden), w.add_feed_forward_length(ffn)
    w.add_head_count(2), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5), w.add_rope_dimension_count(8)
    w.add_vocab_size(n), w.add_tokenizer_model("gpt2"), w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (n - 1)), w.add_bos_token_id(0), w.add_eos_token_id(0)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (n, hidden), "blk.0.attn_q": (hidden, hidden), "blk.0.attn_k": (hidden, hidden),
              "blk.0.attn_v": (hidden, hidden), "blk.0.attn_output": (hidden, hidden),
              "blk.0.ffn_gate": (ffn, hidden), "blk.0.ffn_up": (ffn, hidden), "blk.0.ffn_down": (hidden, ffn)}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.1).astype(np.float32))
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        w.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_gguf_is_converted_once_into_a_plain_folder(tmp_path, cache):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = cache / "models" / f"tiny-{models.sha256_file(gguf)[:12]}"
    out.mkdir(parents=True)
    (out / "junk").write_text("an interrupted conversion: no stamp")
    umask = os.umask(0o027)
    try:
        assert models.resolve(str(gguf)) == str(out)
    finally:
        os.umask(umask)
    assert not (out / "junk").exists() and (out / models.STAMP).is_file()
    # the cache follows the umask like every other output (safetensors alone would write model.safetensors 0600)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o640)}
    assert oct(out.stat().st_mode & 0o777) == oct(0o750)
    stamp = (out / models.STAMP).stat().st_mtime_ns
    assert models.resolve(str(gguf)) == str(out) and (out / models.STAMP).stat().st_mtime_ns == stamp

    model, tok = models.load_model(str(gguf)), models.load_tokenizer(str(gguf))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    batch = tok("the cat sat on the mat", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
    assert model.dtype == torch.float32 and "quantization_config" not in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("damage", ["random bytes", "magic then random bytes", "a tensor of 2**62 elements"])
def test_a_damaged_gguf_is_one_error_line(tmp_path, cache, damage):
    """Whatever the file claims, reading it is one InputError naming it, and no converted folder is left."""
    path = tmp_path / "bad.gguf"
    if damage == "a tensor of 2**62 elements":
        gguf = pytest.importorskip("gguf")
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_block_count(1), w.add_vocab_size(4), w.add_tokenizer_model("gpt2"), w.add_token_list(list("abcd"))
        w.add_token_types([1] * 4), w.add_token_merges(["a b"])
        w.add_tensor_info("token_embd.weight", (2**31, 2**31), np.dtype(np.float32), 16)
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_ti_data_to_file(), w.close()
    else:
        pytest.importorskip("gguf")
        path.write_bytes((b"GGUF" if damage.startswith("magic") else b"") + random.Random(0).randbytes(4096))
    with pytest.raises(InputError, match=rf"^{path}: cannot read it as a GGUF model \("):
        models.resolve(str(path))
    assert not [p for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]


def test_gguf_needs_the_extra(tmp_path, cache, monkeypatch):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda m: None if m == "gguf" else real(m))
    with pytest.raises(InputError, match=r"pip install -e '\.\[gguf\]'"):
        models.resolve(str(tmp_path / "x.gguf"))


SMOLLM2 = models.CACHE_DIR / "models" / "smollm2-135m"


@pytest.mark.skipif(not (SMOLLM2 / models.STAMP).is_file(), reason="smollm2-135m not converted in the cache")
def test_smollm2_from_the_cache_is_sensible():
    assert models.resolve("smollm2-135m") == str(SMOLLM2)
    tok, model = models.load_tokenizer("smollm2-135m"), models.load_model("smollm2-135m")
    assert tok.pad_token is not None and model.config.tie_word_embeddings
    batch = tok("The capital of France is Paris. It is known for the Eiffel Tower.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    assert loss < 6.0
