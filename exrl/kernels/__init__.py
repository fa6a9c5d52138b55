"""Streaming token statistics over the vocabulary (log-prob, lse, entropy, self-certainty, exact KL); imports jax only."""
from kernels.api import token_stats
from kernels.stats import TokenStats

__all__ = ["token_stats", "TokenStats"]
