"""Greedy generation from exrl's KV-cache sampler equals transformers `generate` on a left-padded ragged batch."""
import chex
import jax
import numpy as np
import pytest
import torch

from exrl.models import hf
from exrl.rollout import sampler
from tests.models.hf_fixtures import FAMILIES, make_hf_model

NEW = 32


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(family, tmp_path):
  model = make_hf_model(family, tmp_path)
  # Larger random weights than the fixture's: std-0.02 models repeat one token forever, which would
  # hide cache and position bugs; these give varied continuations.
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 2:
        p.normal_(0, 0.25)
  model.save_pretrained(tmp_path)
  config, params = hf.load(tmp_path)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (5, 11, 2, 8)]
  tokens, valid = sampler.pad_prompts(prompts, pad_id=0, bucket=16)
  # No eos on either side, so all 32 tokens are compared.
  out = sampler.sample(config, params, tokens, valid, jax.random.key(0),
                       sampler.SamplingConfig(max_new_tokens=NEW, greedy=True, stop_token_ids=()))
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(valid, dtype=torch.long), do_sample=False,
                         max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
  ref = ref[:, tokens.shape[1]:].numpy()
  chex.assert_shape(ref, (len(prompts), NEW))
  assert bool(out.mask_BxN.all())
  assert min(len(set(row)) for row in ref.tolist()) >= 5, "degenerate continuations make a weak test"
  np.testing.assert_array_equal(np.asarray(out.tokens_BxN), ref)
