"""The time-bounded verifier pool: hanging, raising, dying and non-finite verifiers never take a run down."""
import os
import time

import numpy as np
import pytest

from exrl import tasks
from exrl.tasks import pool as pool_lib


# Verifiers used by the tests; module-level so worker processes can import them.
def sleep_forever(response, problem):
  while True:
    time.sleep(1)


def raise_error(response, problem):
  raise RuntimeError("parser exploded on " + response)


def die(response, problem):
  os._exit(3)


def by_response(response, problem):
  """Behaviour chosen by the response text, so one batch mixes good, hanging, raising and dying calls."""
  if response == "hang":
    return sleep_forever(response, problem)
  if response == "raise":
    return raise_error(response, problem)
  if response == "die":
    return die(response, problem)
  if response == "nan":
    return float("nan")
  if response == "big":
    return 7.0
  return float(response == problem.answer)


@pytest.fixture(scope="module")
def pool():
  with pool_lib.VerifierPool(num_workers=2, timeout_s=1.0) as p:
    p.map(by_response, [("1", tasks.Problem("", "1"))])  # Warm the workers up outside the timed checks.
    yield p


def test_hanging_raising_and_dying_verifiers_score_zero_and_are_counted(pool):
  p = tasks.Problem("x", "ok")
  resp = ["ok", "hang", "no", "raise", "ok", "hang", "die", "nan", "big", "ok"]
  t0 = time.perf_counter()
  r, info = pool.map(by_response, [(x, p) for x in resp])
  elapsed = time.perf_counter() - t0
  import chex  # here, not at module level: workers import this module for `by_response`, and chex pulls in jax
  chex.assert_shape(r, (len(resp),))
  assert r.dtype == np.float32
  np.testing.assert_array_equal(r, [1, 0, 0, 0, 1, 0, 0, 0, 1, 1], err_msg=str(info))  # "big" (7.0) is clipped to 1.
  assert info["verifier_timeouts"] == 2
  assert info["verifier_errors"] == 3  # raise, die, nan.
  assert any("parser exploded" in m for m in info["verifier_error_examples"])
  assert any("died (exit code 3)" in m for m in info["verifier_error_examples"])
  # Two 1 s timeouts on two workers run in parallel: well under the sum of a serial run.
  assert elapsed < 6.0, elapsed
  # The pool recovered: a clean batch afterwards is all correct with no counts.
  r2, info2 = pool.map(by_response, [("ok", p)] * 4)
  np.testing.assert_array_equal(r2, [1, 1, 1, 1])
  assert info2["verifier_timeouts"] == info2["verifier_errors"] == 0


def test_all_hanging_batch_returns_promptly():
  with pool_lib.VerifierPool(num_workers=2, timeout_s=0.5) as pool:
    t0 = time.perf_counter()
    r, info = pool.map(sleep_forever, [("a", None)] * 4)
    elapsed = time.perf_counter() - t0
  np.testing.assert_array_equal(r, np.zeros(4, np.float32))
  assert info["verifier_timeouts"] == 4 and info["verifier_errors"] == 0
  assert elapsed < 8.0, elapsed  # 2 rounds of 0.5 s plus worker restarts.


def test_raising_verifier_counted():
  with pool_lib.VerifierPool(num_workers=1, timeout_s=2.0) as pool:
    r, info = pool.map(raise_error, [("a", None), ("b", None)])
  np.testing.assert_array_equal(r, [0, 0])
  assert info["verifier_errors"] == 2 and info["verifier_timeouts"] == 0


def test_verifier_rewards_builtin_and_math_dispatch():
  # A roomy deadline: math-verify's first parse in a fresh worker can take over a second on a loaded machine.
  with pool_lib.VerifierPool(num_workers=2, timeout_s=30.0) as pool:
    _check_dispatch(pool)


def _check_dispatch(pool):
  ar, ch = tasks.ArithmeticTask(), tasks.ChainSumTask()
  a = ar.generate(3, seed=0)
  c = ch.generate(2, seed=0)
  math_p = tasks.Problem("Half of one?", "\\frac{1}{2}", "math")
  problems = a + c + [math_p, math_p]
  resp = [a[0].answer, "999999", a[2].answer + " ", ch.sft_target(c[0]), "answer: 1000",
          "so it is $0.5$", "\\boxed{2}"]
  r, info = pool_lib.verifier_rewards(resp, problems, pool=pool)
  np.testing.assert_array_equal(r, [1, 0, 1, 1, 0, 1, 0])
  assert info["verifier_timeouts"] == info["verifier_errors"] == 0
  # An explicit verifier (a task's bound method) is used for every pair.
  r, _ = pool_lib.verifier_rewards([ar.sft_target(x) for x in a], a, ar.verify, pool=pool)
  np.testing.assert_array_equal(r, [1, 1, 1])
  with pytest.raises(ValueError, match="2 responses but 1 problems"):
    pool_lib.verifier_rewards(["a", "b"], a[:1], pool=pool)


def _run_script(tmp_path, body: str):
  import subprocess
  import sys
  from pathlib import Path
  script = tmp_path / "script.py"
  script.write_text(body)
  repo = Path(__file__).resolve().parents[2]
  env = {**os.environ, "PYTHONPATH": str(repo)}
  return script, subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=240)


_USE_POOL = """
from exrl import tasks
from exrl.tasks.pool import VerifierPool
p = VerifierPool(num_workers=2, timeout_s=5)
print(p.map(tasks.verify_math, [("\\\\boxed{1}", tasks.Problem("q", "1"))])[0])
"""


def test_script_without_main_guard_is_named_before_any_worker_starts(tmp_path):
  script, out = _run_script(tmp_path, _USE_POOL)
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("exrl.tasks.pool.WorkerStartError: cannot start verifier worker processes: ")
  assert f'{script} has no `if __name__ == "__main__":` guard' in last
  assert out.stderr.count("Traceback") == 1  # no worker got far enough to print its own
  assert pool_lib.main_guard_problem("fork") is None  # forked workers do not re-import the script


def test_guarded_script_runs_and_dying_workers_name_the_likely_cause(tmp_path):
  guarded = "if __name__ == '__main__':\n" + "".join("  " + l + "\n" for l in _USE_POOL.strip().splitlines())
  _, out = _run_script(tmp_path, guarded)
  assert out.returncode == 0 and out.stdout.strip() == "[1.]", out.stderr
  dies = "import os\nif __name__ == '__mp_main__':  # a worker importing the script\n  os._exit(7)\n" + guarded
  _, out = _run_script(tmp_path, dies)
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert "verifier worker processes keep failing to start (died; last exit code 7). Likely cause: " in last
  assert "a worker dies while importing the main module" in last
