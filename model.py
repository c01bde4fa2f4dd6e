"""The language model: token embedding, pre-norm blocks, final RMSNorm, LM head, and cached generation."""
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from attention import LayerCache, RowBlock, rope_tables
from block import Block
from kernels import Linear, visible
from model_config import ModelConfig


class RotaryTables:
    """cos and sin of RoPE's angles for positions 0 .. block_size - 1, each (block_size, rope_dim / 2), float32.

    They live outside the module's parameters and buffers, so casting the model (model.to(torch.bfloat16))
    leaves them in float32: angles at far positions lose their precision in 16 bits. One copy per device."""

    def __init__(self, config: ModelConfig):
        self.tables = {torch.device("cpu"): rope_tables(config.rope_dim, config.block_size, config.rope_theta,
                                                        scaling=config)}

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at positions (B or 1, T) -> each (B or 1, T, rope_dim / 2)."""
        if positions.device not in self.tables:
            self.tables[positions.device] = [t.to(positions.device) for t in self.tables[torch.device("cpu")]]
        cos, sin = self.tables[positions.device]
        return cos[positions], sin[positions]


class Cache:
    """The decode cache of B sequences of up to `capacity` positions: one LayerCache per layer, each holding each
    row's left padding pad (B,), for prompts of different lengths decoded as one batch.

    It keeps no count of what it holds. Each forward names the slots it writes (input_pos), and each query at
    slot p reads the slots pad[b] .. p of its row. So rewinding is writing at earlier slots again, and a new
    sequence in the same cache is a forward from slot 0; nothing else needs resetting."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    @property
    def pad(self) -> torch.Tensor:
        return self.layers[0].pad

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    @property
    def nbytes(self) -> int:
        """Bytes the cache's tensors hold, all layers together."""
        return sum(layer.nbytes for layer in self.layers)

    def positions_and_mask(self, input_pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """For new tokens at slots input_pos (T,): their RoPE positions (B, T), slot minus the row's padding,
        and the additive attention mask (B, 1, T, capacity) in dtype: 0 where a query reads (kernels.visible),
        -inf elsewhere."""
        slots = torch.arange(self.capacity, device=input_pos.device)
        query_slot = input_pos[:, None]  # (T, 1)
        pad = self.pad[:, None, None]  # (B, 1, 1)
        seen = visible(slots, query_slot, pad)  # (B, T, capacity)
        mask = torch.zeros(seen.shape, dtype=dtype, device=input_pos.device).masked_fill(~seen, -math.inf)
        return (input_pos[None, :] - self.pad[:, None]).clamp(min=0), mask.unsqueeze(1)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = Linear(config.d_model, config.vocab_size)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryTables(config)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2: scale the projections into the residual
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None,
                input_pos: torch.Tensor | None = None, *, last_only: bool = False,
                absorb: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab), or (B, 1, vocab) for the last position only with
        last_only, and the mean cross-entropy against targets (B, T), where -1 marks a target to skip; the loss
        is None without targets.

        With a cache (from make_cache), idx holds the tokens at slots input_pos (T,) of the cache (a LongTensor,
        so that a decode step has static shapes) and they attend over the cache; absorb=False makes MLA
        decompress its cache instead of decoding by weight absorption (the decode benchmark's reference)."""
        T = idx.size(1)
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
            positions, mask = torch.arange(T, device=idx.device)[None], None
        else:
            positions, mask = cache.positions_and_mask(input_pos, self.embed_tokens.weight.dtype)
        cos, sin = self.rope.at(positions)
        x = self.dropout(self.embed_tokens(idx))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache.layers[i] if cache is not None else None, input_pos, absorb)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def stacked_rows(self) -> dict[str, list[RowBlock]]:
        """The row blocks of every weight that stacks several matrices (see MultiHeadLatentAttention.stacked_rows),
        by state-dict name."""
        return {f"layers.{i}.self_attn.{name}": blocks for i, layer in enumerate(self.layers)
                for name, blocks in layer.self_attn.stacked_rows().items()}

    def make_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None,
                   pad: torch.Tensor | None = None) -> Cache:
        """An empty decode cache for batch_size sequences of up to capacity tokens, in dtype (default: the
        model's), with pad (B,) leading padding tokens per row (default none)."""
        if capacity > self.config.block_size:
            raise ValueError(f"a cache of {capacity} positions is longer than block_size {self.config.block_size}")
        weight = self.embed_tokens.weight
        pad = (torch.zeros(batch_size, dtype=torch.long) if pad is None else pad).to(weight.device)
        return Cache([LayerCache(layer.self_attn.cache_shapes(batch_size, capacity), dtype or weight.dtype,
                                 weight.device, pad) for layer in self.layers])

    def decode_step(self, token: torch.Tensor, cache: Cache, input_pos: torch.Tensor,
                    absorb: bool = True) -> torch.Tensor:
        """Logits (B, vocab) after token (B, 1) at slot input_pos (1,). Its shapes are the same at every step,
        so torch.compile captures it once (compile_decode_step)."""
        return self(token, cache=cache, input_pos=input_pos, last_only=True, absorb=absorb)[0][:, -1]

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None, *,
               pad: torch.Tensor | None = None, vocab_limit: int | None = None, stop_id: int | None = None,
               cache_dtype: torch.dtype | None = None, decode_step=None) -> Iterator[torch.Tensor]:
        """Yield up to max_new_tokens next tokens (B, 1), one at a time: one prefill of the prompts idx (B, T),
        then one cached decode step per token.

        pad (B,): row b is left-padded by pad[b] tokens (left_pad makes idx and pad from prompts of different
        lengths). vocab_limit: sample only ids below it (the tokenizer's; the model's vocabulary is padded).
        stop_id: a row that produced it keeps producing it, and the stream ends when every row has.
        decode_step: what takes each decode step (default: self.decode_step; compile_decode_step's compiled one)."""
        B, T = idx.shape
        total = T + max_new_tokens
        if total > self.config.block_size:
            raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens = {total} "
                             f"is longer than block_size {self.config.block_size}")
        cache = self.make_cache(B, total, cache_dtype, pad)
        decode_step = decode_step or self.decode_step
        logits = self(idx, cache=cache, input_pos=torch.arange(T, device=idx.device), last_only=True)[0][:, -1]
        done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
        for i in range(max_new_tokens):
            token = sample_next(logits[:, :vocab_limit], temperature, top_k, top_p, generator)
            if stop_id is not None:
                token = token.masked_fill(done, stop_id)
                done |= token == stop_id
            yield token
            if i + 1 == max_new_tokens or (stop_id is not None and bool(done.all())):
                return
            logits = decode_step(token, cache, torch.tensor([T + i], device=idx.device))

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, **options) -> torch.Tensor:
        """Continue the prompts idx (B, T) by up to max_new_tokens tokens -> (B, T + new tokens).
        temperature 0 is greedy; options are stream()'s keyword options."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, **options))
        return torch.cat([idx, *new], dim=1)


def compile_decode_step(model: Transformer):
    """model.decode_step compiled with torch.compile (the model itself is left as it is). Its shapes are the same
    at every step, so it is captured once; on CUDA as a CUDA graph ("reduce-overhead"), which removes the launch
    cost of its many small kernels."""
    cuda = model.lm_head.weight.device.type == "cuda"
    return torch.compile(model.decode_step, mode="reduce-overhead" if cuda else None, fullgraph=True)


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch: ids (B, longest) right-aligned after pad_id, and the padding
    of each row (B,), for Transformer.stream."""
    longest = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], dtype=torch.long)
    return idx, torch.tensor([longest - len(p) for p in prompts], dtype=torch.long)


# How test.py samples unless told otherwise; an export's generation_config.json says the same.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 200


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row of logits (B, vocab) -> (B, 1).

    temperature 0 takes the argmax; top_k keeps the k most likely tokens; top_p keeps the smallest set of most
    likely tokens whose probability reaches p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.double()  # float64, and the top logit 0, so that no temperature > 0 makes inf or nan
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = before >= top_p  # already reached p without this token
        drop_sorted[:, 0] = False  # the top token is always kept (a top_p below float32's range rounds to 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
