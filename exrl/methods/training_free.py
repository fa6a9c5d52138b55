"""Training-Free GRPO (Cai et al., arXiv 2510.08191): a frozen policy learns a text experience library.

  for epoch in 1..E, for each batch of training problems:
    rollouts: G completions per problem with the library in the prompt; reward each with the verifier
    keep groups whose rewards are not all equal (the paper: mean strictly between 0 and 1)
    summarise: the extractor LLM describes each kept rollout given its reward
    semantic advantage: per group, from the summaries and rewards, lessons on what the better rollouts did
    update: one call turns the batch's lessons into add / modify / delete / keep operations on the library
  inference: the library's lessons are put in front of every prompt (`policy_prompt`)

Weights never change: the policy and the extractor are `exrl.serve.llm.LLM`s (the sampler in-process or an
OpenAI-compatible endpoint), and may be different models. The library and the counters are checkpointed after
every step (`exrl.infra.checkpoint`; the state item holds only the step, the library is in the meta), and a
re-run of the same command resumes. Given the seed and the LLMs' outputs the run is deterministic: ids are
assigned in order, operations apply in reply order, and every call's seed derives from (seed, step, stage).

Where this differs from the paper (whose code is tied to youtu-agent): the paper's per-group update and its
batch-level consolidation are one update call per batch here; replies are JSON in our own prompts
(`training_free_prompts`); a reply that does not parse, an operation that names a missing id, and a prompt the
extractor refuses are counted in `stats` and skipped, never fatal.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from exrl.methods import training_free_prompts as prompts
from exrl.serve.llm import LLM, Completion, GenParams
from exrl.tasks import pool as pool_lib
from exrl.train.evaluate import wilson_interval

OPS = ("add", "modify", "delete", "keep")


class ExperienceLibrary:
  """Lessons with stable ids "E0", "E1", ... (never reused); ordered by id. `max_entries` 0: no cap."""

  def __init__(self, max_entries: int = 0, max_chars: int = 400):
    self.max_entries, self.max_chars = max_entries, max_chars
    self.entries: dict[str, str] = {}
    self.next_id = 0

  def __len__(self) -> int:
    return len(self.entries)

  def add(self, text: str) -> str:
    text = self._check_text(text)
    if self.max_entries and len(self.entries) >= self.max_entries:
      raise ValueError(f"the library is full ({self.max_entries} entries); delete or modify one instead")
    eid = f"E{self.next_id}"
    self.next_id += 1
    self.entries[eid] = text
    return eid

  def modify(self, eid: str, text: str) -> None:
    self._check_id(eid)
    self.entries[eid] = self._check_text(text)

  def delete(self, eid: str) -> None:
    self._check_id(eid)
    del self.entries[eid]

  def apply(self, op) -> str:
    """Apply one operation dict ({"op": add|modify|delete|keep, "id"?, "text"?}); returns the op's name.

    Raises ValueError naming what is wrong with a malformed operation (the caller counts and skips it).
    """
    if not isinstance(op, dict) or op.get("op") not in OPS:
      raise ValueError(f"operation {str(op)[:80]!r} needs 'op' in {OPS}")
    kind = op["op"]
    if kind == "add":
      self.add(op.get("text"))
    elif kind == "modify":
      self.modify(op.get("id"), op.get("text"))
    elif kind == "delete":
      self.delete(op.get("id"))
    else:
      self._check_id(op.get("id"))
    return kind

  def render(self) -> str:
    """The lessons as prompt text, one "[E3] lesson" per line ('' when empty)."""
    return "\n".join(f"[{eid}] {text}" for eid, text in self.entries.items())

  def state_dict(self) -> dict:
    return {"entries": [[eid, text] for eid, text in self.entries.items()], "next_id": self.next_id}

  def load_state_dict(self, state: dict) -> None:
    entries = state.get("entries") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not isinstance(state.get("next_id"), int):
      raise ValueError(f"not an ExperienceLibrary state (want {{'entries': [[id, text]], 'next_id': int}}): "
                       f"{str(state)[:120]}")
    self.entries = {str(eid): str(text) for eid, text in entries}
    self.next_id = state["next_id"]

  def _check_id(self, eid) -> None:
    if eid not in self.entries:
      raise ValueError(f"no lesson with id {eid!r}; ids in the library: {list(self.entries)[:20]}")

  def _check_text(self, text) -> str:
    line = " ".join(text.split()) if isinstance(text, str) else ""
    if not 0 < len(line) <= self.max_chars:
      raise ValueError(f"lesson text must be a string of 1..{self.max_chars} characters; got {str(text)[:80]!r}")
    return line


@dataclasses.dataclass(frozen=True)
class TrainingFreeConfig:
  """Defaults follow the paper where it says (G = 5, 3 epochs, rollout temperature 0.7); the rest are ours."""
  run_dir: str = "runs/training_free"
  epochs: int = 3
  batch_size: int = 8  # problems per step
  group_size: int = 5  # G rollouts per problem
  chat: bool = True  # policy prompts as chat messages (instruct models) or raw completions (exrl's tiny models)
  rollout: GenParams = GenParams(max_tokens=1024, temperature=0.7)
  extractor: GenParams = GenParams(max_tokens=1024, temperature=0.0)  # one reply per call: n is ignored
  summary_words: int = 120
  max_attempt_chars: int = 4000  # a rollout is cut to this many characters before it is summarised
  max_lessons_per_group: int = 3
  max_entries: int = 0  # library size cap (0: none)
  max_lesson_chars: int = 400
  show_answer: bool = True  # give the reference answer to the advantage step (the paper's math setting does)
  seed: int = 0
  keep_checkpoints: int = 2

  def __post_init__(self):
    for name in ("epochs", "batch_size", "summary_words", "max_lessons_per_group", "max_lesson_chars",
                 "keep_checkpoints", "max_attempt_chars"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainingFreeConfig.{name}={getattr(self, name)} must be >= 1")
    if self.group_size < 2:
      raise ValueError(f"TrainingFreeConfig.group_size={self.group_size}: a group advantage needs >= 2 rollouts")


def _ask(llm: LLM, texts: Sequence[str], gen: GenParams, chat: bool) -> list[list[Completion]]:
  """texts as user messages (chat) or raw prompts."""
  if chat:
    return llm.chat([[{"role": "user", "content": t}] for t in texts], gen)
  return llm.complete(list(texts), gen)


def solve(policy: LLM, problems: Sequence, library: ExperienceLibrary, gen: GenParams, chat: bool
          ) -> list[list[Completion]]:
  """Inference with the library in context: `gen.n` completions per problem."""
  text = library.render()
  return _ask(policy, [prompts.policy_prompt(p.prompt, text) for p in problems], gen, chat)


def _tokens(comps: Sequence[Sequence[Completion]]) -> tuple[int, int]:
  """(prompt tokens, completion tokens) of a call: the prompt once per prompt, every completion."""
  return (sum(cs[0].prompt_tokens for cs in comps if cs),
          sum(c.completion_tokens for cs in comps for c in cs))


class TrainingFreeGRPO:
  """The loop over (policy, extractor, problems, verify). `stats` holds counts and token use."""

  def __init__(self, cfg: TrainingFreeConfig, policy: LLM, extractor: LLM, problems: Sequence,
               verify: Callable | None, *, pool: pool_lib.VerifierPool | None = None, log: Callable = print):
    if not problems:
      raise ValueError("Training-Free GRPO needs at least one training problem")
    self.cfg, self.policy, self.extractor, self.problems = cfg, policy, extractor, list(problems)
    self.verify, self.pool, self.log = verify, pool, log
    self.library = ExperienceLibrary(cfg.max_entries, cfg.max_lesson_chars)
    self.steps_per_epoch = math.ceil(len(self.problems) / cfg.batch_size)
    self.total_steps = cfg.epochs * self.steps_per_epoch
    self.stats = {k: 0 for k in (
        "rollouts", "groups", "informative_groups", "summary_calls", "summary_malformed", "advantage_calls",
        "advantage_malformed", "lessons", "lessons_dropped", "update_calls", "update_malformed", "ops_invalid",
        *[f"ops_{o}" for o in OPS], "policy_prompt_tokens", "policy_completion_tokens",
        "extractor_prompt_tokens", "extractor_completion_tokens", "reward_sum")}
    self.stats["wall_s"] = 0.0
    self.history: list[dict] = []  # per step: rewards, informative groups, library size

  def batch(self, step: int) -> list:
    """The problems of `step`: epochs over the set, reshuffled per epoch from the seed."""
    epoch, i = divmod(step, self.steps_per_epoch)
    order = list(range(len(self.problems)))
    random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
    return [self.problems[j] for j in order[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]]

  def _gen(self, base: GenParams, step: int, stage: int, **kw) -> GenParams:
    return dataclasses.replace(base, seed=(self.cfg.seed * 1_000_003 + step * 8 + stage) % 2**31, **kw)

  def _extract(self, texts: Sequence[str], step: int, stage: int) -> list[Completion]:
    comps = _ask(self.extractor, texts, self._gen(self.cfg.extractor, step, stage, n=1), chat=True)
    p, c = _tokens(comps)
    self.stats["extractor_prompt_tokens"] += p
    self.stats["extractor_completion_tokens"] += c
    return [cs[0] for cs in comps]

  def step(self, step: int) -> dict:
    """One batch: rollouts, semantic advantages, one library update. Returns the step's record."""
    cfg, st = self.cfg, self.stats
    problems = self.batch(step)
    G = cfg.group_size
    comps = solve(self.policy, problems, self.library, self._gen(cfg.rollout, step, 0, n=G), cfg.chat)
    p, c = _tokens(comps)
    st["policy_prompt_tokens"] += p
    st["policy_completion_tokens"] += c
    texts = [x.text for cs in comps for x in cs]
    rewards, _ = pool_lib.verifier_rewards(texts, [q for q in problems for _ in range(G)], self.verify,
                                           pool=self.pool)
    rewards_UxG = np.asarray(rewards, np.float64).reshape(len(problems), G)
    st["rollouts"] += len(texts)
    st["groups"] += len(problems)
    st["reward_sum"] += float(rewards_UxG.sum())
    keep = [u for u in range(len(problems)) if rewards_UxG[u].max() > rewards_UxG[u].min()]
    st["informative_groups"] += len(keep)

    # Summaries of every rollout of the informative groups; a malformed one drops that rollout.
    items = [(u, g) for u in keep for g in range(G)]
    summaries = self._extract([prompts.summary_prompt(problems[u].prompt, texts[u * G + g][:cfg.max_attempt_chars],
                                                      float(rewards_UxG[u, g]), cfg.summary_words)
                               for u, g in items], step, 1)
    st["summary_calls"] += len(items)
    by_group: dict[int, list[tuple[str, float]]] = {u: [] for u in keep}
    for (u, g), s in zip(items, summaries):
      line = " ".join(s.text.split())
      if s.error or not line:
        st["summary_malformed"] += 1
        continue
      by_group[u].append((line, float(rewards_UxG[u, g])))

    # Semantic advantage per group that still has both better and worse rollouts.
    groups = [u for u in keep if len({r for _, r in by_group[u]}) > 1]
    library_text = self.library.render()
    replies = self._extract([prompts.advantage_prompt(problems[u].prompt, problems[u].answer if cfg.show_answer
                                                      else None, by_group[u], library_text,
                                                      cfg.max_lessons_per_group) for u in groups], step, 2)
    st["advantage_calls"] += len(groups)
    lessons: list[str] = []
    for reply in replies:
      got, dropped = (None, 0) if reply.error else prompts.parse_lessons(reply.text, cfg.max_lessons_per_group,
                                                                         cfg.max_lesson_chars)
      if got is None:
        st["advantage_malformed"] += 1
        continue
      st["lessons_dropped"] += dropped
      lessons += got
    st["lessons"] += len(lessons)

    applied = []
    if lessons:
      reply = self._extract([prompts.update_prompt(library_text, lessons)], step, 3)[0]
      st["update_calls"] += 1
      ops = None if reply.error else prompts.parse_operations(reply.text)
      if ops is None:
        st["update_malformed"] += 1
      for op in ops or []:
        try:
          kind = self.library.apply(op)
        except ValueError:
          st["ops_invalid"] += 1
          continue
        st[f"ops_{kind}"] += 1
        applied.append(op)
    record = {"step": step + 1, "reward_mean": float(rewards_UxG.mean()), "informative_groups": len(keep),
              "lessons": len(lessons), "ops_applied": len(applied), "library_size": len(self.library)}
    self.history.append(record)
    return record

  def state_dict(self) -> dict:
    return {"library": self.library.state_dict(), "stats": dict(self.stats), "history": list(self.history)}

  def load_state_dict(self, state: dict) -> None:
    self.library.load_state_dict(state["library"])
    self.stats.update(state["stats"])
    self.history = list(state["history"])

  def run(self) -> ExperienceLibrary:
    """Run (or resume from the newest checkpoint in cfg.run_dir) all epochs; returns the library."""
    from exrl.infra.checkpoint import Checkpointer  # orbax: only a run that saves pays its import

    run_dir = Path(self.cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with Checkpointer(run_dir / "ckpt", keep=self.cfg.keep_checkpoints) as ckpt:
      start, _, meta = ckpt.restore_latest({"step": np.zeros((), np.int32)})
      if start:
        self.load_state_dict(meta["training_free"])
        self.log(f"[training_free] resumed at step {start} with {len(self.library)} lessons")
      before = self.stats.get("wall_s", 0.0)  # wall time of the steps a resumed run already did
      for step in range(start, self.total_steps):
        record = self.step(step)
        self.log(f"[training_free] step {step + 1}/{self.total_steps} {json.dumps(record)}")
        self.stats["wall_s"] = before + time.time() - t0
        ckpt.save(step + 1, {"step": np.asarray(step + 1, np.int32)}, {"training_free": self.state_dict()},
                  force=True)
    (run_dir / "library.json").write_text(json.dumps(self.library.state_dict(), indent=2))
    return self.library


def evaluate_policy(policy: LLM, problems: Sequence, verify: Callable | None, library: ExperienceLibrary, *,
                    chat: bool, gen: GenParams, greedy: bool = True, pool: pool_lib.VerifierPool | None = None
                    ) -> dict:
  """pass@1 (mean over gen.n samples at gen.temperature) and greedy accuracy with the library in context,
  with 95% Wilson intervals, plus the tokens used."""
  out = {"n": len(problems), "samples_per_problem": gen.n, "library_size": len(library)}
  runs = [("pass1", gen)] + ([("greedy", dataclasses.replace(gen, n=1, temperature=0.0))] if greedy else [])
  prompt_tokens = completion_tokens = 0
  for name, g in runs:
    comps = solve(policy, problems, library, g, chat)
    p, c = _tokens(comps)
    prompt_tokens, completion_tokens = prompt_tokens + p, completion_tokens + c
    texts = [x.text for cs in comps for x in cs]
    scores, _ = pool_lib.verifier_rewards(texts, [q for q in problems for _ in range(g.n)], verify, pool=pool)
    wins = float(np.sum(np.asarray(scores) >= 1.0))
    out[name] = wins / len(texts)
    # The interval counts problems, not samples: samples of one problem are not independent draws.
    out[f"{name}_ci95"] = list(wilson_interval(out[name] * len(problems), len(problems)))
    out[f"{name}_errors"] = sum(x.finish_reason == "error" for cs in comps for x in cs)
  out.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
  return out
