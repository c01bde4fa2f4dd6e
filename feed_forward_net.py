"""The SwiGLU feed-forward network (Shazeer, arXiv 2002.05202), without biases."""
import torch
import torch.nn.functional as F
from torch import nn

from kernels import Linear
from model_config import ModelConfig


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(config.d_model, config.ffn_hidden)
        self.up_proj = Linear(config.d_model, config.ffn_hidden)
        self.down_proj = Linear(config.ffn_hidden, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
