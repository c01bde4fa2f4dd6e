"""benchmarks/gpu_decode.py, the prepared GPU check, run on the CPU with --smoke (its logic at tiny sizes): its
checks pass, it writes results.md and results.json with every row it plans, a budget too small skips each part
saying so, and a bad --out is one error line."""
import json
import subprocess
import sys

import pytest

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
