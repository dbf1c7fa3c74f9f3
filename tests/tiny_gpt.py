"""A small GPT for tests and benchmarks (nanoGPT's shape: pre-LN blocks, tied embedding and head).

Sizes are configurable: the tests use a few layers of width 64 on CPU; ``GPTConfig.gpt2_small()`` is the
124M GPT-2 shape for the GPU benchmark. Attention is either ``F.scaled_dot_product_attention`` (as Hugging
Face models call it) or Megatron-LM's core attention (``torch.baddbmm`` scores with ``beta=0``, softmax,
``torch.bmm`` context), so both functional paths of ``fakequant.patch_functional`` can be exercised.

Public: ``GPTConfig``, ``TinyGPT``, ``synthetic_batch``, ``train``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_IMPLS = ("sdpa", "megatron")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 96
    block_size: int = 32  # longest sequence
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    attention: str = "sdpa"  # "sdpa" or "megatron"
    bias: bool = True

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"GPTConfig.attention={self.attention!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")

    @classmethod
    def gpt2_small(cls, **changes) -> GPTConfig:
        """GPT-2 small (124M): 12 layers, 12 heads, width 768, context 1024, vocabulary padded to 50304."""
        return cls(**{"vocab_size": 50304, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768, **changes})


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.attention = cfg.n_head, cfg.attention
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:
            y = megatron_core_attention(q.reshape(B * self.n_head, T, hs), k.reshape(B * self.n_head, T, hs),
                                        v.reshape(B * self.n_head, T, hs)).view(B, self.n_head, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def megatron_core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Megatron-LM's unfused core attention on [b·np, s, hn] tensors, causal."""
    bnp, s, hn = q.shape
    buffer = torch.empty(bnp, s, s, dtype=q.dtype, device=q.device)  # ignored: beta = 0
    scores = torch.baddbmm(buffer, q, k.transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(hn))  # [b·np, s, s]
    future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return torch.bmm(probs, v)  # [b·np, s, hn]


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def synthetic_batch(cfg: GPTConfig, batch: int, seq: int | None = None, seed: int = 0, device="cpu"):
    """Random tokens and their next-token targets: (idx, targets), each [batch, seq]."""
    seq = cfg.block_size if seq is None else seq
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def train(model: nn.Module, batch, steps: int, lr: float = 3e-3, optimizer: torch.optim.Optimizer | None = None):
    """``steps`` AdamW steps on one fixed batch; returns the loss of each step (before its update)."""
    idx, targets = batch
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
