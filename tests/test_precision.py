"""`--precision auto` on the CPU: bf16 only where the processor multiplies bf16 matrices faster, decided once per
machine and cached. The probe and the CPU's flags are mocked, so these tests decide the same on any processor."""

import json

import pytest
import torch

from dpo.core import models
from dpo.core.files import InputError
from dpo.engine import precision

CPU = torch.device("cpu")
NATIVE = {"cpu": "AMD EPYC 9R14", "flags": ["avx2", "avx512_bf16", "avx512f"], "capability": "AVX512",
          "torch": "2.13.0+cpu"}
AVX2 = {**NATIVE, "cpu": "AMD EPYC 7R13", "flags": ["avx2"], "capability": "AVX2"}


class Probe:
    """A mocked probe: fixed GFLOP/s, and how often it was asked."""

    def __init__(self, fp32: float, bf16: float):
        self.figures, self.calls = {"fp32_gflops": fp32, "bf16_gflops": bf16, "shape": [1, 2, 3], "threads": 2}, 0

    def __call__(self):
        self.calls += 1
        return self.figures


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """This test's CPU (NATIVE unless a test sets another), its probe, and an empty cache; auto not pinned."""
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    state = {"facts": NATIVE, "probe": Probe(210.0, 940.0)}
    monkeypatch.setattr(precision, "cpu_facts", lambda: state["facts"])
    monkeypatch.setattr(precision, "probe", lambda: state["probe"]())
    return state


def test_auto_picks_bf16_where_its_products_are_faster_and_records_why(machine):
    choice = precision.choose("auto", CPU)
    assert choice["precision"] == "bf16" and precision.resolve_precision("auto", CPU) == "bf16"
    assert choice["probe"]["bf16_gflops"] == 940.0 and "4.48x as fast" in choice["reason"]
    assert choice["cpu"] == NATIVE  # the model, flags, torch's CPU capability and version it was decided for
    cached = json.loads(precision.cache_file(NATIVE).read_text())
    assert cached["precision"] == "bf16" and cached["facts"] == NATIVE and cached["probe"] == choice["probe"]


def test_auto_stays_fp32_where_bf16_is_slower_or_not_faster_enough(machine):
    machine["probe"] = Probe(210.0, 35.0)  # flags say bf16, but this torch build's kernels are slow
    choice = precision.choose("auto", CPU)
    assert choice["precision"] == "fp32" and "0.17x as fast" in choice["reason"]
    machine["facts"], machine["probe"] = {**NATIVE, "cpu": "other"}, Probe(210.0, 250.0)  # 1.19x: not enough
    assert precision.resolve_precision("auto", CPU) == "fp32"


def test_without_native_bf16_flags_auto_is_fp32_without_a_probe(machine):
    machine["facts"] = AVX2
    choice = precision.choose("auto", CPU)
    assert choice["precision"] == "fp32" and choice["probe"] is None and machine["probe"].calls == 0
    assert "no native bf16 instructions" in choice["reason"] and "AVX2" in choice["reason"]
    machine["facts"] = {**AVX2, "flags": None}  # flags unknown (no /proc/cpuinfo): the probe decides
    assert precision.resolve_precision("auto", CPU) == "bf16" and machine["probe"].calls == 1


def test_the_choice_is_cached_per_machine(machine):
    assert precision.resolve_precision("auto", CPU) == "bf16" and machine["probe"].calls == 1
    assert precision.resolve_precision("auto", CPU) == "bf16" and machine["probe"].calls == 1  # reused
    machine["facts"] = {**NATIVE, "torch": "2.14.0+cpu"}  # another torch: other kernels, decided again
    assert precision.cache_file(machine["facts"]) != precision.cache_file(NATIVE)
    machine["probe"] = Probe(210.0, 100.0)
    assert precision.resolve_precision("auto", CPU) == "fp32" and machine["probe"].calls == 1
    machine["facts"] = NATIVE
    assert precision.resolve_precision("auto", CPU) == "bf16"  # each machine keeps its own


@pytest.mark.parametrize("damage", [b"{\"format\": 1, \"precis", b"\xff\xfe", b"[]",
                                    b'{"format": 1, "facts": {}, "precision": "bf16", "reason": "x"}',
                                    b'{"format": 1, "precision": "fp16", "reason": "x"}'])
def test_a_damaged_cache_file_is_ignored_and_rewritten(machine, damage):
    path = precision.cache_file(NATIVE)
    path.parent.mkdir(parents=True)
    path.write_bytes(damage)
    assert precision.resolve_precision("auto", CPU) == "bf16" and machine["probe"].calls == 1
    assert json.loads(path.read_text())["precision"] == "bf16"
    assert not [p for p in path.parent.iterdir() if p != path]  # written atomically: no temporary file left


def test_a_cache_folder_that_cannot_be_written_still_decides(machine, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "file")  # its "precision" folder cannot be made
    assert precision.resolve_precision("auto", CPU) == "bf16"


def test_pinned_explicit_and_cuda(machine, monkeypatch):
    assert precision.resolve_precision("fp32", CPU) == "fp32" and precision.resolve_precision("bf16", CPU) == "bf16"
    assert precision.choose("auto", torch.device("cuda"))["precision"] == "bf16"
    monkeypatch.setenv(precision.ENV, "fp32")
    assert precision.choose("auto", CPU) == {"precision": "fp32", "requested": "auto",
                                             "reason": "pinned by DPO_CPU_PRECISION=fp32"}
    assert machine["probe"].calls == 0
    monkeypatch.setenv(precision.ENV, "fast")
    with pytest.raises(InputError, match="DPO_CPU_PRECISION='fast': expected fp32 or bf16"):
        precision.resolve_precision("auto", CPU)
    assert precision.reference_precision("auto") == "fp32" and precision.reference_precision("bf16") == "bf16"


def test_this_machine_facts_and_a_real_probe_are_well_formed():
    facts = precision.cpu_facts()
    assert set(facts) == {"cpu", "flags", "capability", "torch"} and facts["cpu"]
    assert facts["flags"] is None or set(facts["flags"]) <= set(precision.FLAGS_SHOWN)
    figures = precision.probe(shape=(64, 32, 48), repeats=1)
    assert figures["fp32_gflops"] > 0 and figures["bf16_gflops"] > 0 and figures["shape"] == [64, 32, 48]


@pytest.mark.parametrize("damage", [b"[" * 200_000 + b"]" * 200_000, b'{"format": ' + b"9" * 5000 + b"}",
                                    b'{"facts": ' * 100_000 + b"1" + b"}" * 100_000])
def test_a_cache_nested_too_deeply_or_holding_a_huge_integer_is_decided_again_with_one_warning(machine, capsys,
                                                                                               damage):
    """Issue 30: such a file ended every later `dpo train` in a RecursionError (or ValueError) traceback."""
    path = precision.cache_file(NATIVE)
    path.parent.mkdir(parents=True)
    path.write_bytes(damage)
    assert precision.resolve_precision("auto", CPU) == "bf16" and machine["probe"].calls == 1
    assert capsys.readouterr().err.splitlines() == [f"warning: {path}: not a precision cache of this machine "
                                                    "(damaged or edited); deciding again"]
    assert json.loads(path.read_text())["precision"] == "bf16"
    precision.resolve_precision("auto", CPU)
    assert machine["probe"].calls == 1 and not capsys.readouterr().err  # rewritten: read the next time
