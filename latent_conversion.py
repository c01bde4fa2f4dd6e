"""Conversion of a trained MHA, GQA or MQA model into MLA (TransMLA's route, arXiv 2502.07864): the math that
convert_mla.py runs, in float64, on an intermediate form of each layer (LatentLayer).

Per layer, on a source with H query heads, G key/value heads of width d, and d_model D (every step is a change
of basis of the latent: what one token caches, before the latent norm):
1. Latent GQA (exact): the latent is [W_k x; W_v x] (2Gd); each query head's key and value up-projections
   select its group's blocks.
2. RoRoPE (exact): for RoPE frequency i, one orthogonal G x G rotation U_i across the key heads, the
   eigenvectors of the calibration keys' second moment at that frequency (a pair's two halves as samples),
   largest first. It mixes heads at one frequency only, so it commutes with that frequency's rotation.
3. Partial RoPE (lossy): only the leading component of frequencies 0, c, 2c, ... (c = d / rope_dim) keeps its
   rotation: MLA's shared k_rope, whose frequencies are exactly those of a width-rope_dim RoPE. Every other key
   component is used unrotated (the NoPE part).
4. Queries (exact): q_nope is the source's query head; q_rope of head h is its query through the key
   up-projection's k_rope columns; the change of softmax scale 1/sqrt(d) -> 1/sqrt(d + rope_dim) is folded in.
5. Balancing (exact): the NoPE key latent is divided by alpha (its up-projection multiplied by it), alpha the
   ratio of the calibration RMS of the NoPE keys to the values'.
6. Joint low rank (exact at full rank): c_KV = P^T [K_nope / alpha; V] with P the top kv_lora_rank principal
   directions of the calibration latent ("pca"), or the top left singular vectors of the stacked weights, no
   calibration ("svd", MHA2MLA's); kv_b_proj is the per-head up-projections times P. c_KV is then scaled to
   unit mean square (exact).
7. Latent norm (lossy): MLA normalises c_KV by its RMS. "fit" (default) sets kv_a_layernorm's weights to the
   least-squares w_j = E[c_j n_j] / E[n_j^2], n = c / rms(c), on calibration data; "fit-full" keeps the weights
   at 1 and replaces kv_b_proj's W by W A, A = E[c n^T] E[n n^T]^-1 (the best linear map from n back to c).
   The norm stays, and no model option removes it: with it a converted checkpoint is a stock DeepSeek-V3 MLA that
   exports to transformers and llama.cpp (TransMLA's exact form without it does not). Its one-shot cost is
   measured in results/conversion.md; fine-tuning heals it with the rest.

Calibration statistics come from the source model (its own dtype forward, float64 sums) on evenly spaced,
deterministic windows of the train split. The source's attention weights are read through
GroupedQueryAttention.head_weights and the MLA weights written through MultiHeadLatentAttention.load_head_weights,
so that each layout stays with the class that defines it.
"""
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from cli import CLIError, positive_int
from dataset import PreparedData
from model import Transformer
from model_config import ModelConfig

F64 = torch.float64
DECOMPOSITIONS = ("pca", "svd")
LATENT_NORMS = ("fit", "fit-full")


# ---- the intermediate representation ------------------------------------------------------------

@dataclass
class LatentLayer:
    """One layer's attention in latent form, float64. H query heads of width d, D model width, L latent width
    (what one token caches), P rotated latent pairs.

    The latent of a token x (D,) is z = w @ x (L,); where norm is set, its "c" part is RMS-normalised and scaled
    by norm before anything reads it. Head h's query is q[h] @ x (d,), its key k_up[h] @ z and its value
    v_up[h] @ z (d,); the output is sum_h o[:, h] @ (head h's attention output). Positions rotate the latent,
    not the heads: pair p turns latent dims (pairs[p, 0], pairs[p, 1]) by position * freq[p], as RoPE turns
    (i, i + d/2); head h's score is scale * <rot_t(k_up[h]^T q_h), rot_s(z_s)>, which equals the source's q.k
    whenever k_up commutes with the rotations (steps 1, 2, 4, 5, 6 keep that; step 3 drops pairs, which is its
    loss).

    parts names the latent's consecutive blocks and their widths, e.g. {"k": 128, "v": 128} after step 1,
    {"k_nope": 112, "v": 128, "k_rope": 16} after step 3, {"c": 64, "k_rope": 16} after step 6."""
    q: torch.Tensor  # (H, d, D)
    w: torch.Tensor  # (L, D)
    k_up: torch.Tensor  # (H, d, L)
    v_up: torch.Tensor  # (H, d, L)
    o: torch.Tensor  # (D, H, d)
    pairs: torch.Tensor  # (P, 2) int64
    freq: torch.Tensor  # (P,) float64
    scale: float
    parts: dict[str, int]
    norm: torch.Tensor | None = None  # (parts["c"],) latent RMSNorm weight, once inserted
    eps: float = 1e-6

    @property
    def width(self) -> int:
        return self.w.size(0)

    def part(self, name: str) -> slice:
        """The latent dims of block name."""
        start = 0
        for key, size in self.parts.items():
            if key == name:
                return slice(start, start + size)
            start += size
        raise KeyError(f"the latent has no {name!r} part (it has {list(self.parts)})")


def change_basis(layer: LatentLayer, m: torch.Tensor, m_inv: torch.Tensor, **changes) -> LatentLayer:
    """The layer with latent z' = m z: w' = m w (L', D), up' = up m_inv (H, d, L'). m (L', L), m_inv (L, L').
    Exact when m_inv m z = z for every latent the layer meets and (for rotated dims) m commutes with the
    rotations; changes replaces other fields (pairs, freq, parts) to describe the new latent."""
    return replace(layer, w=m @ layer.w, k_up=layer.k_up @ m_inv, v_up=layer.v_up @ m_inv, **changes)


def half_split_pairs(width: int, offset: int) -> torch.Tensor:
    """(width/2, 2) pairs (offset + i, offset + i + width/2): RoPE's half-split layout of a width-wide block."""
    i = torch.arange(width // 2)
    return torch.stack((i, i + width // 2), dim=1) + offset


# ---- step 1: latent GQA --------------------------------------------------------------------------

def latent_gqa(attn, rope_theta: float) -> LatentLayer:
    """Step 1 (exact) for a GroupedQueryAttention. The source's G key heads and G value heads stacked as one
    latent [K; V] (2Gd): key dims g * d + j, value dims G * d + g * d + j; head h's up-projections select group
    g = h // (H / G). Every key dim is rotated: pair (g * d + i, g * d + i + d/2) at frequency theta^(-2i/d),
    listed g-major."""
    q, k, v, o = (t.to(F64) for t in attn.head_weights())
    H, d, _ = q.shape
    G = k.size(0)
    k_up = torch.zeros(H, d, 2 * G * d, dtype=F64)
    v_up = torch.zeros(H, d, 2 * G * d, dtype=F64)
    eye = torch.eye(d, dtype=F64)
    for h in range(H):
        g = h // (H // G)
        k_up[h, :, g * d:(g + 1) * d] = eye
        v_up[h, :, G * d + g * d:G * d + (g + 1) * d] = eye
    pairs = torch.cat([half_split_pairs(d, g * d) for g in range(G)])  # (G * d/2, 2)
    freq = (rope_theta ** (-2 * torch.arange(d // 2, dtype=F64) / d)).repeat(G)
    return LatentLayer(q=q, w=torch.cat((k, v)).flatten(0, 1), k_up=k_up, v_up=v_up, o=o, pairs=pairs, freq=freq,
                       scale=attn.scale, parts={"k": G * d, "v": G * d})


def heads_and_dim(layer: LatentLayer) -> tuple[int, int]:
    """(G, d) of a layer in step 1's layout."""
    d = layer.q.size(1)
    return layer.parts["k"] // d, d


# ---- step 2: RoRoPE ------------------------------------------------------------------------------

def frequency_moments(layer: LatentLayer, moment: torch.Tensor) -> torch.Tensor:
    """The key heads' second moments per frequency, (d/2, G, G): entry [i, g, g'] = E[k_g,i k_g',i +
    k_g,i+d/2 k_g',i+d/2], from the attention input's second moment E[x x^T] (D, D). A pair's rotation leaves it
    unchanged, so the pre-RoPE keys' statistics are the rotated keys' too."""
    G, d = heads_and_dim(layer)
    wk = layer.w[layer.part("k")]
    km = wk @ moment @ wk.T  # (Gd, Gd)
    idx = torch.arange(G)[:, None] * d + torch.arange(d)[None, :]  # (G, d): dim of head g, component j
    per_dim = km[idx[:, None, :], idx[None, :, :]].permute(2, 0, 1)  # (d, G, G)
    return per_dim[: d // 2] + per_dim[d // 2:]


def rorope_rotations(layer: LatentLayer, moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2's rotations by PCA: (d/2, G, G) orthogonal U, row j of U[i] the j-th principal direction of
    frequency i across the key heads (largest first), and the energies (d/2, G) each row carries."""
    energy, vectors = torch.linalg.eigh(frequency_moments(layer, moment))  # ascending
    return vectors.flip(-1).transpose(-1, -2).contiguous(), energy.flip(-1).clamp(min=0)


def rotate_key_heads(layer: LatentLayer, rotations: torch.Tensor) -> LatentLayer:
    """Step 2 (exact for any orthogonal rotations (d/2, G, G)): key dim j * d + i becomes component j of
    frequency i, sum_g U[i][j, g] k_g,i (and the same U on the second half, i + d/2). The pairs keep their
    indices, now "component j at frequency i"."""
    G, d = heads_and_dim(layer)
    m = torch.eye(layer.width, dtype=F64)
    heads = torch.arange(G) * d
    for i in range(d // 2):
        for dim in (i, i + d // 2):
            m[(heads + dim)[:, None], (heads + dim)[None, :]] = rotations[i]
    return change_basis(layer, m, m.T)


# ---- step 3: partial RoPE, step 4: the softmax scale ---------------------------------------------

def check_rope_dim(head_dim: int, rope_dim: int) -> None:
    """rope_dim must be an even divisor of head_dim: a width-rope_dim RoPE then has exactly the frequencies 0, c,
    2c, ... of the source's width-head_dim RoPE (c = head_dim / rope_dim)."""
    if rope_dim < 2 or rope_dim % 2 or head_dim % rope_dim:
        choices = [n for n in range(2, head_dim + 1, 2) if head_dim % n == 0]
        raise CLIError(f"--rope-dim {rope_dim}: the source's head_dim {head_dim} gives only {choices} "
                       f"(an even divisor of head_dim, whose RoPE frequencies are every head_dim/rope_dim-th "
                       f"of the source's)")


def partial_rope(layer: LatentLayer, rope_dim: int) -> LatentLayer:
    """Step 3 (lossy: the only loss before the low rank). Component 0 of frequencies 0, c, 2c, ... keeps its
    rotation; every other key dim is used unrotated. The latent is reordered (exactly) to
    [k_nope (Gd - rope_dim) | v (Gd) | k_rope (rope_dim)], k_rope in half-split order: pair m is dims
    (m, m + rope_dim/2) of k_rope, at frequency theta^(-2mc/d) = theta^(-2m/rope_dim)."""
    G, d = heads_and_dim(layer)
    check_rope_dim(d, rope_dim)
    kept = torch.arange(0, d // 2, d // rope_dim)  # component 0 is pairs 0 .. d/2 - 1 (g-major order)
    rope = torch.cat((layer.pairs[kept, 0], layer.pairs[kept, 1]))  # (rope_dim,) half-split
    is_rope = torch.zeros(layer.width, dtype=torch.bool)
    is_rope[rope] = True
    keys = torch.arange(G * d)
    order = torch.cat((keys[~is_rope[: G * d]], torch.arange(G * d, 2 * G * d), rope))
    m = torch.eye(layer.width, dtype=F64)[order]  # a permutation: z' = z[order]
    return change_basis(layer, m, m.T, pairs=half_split_pairs(rope_dim, 2 * G * d - rope_dim), freq=layer.freq[kept],
                        parts={"k_nope": G * d - rope_dim, "v": G * d, "k_rope": rope_dim})


def fold_softmax_scale(layer: LatentLayer, scale: float) -> LatentLayer:
    """Step 4's scale (exact): the same scores under softmax scale `scale`, the old one folded into the query."""
    return replace(layer, q=layer.q * (layer.scale / scale), scale=scale)


# ---- step 5: balancing ---------------------------------------------------------------------------

def latent_moment(layer: LatentLayer, moment: torch.Tensor) -> torch.Tensor:
    """E[z z^T] (L, L) of the latent, from the attention input's E[x x^T] (D, D)."""
    return layer.w @ moment @ layer.w.T


def balance_alpha(layer: LatentLayer, moment: torch.Tensor) -> float:
    """alpha = RMS(K_nope) / RMS(V) per latent dim on calibration data: dividing K_nope by it gives both the
    same mean energy per dim before the joint PCA."""
    if layer.parts["k_nope"] == 0:  # an MQA source with its whole head as k_rope: nothing to balance
        return 1.0
    z = torch.diagonal(latent_moment(layer, moment))
    return math.sqrt(z[layer.part("k_nope")].mean().item() / max(z[layer.part("v")].mean().item(), 1e-30))


def balance(layer: LatentLayer, alpha: float) -> LatentLayer:
    """Step 5 (exact for any alpha > 0): K_nope / alpha in the latent, times alpha in its up-projection."""
    scale = torch.ones(layer.width, dtype=F64)
    scale[layer.part("k_nope")] = 1 / alpha
    return change_basis(layer, torch.diag(scale), torch.diag(1 / scale))


# ---- step 6: joint low rank ----------------------------------------------------------------------

def nope_dims(layer: LatentLayer) -> slice:
    """The latent dims that step 6 compresses: [k_nope | v]."""
    return slice(0, layer.part("k_rope").start)


def pca_basis(layer: LatentLayer, moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All principal directions (n, n) of the calibration latent [K_nope; V] (n = its width), as columns,
    largest first, and their energies (n,) (eigenvalues of its second moment)."""
    nope = nope_dims(layer)
    energy, vectors = torch.linalg.eigh(latent_moment(layer, moment)[nope, nope])
    return vectors.flip(-1), energy.flip(-1).clamp(min=0)


def svd_basis(layer: LatentLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """MHA2MLA's weight-only choice: the left singular vectors (n, n) of the stacked [W_k_nope; W_v] (n, D),
    largest first (zero-padded beyond D), and the squared singular values."""
    w = layer.w[nope_dims(layer)]
    u, s, _ = torch.linalg.svd(w, full_matrices=True)
    energy = torch.zeros(w.size(0), dtype=F64)
    energy[: s.numel()] = s.pow(2)
    return u, energy


def joint_low_rank(layer: LatentLayer, basis: torch.Tensor) -> LatentLayer:
    """Step 6 (exact when basis spans every latent [K_nope; V] the layer meets, e.g. all n columns): c_KV =
    basis^T [K_nope; V] (r = basis columns), the up-projections times basis; the latent becomes [c | k_rope]."""
    nope, r = nope_dims(layer), basis.size(1)
    n, dr = nope.stop, layer.parts["k_rope"]
    m = torch.zeros(r + dr, layer.width, dtype=F64)
    m_inv = torch.zeros(layer.width, r + dr, dtype=F64)
    m[:r, :n], m_inv[:n, :r] = basis.T, basis
    m[r:, n:], m_inv[n:, r:] = torch.eye(dr, dtype=F64), torch.eye(dr, dtype=F64)
    return change_basis(layer, m, m_inv, pairs=half_split_pairs(dr, r), parts={"c": r, "k_rope": dr})


def unit_latent(layer: LatentLayer, moment: torch.Tensor) -> LatentLayer:
    """c_KV scaled to mean square 1 per dim on calibration data (exact): keeps the latent norm's eps negligible
    and the cache well inside bfloat16's range."""
    c = layer.part("c")
    mean_square = torch.diagonal(latent_moment(layer, moment))[c].mean().item()
    s = torch.ones(layer.width, dtype=F64)
    s[c] = 1 / math.sqrt(max(mean_square, 1e-30))
    return change_basis(layer, torch.diag(s), torch.diag(1 / s))


# ---- step 7: the latent norm ---------------------------------------------------------------------

@dataclass
class NormMoments:
    """Calibration sums for one layer's latent c (r,) and its RMS-normalised n = c / rms(c) (r,)."""
    cn: torch.Tensor  # (r, r) sum of c n^T
    nn: torch.Tensor  # (r, r) sum of n n^T
    cc: torch.Tensor  # (r,) sum of c^2
    eps: float  # the RMSNorm's eps

    @classmethod
    def zeros(cls, r: int, eps: float) -> "NormMoments":
        return cls(torch.zeros(r, r, dtype=F64), torch.zeros(r, r, dtype=F64), torch.zeros(r, dtype=F64), eps)

    def add(self, c: torch.Tensor) -> None:
        """Accumulate the latents c (N, r) of N tokens, float64."""
        n = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.eps)
        self.cn += c.T @ n
        self.nn += n.T @ n
        self.cc += c.pow(2).sum(0)


def insert_latent_norm(layer: LatentLayer, stats: NormMoments, mode: str) -> tuple[LatentLayer, float]:
    """Step 7 (lossy). The layer with MLA's RMSNorm on c, fitted by least squares so that the up-projections of
    the normalised latent approximate those of c: "fit" per dim (norm w_j = E[c_j n_j] / E[n_j^2]), "fit-full"
    with norm 1 and up-projections times A = E[c n^T] E[n n^T]^-1. Returns the layer and the relative residual
    E|fit(n) - c|^2 / E|c|^2 on calibration data."""
    if mode not in LATENT_NORMS:
        raise ValueError(f"latent norm must be one of {LATENT_NORMS}, got {mode!r}")
    cc_total = stats.cc.sum()
    if mode == "fit":
        weight = torch.diagonal(stats.cn) / torch.diagonal(stats.nn).clamp(min=1e-30)
        residual = stats.cc - 2 * weight * torch.diagonal(stats.cn) + weight.pow(2) * torch.diagonal(stats.nn)
        return replace(layer, norm=weight, eps=stats.eps), (residual.sum() / cc_total).item()
    c = layer.part("c")
    a = torch.linalg.solve(stats.nn, stats.cn.T).T  # A = E[c n^T] E[n n^T]^-1 (nn is symmetric)
    residual = cc_total - torch.trace(a @ stats.cn.T)  # E|A n - c|^2 = E|c|^2 - tr(A E[n c^T])
    k_up, v_up = layer.k_up.clone(), layer.v_up.clone()
    k_up[..., c], v_up[..., c] = layer.k_up[..., c] @ a, layer.v_up[..., c] @ a
    ones = torch.ones(layer.parts["c"], dtype=F64)
    return replace(layer, k_up=k_up, v_up=v_up, norm=ones, eps=stats.eps), (residual / cc_total).item()


# ---- the MLA model -------------------------------------------------------------------------------

def mla_config(source: ModelConfig, layer: LatentLayer) -> ModelConfig:
    """The converted model's config: the source's, with MLA attention of the latent's sizes (no query
    compression; qk_nope_head_dim = v_head_dim = the source's head_dim)."""
    d = layer.q.size(1)
    return replace(source, attention="mla", q_lora_rank=0, kv_lora_rank=layer.parts["c"],
                   qk_nope_head_dim=d, qk_rope_head_dim=layer.parts["k_rope"], v_head_dim=d)


def mla_head_weights(layer: LatentLayer, config: ModelConfig) -> dict[str, torch.Tensor]:
    """MultiHeadLatentAttention.load_head_weights' parts (float64) that compute exactly what layer does, for a
    layer in the final layout [c | k_rope] with MLA's softmax scale: q_nope = q[h] and q_rope = k_up[h][:,
    k_rope]^T q[h] (H, ·, D), c_kv and k_rope the rows of w (1, ·, D), k_nope and v the up-projections' c
    columns (H, d, r), o (D, H, d)."""
    r, dr = layer.parts["c"], layer.parts["k_rope"]
    d = layer.q.size(1)
    expected_freq = config.rope_theta ** (-torch.arange(0, dr, 2, dtype=F64) / dr)
    if not torch.equal(layer.pairs, half_split_pairs(dr, r)) or not torch.allclose(layer.freq, expected_freq,
                                                                                   rtol=1e-12):
        raise ValueError("the latent's rotated pairs are not MLA's k_rope (run partial_rope and joint_low_rank)")
    if not math.isclose(layer.scale, 1 / math.sqrt(d + dr), rel_tol=1e-12):
        raise ValueError("the softmax scale is not MLA's 1/sqrt(dn + dr) (run fold_softmax_scale)")
    if layer.v_up[..., r:].abs().max() > 0:
        raise ValueError("values read k_rope")
    return {"q_nope": layer.q, "q_rope": torch.einsum("hdl,hde->hle", layer.k_up[..., r:], layer.q),
            "c_kv": layer.w[None, :r], "k_rope": layer.w[None, r:],
            "k_nope": layer.k_up[..., :r], "v": layer.v_up[..., :r], "o": layer.o}


def mla_model(source: Transformer, layers: list[LatentLayer], dtype=torch.float32) -> Transformer:
    """The converted Transformer in dtype: the source's weights outside attention, the latent layers' in it."""
    config = mla_config(source.config, layers[0])
    model = Transformer(config).to(dtype)
    outside = {name: t for name, t in source.state_dict().items() if ".self_attn." not in name}
    model.load_state_dict(model.state_dict() | outside)  # attention's weights are set next
    with torch.no_grad():
        for block, layer in zip(model.layers, layers):
            block.self_attn.load_head_weights(mla_head_weights(layer, config))
            norm = layer.norm if layer.norm is not None else torch.ones(layer.parts["c"])  # 1 where none is fitted
            block.self_attn.kv_a_layernorm.weight.copy_(norm)
    return model.eval()


# ---- calibration ---------------------------------------------------------------------------------

def calibration_windows(data: PreparedData, block_size: int, tokens: int) -> torch.Tensor:
    """(N, block_size) int64 windows of the train split, N = tokens // block_size, their starts evenly spaced
    over the split (deterministic; they overlap when the split is shorter than the tokens asked for)."""
    split = data.tokens("train")
    n = tokens // block_size
    if n < 1:
        raise CLIError(f"--calib-tokens {tokens} is less than one window of block_size {block_size} tokens")
    if len(split) < block_size:
        raise CLIError(f"{data.data_dir}: the train split has {len(split)} tokens, fewer than one calibration "
                       f"window of block_size {block_size}")
    starts = np.linspace(0, len(split) - block_size, n).round().astype(np.int64)
    return torch.from_numpy(split[starts[:, None] + np.arange(block_size)].astype(np.int64))


class _Stop(Exception):
    """Raised after the last block: calibration needs no logits (the LM head is most of a small model's FLOPs)."""


def attention_inputs(model: Transformer, windows: torch.Tensor, batch_size: int, desc: str, consume) -> None:
    """Run model (eval) over windows (N, T) in batches, up to its last block; for each batch call
    consume(layer index, x (B * T, D) float64), x being what that layer's attention reads (the normalised
    residual stream)."""
    def stop(module, args, output):
        raise _Stop

    def reader(i):
        return lambda module, args: consume(i, args[0].flatten(0, 1).to(F64))

    handles = [block.self_attn.register_forward_pre_hook(reader(i)) for i, block in enumerate(model.layers)]
    handles.append(model.layers[-1].register_forward_hook(stop))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
                try:
                    model(windows[start:start + batch_size])
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def input_moments(model: Transformer, windows: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """Per layer, the second moment E[x x^T] (D, D) of the attention's input over every calibration token."""
    D = model.config.d_model
    sums = [torch.zeros(D, D, dtype=F64) for _ in model.layers]

    def consume(i, x):
        sums[i] += x.T @ x

    attention_inputs(model, windows, batch_size, "calibration: moments", consume)
    return [s / windows.numel() for s in sums]


def norm_moments(model: Transformer, windows: torch.Tensor, variants: list[list[LatentLayer]],
                 batch_size: int = 16) -> list[list[NormMoments]]:
    """For each variant (a conversion's latent layers), per layer, the NormMoments of its latent c = w[c] x on
    the calibration tokens: one pass over the data for every variant."""
    eps = model.config.norm_eps
    stats = [[NormMoments.zeros(layer.parts["c"], eps) for layer in layers] for layers in variants]

    def consume(i, x):
        for layers, sums in zip(variants, stats):
            sums[i].add(x @ layers[i].w[layers[i].part("c")].T)

    attention_inputs(model, windows, batch_size, "calibration: latent norm", consume)
    return stats


# ---- the whole conversion ------------------------------------------------------------------------

CALIB_TOKENS = 262_144  # 2,048 windows of 128 tokens: TransMLA's 128 x 256 tokens, eight times over
CALIB_BATCH_SIZE = 16


@dataclass
class ConvertOptions:
    kv_lora_rank: int
    rope_dim: int
    decomposition: str = "pca"  # pca | svd
    alpha: float | str = "auto"  # "calibrated" (balance_alpha), a number, or "auto": calibrated for pca, 1 for svd
    latent_norm: str = "fit"  # fit | fit-full
    calib_tokens: int = CALIB_TOKENS
    batch_size: int = CALIB_BATCH_SIZE


def add_source_arguments(parser) -> None:
    """Add --ckpt (the source) and the calibration's --calib-tokens and --batch-size, for scripts that convert."""
    parser.add_argument("--ckpt", required=True, help="source checkpoint: mha, or gqa (n_kv_head 1 is MQA)")
    parser.add_argument("--calib-tokens", type=positive_int, default=CALIB_TOKENS,
                        help="calibration tokens (train split)")
    parser.add_argument("--batch-size", type=positive_int, default=CALIB_BATCH_SIZE,
                        help="calibration windows per forward")


def check_kind(config: ModelConfig) -> None:
    """Only plain-RoPE MHA/GQA/MQA sources convert."""
    if config.attention == "mla":
        raise CLIError("the source is an MLA checkpoint already: convert_mla.py converts mha or gqa (MQA: gqa with "
                       "n_kv_head 1) checkpoints")
    if config.rope_scaling != "none":
        raise CLIError(f"the source uses rope_scaling {config.rope_scaling!r}: only plain RoPE sources convert "
                       "(MLA's YaRN factor reaches only its k_rope dims)")


def check_source(config: ModelConfig, opts: ConvertOptions) -> None:
    """Refuse, in one line, what cannot convert."""
    check_kind(config)
    d, G = config.head_dim, config.kv_heads
    check_rope_dim(d, opts.rope_dim)
    most = 2 * G * d - opts.rope_dim
    if not 1 <= opts.kv_lora_rank <= most:
        raise CLIError(f"--kv-lora-rank {opts.kv_lora_rank}: with --rope-dim {opts.rope_dim} this source "
                       f"({config.attention}, {G} key/value heads of {d}) gives 1 to {most} latent dims "
                       f"(2 x {G} x {d} - {opts.rope_dim})")
    if opts.decomposition not in DECOMPOSITIONS:
        raise CLIError(f"--decomposition {opts.decomposition!r}: choose from {', '.join(DECOMPOSITIONS)}")
    if opts.latent_norm not in LATENT_NORMS:
        raise CLIError(f"--latent-norm {opts.latent_norm!r}: choose from {', '.join(LATENT_NORMS)}")


def convert_layer(attn, config: ModelConfig, moment: torch.Tensor, opts: ConvertOptions) -> tuple[LatentLayer, dict]:
    """Steps 1-6 for one layer's GroupedQueryAttention (moment: E[x x^T] (D, D) of its input) -> the latent
    layer [c | k_rope] and its report: the share of key energy that keeps RoPE, alpha, and the share of
    [K_nope/alpha; V] energy in c."""
    layer = latent_gqa(attn, config.rope_theta)
    rotations, freq_energy = rorope_rotations(layer, moment)
    layer = rotate_key_heads(layer, rotations)
    layer = partial_rope(layer, opts.rope_dim)
    layer = fold_softmax_scale(layer, 1 / math.sqrt(layer.q.size(1) + opts.rope_dim))
    kept = torch.arange(0, freq_energy.size(0), freq_energy.size(0) * 2 // opts.rope_dim)
    alpha = opts.alpha
    if alpha == "auto":
        alpha = "calibrated" if opts.decomposition == "pca" else 1.0
    if alpha == "calibrated":
        alpha = balance_alpha(layer, moment)
    layer = balance(layer, alpha)
    basis, energy = pca_basis(layer, moment) if opts.decomposition == "pca" else svd_basis(layer)
    basis = basis[:, :opts.kv_lora_rank]
    nope = nope_dims(layer)
    activation = latent_moment(layer, moment)[nope, nope]
    report = {"rope_energy_kept": (freq_energy[kept, 0].sum() / freq_energy.sum()).item(),
              "alpha": alpha,
              "latent_energy_kept": (torch.trace(basis.T @ activation @ basis) / torch.trace(activation)).item()}
    if opts.decomposition == "svd":
        report["weight_energy_kept"] = (energy[:opts.kv_lora_rank].sum() / energy.sum()).item()
    return unit_latent(joint_low_rank(layer, basis), moment), report


def convert_layers(source: Transformer, moments: list[torch.Tensor],
                   opts: ConvertOptions) -> tuple[list[LatentLayer], list[dict]]:
    """Steps 1-6 for every layer of source -> the latent layers and their reports."""
    converted = [convert_layer(block.self_attn, source.config, moment, opts)
                 for block, moment in zip(source.layers, moments)]
    return [layer for layer, _ in converted], [report for _, report in converted]


def fit_latent_norms(layers: list[LatentLayer], reports: list[dict], stats: list[NormMoments],
                     mode: str) -> list[LatentLayer]:
    """Step 7 for every layer; each report gains the fit's relative residual, norm_fit_residual."""
    fitted = []
    for layer, report, s in zip(layers, reports, stats):
        layer, report["norm_fit_residual"] = insert_latent_norm(layer, s, mode)
        fitted.append(layer)
    return fitted


def convert(source: Transformer, data: PreparedData, opts: ConvertOptions) -> tuple[Transformer, dict]:
    """The whole conversion -> (the MLA Transformer, float32, and the report: per layer, the calibration, the
    seconds of each phase and the cache sizes)."""
    config = source.config
    check_source(config, opts)
    if data.vocab_size > config.vocab_size:
        raise CLIError(f"{data.data_dir} has token ids up to {data.vocab_size - 1}, past the source's vocab_size "
                       f"{config.vocab_size}: not the source's data")
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    windows = calibration_windows(data, config.block_size, opts.calib_tokens)
    moments = input_moments(source, windows, opts.batch_size)
    seconds = {"moments_pass": lap()}
    layers, reports = convert_layers(source, moments, opts)
    seconds["decomposition"] = lap()
    (stats,) = norm_moments(source, windows, [layers], opts.batch_size)
    layers = fit_latent_norms(layers, reports, stats, opts.latent_norm)
    seconds["norm_pass"] = lap()
    model = mla_model(source, layers)
    report = {"layers": reports, "calibration_tokens": int(windows.numel()), "phase_seconds": seconds,
              "cache_values_per_token_per_layer": model.config.kv_cache_values_per_token_per_layer(),
              "source_cache_values_per_token_per_layer": config.kv_cache_values_per_token_per_layer()}
    return model, report
