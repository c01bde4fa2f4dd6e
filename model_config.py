"""The model's architecture in one dataclass, its named presets, and the numbers derived from it."""
import math
from dataclasses import asdict, dataclass, field, fields, replace

from fileio import check_field_types

ATTENTION_KINDS = ("mla", "mha", "gqa")
ROPE_SCALINGS = ("none", "yarn")


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 ln(factor) + 1 (arXiv 2309.00071, eq. 22), with DeepSeek's
    coefficient mscale on the log; 1 for factor <= 1."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def softmax_scale(config: "ModelConfig", qk_dim: int) -> float:
    """1 / sqrt(qk_dim), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek-V2/V3): the temperature
    correction reaches every query/key dim this way, not only the rotated ones."""
    multiplier = 1.0
    if config.rope_scaling == "yarn":
        multiplier = yarn_mscale(config.rope_factor, config.mscale_all_dim) ** 2
    return multiplier / math.sqrt(qk_dim)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50304  # GPT-2's 50257, padded up to a multiple of 64
    block_size: int = 256  # longest sequence the model takes (prompt + generated tokens)
    n_layer: int = 6
    d_model: int = 384
    n_head: int = 6
    attention: str = "mla"  # "mla" | "mha" | "gqa"
    n_kv_head: int = 2  # key/value heads of "gqa"; "mha" uses n_head, "mla" ignores it
    # Multi-Head Latent Attention (DeepSeek-V2, arXiv 2405.04434, section 2.1)
    q_lora_rank: int = 192  # 0: no query compression (as in DeepSeek-V2-Lite)
    kv_lora_rank: int = 96
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    rope_theta: float = 10000.0
    # YaRN (Peng et al., arXiv 2309.00071) as DeepSeek-V2/V3 extend their context; names as in DeepSeek's configs
    rope_scaling: str = field(default="none", metadata={"help": "none | yarn (YaRN on the RoPE dims)"})
    rope_factor: float = field(default=1.0, metadata={
        "help": "YaRN: context extension factor (DeepSeek-V3: 40); needs --rope-scaling yarn"})
    original_seq_len: int = field(default=0, metadata={
        "help": "YaRN: the context length the model was trained at (DeepSeek-V3: 4096); required with yarn"})
    beta_fast: float = field(default=32.0, metadata={
        "help": "YaRN: dims rotating more than this often over original_seq_len keep their frequency"})
    beta_slow: float = field(default=1.0, metadata={
        "help": "YaRN: dims rotating less than this often are interpolated by rope_factor; a ramp in between"})
    mscale: float = field(default=1.0, metadata={
        "help": "YaRN: cos/sin are scaled by mscale(rope_factor, mscale) / mscale(rope_factor, mscale_all_dim), "
                "where mscale(s, m) = 0.1 m ln(s) + 1"})
    mscale_all_dim: float = field(default=1.0, metadata={
        "help": "YaRN: the softmax scale is multiplied by mscale(rope_factor, mscale_all_dim)^2 (0: not at all)"})
    ffn_hidden: int = 1024  # SwiGLU hidden width
    norm_eps: float = 1e-6
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self):
        check_field_types(self)
        positive = ("vocab_size", "block_size", "n_layer", "d_model", "n_head", "n_kv_head", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_hidden")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.q_lora_rank < 0:
            raise ValueError(f"q_lora_rank must be >= 0 (0 means no query compression), got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.attention != "mla":
            if self.d_model % self.n_head:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}) for {self.attention}")
            if self.head_dim % 2:
                raise ValueError(f"d_model / n_head ({self.head_dim}) must be even for RoPE in {self.attention}")
        if self.attention == "gqa" and self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("norm_eps and rope_theta must be positive")
        self.check_rope_scaling()

    def check_rope_scaling(self):
        """The YaRN fields' domains, whether or not YaRN is on (a value out of range is a mistake either way)."""
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        if not self.rope_factor >= 1.0:
            raise ValueError(f"rope_factor must be >= 1 (1: no extension), got {self.rope_factor}")
        if self.original_seq_len < 0:
            raise ValueError(f"original_seq_len must be >= 0, got {self.original_seq_len}")
        if not 0 < self.beta_slow < self.beta_fast:
            raise ValueError(f"need 0 < beta_slow < beta_fast, got beta_slow {self.beta_slow} and "
                             f"beta_fast {self.beta_fast}")
        if not self.mscale > 0:
            raise ValueError(f"mscale must be positive, got {self.mscale}")
        if not self.mscale_all_dim >= 0:
            raise ValueError(f"mscale_all_dim must be >= 0 (0: no softmax correction), got {self.mscale_all_dim}")
        if self.rope_scaling == "none" and self.rope_factor != 1.0:
            raise ValueError(f"rope_factor {self.rope_factor} needs rope_scaling 'yarn' (it is 'none')")
        if self.rope_scaling == "yarn" and self.original_seq_len == 0:
            raise ValueError("original_seq_len (the context length trained at) must be positive for yarn, got 0")

    # ---- presets and serialisation -------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset, with any field overridden, e.g. from_preset("tiny", attention="mha")."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Fields missing from d (as in checkpoints from before they existed) take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**d)

    def active_fields(self) -> dict:
        """The fields that shape this model, for people to read: MLA's dims only for MLA, n_kv_head only for GQA,
        the YaRN fields only with YaRN."""
        mla = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        yarn = ("rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
        idle = (() if self.attention == "mla" else mla) + (() if self.attention == "gqa" else ("n_kv_head",))
        idle += () if self.rope_scaling == "yarn" else yarn
        return {name: value for name, value in self.to_dict().items() if name not in idle}

    # ---- derived numbers ------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """Per-head dimension of the MHA/GQA baselines."""
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the MHA/GQA baselines."""
        return self.n_head if self.attention == "mha" else self.n_kv_head

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key dimension: nope + rope for MLA, head_dim for the baselines."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def rope_dim(self) -> int:
        """How many dimensions of each query/key RoPE rotates."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def kv_cache_values_per_token_per_layer(self) -> int:
        """MLA caches c_KV and the shared k_rope; the baselines cache K and V for every key/value head."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.kv_heads * self.head_dim

    def attention_params(self) -> int:
        d, h = self.d_model, self.n_head
        if self.attention != "mla":
            return d * h * self.head_dim + 2 * d * self.kv_heads * self.head_dim + h * self.head_dim * d
        q_out = h * self.qk_head_dim
        q = d * q_out if self.q_lora_rank == 0 else d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * q_out
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * d

    def non_embedding_params(self) -> int:
        """Parameters outside the token embedding and LM head: blocks plus the final norm."""
        per_block = self.attention_params() + 3 * self.d_model * self.ffn_hidden + 2 * self.d_model
        return self.n_layer * per_block + self.d_model

    def num_params(self) -> int:
        embeddings = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.non_embedding_params() + embeddings

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM paper's appendix B:
        6 per matmul weight (the LM head included) plus the attention scores and weighted sum over seq_len keys."""
        t = seq_len or self.block_size
        matmul_weights = self.non_embedding_params() + self.vocab_size * self.d_model
        v_dim = self.v_head_dim if self.attention == "mla" else self.head_dim
        attention = 6 * self.n_layer * self.n_head * t * (self.qk_head_dim + v_dim)
        return 6 * matmul_weights + attention


PRESETS = {
    # For unit tests: a couple of seconds of CPU per training run.
    "tiny": ModelConfig(block_size=64, n_layer=2, d_model=64, n_head=4, n_kv_head=2, q_lora_rank=32,
                        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_hidden=128),
    # Learns Tiny Shakespeare on a 2-core CPU in about 13 minutes (train.py's default 400 steps of 16 x 128
    # tokens); tuned by measurement, see the README.
    "shakespeare": ModelConfig(block_size=128, n_layer=6, d_model=256, n_head=4, n_kv_head=2, q_lora_rank=128,
                               kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                               ffn_hidden=704, dropout=0.1),
    # The 124M-class MLA of published small-scale comparisons (GPT-2 small's depth and width).
    "gpt2-small": ModelConfig(block_size=1024, n_layer=12, d_model=768, n_head=12, n_kv_head=4, q_lora_rank=512,
                              kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                              ffn_hidden=2048),
}
# gpt2-small with a 64-dim RoPE key: its latent per token, kv_lora_rank + qk_rope_head_dim = 256 + 64 = 320, is a
# size vLLM's generic GPU MLA path takes (gpt2-small's 288 is not; its CPU path takes only DeepSeek's 512 + 64).
PRESETS["gpt2-small-mla320"] = replace(PRESETS["gpt2-small"], qk_rope_head_dim=64)

# The like-for-like variants that every preset runs as: the same depth and width, another attention. "mla-no-q" is
# MLA without query compression (as DeepSeek-V2-Lite); "gqa" keeps the preset's n_kv_head; "mqa" is GQA with one
# key/value head (Shazeer, arXiv 1911.02150).
VARIANTS = {"mla": {"attention": "mla"}, "mla-no-q": {"attention": "mla", "q_lora_rank": 0},
            "mha": {"attention": "mha"}, "gqa": {"attention": "gqa"}, "mqa": {"attention": "gqa", "n_kv_head": 1}}
