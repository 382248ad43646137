"""Your own preference data (`dpo data --pairs`): every format in, the same files out; TRL's row forms; the noise
models; reuse by `dpo train`; one error line for bad input; data -> train -> audit end to end."""

import csv
import json
import random
import re
import sys

import pytest
from conftest import WORDS

from dpo import cli
from dpo.core.config import DataConfig
from dpo.core.files import InputError
from dpo.data import pairs, prepare, sources
from dpo.data.sources import ChatTemplate, Fields, Row

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are "
          "helpful.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def string_rows(n=40, seed=0):
    """mc-like rows (after '... A' prefer ' yes', after '... B' ' no'), some answers longer, each with a flip
    probability `p`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        cue = rng.choice("AB")
        good, bad = (" yes", " no") if cue == "A" else (" no", " yes")
        if i % 3 == 0:
            good += " indeed"
        rows.append({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + " " + cue,
                     "chosen": good, "rejected": bad, "p": round(rng.random(), 2)})
    return rows


def chat_rows(n=30, seed=0):
    return [{"prompt": [{"role": "user", "content": f"Is {p['prompt']} right?"}],
             "chosen": [{"role": "assistant", "content": p["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": p["rejected"].strip()}]} for p in string_rows(n, seed)]


def write_source(folder, fmt, rows):
    """rows written as fmt: json, jsonl, csv, parquet, arrow (a folder as datasets' save_to_disk writes it, made
    with pyarrow), datasets (save_to_disk itself), snapshot (a dataset repository's data/ with a test split)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt in ("json", "jsonl"):
        path = folder / f"prefs.{fmt}"
        path.write_text(json.dumps(rows) if fmt == "json" else "".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        path = folder / "prefs.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "snapshot":
        path = folder / "repo"
        (path / "data").mkdir(parents=True)
        (path / "README.md").write_text("a dataset card\n")
        for name, part in (("train-00000-of-00002", rows[:25]), ("train-00001-of-00002", rows[25:]),
                           ("test-00000-of-00001", rows[:3])):
            (path / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    elif fmt == "datasets":
        datasets = pytest.importorskip("datasets")
        from datasets.table import InMemoryTable

        # an explicit fingerprint: hashing the table fails with some dill/pyarrow pairs, and is not what is tested
        path = folder / "saved"
        table = InMemoryTable.from_pylist(rows)
        datasets.DatasetDict({"train": datasets.Dataset(table, fingerprint="a"),
                              "test": datasets.Dataset(table.slice(0, 3), fingerprint="b")}).save_to_disk(path)
    else:
        pa = pytest.importorskip("pyarrow")
        table = pa.Table.from_pylist(rows)
        if fmt == "parquet":
            import pyarrow.parquet

            path = folder / "prefs.parquet"
            pyarrow.parquet.write_table(table, path)
        else:
            import pyarrow.ipc

            path = folder / "saved"
            path.mkdir()
            with pyarrow.ipc.new_stream(path / "data-00000-of-00001.arrow", table.schema) as writer:
                writer.write_table(table)
            (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
            (path / "dataset_info.json").write_text("{}")
    return path


FORMATS = ("json", "jsonl", "csv", "parquet", "arrow", "datasets", "snapshot")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny GPT-2 with a ChatML chat template (a default system message when the first is not one)."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def run_data(*args, out):
    return cli.main(["data", *map(str, args), "--out-dir", str(out)])


def read(path):
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- formats and reading

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_files(tmp_path, fmt):
    rows = string_rows()
    reference = tmp_path / "ref"
    assert run_data("--pairs", write_source(tmp_path / "j", "jsonl", rows), "--noise", 0.25, out=reference) == 0
    assert run_data("--pairs", write_source(tmp_path / fmt, fmt, rows), "--noise", 0.25, out=tmp_path / "out") == 0
    got = sorted(p.name for p in (tmp_path / "out").glob("*.json") if p.name != "manifest.json")
    want = sorted(p.name for p in reference.glob("*.json") if p.name != "manifest.json")
    assert len(got) == 2 and [re.sub(r"^[^_]+", "", n) for n in got] == [re.sub(r"^[^_]+", "", n) for n in want]
    for g, w in zip(got, want):
        assert (tmp_path / "out" / g).read_bytes() == (reference / w).read_bytes()


def test_folders_take_the_train_split_and_name_it(tmp_path):
    rows = string_rows()
    repo = write_source(tmp_path, "snapshot", rows)
    assert [r.data for r in sources.read_rows(repo)] == rows  # the two train shards in order, not the test split
    assert sources.source_stem(repo) == "repo" and sources.source_stem(tmp_path / "x" / "train") == "x-train"
    (repo / "data" / "train_sft.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(InputError, match=r"3 splits \(data/test, data/train, data/train_sft\), 2 are train splits"):
        sources.read_rows(repo)
    picked = sources.read_rows(str(repo / "data" / "train-*.jsonl"))  # a glob pattern picks files by hand
    assert [r.data for r in picked] == rows


def test_csv_cells_may_span_lines_and_rows_know_their_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('\ufeffprompt,chosen,rejected\n"two\nlines",a,b\nq,c,d\n', encoding="utf-8")
    rows = sources.read_rows(path)
    assert [r.data["prompt"] for r in rows] == ["two\nlines", "q"] and [r.line for r in rows] == [2, 4]
    assert rows[1].here() == f"{path}:4: row 1"


def test_a_csv_cell_longer_than_the_csv_modules_limit_is_read(tmp_path):
    """The csv module's default field limit is 128 KiB; a long response is data, not a malformed file."""
    path = tmp_path / "p.csv"
    long = "word " * 40_000  # 200 KB
    path.write_text(f"prompt,chosen,rejected\nq,{long},b\n", encoding="utf-8")
    assert sources.read_rows(path)[0].data["chosen"] == long
    assert csv.field_size_limit() == 128 * 1024  # the module's limit is left as it was


def test_a_file_mixing_conversations_and_strings_is_refused_for_training(tmp_path):
    rows = chat_rows(2) + string_rows(2)
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(InputError, match=rf"^{path}: pair 2: field 'chosen' is not a conversation, but {path}: pair "
                                         r"0's is .*: a file holds rows of one form"):
        pairs.read_pairs(path, ChatTemplate())


def test_parquet_without_pyarrow_is_one_error_saying_how_to_install(tmp_path, capsys, monkeypatch):
    path = tmp_path / "prefs.parquet"
    path.write_bytes(b"PAR1 not really")
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as when it is not installed
    assert run_data("--pairs", path, out=tmp_path / "out") == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {path}: reading Parquet files needs pyarrow, which is not installed: pip install pyarrow "
                   "(or this project's extra: pip install -e '.[pairs]')"]
    assert not (tmp_path / "out").exists()


def test_jsonl_and_conversations_train_directly(tmp_path, chat_model_dir):
    """read_pairs (dpo train --train-data-path, dpo audit) takes JSON Lines and TRL's conversational rows."""
    path = write_source(tmp_path, "jsonl", chat_rows(4))
    with pytest.raises(InputError, match=r"prefs.jsonl:1: pair 0: a conversation .* pass --model"):
        pairs.read_pairs(path)
    loaded = pairs.read_pairs(path, ChatTemplate(str(chat_model_dir)))
    assert loaded[0]["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n") and loaded[0]["item"] == "pair/0"
    assert loaded[0]["chosen"] == chat_rows(4)[0]["chosen"][0]["content"] + "<|im_end|>\n"


# ---------------------------------------------------------------------------------------------- TRL's row forms

def row(data):
    return Row("f.jsonl", 0, 1, data)


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


TRL_ROWS = [
    {"prompt": [u("What color is the sky?")], "chosen": [a("Blue.")], "rejected": [a("Green.")]},
    {"prompt": [{"role": "system", "content": "Be brief."}, u("Hi"), a("Hello!"), u("2+2?")], "chosen": [a("4")],
     "rejected": [a("5")]},
    {"prompt": [u("Finish: the cat"), a("The cat")], "chosen": [a(" sat.")], "rejected": [a(" ran.")]},
    {"chosen": [u("Q?"), a("yes")], "rejected": [u("Q?"), a("no")]},  # implicit prompt
    {"prompt": "Q?", "chosen": [u("Q?"), a("yes")], "rejected": [u("Q?"), a("no")]},  # string prompt, conversations
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "Q: why? A: because", "rejected": "Q: why? A: no idea"},
]


def test_conversations_render_as_chatml_by_hand(chat_model_dir):
    chat = ChatTemplate(str(chat_model_dir))
    system = "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    got = sources.to_pair(row(TRL_ROWS[0]), Fields(), chat)
    assert got == {"prompt": system + "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n",
                   "chosen": "Blue.<|im_end|>\n", "rejected": "Green.<|im_end|>\n"}
    got = sources.to_pair(row(TRL_ROWS[2]), Fields(), chat)  # the prompt continues its final assistant message,
    assert got["prompt"].endswith("<|im_start|>assistant\nThe cat")  # and a response is a message after it (TRL)
    assert got["chosen"] == "<|im_end|>\n<|im_start|>assistant\n sat.<|im_end|>\n"
    assert sources.to_pair(row(TRL_ROWS[3]), Fields(), chat) == sources.to_pair(row(TRL_ROWS[4]), Fields(), chat)


def test_implicit_prompts_of_strings_follow_trl():
    assert sources.to_pair(row(TRL_ROWS[6]), Fields()) == {"prompt": "The sky is", "chosen": " blue.",
                                                           "rejected": " green."}
    assert sources.to_pair(row(TRL_ROWS[7]), Fields())["prompt"] == "Q: why? A:"
    renamed = {"q": "The sky is", "good": " blue.", "bad": " green."}
    assert sources.to_pair(row(renamed), Fields("q", "good", "bad")) == sources.to_pair(row(TRL_ROWS[5]), Fields())
    for bad, why in (({"chosen": "abc", "rejected": "xyz"}, "they share no start"),
                     ({"chosen": "abc", "rejected": "abcd"}, "one is the start of the other"),
                     ({"chosen": "a b", "rejected": [a("x")]}, "must both be strings or both lists")):
        with pytest.raises(InputError, match=re.escape(why)):
            sources.to_pair(row(bad), Fields())


def trl_reference(data, tokenizer):
    trl = pytest.importorskip("trl")
    out = trl.maybe_apply_chat_template(trl.maybe_extract_prompt(dict(data)), tokenizer)
    return {k: out[k] for k in ("prompt", "chosen", "rejected")}


def test_rendering_equals_trls_own(chat_model_dir):
    """to_pair against TRL's maybe_extract_prompt + maybe_apply_chat_template (skipped without TRL), with the tiny
    model's ChatML template and, where it is in the cache, SmolLM2's."""
    from dpo.core import models

    specs = [str(chat_model_dir)]
    if (models.CACHE_DIR / "models" / "smollm2-135m" / models.STAMP).is_file():
        specs.append("smollm2-135m")
    for spec in specs:
        tokenizer = models.load_tokenizer(spec)
        for example in TRL_ROWS:
            want = trl_reference(example, tokenizer)
            assert sources.to_pair(row(example), Fields(), ChatTemplate(spec, tokenizer)) == want, (spec, example)


# ---------------------------------------------------------------------------------------------- the noise models

def made(out, pattern):
    (path,) = [p for p in out.glob(pattern) if "_val_" not in p.name]
    return read(path), read(out / "manifest.json")[path.name]


def flipped(rows):
    return {r["item"] for r in rows if r["flipped"]}


def test_uniform_noise_is_exact_nested_and_the_holdout_is_clean_and_shared(tmp_path):
    src = write_source(tmp_path, "jsonl", string_rows(50))
    for noise, seed in ((0.1, 1), (0.3, 1), (0.3, 2)):
        assert run_data("--pairs", src, "--noise", noise, "--seed", seed, "--holdout", 10, out=tmp_path / "o") == 0
    low, entry = made(tmp_path / "o", "prefs_n40_noise0.1_seed1.json")
    high, _ = made(tmp_path / "o", "prefs_n40_noise0.3_seed1.json")
    assert len(flipped(low)) == 4 and len(flipped(high)) == 12 and flipped(low) < flipped(high)
    val = read(tmp_path / "o" / "prefs_heldout_n10.json")
    assert len(val) == 10 and not any(p["flipped"] for p in val)
    assert not {p["item"] for p in val} & {p["item"] for p in high}  # held out before flipping, never trained on
    assert entry["validation_file"] == "prefs_heldout_n10.json" and entry["flipped"] == 4
    assert entry["sources"]["pairs"]["sha256"] == sources.source_sha256([src])
    assert entry["settings"]["noise_model"] == "uniform" and entry["settings"]["holdout"] == 10
    assert prepare.validation_file_for(tmp_path / "o" / "prefs_n40_noise0.1_seed1.json") == \
        tmp_path / "o" / "prefs_heldout_n10.json"  # held-out rows


def test_the_same_inputs_give_byte_identical_files(tmp_path):
    src = write_source(tmp_path, "csv", string_rows())
    args = ("--pairs", src, "--noise-longer", 0.2, "--noise-shorter", 0.6, "--seed", 4)
    assert run_data(*args, out=tmp_path / "a") == 0 and run_data(*args, out=tmp_path / "b") == 0
    for path in (tmp_path / "a").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()


def test_length_noise_flips_by_which_response_is_longer(tmp_path):
    src = write_source(tmp_path, "jsonl", string_rows(60))
    clean_rows = [sources.to_pair(r, Fields()) for r in sources.read_rows(src)]
    assert run_data("--pairs", src, "--noise-longer", 0, "--noise-shorter", 1, "--holdout", 0, out=tmp_path / "o") == 0
    got, entry = made(tmp_path / "o", "prefs_n60_longer0_shorter1_seed1.json")
    longer = [len(p["chosen"]) > len(p["rejected"]) for p in clean_rows]
    assert [p["flipped"] for p in got] == [not lg for lg in longer]  # exactly the pairs whose chosen is shorter
    assert 0 < sum(longer) < 60 and entry["noise_model"] == {
        "name": "length", "longer": 0.0, "shorter": 1.0, "expected_flips": 60 - sum(longer),
        "flipped": 60 - sum(longer), "chosen_longer": sum(longer), "flipped_chosen_longer": 0}
    assert not (tmp_path / "o" / "prefs_heldout_n0.json").exists()  # --holdout 0: no validation file
    assert run_data("--pairs", src, "--noise-longer", 0.1, "--noise-shorter", 0.3, out=tmp_path / "o") == 0
    assert run_data("--pairs", src, "--noise-longer", 0.2, "--noise-shorter", 0.5, out=tmp_path / "o") == 0
    low, _ = made(tmp_path / "o", "prefs_n54_longer0.1_shorter0.3_seed1.json")
    high, _ = made(tmp_path / "o", "prefs_n54_longer0.2_shorter0.5_seed1.json")
    assert flipped(low) < flipped(high)  # one uniform draw per row: higher probabilities flip a superset


def test_per_row_noise_uses_each_rows_probability_and_nests(tmp_path):
    rows = string_rows(200)
    rows[0]["p"], rows[1]["p"] = 0, 1
    src = write_source(tmp_path, "json", rows)
    clean = [{**sources.to_pair(r, Fields()), "flipped": False} for r in sources.read_rows(src)]
    probs = [r["p"] for r in rows]
    noisy = pairs.add_row_noise(clean, probs, seed=7)
    assert not noisy[0]["flipped"] and noisy[1]["flipped"] and [p["flip_prob"] for p in noisy] == probs
    doubled = pairs.add_row_noise(clean, [min(1, 2 * q) for q in probs], seed=7)
    assert {i for i, p in enumerate(noisy) if p["flipped"]} < {i for i, p in enumerate(doubled) if p["flipped"]}
    assert pairs.add_row_noise(clean[:50], probs[:50], seed=7) == noisy[:50]  # N=50 is a prefix of N=200
    share = sum(p["flipped"] for p in noisy) / len(noisy)
    assert abs(share - sum(probs) / len(probs)) < 0.1
    assert run_data("--pairs", src, "--flip-prob-field", "p", "--seed", 7, "--holdout", 0, out=tmp_path / "o") == 0
    got, entry = made(tmp_path / "o", "prefs_n200_flipprob-p_seed7.json")
    assert [p["flipped"] for p in got] == [p["flipped"] for p in noisy]
    assert entry["noise_model"]["name"] == "field" and entry["flipped"] == sum(p["flipped"] for p in got)
    assert entry["noise_model"]["expected_flips"] == pytest.approx(sum(probs))


# --------------------------------------------------------------------------------------- reuse by `dpo train`

def test_train_reuses_the_files_dpo_data_made_and_rebuilds_when_the_source_changes(tmp_path, capsys,
                                                                                    chat_model_dir):
    src = write_source(tmp_path, "jsonl", chat_rows())
    out = tmp_path / "o"
    assert run_data("--pairs", src, "--noise", 0.2, "--model", chat_model_dir, out=out) == 0
    capsys.readouterr()
    cfg = DataConfig(pairs=str(src), noise=0.2, out_dir=str(out))
    train_path, val_path = prepare.ensure_pairs(cfg, model=str(chat_model_dir))
    assert (train_path.name, val_path.name) == ("prefs_n27_noise0.2_seed1.json", "prefs_heldout_n3.json")
    assert capsys.readouterr().err.startswith("using ")  # reused, and said so
    src.write_text(src.read_text().replace("Is ", "Was ", 1))
    prepare.ensure_pairs(cfg, model=str(chat_model_dir))
    err = capsys.readouterr().err
    assert f"note: {train_path} was made from other data (pairs file sha256" in err and f"made {train_path}" in err
    assert "Was " in read(val_path)[0]["prompt"] + read(train_path)[0]["prompt"]


# ------------------------------------------------------------------------------------------------- bad input

BAD_ROWS = {
    "bad.jsonl": '{"prompt": "p", "chosen": "a", "rejected": "b", "p": 0.5}\n{"prompt": "p", "chosen": "a",\n',
    "cells.csv": "prompt,chosen,rejected\np,a,b\np,a\n",
    "notes.txt": "hello\n",
    "probs.jsonl": '{"prompt": "p", "chosen": "a", "rejected": "b", "p": 0.5}\n'
                   '{"prompt": "q", "chosen": "a", "rejected": "b", "p": 1.5}\n',
    "text.jsonl": '{"prompt": "p", "chosen": "a", "rejected": "b", "p": 0.5}\n'
                  '{"prompt": "q", "chosen": "a", "rejected": "b", "p": "often"}\n',
    "yes.jsonl": '{"prompt": "p", "chosen": "a", "rejected": "b", "p": true}\n',
    "system.jsonl": json.dumps({"prompt": [{"role": "system", "content": "x"}], "chosen": [a("y")],
                                "rejected": [a("z")]}) + "\n",
    "parts.jsonl": json.dumps({"prompt": [u("x")], "chosen": [{"role": "assistant", "content": [{"t": 1}]}],
                               "rejected": [a("z")]}) + "\n",
    "mixed.jsonl": json.dumps({"prompt": [u("x")], "chosen": [a("y")], "rejected": [a("z")]}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n",
    "norole.jsonl": json.dumps({"prompt": [{"content": "x"}], "chosen": [a("y")], "rejected": [a("z")]}) + "\n",
}
BAD_INPUT = [
    (["--pairs", "missing.jsonl"], "missing.jsonl: no such file or folder"),
    (["--pairs", "notes.txt"], "notes.txt: unknown format '.txt'"),
    (["--pairs", "bad.jsonl"], "bad.jsonl:2: malformed JSON"),
    (["--pairs", "cells.csv"], "cells.csv:3: row 1: 2 cells, the header has 3"),
    (["--pairs", "good.jsonl", "--prompt-field", "question"], "good.jsonl:1: row 0: no 'question' field"),
    (["--pairs", "good.jsonl", "--chosen-field", "answer"],
     "good.jsonl:1: row 0: field 'answer' missing (name another column with --chosen-field)"),
    (["--pairs", "good.jsonl", "--rejected-field", "chosen"], "--prompt-field, --chosen-field, --rejected-field"),
    (["--pairs", "chats.jsonl"], "chats.jsonl:1: row 0: a conversation (a list of {role, content} messages) is "
                                 "rendered with a model's chat template: pass --model MODEL"),
    (["--pairs", "chats.jsonl", "--model", "TINY"], "chats.jsonl:1: row 0: a conversation needs a chat template, "
                                                     "and the tokenizer of TINY has none"),
    (["--pairs", "system.jsonl", "--model", "CHAT"], "system.jsonl:1: row 0: the prompt's last message has role "
                                                      "'system'"),
    (["--pairs", "parts.jsonl", "--model", "CHAT"], "parts.jsonl:1: row 0: field 'chosen' message 0: expected"),
    (["--pairs", "mixed.jsonl", "--model", "CHAT"], "mixed.jsonl:2: row 1: field 'chosen' is not a conversation, but "
                                                    "mixed.jsonl:1: row 0's is"),
    (["--pairs", "norole.jsonl", "--model", "CHAT"], "norole.jsonl:1: row 0: field 'prompt' message 0: expected "
                                                     '{"role": string, "content": string}'),
    (["--model", "CHAT"], "--tokenizer/--model: only with --pairs"),
    (["--pairs", "good.jsonl", "--holdout", "40"], "good.jsonl: --holdout 40 holds out 40 of its 40 rows"),
    (["--pairs", "good.jsonl", "--holdout", "2.5"], "--holdout 2.5: expected a fraction of the rows"),
    (["--pairs", "good.jsonl", "--holdout", "-0.1"], "--holdout -0.1: expected"),
    (["--pairs", "good.jsonl", "--noise-longer", "0.2"], "--noise-longer and --noise-shorter go together"),
    (["--pairs", "good.jsonl", "--noise-longer", "0.2", "--noise-shorter", "1.2"],
     "--noise-shorter 1.2 is outside [0, 1]"),
    (["--pairs", "good.jsonl", "--noise", "0.1", "--noise-longer", "0.2", "--noise-shorter", "0.3"],
     "--noise and --noise-longer/--noise-shorter: two noise models, give one"),
    (["--noise-longer", "0.2", "--noise-shorter", "0.3"], "--noise-longer/--noise-shorter: only with --pairs"),
    (["--pairs", "good.jsonl", "--flip-prob-field", "q"], "good.jsonl:1: row 0: field 'q' (--flip-prob-field) "
                                                          "missing"),
    (["--pairs", "probs.jsonl", "--flip-prob-field", "p", "--holdout", "0"],
     "probs.jsonl:2: row 1: field 'p' (--flip-prob-field) is 1.5, expected a probability in [0, 1]"),
    (["--pairs", "text.jsonl", "--flip-prob-field", "p", "--holdout", "0"],
     "text.jsonl:2: row 1: field 'p' (--flip-prob-field) 'often' is not a number"),
    (["--pairs", "yes.jsonl", "--flip-prob-field", "p", "--holdout", "0"], "field 'p' (--flip-prob-field) is True"),
    (["--pairs", "good.jsonl", "--flip-prob-field", "p", "--noise-longer", "0", "--noise-shorter", "0"],
     "--noise-longer/--noise-shorter and --flip-prob-field: two noise models"),
    (["--flip-prob-field", "p"], "--flip-prob-field: only with --pairs"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_is_one_error_line_and_no_file(tmp_path, capsys, monkeypatch, tiny_model_dir, chat_model_dir,
                                                 args, message):
    monkeypatch.chdir(tmp_path)
    for name, text in BAD_ROWS.items():
        (tmp_path / name).write_text(text)
    write_source(tmp_path, "jsonl", string_rows()).rename(tmp_path / "good.jsonl")
    write_source(tmp_path, "jsonl", chat_rows()).rename(tmp_path / "chats.jsonl")
    models = {"TINY": str(tiny_model_dir), "CHAT": str(chat_model_dir)}
    args = [models.get(arg, arg) for arg in args]
    message = message.replace("TINY", str(tiny_model_dir))
    assert cli.main(["data", *args, "--out-dir", "out"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- end to end

def audit_ok_or_refused(code, err):
    """An audit with a random model either works or refuses as too weak (or too small) a detector."""
    if code == 0:
        return True
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert re.search(r"too weak a detector|is wider than 0\.5: too few pairs|too few clean pairs|"
                     r"too few pairs to estimate", errors[0]), errors[0]
    return False


@pytest.mark.parametrize("fmt", FORMATS + ("conversations",))
def test_data_train_audit_end_to_end(tmp_path, capsys, monkeypatch, tiny_model_dir, chat_model_dir, fmt):
    """`dpo data --pairs FILE --noise 0.2`, then `dpo train` with the same flags (reusing the files) and
    `dpo audit` of the training file (its clean pairs found through the manifest), in each format."""
    monkeypatch.chdir(tmp_path)
    conversations = fmt == "conversations"
    src = write_source(tmp_path / "src", "jsonl" if conversations else fmt, chat_rows(48) if conversations
                       else string_rows(48))
    model = str(chat_model_dir if conversations else tiny_model_dir)
    flags = ["--pairs", str(src), "--noise", "0.2", "--holdout", "20"]  # 20: the audit's least calibration pairs
    assert cli.main(["data", *flags, "--model", model] if conversations else ["data", *flags]) == 0
    capsys.readouterr()
    train_file = next(p for p in (tmp_path / "data" / "dpo").glob("*_n28_noise0.2_seed1.json"))
    assert sum(p["flipped"] for p in read(train_file)) == 6
    assert cli.main(["train", *flags, "--model", model, "--output-dir", "run", "--cache-dir", "cache",
                     "--max-steps", "2", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps",
                     "1", "--eval-every", "0", "--save-every", "0", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "made " not in err and "note:" not in err  # dpo train reused what dpo data made
    config = read(tmp_path / "run" / "config.json")
    assert config["pairs"] == 28 and config["val_pairs"] == 20 and config["flipped"] == 6
    assert config["files"]["train"] == str(train_file.relative_to(tmp_path))
    code = cli.main(["audit", str(train_file), "--model", model, "--out-dir", "audit", "--cache-dir", "cache"])
    if audit_ok_or_refused(code, capsys.readouterr().err):
        assert read(tmp_path / "audit" / "audit.json")["val_file"] is None  # held-out rows are not clean
