"""Small building blocks of the decoder: RMSNorm and rotary position embeddings.

Shape legend: T tokens in the flat batch, H heads, Dh head dim, D hidden size, P max positions.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as Mixtral's reference does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary embedding in the rotate-half convention of the Hugging Face layout.

    Consolidated (interleaved-pair) checkpoints are permuted into this convention at load time,
    so the forward has a single code path. The cos/sin table is a non-persistent buffer that
    `reset_cache` (re)computes, because a model built on the meta device has no data yet.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.register_buffer("cos_sin", torch.empty(max_positions, 2, head_dim), persistent=False)
        if self.cos_sin.device.type != "meta":
            self.reset_cache()

    @torch.no_grad()
    def reset_cache(self) -> None:
        """Fill the [P, 2, Dh] cos/sin table on the buffer's device, in fp32."""
        device = self.cos_sin.device
        inv_freq = 1.0 / (
            self.theta
            ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)
        )  # [Dh/2]
        pos = torch.arange(self.max_positions, dtype=torch.float32, device=device)  # [P]
        freqs = torch.outer(pos, inv_freq)  # [P, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, Dh]
        self.cos_sin = torch.stack((emb.cos(), emb.sin()), dim=1)  # [P, 2, Dh]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, Dh] for token positions [T], shared by every layer of a step."""
        cos_sin = self.cos_sin.index_select(0, positions).to(dtype)  # [T, 2, Dh]
        return cos_sin[:, 0].unsqueeze(1), cos_sin[:, 1].unsqueeze(1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, Dh] and k [T, K, Dh] by cos, sin [T, 1, Dh] (rotate-half convention)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
