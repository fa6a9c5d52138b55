"""Streaming token statistics over the vocabulary (log-prob, lse, entropy, self-certainty, exact KL); imports jax only."""
from exrl.kernels.api import token_stats
from exrl.kernels.stats import TokenStats

__all__ = ["token_stats", "TokenStats"]
