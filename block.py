"""The pre-norm transformer block: x + attn(RMSNorm(x)), then x + ffn(RMSNorm(x))."""
import torch
from torch import nn

from attention import LayerCache, build_attention
from feed_forward_net import FeedForward
from model_config import ModelConfig


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.self_attn = build_attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask=None, cache: LayerCache | None = None, input_pos=None,
                absorb: bool = True) -> torch.Tensor:
        """x (B, T, D), cos/sin (B or 1, T, rope_dim / 2) for the T new positions -> (B, T, D); mask, cache,
        input_pos and absorb as the attention takes them."""
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos, absorb))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
