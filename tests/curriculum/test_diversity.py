"""Diversity bonus: multipliers against a hand-computed example; embeddings against a numpy mean of hidden states."""
import jax
import numpy as np
import pytest

from experiments import common
from exrl.models import decoder
from exrl.train.diversity import diversity_multipliers, response_embedding_sums


def test_multipliers_hand_example():
  emb = np.array([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0], [5.0, 5.0]])
  group = np.array([7, 7, 3, 3])
  # group 7: mean (1, 0), distances 1 and 1 -> 1, 1; group 3: identical -> 1, 1
  np.testing.assert_allclose(diversity_multipliers(emb, group), [1, 1, 1, 1])
  emb = np.array([[0.0], [0.0], [3.0], [10.0]])
  # mean 3.25; d = 3.25, 3.25, 0.25, 6.75; mean d = 3.375
  want = np.array([3.25, 3.25, 0.25, 6.75]) / 3.375
  np.testing.assert_allclose(diversity_multipliers(emb, np.zeros(4, int)), want, rtol=1e-6)


def test_embedding_is_masked_mean_of_hidden_states():
  class Tok:
    bos_id, eos_id, pad_id = 1, 2, 0

  config = common.TinyModel(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                            intermediate_size=32).config(24, Tok)
  params = decoder.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 24, (3, 8)).astype(np.int32)
  valid = np.ones((3, 8), bool)
  positions = np.tile(np.arange(8, dtype=np.int32), (3, 1))
  mask = np.zeros((3, 8), bool)
  mask[0, 4:] = True
  mask[1, 2:5] = True
  sums, counts = jax.device_get(response_embedding_sums(config, params, tokens, valid, positions, mask))
  hidden = np.asarray(decoder.hidden_states(config, params, tokens, valid, positions), np.float64)
  for r in range(3):
    want = hidden[r][mask[r]].sum(0)
    np.testing.assert_allclose(sums[r], want, rtol=1e-4, atol=1e-5)
    assert counts[r] == mask[r].sum()
