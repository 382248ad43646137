"""LoRA (dpo/engine/lora.py, issue 19 §2): a frozen base, trainable low-rank A/B, the reference is the same model
with its adapters off, checkpoints hold the adapters alone, final/ the merged model. Tiny random GPT-2 (Conv1D) and
Llama (nn.Linear) models built from a config; no download."""

import json
import math
import shutil

import pytest
import torch
from conftest import configs, final_params, mc_like_pairs, metrics, run_argv, stopped_copy, tiny_model
from transformers import AutoModelForCausalLM

from dpo import cli
from dpo.core.models import disable_dropout, enable_checkpointing
from dpo.engine import lora
from dpo.train import train

KINDS = ("gpt2", "llama")
DEFAULT_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                   "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json"}


def tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (3, 17), generator=torch.Generator().manual_seed(seed))


def logprobs(model, ids) -> torch.Tensor:
    """Each next token's log-prob under the model, [batch, length - 1]."""
    logits = model(ids).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]


def adapted(kind: str, r: int = 4, targets: str = "", trained: bool = True):
    """(the base model, an adapted copy); trained: B set at random, as if the adapters had been trained."""
    base = tiny_model(kind, 400).eval()
    model = tiny_model(kind, 400).eval()
    lora.add_adapters(model, r, 8.0, targets, 0.0, "tiny")
    if trained:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in lora.adapters(model).values():
                layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=gen))
    return base, model


# ------------------------------------------------------------------------------------------- the adapted model

@pytest.mark.parametrize("kind", KINDS)
def test_adapters_off_give_the_base_models_logprobs_exactly(kind):
    base, model = adapted(kind)
    ids = tokens(400)
    want = logprobs(base, ids)
    with torch.no_grad():
        with lora.adapters_off(model):
            assert torch.equal(logprobs(model, ids), want)
        assert not torch.allclose(logprobs(model, ids), want, atol=1e-3)  # on: trained adapters change them
    assert all(layer.enabled for layer in lora.adapters(model).values())  # switched back on after the block


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_adapters_compute_the_base_model_exactly(kind):
    """B starts at zero: the policy's first step starts from exactly the reference."""
    base, model = adapted(kind, trained=False)
    ids = tokens(400, seed=2)
    with torch.no_grad():
        assert torch.equal(logprobs(model, ids), logprobs(base, ids))


@pytest.mark.parametrize("kind", KINDS)
def test_merged_weights_give_the_adapted_models_logprobs(kind, tmp_path):
    _, model = adapted(kind)
    ids = tokens(400, seed=3)
    with torch.no_grad():
        want = logprobs(model, ids)
        lora.merge(model)
    assert not lora.adapters(model)  # a plain model again
    model.save_pretrained(tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(logprobs(merged, ids), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_flow_only_to_the_adapters_also_with_checkpointing(kind):
    _, model = adapted(kind)
    disable_dropout(model)  # (as dpo train does: the two passes below must be the same computation)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(lora.adapters(model))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_checkpointing(model)
        model.zero_grad(set_to_none=True)
        logprobs(model, tokens(400, seed=4)).sum().backward()
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(got) == trainable and all(g.abs().sum() > 0 for g in got.values())
        grads.append(got)
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in trainable)


@pytest.mark.parametrize("kind", KINDS)
def test_default_targets_are_every_linear_layer_but_the_output_embedding(kind):
    _, model = adapted(kind, trained=False)
    assert model.lora_targets == DEFAULT_TARGETS[kind]
    assert len(lora.adapters(model)) == 2 * len(DEFAULT_TARGETS[kind]) + (2 if kind == "gpt2" else 0)  # + mlp.c_proj
    assert not isinstance(model.get_output_embeddings(), lora.LoraLayer)


def test_a_dotted_target_adapts_only_the_layers_inside_that_module():
    _, model = adapted("gpt2", targets="attn.c_proj", trained=False)
    assert sorted(lora.adapters(model)) == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]


def test_a_target_the_model_lacks_is_an_error_naming_those_it_has():
    from dpo.core.files import InputError

    with pytest.raises(InputError, match=r"--lora-targets 'q_proj' matches no linear layer of tiny .*c_attn, c_proj, "
                                         r"c_fc"):
        adapted("gpt2", targets="c_attn,q_proj")


def test_saved_adapters_load_back_and_others_are_refused(tmp_path):
    from dpo.core.files import InputError

    _, model = adapted("llama")
    lora.save_adapters(model, tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == ADAPTER_FILES
    _, fresh = adapted("llama", trained=False)
    lora.load_adapters(fresh, tmp_path / "a")
    ids = tokens(400, seed=5)
    with torch.no_grad():
        assert torch.equal(logprobs(fresh, ids), logprobs(model, ids))
    _, other_rank = adapted("llama", r=2, trained=False)
    with pytest.raises(InputError, match="not adapters of rank 2"):
        lora.load_adapters(other_rank, tmp_path / "a")
    _, fewer = adapted("llama", targets="q_proj", trained=False)
    with pytest.raises(InputError, match="not this run's adapters"):
        lora.load_adapters(fewer, tmp_path / "a")


# ------------------------------------------------------------------------------------------------ dpo train

def one_line(code, capsys) -> str:
    """The one `error:` line of a command that failed (and no traceback)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "Traceback"))]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--lora-r", "-1"], "--lora-r -1: expected a rank of 1 or more, or 0"),
    (["--lora-r", "2.5"], "--lora-r '2.5': expected an integer"),
    (["--lora-r", "4", "--lora-alpha", "0"], "--lora-alpha 0.0: expected a number > 0"),
    (["--lora-r", "4", "--lora-alpha", "nan"], "--lora-alpha nan: expected a number > 0"),
    (["--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout 1.0: expected a probability in [0, 1)"),
    (["--lora-r", "4", "--lora-dropout", "-0.1"], "--lora-dropout -0.1: expected a probability in [0, 1)"),
    (["--lora-r", "4", "--lora-targets", "c_attn;c_fc"], "--lora-targets 'c_attn;c_fc': expected comma-separated"),
    (["--lora-alpha", "32", "--lora-dropout", "0.1"], "--lora-alpha, --lora-dropout: only with --lora-r"),
    (["--lora-r", "4", "--lora-targets", "c_attn,q_proj"], "--lora-targets 'q_proj' matches no linear layer of"),
])
def test_bad_lora_flags_give_one_error_line_and_write_nothing(tmp_path, tiny_model_dir, capsys, flags, message):
    (tmp_path / "pairs.json").write_text(json.dumps(mc_like_pairs(8)))
    line = one_line(cli.main(run_argv(tiny_model_dir, tmp_path, *flags)), capsys)
    assert message in line, line
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.json").exists()


LORA = ("--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """folder/run: a finished 2-step LoRA run of the tiny GPT-2 (checkpoints step_000001, step_000002, final/),
    its reference run alongside (--ref-on-the-fly: the policy with its adapters off)."""
    folder = tmp_path_factory.mktemp("lora")
    (folder / "pairs.json").write_text(json.dumps(mc_like_pairs(16)))
    assert cli.main(run_argv(tiny_model_dir, folder, *LORA, "--ref-on-the-fly", "--learning-rate", "1e-2")) == 0
    return folder


def test_a_lora_run_saves_small_adapter_checkpoints_and_a_merged_final(lora_run, tiny_model_dir):
    run = lora_run / "run"
    base_size = (tiny_model_dir / "model.safetensors").stat().st_size
    for step in (1, 2):
        ckpt = run / "checkpoints" / f"step_00000{step}"
        assert {p.name for p in ckpt.iterdir()} == ADAPTER_FILES | {"trainer_state.pt", "checkpoint.json"}
        assert sum(p.stat().st_size for p in ckpt.iterdir()) < base_size / 2  # adapters and their Adam state
    assert {p.name for p in (run / "final" / "adapters").iterdir()} == ADAPTER_FILES
    assert (run / "final" / "adapters" / "adapter_model.safetensors").read_bytes() == \
        (run / "checkpoints" / "step_000002" / "adapter_model.safetensors").read_bytes()
    config = json.loads((run / "config.json").read_text())["lora"]
    assert config["r"] == 4 and config["alpha"] == 8 and config["targets"] == DEFAULT_TARGETS["gpt2"]
    # final/ = base + scale B A: what the base model with final/adapters computes
    merged = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    lora.add_adapters(model, 4, 8.0, "", 0.0, "tiny")
    lora.load_adapters(model, run / "final" / "adapters")
    ids = tokens(merged.config.vocab_size, seed=6)
    with torch.no_grad():
        assert torch.allclose(logprobs(merged, ids), logprobs(model, ids), atol=1e-5, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = {n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert moved == {f"transformer.h.{i}.{m}.weight" for i in (0, 1)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}  # the base stayed frozen


def test_a_lora_runs_first_step_starts_from_exactly_the_reference(lora_run):
    first, second = metrics(lora_run / "run")
    assert first["rewards/margins"] == 0 and first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert second["rewards/margins"] != 0  # and the adapters did train


def test_lora_resume_equals_the_uninterrupted_run(lora_run, tiny_model_dir, tmp_path, capsys):
    """Stopped after step 1 and resumed: the same final/ and adapters, bit for bit (the adapters' dropout draws
    included)."""
    folder = stopped_copy(lora_run, tmp_path / "x")
    assert cli.main(run_argv(tiny_model_dir, folder, *LORA, "--ref-on-the-fly", "--learning-rate", "1e-2",
                             "--resume")) == 0
    for name in ("model.safetensors", "adapters/adapter_model.safetensors"):
        assert (folder / "run" / "final" / name).read_bytes() == (lora_run / "run" / "final" / name).read_bytes()
    numbers = ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "lr")
    assert [[m[k] for k in numbers] for m in metrics(folder / "run")] == \
        [[m[k] for k in numbers] for m in metrics(lora_run / "run")]


@pytest.mark.parametrize("flags, listed", [
    (["--lora-r", "8", "--lora-alpha", "8", "--lora-dropout", "0.1"], ["lora_r 4 -> 8"]),
    ([*LORA, "--lora-targets", "c_attn"], ["lora_targets  -> c_attn"]),
    ([], ["lora_r 4 -> none", "lora_alpha 8.0 -> none", "lora_targets  -> none", "lora_dropout 0.1 -> none"]),
])
def test_resume_with_other_lora_settings_is_refused(lora_run, tiny_model_dir, tmp_path, capsys, flags, listed):
    folder = stopped_copy(lora_run, tmp_path / "x")
    line = one_line(cli.main(run_argv(tiny_model_dir, folder, *flags, "--ref-on-the-fly", "--learning-rate", "1e-2",
                                      "--resume")), capsys)
    assert "was trained with other settings: " in line and all(c in line for c in listed), line
    assert line.count(" -> ") == len(listed), line
    assert not (folder / "run" / "final").exists()


def test_a_lora_checkpoint_is_named_as_such_where_a_model_is_expected(lora_run):
    from dpo.core import models
    from dpo.core.files import InputError

    ckpt = lora_run / "run" / "checkpoints" / "step_000001"
    for load in (models.load_tokenizer, models.load_model):
        with pytest.raises(InputError, match="LoRA adapters alone .* final/ holds the merged model"):
            load(str(ckpt))


def test_bf16_and_checkpointing_compose_with_lora(tmp_path, tiny_model_dir):
    """A bf16 compute copy with gradient checkpointing trains the adapters like fp32 (bf16 tolerance); the
    reference is scored by the fp32 policy with its adapters off, into the cache full fine-tuning runs share."""
    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["--precision", "bf16", "--gradient-checkpointing", "true"])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "pairs.json").write_text(json.dumps(mc_like_pairs(16)))
        argv = run_argv(tiny_model_dir, folder, "--lora-r", "4", "--learning-rate", "1e-2", *extra)
        argv[argv.index("--cache-dir") + 1] = str(tmp_path / "cache")
        assert cli.main(argv) == 0
        runs[name] = metrics(folder / "run")
    assert [m["loss"] for m in runs["bf16"]] == pytest.approx([m["loss"] for m in runs["fp32"]], abs=2e-2)
    assert json.loads((tmp_path / "bf16" / "run" / "config.json").read_text())["reference_pairs_computed"] == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "run" / "final").dtype == torch.float32
    shutil.rmtree(tmp_path / "cache")


def test_compiled_lora_training_matches_eager(tmp_path, tiny_model_dir):
    """Compiled blocks (inside gradient checkpointing) carry their adapters, switched off for the reference each
    micro-batch (--ref-on-the-fly) and on for the policy: the eager run's losses and update."""
    runs = {}
    for name, kw in (("eager", dict(compile=False)), ("compiled", dict(compile=True, gradient_checkpointing=True))):
        d, cfg = configs(tmp_path, tiny_model_dir, output_dir=str(tmp_path / name), max_steps=2, lora_r=4,
                         ref_on_the_fly=True, val_data_path="", **kw)
        train.train(d, cfg)
        runs[name] = metrics(tmp_path / name)
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compiled"] is True
    assert [m["loss"] for m in runs["compiled"]] == pytest.approx([m["loss"] for m in runs["eager"]], abs=1e-5)
    assert runs["compiled"][0]["rewards/margins"] == 0  # step 1: exactly the reference, compiled too
    got, want = final_params(tmp_path / "compiled"), final_params(tmp_path / "eager")
    start = final_params(tiny_model_dir, "")
    assert (got - want).abs().max() < 1e-5 and (want - start).abs().max() > 1e-4


def test_peft_loads_the_saved_adapters_and_computes_final(lora_run, tiny_model_dir):
    """final/adapters has peft's names: PeftModel.from_pretrained on the base model gives final/'s log-probs."""
    peft = pytest.importorskip("peft")
    run = lora_run / "run"
    merged = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                             str(run / "final" / "adapters")).eval()
    ids = tokens(merged.config.vocab_size, seed=7)
    with torch.no_grad():
        assert torch.allclose(logprobs(merged, ids), logprobs(adapted, ids), atol=1e-4, rtol=0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        assert not torch.allclose(logprobs(base, ids), logprobs(adapted, ids), atol=1e-4, rtol=0)  # it did adapt
