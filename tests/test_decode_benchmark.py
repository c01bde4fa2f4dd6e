"""decode_benchmark.py and its command line, benchmarks/bench_decode.py: the bytes and FLOPs a decode step must move against hand counts and
torch's FLOP counter, the sweep's rows (finite, interleaved, absorbed only where asked), memory refusals, the
capacity table, the plot, the command line and its bad flags."""
import json
import math
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import decode_benchmark as bench
from benchmarks import bench_decode as script
from cli import CLIError
from conftest import REPO
from model import Transformer
from model_config import VARIANTS as VARIANT_OVERRIDES, ModelConfig
from report import table_header

VARIANTS = ["mla absorbed", "mla decompressed", "mha", "gqa", "mqa"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def small_probe(monkeypatch):
    """A 1 MiB bandwidth probe instead of 1 GiB: the tests check the plumbing, not this machine."""
    monkeypatch.setattr(bench, "PROBE_BYTES", 2**20)


def tiny(variant: str) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **VARIANT_OVERRIDES[variant])


# ---- bytes and FLOPs per step -------------------------------------------------------------------

# The tiny preset: vocab 50304, d_model 64, 4 heads (GQA: 2 key/value heads, head_dim 16), 2 layers, SwiGLU 128,
# MLA q_lora_rank 32, r 32, dn 16, dr 8, dv 16; tied embeddings. Batch 2, context 16, float32.
# Weights (num_params; the matmul weights of flops_per_token are the same count):
#   embedding/LM head 50304 * 64 = 3,219,456; per block SwiGLU 3 * 64 * 128 = 24,576 and norms 2 * 64 = 128;
#   final norm 64. Attention per block: MHA 4 * 64 * 64 = 16,384; GQA 64*64 + 2*64*32 + 64*64 = 12,288;
#   MQA 64*64 + 2*64*16 + 64*64 = 10,240;
#   MLA q 64*32 + 32 + 32*4*24 = 5,152, kv 64*40 + 32 + 32*4*32 = 6,688 (kv_b_proj 4,096), o 4*16*64 = 4,096.
#   -> MHA 3,301,696; GQA 3,293,504; MQA 3,289,408; MLA 3,300,800.
# Cache per position and layer: MHA 2 * 4 * 16 = 128 values, GQA 2 * 2 * 16 = 64, MQA 2 * 16 = 32, MLA r + dr = 40.
HAND_BYTES = {  # 4 * (weights + 2 sequences * 16 positions * 2 layers * cache values)
    "mha": 4 * (3_301_696 + 2 * 16 * 2 * 128),
    "gqa": 4 * (3_293_504 + 2 * 16 * 2 * 64),
    "mqa": 4 * (3_289_408 + 2 * 16 * 2 * 32),
    "mla": 4 * (3_300_800 + 2 * 16 * 2 * 40),
}
HAND_FLOPS = {  # 2 * batch * (weights + layers * heads * positions * multiply-adds per head and position)
    "mha": 2 * 2 * (3_301_696 + 2 * 4 * 16 * 2 * 16),  # scores and weighted sum over head_dim 16
    "gqa": 2 * 2 * (3_293_504 + 2 * 4 * 16 * 2 * 16),
    "mqa": 2 * 2 * (3_289_408 + 2 * 4 * 16 * 2 * 16),
    "mla absorbed": 2 * 2 * (3_300_800 + 2 * 4 * 16 * (40 + 40)),  # the whole latent r + dr as key and as value
    # kv_b_proj over the 15 cached positions too; keys dn + dr = 24, values dv = 16
    "mla decompressed": 2 * 2 * (3_300_800 + 2 * 4_096 * 15 + 2 * 4 * 16 * (24 + 16)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_step_bytes_and_flops_equal_hand_counts(name):
    kind, absorb = bench.CONTENDERS[name]
    assert bench.step_bytes(tiny(kind), 2, 16, 4) == HAND_BYTES[kind]
    assert bench.step_flops(tiny(kind), 2, 16, absorb) == HAND_FLOPS[name]


@pytest.mark.parametrize("name", VARIANTS)
def test_step_bytes_and_flops_match_the_real_model_and_torch_flop_counter(name):
    """Bytes: the model's own parameters (a tied one once) and its real cache. FLOPs: torch's counter over one
    real decode step on SDPA's math backend (whose matmuls it sees), plus the norms' weights, which
    flops_per_token counts as matmul weights, less the zero padding MLA's decompressed values get for SDPA."""
    kind, absorb = bench.CONTENDERS[name]
    config = tiny(kind)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    cache = model.make_cache(2, 16)
    weights = sum(p.numel() for p in model.parameters()) * 4
    assert bench.step_bytes(config, 2, 16, 4) == weights + cache.nbytes
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.decode_step(torch.zeros(2, 1, dtype=torch.long), cache, torch.tensor([15]), absorb=absorb)
    norms = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.RMSNorm))
    c = config
    padding = 0 if absorb else 2 * 2 * c.n_head * 16 * c.n_layer * (c.qk_nope_head_dim + c.qk_rope_head_dim - c.v_head_dim)
    assert bench.step_flops(config, 2, 16, absorb) == counter.get_total_flops() + 2 * 2 * norms - padding


# ---- the sweep ----------------------------------------------------------------------------------

def test_sweep_interleaves_every_variant_and_reports_finite_numbers(monkeypatch):
    steps = []  # (attention kind, key/value heads, absorb) of every decode step, in order
    decode_step = Transformer.decode_step

    def recorded(model, token, cache, input_pos, absorb=True):
        steps.append((model.config.attention, model.config.kv_heads, absorb))
        return decode_step(model, token, cache, input_pos, absorb)

    monkeypatch.setattr(Transformer, "decode_step", recorded)
    rows = bench.benchmark(tiny("mla"), contexts=[8, 16], batches=[1, 2], device="cpu", dtype=torch.float32, steps=2)
    # Each (batch, context) row: 1 untimed + 2 timed rounds, each one step of every variant in turn.
    expected = [(tiny(variant).attention, tiny(variant).kv_heads, absorb)
                for variant, absorb in (bench.CONTENDERS[name] for name in VARIANTS)]
    assert steps == expected * 3 * 4
    assert [(r["batch"], r["context"], r["attention"]) for r in rows] == [
        (b, c, name) for b in (1, 2) for c in (8, 16) for name in VARIANTS]
    for row in rows:
        kind, absorb = bench.CONTENDERS[row["attention"]]
        numbers = [v for k, v in row.items() if k not in ("attention", "fits")]
        assert row["fits"] and all(math.isfinite(v) and v > 0 for v in numbers), row
        assert row["ms_per_step_min"] <= row["ms_per_step"] <= row["ms_per_step_max"]
        assert row["decode_tokens_per_s"] == pytest.approx(row["batch"] * 1e3 / row["ms_per_step"])
        assert row["bytes_per_step"] == bench.step_bytes(tiny(kind), row["batch"], row["context"], 4)
        assert row["flops_per_step"] == bench.step_flops(tiny(kind), row["batch"], row["context"], absorb)
        assert row["bandwidth_fraction"] == pytest.approx(row["bytes_per_s"] / row["machine_bytes_per_s"])
        assert len(bench.table_line(row, bench.SWEEP_COLUMNS).split("|")) == len(bench.SWEEP_COLUMNS) + 2
    assert all(r["tokens_per_s_vs_mha"] == 1 for r in rows if r["attention"] == "mha")


def test_a_variant_whose_cache_does_not_fit_is_reported_and_not_run(monkeypatch):
    # Batch 1, context 16, float32: MLA's cache 1 * 16 * 2 layers * 40 * 4 = 5,120 bytes, GQA's 8,192, MHA's
    # 16,384; decompressing MLA holds 2 * 16 * 4 heads * (16 + 8 + 16) * 4 = 20,480 bytes of keys and values.
    monkeypatch.setattr(bench, "available_memory", lambda device: bench.MEMORY_MARGIN + 10_000)
    rows = {r["attention"]: r for r in bench.benchmark(tiny("mla"), [16], [1], "cpu", torch.float32, steps=1)}
    assert rows["mla absorbed"]["fits"] and rows["gqa"]["fits"]
    assert rows["mla decompressed"] == {"attention": "mla decompressed", "batch": 1, "context": 16, "fits": False,
                                        "needs_bytes": 5_120 + 20_480}
    assert rows["mha"]["needs_bytes"] == 16_384 and not rows["mha"]["fits"]
    assert "tokens_per_s_vs_mha" not in rows["gqa"]
    line = bench.table_line(rows["mha"], bench.SWEEP_COLUMNS)
    assert line.startswith("| mha | 1 | 16 | does not fit (needs 0.0 GiB) |")
    assert len(line.split("|")) == len(bench.SWEEP_COLUMNS) + 2


def test_capacity_picks_the_largest_batch_that_fits_the_budget():
    # Context 16: one sequence's cache is 5,120 bytes for MLA, 16,384 for MHA, 8,192 for GQA, 4,096 for MQA.
    runner = bench.DecodeBench(tiny("mla"), 16, "cpu", torch.float32, steps=1)
    rows = {r["attention"]: r for r in runner.capacity(16, 100_000)}
    assert {name: r["batch"] for name, r in rows.items()} == {"mla absorbed": 19, "mha": 6, "gqa": 12, "mqa": 24}
    for row in rows.values():
        assert row["fits"] and row["cache_bytes"] <= 100_000 < row["cache_bytes"] / row["batch"] * (row["batch"] + 1)
        assert row["decode_tokens_per_s"] == pytest.approx(row["batch"] * 1e3 / row["ms_per_step"])
    small = {r["attention"]: r for r in runner.capacity(16, 10_000)}
    assert small["mha"] == {"attention": "mha", "batch": 0, "context": 16, "fits": False, "needs_bytes": 16_384,
                            "budget_bytes": 10_000}
    assert small["mla absorbed"]["batch"] == small["gqa"]["batch"] == 1


# ---- the plot -----------------------------------------------------------------------------------

def plotted_rows() -> list[dict]:
    return [{"attention": name, "batch": b, "context": c, "fits": True, "decode_tokens_per_s": b * 1e4 / c}
            for name in VARIANTS for b in (1, 8) for c in (512, 1024, 2048)]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")  # optional: requirements.txt does not name it
    path = tmp_path / "decode.png"
    bench.plot(plotted_rows(), path, "again")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in tmp_path.iterdir()] == ["decode.png"]


def test_plot_without_matplotlib_is_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # importing it now raises ImportError
    bench.plot(plotted_rows(), tmp_path / "decode.png", "run it again")
    note = capsys.readouterr().err
    assert note.startswith("note:") and "pip install matplotlib, then run it again" in note and note.count("\n") == 1
    assert not any(tmp_path.iterdir())


# ---- the command line ---------------------------------------------------------------------------

def test_bench_command_prints_rows_as_they_come_and_json(capsys, tmp_path):
    script.main(["--preset", "tiny", "--contexts", "8", "16", "--steps", "1", "--device", "cpu",
                 "--plot", str(tmp_path / "d.png"), "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1] == table_header([heading for heading, _ in bench.SWEEP_COLUMNS]).splitlines()[0]
    assert [line.split(" | ")[0] for line in lines[3:13]] == ["| " + name for name in VARIANTS] * 2
    report = json.loads(lines[-1])
    assert len(report["rows"]) == 10 and report["model_config"]["n_layer"] == 2
    by_kind = {r["attention"]: r for r in report["rows"] if r["context"] == 16}
    assert by_kind["mla absorbed"]["cache_bytes"] / by_kind["mha"]["cache_bytes"] == pytest.approx(40 / 128)
    assert (tmp_path / "d.png").stat().st_size > 0


def test_bench_command_capacity_and_layers(capsys):
    script.main(["--preset", "tiny", "--layers", "1", "--contexts", "16", "--steps", "1", "--device",
                 "cpu", "--cache-budget-gib", str(10_000 / 2**30), "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2] == table_header([heading for heading, _ in bench.CAPACITY_COLUMNS]).splitlines()[0]
    report = json.loads(lines[-1])
    # One layer halves the tiny preset's cache per sequence: MLA 2,560, MHA 8,192, GQA 4,096, MQA 2,048 bytes.
    assert {r["attention"]: r["batch"] for r in report["rows"]} == {"mla absorbed": 3, "mha": 1, "gqa": 2, "mqa": 4}


@pytest.mark.parametrize("flags, message", [
    (["--contexts", "1"], "--contexts: must be at least 2"),
    (["--batches", "0"], "--batches: must be at least 1"),
    (["--steps", "0"], "--steps: must be at least 1"),
    (["--layers", "0"], "--layers: must be at least 1"),
    (["--cache-budget-gib", "0"], "--cache-budget-gib: must be"),
    (["--cache-budget-gib", "-1"], "--cache-budget-gib: must be"),
    (["--cache-budget-gib", "nan"], "--cache-budget-gib: must be finite"),
    (["--cache-budget-gib", "inf"], "--cache-budget-gib: must be finite"),
    (["--cache-budget-gib", "1", "--batches", "2"], "takes no --batches and no --plot"),
    (["--plot", "/no/such/dir/d.png"], "no such directory"),
    (["--plot", "."], "is a directory"),
    (["--ckpt", "x.pt"], "not allowed with argument --preset"),
])
def test_bad_bench_flags_are_one_line_errors(capsys, flags, message):
    """Refused up front: before the benchmark prints (or runs) anything."""
    with pytest.raises(CLIError, match=message):
        script.main(["--preset", "tiny", "--device", "cpu", *flags])
    assert capsys.readouterr().out == ""


def test_bad_bench_flag_from_the_shell():
    proc = subprocess.run([sys.executable, "benchmarks/bench_decode.py", "--cache-budget-gib", "nan"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: argument --cache-budget-gib") and len(proc.stderr.splitlines()) == 1


def test_a_failing_compile_is_one_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nlong compiler log")
    monkeypatch.setattr(torch, "compile", lambda fn, **options: broken)
    with pytest.raises(CLIError, match=r"^--compile failed: RuntimeError: no C\+\+ compiler$"):
        bench.DecodeBench(tiny("mla"), 16, "cpu", torch.float32, steps=1, compile=True)


@pytest.mark.usefixtures("fresh_compiler")
def test_compiled_sweep_of_every_model_at_several_batches_and_contexts(monkeypatch):
    """All models' compiled decode steps are graphs of one function to dynamo: 4 models x 2 batches x 2 contexts
    pass its default limit of 8 graphs (a FailOnRecompileLimitHit before DecodeBench raised it). Dynamo's eager
    backend: the graphs and their guards as inductor would get them, without its C++ build."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile(fn, fullgraph=True, backend="eager"))
    with torch._dynamo.config.patch(recompile_limit=8):  # the default, whatever an earlier test left
        sweep = bench.DecodeBench(tiny("mla"), 16, "cpu", torch.float32, steps=1, compile=True).sweep([8, 16], [1, 2])
        rows = [row for group in sweep for row in group]
    assert len(rows) == 2 * 2 * len(VARIANTS) and all(r["fits"] for r in rows)


def test_bf16_drift_compares_every_variant_teacher_forced(capsys):
    """benchmarks/bf16_drift.py: one row per variant, each a small nonzero gap (bfloat16 rounds, float32 does
    not), and the bfloat16 copy fed float32's tokens (so its argmax may differ without the inputs diverging)."""
    from benchmarks import bf16_drift
    bf16_drift.main(["--preset", "shakespeare", "--prompt", "4", "--steps", "3"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| m")
            or line.startswith("| g")]
    assert [cells[0].strip() for cells in rows] == list(bf16_drift.KINDS)
    for cells in rows:
        largest, median = float(cells[1]), float(cells[2])
        assert 0 < median <= largest < 0.1
        assert cells[4].strip().endswith("/3")


def test_bench_linear_times_every_shape_and_block_count(capsys):
    """benchmarks/bench_linear.py: a row per weight shape, a median for every block count that divides it."""
    from benchmarks import bench_linear
    bench_linear.main(["--rounds", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and " x " in line]
    assert len(rows) == len(bench_linear.SHAPES)
    assert all(cell.strip() != "–" for row in rows for cell in row.split("|")[3:-1])  # every shape divides by 8
