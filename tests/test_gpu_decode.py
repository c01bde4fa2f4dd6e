"""benchmarks/gpu_decode.py, the prepared GPU check, run on the CPU with --smoke (its logic at tiny sizes): its
checks pass, it writes results.md and results.json with every row it plans, a budget too small skips each part
saying so, a bench step that fails or a cache that does not fit is a row that says so, and a bad --out is one error
line."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from benchmarks import gpu_decode
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_decode.py"
VARIANTS = ["mla absorbed", "mha", "gqa"]
BATCHES, CONTEXTS = [1, 2], [128, 320]  # the smoke plan's


def run_check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run: (its process, its output directory, its results.json)."""
    out = tmp_path_factory.mktemp("check") / "out"
    result = run_check("--out", out)
    assert result.returncode == 0, result.stderr
    return result, out, json.loads((out / "results.json").read_text())


def test_the_smoke_run_passes_every_check_and_prints_its_wall_time(smoke):
    result, out, record = smoke
    assert record["smoke"] and record["skipped"] == []
    assert len(record["checks"]) == 4 + 2 * 3  # flex: 2 cases x 2 dtypes; per variant: batched, compiled
    assert all(check["passed"] for check in record["checks"]), record["checks"]
    assert f"wall time {record['wall_s']:.1f} s" in result.stdout
    assert sorted(path.name for path in out.iterdir()) == ["results.json", "results.md"]  # no temporary file left


def test_every_planned_row_is_measured_and_in_the_table(smoke):
    _, out, record = smoke
    bench = {(r["attention"], r["batch"], r["context"]): r for r in record["bench"]}
    assert sorted(bench) == sorted((v, b, c) for v in VARIANTS for b in BATCHES for c in CONTEXTS)
    for row in bench.values():
        assert 0 < row["ms_min"] <= row["ms_median"] <= row["ms_max"] and row["copy_bytes_per_s"] > 0, row
    assert all(bench["mha", b, c]["tokens_per_s_vs_mha"] == 1.0 for b in BATCHES for c in CONTEXTS)
    race = {(r["attention"], r["batch"], r["context"]) for r in record["race"] if r["ms_median"] > 0}
    assert race == {(a, b, 320) for a in ("mla, flex compiled", "mla, two matmuls", "mha, sdpa") for b in (1, 2)}
    table = (out / "results.md").read_text()
    for variant, batch, context in bench:
        assert f"| {variant} | {batch} | {context} | " in table
    ratio = f"{bench['mla absorbed', 2, 320]['tokens_per_s_vs_mha']:.2f}"
    assert f"| 2 | {bench['mla absorbed', 2, 128]['tokens_per_s_vs_mha']:.2f} | {ratio} |" in table
    assert "10 of 10 checks passed" in table and "Smoke run" in table


def test_a_budget_too_small_skips_every_part_saying_why(tmp_path):
    result = run_check("--out", tmp_path, "--budget-s", "0.001")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["checks"] == record["race"] == record["bench"] == []
    skipped = [s["part"] for s in record["skipped"]]
    assert skipped == ["the kernel checks", "the mla model checks", "the mha model checks", "the gqa model checks",
                       "the race at batch 1, context 320", "the race at batch 2, context 320", "the bench"]
    assert "left, under the" in record["skipped"][0]["why"]
    assert "- the bench: " in (tmp_path / "results.md").read_text()


def test_an_out_that_is_a_file_is_one_error_line(tmp_path):
    file = tmp_path / "results"
    file.write_text("keep me")
    result = run_check("--out", file)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert file.read_text() == "keep me"


def test_a_failing_step_is_not_tried_again_and_a_cache_that_does_not_fit_is_refused(monkeypatch, one_thread):
    """What a GPU may do that the smoke run does not: a compiled step that fails (GQA's here) and a cache over the
    memory left (MHA's: the memory left is the margin and 20 kB, and MLA's cache 10 kB, GQA's 16 kB, MHA's 32 kB)."""
    calls = []

    def failing_step(*args):
        calls.append(args)
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(gpu_decode, "compiled_step", lambda model, plan:
                        failing_step if model.config.attention == "gqa" else model.decode_step)
    monkeypatch.setattr(gpu_decode, "available_memory", lambda device: gpu_decode.MEMORY_MARGIN + 20_000)
    plan = replace(gpu_decode.SMOKE, batches=(1,), contexts=(64, 96), rounds=1)
    rows = gpu_decode.bench(plan, gpu_decode.CopyProbe(2**20, torch.device("cpu")), gpu_decode.Deadline(60))
    by_name = {(r["attention"], r["context"]): r for r in rows}
    assert len(calls) == 1  # tried once, at the first shape
    assert by_name["gqa", 64]["error"] == "RuntimeError: no kernel for this shape"
    assert by_name["gqa", 96]["error"] == "not tried again after RuntimeError: no kernel for this shape"
    assert not by_name["mha", 96]["fits"] and by_name["mha", 96]["needs_bytes"] == 1 * 96 * 2 * 128 * 2
    assert by_name["mla absorbed", 96]["ms_median"] > 0 and "tokens_per_s_vs_mha" not in by_name["mla absorbed", 96]
    record = {"command": "x", "environment": {"device": "CPU", "torch": torch.__version__, "date": "today"},
              "wall_s": 1.0, "budget_s": 60.0, "smoke": True, "probe_bytes": 2**20, "batches": plan.batches,
              "contexts": plan.contexts, "checks": [], "race": [], "bench": rows, "skipped": []}
    table = gpu_decode.markdown(record)
    assert "| gqa | 1 | 96 | failed: not tried again after RuntimeError: no kernel for this shape |" in table
    assert "| mha | 1 | 96 | does not fit: its cache needs 0.0 GiB" in table
    assert "| 1 | MHA does not fit | MHA does not fit |" in table
