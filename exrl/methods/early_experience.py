"""Early Experience (Zhang et al., "Agent Learning via Early Experience", arXiv 2510.08558): reward-free data
from the agent's own alternative actions at expert states, used two ways.

  for each expert trajectory and each of its states s_i (instruction + expert turns [0, i)):
    sample `proposals` turns from the policy at s_i; keep up to K distinct parsed actions a' != expert a_i
    restore s_i exactly (reset(instance) + replay of the expert's first i actions; the envs are deterministic,
    and the restored observation is checked against the one the expert saw), step a', record s'  -> Branch
  implicit world modelling (IWM):  -log p(s' | s_i, a')            loss on the observation tokens only
  self-reflection (SR):            -log p(rationale, a_i | s_i)    loss on the rationale and the action

The rationale here is a TEMPLATE over the observed outcomes (`reflection_thought`), not model-written: the
paper prompts an instruct LLM for it; our few-M-parameter decoders cannot write one. Example builders live in
`early_experience_data.py`; this file collects the branches and trains the two arms.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

import jax

from exrl.envs.experts import EnvTrajectory, expert_trajectories
from exrl.methods.agentevol import AgentEvolConfig, _sft, build_env, expert_count, expert_examples
from exrl.methods.early_experience_data import Branch, iwm_examples, sr_examples, state_ids
from exrl.models.config import ModelConfig
from exrl.rollout.multiturn import _decode, agent_text, parse_action
from exrl.rollout.sampler import SamplingConfig, pad_prompts, sample

IWM_SCHEDULES = ("two_stage", "mixed")


@dataclasses.dataclass(frozen=True)
class EarlyExperienceConfig:
  """branches: K alternatives per expert state. proposals: policy samples per state from which the K distinct
  non-expert actions are taken (fewer than K when the policy repeats itself). iwm_schedule: "two_stage" (the
  paper: IWM on the branches, then imitation) or "mixed" (one SFT on both). iwm_epochs / sr_epochs: passes
  over the IWM / SR examples; the imitation part always gets the BC arm's `sft_epochs` over the expert data."""
  branches: int = 3
  proposals: int = 8
  temperature: float = 1.0
  max_new_tokens: int = 24
  state_batch: int = 16  # expert states per sampler call (rows = state_batch * proposals)
  iwm_schedule: str = "two_stage"
  iwm_epochs: float = 1.0
  sr_epochs: float = 1.0
  fill_random: bool = False  # top up to K with random legal actions where the policy proposed fewer (not the paper)

  def __post_init__(self):
    if self.iwm_schedule not in IWM_SCHEDULES:
      raise ValueError(f"EarlyExperienceConfig.iwm_schedule={self.iwm_schedule!r}; valid: {IWM_SCHEDULES}")
    for name in ("branches", "proposals", "max_new_tokens", "state_batch"):
      if getattr(self, name) < 1:
        raise ValueError(f"EarlyExperienceConfig.{name}={getattr(self, name)} must be >= 1")
    if self.proposals < self.branches:
      raise ValueError(f"EarlyExperienceConfig.proposals={self.proposals} < branches={self.branches}; "
                       "need at least K samples to find K alternatives")


def restore(env, traj: EnvTrajectory, turn: int) -> str:
  """Put `env` in the state the expert saw before its turn `turn`: reset + replay of its first `turn` actions.

  Returns that observation; raises RuntimeError when it differs from the one the expert saw (a
  non-deterministic env or a different instance seed), since branching from it would be silently wrong."""
  if not 0 <= turn < len(traj.turns):
    raise ValueError(f"turn={turn}; {traj.env} instance {traj.idx} has expert turns [0, {len(traj.turns)})")
  obs = env.reset(traj.idx)
  for _, action, _ in traj.turns[:turn]:
    obs = env.step(action).observation
  want = traj.turns[turn - 1][2] if turn else traj.instruction
  if obs != want:
    raise RuntimeError(f"restoring {traj.env} instance {traj.idx} at turn {turn} gave {obs!r}; the expert saw "
                       f"{want!r} (is the env deterministic, with the expert's seed and kwargs?)")
  return obs


def propose_actions(model_config: ModelConfig, params, tokenizer, prompts: Sequence[Sequence[int]], key: jax.Array,
                    cfg: EarlyExperienceConfig) -> list[list[tuple[str, str]]]:
  """`cfg.proposals` sampled turns per prompt, as (turn text, parsed action) pairs, in sampling order."""
  sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            stop_token_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id)
  out = []
  for b, start in enumerate(range(0, len(prompts), cfg.state_batch)):
    chunk = list(prompts[start:start + cfg.state_batch])
    n = len(chunk)
    chunk += [chunk[-1]] * (min(cfg.state_batch, len(prompts)) - n)  # one batch shape for every call
    tokens, valid = pad_prompts(chunk, tokenizer.pad_id, bucket="pow2")
    res = sample(model_config, params, tokens, valid, jax.random.fold_in(key, b), sampling, cfg.proposals)
    toks_RxN, mask_RxN = jax.device_get((res.tokens_BxN, res.mask_BxN))
    for p in range(n):
      texts = [_decode(tokenizer, toks_RxN[r][mask_RxN[r]].tolist())
               for r in range(p * cfg.proposals, (p + 1) * cfg.proposals)]
      out.append([(t, parse_action(t)) for t in texts])
  return out


def pick_alternatives(samples: Sequence[tuple[str, str]], expert_action: str, k: int) -> list[tuple[str, str]]:
  """The first k samples whose action is non-empty, differs from the expert's and from earlier picks."""
  seen, out = {expert_action.strip()}, []
  for text, action in samples:
    if action and action not in seen:
      seen.add(action)
      out.append((text, action))
      if len(out) == k:
        break
  return out


def step_branches(states: Sequence[tuple[EnvTrajectory, int]], alternatives: Sequence[Sequence[tuple[str, str]]],
                  env_factory: Callable, fill_to: int = 0, seed: int = 0) -> list[Branch]:
  """Step each state's alternatives (turn text, action) from an exact restore of that state.

  fill_to > 0 tops a state's alternatives up to that many with actions drawn (seeded) from the restored env's
  `available_actions()`, when the policy proposed fewer. env_factory(name) -> Env (in-process or `EnvClient`);
  one env per name is reused for every restore."""
  envs, out = {}, []
  try:
    for (traj, i), alts in zip(states, alternatives, strict=True):
      env = envs[traj.env] if traj.env in envs else envs.setdefault(traj.env, env_factory(traj.env))
      alts = list(alts)
      if len(alts) < fill_to:
        restore(env, traj, i)
        used = {traj.turns[i][1]} | {a for _, a in alts}
        pool = [a for a in env.available_actions() if a not in used]
        rng = random.Random(f"{seed}|{traj.env}|{traj.idx}|{i}")
        alts += [(agent_text("", a), a) for a in rng.sample(pool, min(len(pool), fill_to - len(alts)))]
      for text, action in alts:
        restore(env, traj, i)
        obs, reward, done = env.step(action)
        out.append(Branch(traj.env, traj.idx, i, text, action, obs, float(reward), bool(done)))
  finally:
    for env in envs.values():
      if hasattr(env, "close"):  # HTTP sessions end here; in-process envs hold nothing
        env.close()
  return out


def collect_branches(model_config: ModelConfig, params, tokenizer, trajs: Sequence[EnvTrajectory],
                     env_factory: Callable, key: jax.Array, cfg: EarlyExperienceConfig, seed: int = 0) -> list[Branch]:
  """Branch every state of every expert trajectory with up to K policy alternatives, stepped in real envs."""
  states = [(t, i) for t in trajs for i in range(len(t.turns))]
  proposals = propose_actions(model_config, params, tokenizer, [state_ids(tokenizer, t, i) for t, i in states], key,
                              cfg)
  alternatives = [pick_alternatives(samples, t.turns[i][1], cfg.branches) for (t, i), samples in zip(states, proposals)]
  return step_branches(states, alternatives, env_factory, cfg.branches if cfg.fill_random else 0, seed)


def expert_data(evol: AgentEvolConfig, tokenizer) -> tuple[list[EnvTrajectory], list]:
  """The expert trajectories (records, for branching) and their BC examples, as AgentEvol builds them."""
  trajs = [tr for name in evol.envs
           for tr in expert_trajectories(build_env(evol, name), range(expert_count(evol, name)))]
  return trajs, expert_examples(tokenizer, evol)


def repeat_to(data: Sequence, epochs: float, seed: int) -> list:
  """`epochs` passes over data as one list: whole copies plus a seeded random part for the fraction."""
  whole, frac = divmod(epochs, 1.0)
  part = random.Random(seed).sample(list(data), round(frac * len(data)))
  return list(data) * int(whole) + part


def train_iwm(evol: AgentEvolConfig, ee: EarlyExperienceConfig, model_config, base_params, tokenizer,
              trajs: Sequence[EnvTrajectory], expert: Sequence, branches: Sequence[Branch]):
  """The IWM arm from the base model: two-stage (IWM, then imitation) or one mixed SFT; returns params."""
  iwm = iwm_examples(tokenizer, trajs, branches)
  if not iwm:
    raise ValueError("no IWM examples: the policy proposed no alternative action at any expert state")
  if ee.iwm_schedule == "two_stage":
    params = _sft(evol, "iwm_stage1", model_config, base_params, tokenizer, repeat_to(iwm, ee.iwm_epochs, evol.seed),
                  1.0)
    return _sft(evol, "iwm_stage2", model_config, params, tokenizer, list(expert), evol.sft_epochs)
  mixed = repeat_to(expert, evol.sft_epochs, evol.seed) + repeat_to(iwm, ee.iwm_epochs, evol.seed + 1)
  return _sft(evol, "iwm_mixed", model_config, base_params, tokenizer, mixed, 1.0)


def train_sr(evol: AgentEvolConfig, ee: EarlyExperienceConfig, model_config, base_params, tokenizer,
             trajs: Sequence[EnvTrajectory], expert: Sequence, branches: Sequence[Branch], threshold: float):
  """The SR arm from the base model: one SFT on the expert data mixed with the reflection examples (the paper)."""
  sr = sr_examples(tokenizer, trajs, branches, threshold)
  if not sr:
    raise ValueError("no SR examples: no expert state has an alternative that failed to solve the task")
  mixed = repeat_to(expert, evol.sft_epochs, evol.seed) + repeat_to(sr, ee.sr_epochs, evol.seed + 2)
  return _sft(evol, "sr", model_config, base_params, tokenizer, mixed, 1.0)
