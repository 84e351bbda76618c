"""The built-in decoder-only transformer (pre-LayerNorm, GELU MLP, learned positions).

Plain on purpose: codebooks are inserted from outside by `cbtool.model.sites` with module hooks on
`attn.proj` (per-head outputs, before the output projection), `attn` (attention output) and `mlp`
(MLP output) — the same hook points used for Hugging Face models. Supports a KV cache for
generation and left-padded batches (a per-row start position masks the padding).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cbtool.model.specs import ModelConfig  # noqa: F401 - re-exported

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, t, d)  # heads side by side: the per-head site
        return self.proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, past=None):
        a, kv = self.attn(self.ln1(x), mask, past)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return x, kv


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError("d_model must be divisible by n_head")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        past: KVCache | None = None,
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """idx: (B, T) token ids -> logits (B, T, V) and the KV cache.

        `past` continues from a cache; `start` (B,) is each row's first real position for
        left-padded batches (positions count from it, and keys before it are masked)."""
        b, t = idx.shape
        offset = 0 if past is None else past[0][0].shape[2]
        total = offset + t
        if total > self.config.block_size:
            raise ValueError(f"sequence of {total} tokens exceeds block size {self.config.block_size}")
        pos = torch.arange(offset, total, device=idx.device).unsqueeze(0).expand(b, t)
        mask = None
        if start is not None or past is not None:
            s = torch.zeros(b, dtype=torch.long, device=idx.device) if start is None else start
            pos = (pos - s.unsqueeze(1)).clamp(min=0)
            q_pos = torch.arange(offset, total, device=idx.device).view(1, t, 1)
            k_pos = torch.arange(total, device=idx.device).view(1, 1, total)
            allowed = (k_pos <= q_pos) & (k_pos >= s.view(b, 1, 1))
            allowed = allowed | (k_pos == q_pos)  # a padding query attends to itself, never NaN
            mask = allowed.unsqueeze(1)  # (B, 1, T, total)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        cache: KVCache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, mask, None if past is None else past[i])
            cache.append(kv)
        return self.head(self.ln_f(x)), cache
