"""python -m experiments.bench_verifier

10,000 generated adversarial completions (huge numbers, deeply nested \\frac, 1 MB strings, null bytes,
invalid surrogates, unbalanced braces, and mixes of them) scored through `VerifierPool` with the settings
training and eval use (`default_pool()`: 2 workers, 5 s per call): math-verify for "math" problems and the
built-in verifiers for arithmetic / chain_sum / countdown / digit_sum. Reports per-call latency p50 / p99 /
max (dispatch to reply or kill, from `info["verifier_latency_s"]`), time-outs, errors, and that the
pool is still healthy afterwards (a clean control batch scores all correct).

Measured 2026-11-23 on the shared 2-core dev box (load average 9-14 from other jobs): 313 s wall,
  {"n": 10000, "num_workers": 2, "timeout_s": 5.0, "latency_p50_ms": 0.65, "latency_p99_ms": 1178.88,
   "latency_max_s": 5.177, "timeouts": 35, "errors": 0, "never_ran": 0, "scores_in_0_1": true,
   "control_all_correct_after": true, ...}
Kinds whose slowest call reached the 5 s deadline: 1 MB digit and 1 MB "1+1+..." strings, \\frac nested
200-1000 deep, huge numbers, light nested \\frac and mixes (per-kind max latency; per-kind time-out counts are not
recorded). No verifier raised or killed its worker, and every call's latency stayed within the deadline plus
kill-and-reap time (max 5.18 s). The per-kind breakdown is in runs/bench_verifier/result.json.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np

KINDS = ("huge_number", "nested_frac", "megabyte", "null_bytes", "surrogates", "unbalanced", "mixed")
HEAVY = ("megabyte_boxed_digits", "megabyte_sum", "deep_frac", "power_tower", "megabyte_braces")


def _number(rng: random.Random) -> str:
  digits = "".join(rng.choice("0123456789") for _ in range(rng.choice([20, 200, 2000])))
  return rng.choice([digits, f"-{digits}", f"{digits}.{digits[:50]}", f"1e{rng.randint(300, 10**9)}",
                     f"{digits[:30]}^{{{digits[:8]}}}", f"{digits[:4]}!", "\\infty", "NaN", "0/0", "1/0"])


def _frac(rng: random.Random, depth: int) -> str:
  a, b = rng.randint(0, 99), rng.randint(0, 99)
  return "\\frac{" * depth + f"{a}}}{{{b}" + "}}{1" * (depth - 1) + "}"


def _light(rng: random.Random, kind: str, answer: str) -> str:
  """A cheap-to-build adversarial completion of `kind`; some embed the correct answer to tempt the parser."""
  if kind == "huge_number":
    return rng.choice(["The answer is ", "\\boxed{", "#### ", "answer: ", "$"]) + _number(rng) + rng.choice(["", "}", "$"])
  if kind == "nested_frac":
    return f"so $x = {_frac(rng, rng.randint(1, 12))}$ and \\boxed{{{_frac(rng, rng.randint(1, 6))}}}"
  if kind == "megabyte":  # the light version: 1-64 KB of filler around an answer
    return rng.choice("ab{}\\$ 9") * rng.randint(1 << 10, 1 << 16) + f" \\boxed{{{answer}}}"
  if kind == "null_bytes":
    return "".join(c + "\x00" * rng.randint(0, 2) for c in f"\\boxed{{{answer}}}") + "\x00" * rng.randint(0, 64)
  if kind == "surrogates":
    s = rng.choice(["\ud800", "\udfff", "\udc80\ud800", "\U0010ffff", "\ufffe", "\u202e"])
    return rng.choice([f"\\boxed{{{s}}}", f"{answer}{s}", f"{s} answer: {answer}", s * rng.randint(1, 500)])
  if kind == "unbalanced":
    return rng.choice(["\\boxed{" * rng.randint(1, 200), "}" * rng.randint(1, 200), f"\\boxed{{{answer}",
                       f"\\frac{{1}}{{{answer}", "\\left( \\right] \\begin{matrix} 1 & 2", f"$$ {answer} $ \\boxed}}{{",
                       "\\sqrt[{]{2}", "{" * 100 + answer + "}" * 99])
  parts = [_light(rng, rng.choice(KINDS[:-1]), answer) for _ in range(rng.randint(2, 4))]
  return " ".join(parts)[: 1 << 20]


def _heavy(rng: random.Random, kind: str) -> str:
  """The expensive ones: each can take math-verify seconds, so the pool's deadline is what bounds them."""
  if kind == "megabyte_boxed_digits":
    return "\\boxed{" + "9" * (1 << 20) + "}"
  if kind == "megabyte_sum":
    return "\\boxed{" + "1+" * (1 << 19) + "1}"
  if kind == "deep_frac":
    return f"\\boxed{{{_frac(rng, rng.randint(200, 1000))}}}"
  if kind == "power_tower":
    return "$" + "2^{" * rng.randint(6, 40) + "2" + "}" * 39 + "$"
  return "{" * (1 << 20)


def adversarial_completions(n: int, seed: int = 0, heavy_every: int = 100) -> list[tuple[str, str, int]]:
  """n (kind, completion, problem index) triples, deterministic in `seed`.

  Every `heavy_every`-th item is a heavy one (1 MB strings, \\frac nested hundreds deep, power towers);
  the rest are light adversarial kinds. Problem index k refers to `fuzz_problems()[k]`.
  """
  rng = random.Random(seed)
  problems = fuzz_problems()
  out = []
  for i in range(n):
    k = rng.randrange(len(problems))
    if heavy_every and i % heavy_every == heavy_every - 1:
      kind = HEAVY[(i // heavy_every) % len(HEAVY)]
      out.append((kind, _heavy(rng, kind), k))
    else:
      kind = KINDS[i % len(KINDS)]
      out.append((kind, _light(rng, kind, problems[k].answer), k))
  return out


def fuzz_problems():
  """Math problems with LaTeX answers plus problems of every built-in verifier task."""
  from exrl import tasks

  math = [tasks.Problem("q", a, "math") for a in ("\\frac{1}{2}", "42", "2\\sqrt{3}", "-7", "\\{1,2\\}")]
  builtin = [p for name in ("arithmetic", "chain_sum", "countdown", "digit_sum")
             for p in tasks.get_task(name).generate(2, seed=0)]
  return math + builtin


@dataclasses.dataclass(frozen=True)
class Args:
  n: int = 10_000  # adversarial completions
  heavy_every: int = 100  # one heavy completion (1 MB, deep \frac, power tower) per this many
  batch: int = 500  # completions per pool.map call, as a training step would send them
  num_workers: int = 2
  timeout_s: float = 5.0
  seed: int = 0
  out_dir: str = "runs/bench_verifier"


def main(args: Args) -> dict:
  from exrl import tasks
  from exrl.tasks import pool as pool_lib

  t0 = time.perf_counter()
  problems = fuzz_problems()
  items = adversarial_completions(args.n, args.seed, args.heavy_every)
  lat, scores, kinds = [], [], []
  timeouts = errors = 0
  with pool_lib.VerifierPool(args.num_workers, args.timeout_s) as pool:
    pool.map(tasks.verify_math, [("1", problems[1])] * args.num_workers)  # start workers outside the timing
    for s in range(0, len(items), args.batch):
      chunk = items[s:s + args.batch]
      r, info = pool_lib.verifier_rewards([c for _, c, _ in chunk], [problems[k] for _, _, k in chunk], pool=pool)
      lat.append(info["verifier_latency_s"])
      scores.append(r)
      kinds += [k for k, _, _ in chunk]
      timeouts += info["verifier_timeouts"]
      errors += info["verifier_errors"]
    control = [f"\\boxed{{{p.answer}}}" if p.task == "math" else tasks.get_task(p.task).sft_target(p) for p in problems]
    rc, ic = pool_lib.verifier_rewards(control, problems, pool=pool)
  lat_N = np.concatenate(lat)
  score_N = np.concatenate(scores)
  kinds_N = np.array(kinds)
  per_kind = {k: {"n": int((kinds_N == k).sum()), "max_latency_s": round(float(np.nanmax(lat_N[kinds_N == k])), 3),
                  "mean_score": round(float(score_N[kinds_N == k].mean()), 3)}
              for k in dict.fromkeys(kinds)}
  result = {
      "n": int(len(items)), "num_workers": args.num_workers, "timeout_s": args.timeout_s,
      "latency_p50_ms": round(float(np.nanpercentile(lat_N, 50)) * 1e3, 2),
      "latency_p99_ms": round(float(np.nanpercentile(lat_N, 99)) * 1e3, 2),
      "latency_max_s": round(float(np.nanmax(lat_N)), 3),
      "timeouts": int(timeouts), "errors": int(errors), "never_ran": int(np.isnan(lat_N).sum()),
      "scores_in_0_1": bool(np.all((score_N >= 0) & (score_N <= 1))),
      "control_all_correct_after": bool(np.all(rc == 1)) and ic["verifier_timeouts"] == ic["verifier_errors"] == 0,
      "wall_s": round(time.perf_counter() - t0, 1), "per_kind": per_kind,
  }
  out = Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "result.json").write_text(json.dumps(result) + "\n")
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  import tyro

  main(tyro.cli(Args))
