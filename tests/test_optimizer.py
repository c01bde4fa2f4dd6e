"""--optimizer muon: Muon steps exactly the hidden matrices (MLA's stacked ones block by block, as separate matrices
would step), AdamW the rest; resuming stays bitwise exact, two DDP processes equal one, torch.compile equals eager,
bf16 autocast trains, and a bad --optimizer is one line. The tiny preset on byte tokens, as in test_train.py."""
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from checkpoint import load_checkpoint
from model import Transformer
from optim import MuonWithAdamW, make_optimizer, train_step
from runs import TINY, assert_same_run, ddp_worker, run_cli, run_config, train_on_one_and_two_processes
from training import train

pytestmark = pytest.mark.usefixtures("one_thread")

MUON_MATRICES = ("self_attn.q_a_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
STACKED = ("self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj")  # rows: the model's stacked_rows


def random_grads(model: nn.Module, seed: int):
    """Backward of a random linear function of the weights: each gradient is a random tensor, written by autograd
    as a real backward writes it."""
    generator = torch.Generator().manual_seed(seed)
    sum((p * torch.randn(p.shape, generator=generator)).sum() for p in model.parameters()).backward()


def test_muon_steps_the_hidden_matrices_and_adamw_the_rest():
    model = Transformer(TINY)
    optimizer = make_optimizer(model, 1e-3, 0.1, fused=False, kind="muon")
    names = {p: name for name, p in model.named_parameters()}
    layers = [f"layers.{i}." for i in range(TINY.n_layer)]
    whole = [p for p in optimizer.muon.param_groups[0]["params"] if p in names]
    assert {names[p] for p in whole} == {f"{layer}{m}.weight" for layer in layers for m in MUON_MATRICES}
    assert {names[w]: [b.size(0) for b in blocks] for w, blocks in optimizer.split} == {
        name: [block.rows for block in blocks] for name, blocks in model.stacked_rows().items()}
    assert set(model.stacked_rows()) == {f"{layer}{m}.weight" for layer in layers for m in STACKED}
    assert len(optimizer.muon.param_groups[0]["params"]) == len(whole) + sum(len(b) for _, b in optimizer.split)
    decay, no_decay = optimizer.adamw.param_groups
    assert [names[p] for p in decay["params"]] == ["embed_tokens.weight"]  # the tied LM head too
    assert {names[p] for p in no_decay["params"]} == {n for n in names.values() if "norm" in n}
    assert decay["weight_decay"] == optimizer.muon.param_groups[0]["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0


def test_stacked_matrices_step_as_separate_matrices():
    """Two steps of the stacked kv_b_proj (each head's W_UK and W_UV) equal torch's Muon on 8 separate matrices."""
    model = Transformer(TINY)
    optimizer = make_optimizer(model, 1e-2, 0.1, fused=False, kind="muon")
    weight = model.layers[0].self_attn.kv_b_proj.weight
    rows = [block.rows for block in model.stacked_rows()["layers.0.self_attn.kv_b_proj.weight"]]
    separate = [nn.Parameter(block.clone()) for block in weight.detach().split(rows)]
    reference = torch.optim.Muon(separate, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for seed in (0, 1):
        random_grads(model, seed)
        for p, grad in zip(separate, weight.grad.split(rows)):
            p.grad = grad.clone()
        optimizer.step()
        reference.step()
        optimizer.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(weight.detach(), torch.cat([p.detach() for p in separate]), rtol=0, atol=0)


def test_resume_is_bitwise_exact_with_muon(tmp_path, byte_data):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(run_config(straight, byte_data, optimizer="muon"), TINY) == 0
    assert train(run_config(resumed, byte_data, optimizer="muon", max_iters=10), TINY) == 0
    assert train(run_config(resumed, byte_data, optimizer="muon", resume=True), TINY) == 0
    assert_same_run(resumed, straight, every_line=True)
    assert load_checkpoint(straight / "ckpt.pt")["optimizer"].keys() == {"muon", "adamw"}
    other = run_cli("--resume", "--out-dir", straight, "--optimizer", "adamw")  # the saved state is Muon's
    assert other.returncode == 2 and other.stderr == (f"error: cannot resume from {straight / 'ckpt.pt'}: it was "
                                                      "trained with --optimizer muon, not adamw\n")


def float64_ddp_worker(*args):
    torch.set_default_dtype(torch.float64)
    ddp_worker(*args)


@pytest.fixture
def float64_default():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_ddp_two_processes_equal_one_with_muon(tmp_path, byte_data, monkeypatch, float64_default):
    """As test_train.py's DDP test, in float64: Muon orthogonalises in bfloat16 with a polynomial that magnifies
    small singular values several hundredfold, so float32 all-reduce rounding (1e-7) grows to 1e-4 in the weights
    after 3 steps; in float64 the bfloat16 inputs of both runs agree."""
    single, double = train_on_one_and_two_processes(float64_ddp_worker, tmp_path, byte_data, replace(TINY, dropout=0.0),
                                                    monkeypatch, optimizer="muon")
    one, two = load_checkpoint(single / "ckpt.pt"), load_checkpoint(double / "ckpt.pt")
    for name, weight in one["model"].items():
        assert weight.dtype == torch.float64
        torch.testing.assert_close(two["model"][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def three_steps(kind: str, compiled: bool, dtype=torch.float32) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = Transformer(replace(TINY, dropout=0.0))
    optimizer = make_optimizer(model, 3e-3, 0.1, fused=False, kind=kind)
    batches = iter([torch.randint(0, 256, (4, TINY.block_size + 1), generator=torch.Generator().manual_seed(i))
                    for i in range(3)])

    def next_batch():
        rows = next(batches)
        return rows[:, :-1], rows[:, 1:]

    stepped = torch.compile(model) if compiled else model
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [train_step(stepped, optimizer, scaler, next_batch, 1, 3e-3, autocast).item() for _ in range(3)]
    return losses, model.state_dict()


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_compiled_steps_equal_eager(kind, float64_default):
    """In float64 (see the DDP test: in float32, inductor's reordered sums grow to 1e-4 through Muon's bfloat16
    Newton-Schulz), 3 compiled steps equal 3 eager ones: weights to 1e-9, losses to float32 rounding."""
    eager_losses, eager = three_steps(kind, compiled=False)
    compiled_losses, compiled = three_steps(kind, compiled=True)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-6)  # the loss is taken in float32
    for name in eager:
        assert eager[name].dtype == torch.float64
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_bf16_autocast_steps_train(kind):
    float32_losses, float32 = three_steps(kind, compiled=False)
    bf16_losses, bf16 = three_steps(kind, compiled=False, dtype=torch.bfloat16)
    assert all(map(math.isfinite, bf16_losses)) and bf16_losses == pytest.approx(float32_losses, rel=0.01)
    assert all(torch.isfinite(w).all() and not torch.equal(w, float32[name]) for name, w in bf16.items()
               if w.is_floating_point())
    assert isinstance(make_optimizer(Transformer(TINY), 1e-3, 0.1, False, kind), MuonWithAdamW) == (kind == "muon")


def scaled_step(model: nn.Module, optimizer: MuonWithAdamW, scale: float, batch: torch.Tensor, poison=None):
    """One float16-style step: backward of the loss times scale, unscale_, step. Returns the gradients the
    optimisers saw after unscale_ (Muon's row blocks, AdamW's parameters). poison(model) may edit gradients
    before unscale_."""
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(model(batch[:, :-1], batch[:, 1:])[1]).backward()
    if poison is not None:
        poison(model)
    scaler.unscale_(optimizer)
    grads = [p.grad.clone() for group in optimizer.param_groups for p in group["params"]]
    scaler.step(optimizer)
    optimizer.zero_grad()
    return grads


def test_loss_scaling_reaches_muons_row_blocks():
    """GradScaler.unscale_ unscales every gradient Muon steps, MLA's row blocks included: a step at loss scale
    2^12 sees the same gradients as one at scale 1, bit for bit, and ends at the same weights; an inf in one
    stacked weight's gradient skips the whole step."""
    batch = torch.randint(0, 256, (4, TINY.block_size + 1), generator=torch.Generator().manual_seed(0))
    runs = []
    for scale in (1.0, 2.0 ** 12):
        torch.manual_seed(0)
        model = Transformer(replace(TINY, dropout=0.0))
        optimizer = make_optimizer(model, 3e-3, 0.1, fused=False, kind="muon")
        runs.append((scaled_step(model, optimizer, scale, batch), model.state_dict()))
    (grads, weights), (scaled_grads, scaled_weights) = runs
    assert len(grads) == len(scaled_grads) and all(map(torch.equal, grads, scaled_grads))
    for name, weight in weights.items():
        torch.testing.assert_close(scaled_weights[name], weight, rtol=0, atol=0, msg=name)

    def inf_in_kv_b_proj(poisoned: nn.Module):
        poisoned.layers[1].self_attn.kv_b_proj.weight.grad[-1, -1] = math.inf

    before = {name: w.clone() for name, w in scaled_weights.items()}
    scaled_step(model, optimizer, 2.0 ** 12, batch, poison=inf_in_kv_b_proj)
    assert all(torch.equal(model.state_dict()[name], w) for name, w in before.items())


@pytest.mark.parametrize("args, expected", [
    (["--optimizer", "sgd"], "optimizer must be one of adamw, muon, got 'sgd'"),
])
def test_bad_optimizer_is_one_line(tmp_path, byte_data, args, expected):
    out = tmp_path / "out"
    result = run_cli("--out-dir", out, "--data-dir", byte_data, "--preset", "tiny", "--vocab-size", 256, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (out / "ckpt.pt").exists()
