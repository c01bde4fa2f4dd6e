"""compare.py end to end on the tiny preset: every variant and seed trained, evaluated and benchmarked, every
column of the table filled, and a second call resumes rather than retrains."""
import json
import math
import random
import sys

import pytest

import compare
import data_prepare
from checkpoint import load_checkpoint
from dataset import PreparedData


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    rng = random.Random(0)
    words = "the king queen sword crown night day love war bread river stone café naïve".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(1000))
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    data_prepare.main(["--input", str(root / "corpus.txt"), "--out-dir", str(root / "data"), "--workers", "1"])
    return root, text


def test_study_fills_every_column_and_resumes(prepared, monkeypatch):
    root, text = prepared
    out = root / "study"
    argv = ["--data-dir", str(root / "data"), "--preset", "tiny", "--out-dir", str(out), "--seeds", "1", "2",
            "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--bench-context", "48"]
    compare.main(argv)
    study = json.loads((out / "study.json").read_text())
    rows = study["rows"]
    assert [(r["variant"], r["seed"]) for r in rows] == (
        [(v, s) for s in (1, 2) for v in compare.VARIANTS] + [(v, "mean") for v in compare.VARIANTS])
    for row in rows:
        for key in compare.COLUMNS:
            value = row[key]
            assert value is not None and (isinstance(value, str) or math.isfinite(value)), (row["variant"], key)
    by_variant = {r["variant"]: r for r in rows if r["seed"] == 1}
    assert by_variant["mla"]["kv_cache_bytes_per_token_bf16"] == 2 * 2 * (32 + 8)  # 2 layers, bf16, r + dr
    assert by_variant["mha"]["kv_cache_bytes_per_token_bf16"] == 2 * 2 * (2 * 64)
    assert by_variant["mla-no-q"]["params_total"] != by_variant["mla"]["params_total"]
    val_chars = len(text) - int(len(text) * 0.9)  # roughly: the val split is the last tenth of the text
    assert abs(compare.val_characters(PreparedData(root / "data")) - val_chars) < 0.01 * len(text)
    table = (out / "study.md").read_text()
    assert table.count("\n") == 2 + len(rows)
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_training(*args):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare, "train", no_training)
    compare.main(argv)
    assert json.loads((out / "study.json").read_text())["rows"] == rows


def test_an_interrupted_run_resumes_from_its_checkpoint(prepared):
    root, _ = prepared
    out = root / "resume"
    argv = ["--data-dir", str(root / "data"), "--preset", "tiny", "--out-dir", str(out), "--seeds", "1",
            "--variants", "mla", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
            "--bench-context", "48", "--optimizer", "adamw"]
    compare.main(argv)
    run_dir = out / "mla-seed1"
    assert load_checkpoint(run_dir / "ckpt.pt")["train_config"]["optimizer"] == "adamw"
    first = json.loads((run_dir / "result.json").read_text())
    (run_dir / "result.json").unlink()  # as if stopped after training, before evaluation
    compare.main(argv)
    again = json.loads((run_dir / "result.json").read_text())
    assert again["val_loss"] == first["val_loss"]
    assert again["wall_seconds"] >= first["wall_seconds"]


def test_bad_overrides_fail_before_training(prepared, tmp_path):
    root, _ = prepared
    with pytest.raises(compare.CLIError, match="--max-iters: must be at least 1"):
        compare.main(["--data-dir", str(root / "data"), "--preset", "tiny", "--out-dir", str(tmp_path / "x"),
                      "--max-iters", "0"])
    assert not (tmp_path / "x").exists()


def test_a_rerun_with_other_settings_is_refused_before_training(prepared, monkeypatch):
    """The same --out-dir with another --max-iters would resume the runs past their schedule and mix their rows
    with the first call's: refused, and nothing in the directory changes."""
    root, _ = prepared
    out = root / "settings"

    def argv(max_iters):
        return ["--data-dir", str(root / "data"), "--preset", "tiny", "--out-dir", str(out), "--seeds", "1",
                "--variants", "mha", "--max-iters", str(max_iters), "--eval-interval", "3", "--eval-iters", "1",
                "--bench-context", "48"]

    compare.main(argv(3))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(compare, "train", lambda *args: pytest.fail("trained"))
    with pytest.raises(compare.CLIError, match="max_iters 3 there, 4 now.*choose another --out-dir"):
        compare.main(argv(4))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_without_matplotlib_the_plot_is_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    compare.plot_study([], [], tmp_path / "study.png")
    note = capsys.readouterr().err
    assert note.startswith("note: matplotlib is not installed") and note.count("\n") == 1
    assert not (tmp_path / "study.png").exists()
