"""The language model: token embedding, pre-norm blocks, final RMSNorm, LM head, and cached generation."""
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from attention import LayerCache, rope_tables
from block import Block
from model_config import ModelConfig


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.rope_dim, config.block_size, config.rope_theta, scaling=config)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, rope_dim / 2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2: scale the projections into the residual
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    def _apply(self, fn, recurse=True):
        """Casts and moves (model.to, .bfloat16(), .cuda()) apply to the weights; the RoPE tables stay float32,
        since angles at far positions lose their precision in 16 bits."""
        cos, sin = self.rope_cos.float(), self.rope_sin.float()
        super()._apply(fn, recurse)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: list[LayerCache] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab) and the mean cross-entropy against targets (B, T),
        where -1 marks a target to skip; the loss is None without targets.

        With a cache (from make_cache), idx holds the next T positions after those cached, the cache is
        extended, and logits come for the last position only: (B, 1, vocab)."""
        T = idx.size(1)
        start = cache[0].length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.dropout(self.embed_tokens(idx))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache[i] if cache is not None else None)
        if cache is not None:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def make_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None) -> list[LayerCache]:
        """An empty decode cache for batch_size sequences of up to capacity tokens, one LayerCache per layer."""
        weight = self.embed_tokens.weight
        return [LayerCache(layer.self_attn.cache_shapes(batch_size, capacity), dtype or weight.dtype, weight.device)
                for layer in self.layers]

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield max_new_tokens next tokens (B, 1), one at a time: one prefill of the prompt idx (B, T),
        then one cached decode step per token."""
        total = idx.size(1) + max_new_tokens
        if total > self.config.block_size:
            raise ValueError(f"prompt of {idx.size(1)} tokens + {max_new_tokens} new tokens = {total} "
                             f"is longer than block_size {self.config.block_size}")
        cache = self.make_cache(idx.size(0), total)
        logits, _ = self(idx, cache=cache)
        for i in range(max_new_tokens):
            token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            yield token
            if i + 1 < max_new_tokens:
                logits, _ = self(token, cache=cache)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue the prompt idx (B, T) by max_new_tokens tokens -> (B, T + max_new_tokens).
        temperature 0 is greedy."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator))
        return torch.cat([idx, *new], dim=1)


def cache_nbytes(cache: list[LayerCache]) -> int:
    """Bytes the cache's tensors hold, all layers together."""
    return sum(layer.nbytes for layer in cache)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row of logits (B, vocab) -> (B, 1).

    temperature 0 takes the argmax; top_k keeps the k most likely tokens; top_p keeps the smallest set of most
    likely tokens whose probability reaches p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = before >= top_p  # already reached p without this token (the top token is always kept)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
