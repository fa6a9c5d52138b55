"""Task generators, verifiers, registry and dataset loaders. Oracles: python's own eval / digit sums, hand-written cases."""
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exrl import tasks
from exrl.tasks import base

BUILTINS = [
    ("arithmetic", dict(digits=2)),
    ("arithmetic", dict(digits=2, num_ops=3, ops="+-*")),
    ("chain_sum", dict(num_terms=4, digits=1)),
    ("chain_sum", dict(num_terms=3, digits=2, ops="+-")),
    ("digit_sum", dict(digits=4)),
]


def _oracle(prompt: str) -> int:
  """Independent answer: python evaluates the expression; digit_sum sums the digits."""
  if prompt.startswith("sum digits "):
    return sum(int(c) for c in prompt[len("sum digits "):-1])
  assert re.fullmatch(r"[0-9+\-*]+=", prompt), prompt  # Only digits and operators reach eval.
  return eval(prompt[:-1])  # noqa: S307


@pytest.mark.parametrize("name,kw", BUILTINS)
def test_generate_is_deterministic_correct_and_split_disjoint(name, kw):
  task = tasks.get_task(name, **kw)
  assert isinstance(task, tasks.Task)
  train = task.generate(300, seed=0)
  assert train == task.generate(300, seed=0)
  assert train != task.generate(300, seed=1)
  assert len({p.prompt for p in train}) == 300
  for p in train[:100]:
    assert p.task == name
    assert int(p.answer) == _oracle(p.prompt)
    target = task.sft_target(p)
    assert task.verify(target, p) == 1.0
    assert re.fullmatch(task.format_regex, target.strip())
  # Eval never overlaps train, whatever the seeds.
  eval_prompts = {p.prompt for s in range(3) for p in task.generate(200, seed=s, split="eval")}
  train_prompts = {p.prompt for s in range(3) for p in task.generate(300, seed=s, split="train")}
  assert eval_prompts and not eval_prompts & train_prompts
  assert all(tasks.in_eval_split(p, task.eval_fraction) for p in eval_prompts)


def test_arithmetic_prompts_and_difficulty():
  p = tasks.get_task("arithmetic", digits=3, num_ops=2, ops="*").generate(50, seed=3)
  for x in p:
    nums = re.findall(r"\d+", x.prompt)
    assert len(nums) == 3 and all(len(n) <= 3 for n in nums) and x.prompt.count("*") == 2
  assert max(int(n) for x in p for n in re.findall(r"\d+", x.prompt)) >= 100  # Uses the full 3-digit range.
  # Precedence: * before + / -.
  assert tasks.ArithmeticTask().verify("14", tasks.Problem("2+3*4=", "14", "arithmetic")) == 1.0
  assert tasks.arithmetic.evaluate([2, 3, 4], ["+", "*"]) == 14
  assert tasks.arithmetic.evaluate([2, 3, 4, 5], ["-", "*", "-"]) == 2 - 12 - 5


def test_chain_sum_target_is_a_running_total():
  task = tasks.ChainSumTask(num_terms=4)
  p = tasks.Problem("7+5+9+3=", "24", "chain_sum", meta={"start": 7, "steps": [("+", 5), ("+", 9), ("+", 3)]})
  assert task.sft_target(p) == "7+5=12,12+9=21,21+3=24. answer: 24"
  dp = tasks.DigitSumTask().generate(1, seed=0)[0]
  n = dp.prompt[len("sum digits "):-1]
  assert task.sft_target(dp).startswith(f"{n[0]}+{n[1]}={int(n[0]) + int(n[1])},")


@pytest.mark.parametrize("response,score", [
    ("24", 1.0), (" 24\n", 1.0), ("24.", 1.0), ("+24", 1.0), ("024", 1.0),
    ("25", 0.0), ("24 25", 0.0), ("answer: 24", 0.0), ("", 0.0), ("2" * 500, 0.0), ("24\n3+4=7", 0.0),
])
def test_arithmetic_verify(response, score):
  assert tasks.ArithmeticTask().verify(response, tasks.Problem("20+4=", "24")) == score


@pytest.mark.parametrize("response,score", [
    ("7+5=12,12+9=21,21+3=24. answer: 24", 1.0),
    ("answer: 24", 1.0),
    ("answer: 23. Wait. ANSWER:  24 ", 1.0),  # The last marker wins, case-insensitive.
    ("answer: 24 ... answer: 23", 0.0),
    ("7+5=12,12+9=21,21+3=24", 0.0),          # No marker.
    ("answer: 24abc", 0.0),
    ("answer: 24\n1+1=2", 0.0),                # Trailing text after the answer.
    ("answer:", 0.0),
    ("answer: -24", 0.0),
])
def test_marked_verify(response, score):
  assert tasks.ChainSumTask().verify(response, tasks.Problem("7+5+9+3=", "24")) == score


def test_format_regex_rejects_malformed():
  rx = tasks.ChainSumTask.format_regex
  assert re.fullmatch(rx, "7+5=12,12+9=21. answer: 21")
  assert re.fullmatch(rx, "7-9=-2. answer: -2")
  for bad in ["answer: 21", "7+5=12,12+9=21 answer: 21", "7+5=12. answer: 21. answer: 21", "7+5=12,. answer: 1"]:
    assert not re.fullmatch(rx, bad), bad


def test_registry_errors():
  with pytest.raises(ValueError, match=r"unknown task 'algebra'; valid names: \['arithmetic', 'chain_sum'"):
    tasks.get_task("algebra")
  with pytest.raises(TypeError, match=r"unknown options \['digitz'\]; valid options: \['digits'"):
    tasks.get_task("arithmetic", digitz=3)
  with pytest.raises(ValueError, match="ops='/'"):
    tasks.get_task("arithmetic", ops="/")
  with pytest.raises(ValueError, match="split='test'"):
    tasks.ArithmeticTask().generate(3, 0, split="test")
  with pytest.raises(ValueError, match="problem space is too small"):
    tasks.ArithmeticTask(digits=1).generate(90, 0)
  assert len(tasks.ArithmeticTask(digits=1).generate(200, 0, unique=False)) == 200
  with pytest.raises(ValueError, match="no verifier for task 'x'"):
    tasks.get_verifier("x")
  with pytest.raises(ValueError, match="not an integer"):
    tasks.ArithmeticTask().verify("3", tasks.Problem("1+2=", "three"))


def test_tokenizer_corpus_covers_all_tasks():
  corpus = tasks.tokenizer_corpus([tasks.ArithmeticTask(), tasks.DigitSumTask()], n_per_task=10)
  assert len(corpus) == 2 * 2 * 2 * 10
  assert any(t.startswith("sum digits ") for t in corpus) and any("answer:" in t for t in corpus)


GSM_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4 = <<3+4=7>>7\n#### 7"},
    {"question": "A farm has 1,200 cows and sells 2. How many?", "answer": "1200-2=1198\n#### 1,198"},
]
MATH_ROWS = [
    {"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "1"},
    {"problem": "Simplify sqrt(12).", "solution": "$\\sqrt{12}=\\boxed{2\\sqrt{3}}$", "level": "2"},
    {"problem": "Solve.", "solution": "First \\boxed{1}, then finally \\boxed{\\{1,2\\}}", "level": "3"},
]


def test_load_gsm8k_jsonl_and_verify(tmp_path):
  f = tmp_path / "gsm.jsonl"
  f.write_text("\n".join(json.dumps(r) for r in GSM_ROWS) + "\n\n")
  ps = tasks.load_math_dataset(f)
  assert [p.answer for p in ps] == ["7", "1198"]
  assert ps[0].prompt == GSM_ROWS[0]["question"] and ps[0].solution == GSM_ROWS[0]["answer"]
  assert all(p.task == "math" for p in ps)
  v = tasks.verify_math
  assert v("so the answer is 7", ps[0]) == 1.0
  assert v("#### 7", ps[0]) == 1.0
  assert v("\\boxed{7.0}", ps[0]) == 1.0
  assert v("I think 8", ps[0]) == 0.0
  assert v("", ps[0]) == 0.0
  assert v("they have \\boxed{1198} cows", ps[1]) == 1.0
  assert v("they have 1,198 cows", ps[1]) == 1.0
  task = tasks.get_task("math", path=str(f), eval_fraction=0.5)
  assert task.verify(task.sft_target(ps[1]), ps[1]) == 1.0


def test_load_math_parquet_and_verify(tmp_path):
  f = tmp_path / "math.parquet"
  pq.write_table(pa.Table.from_pylist(MATH_ROWS), f)
  ps = tasks.load_math_dataset(f, question_field="problem", answer_field="solution")
  assert [p.answer for p in ps] == ["\\frac{1}{2}", "2\\sqrt{3}", "\\{1,2\\}"]
  assert tasks.verify_math("The result is $0.5$", ps[0]) == 1.0
  assert tasks.verify_math("$\\frac{2}{4}$", ps[0]) == 1.0
  assert tasks.verify_math("$\\frac{1}{3}$", ps[0]) == 0.0
  assert tasks.verify_math("\\boxed{\\sqrt{12}}", ps[1]) == 1.0
  assert tasks.verify_math("\\boxed{3\\sqrt{2}}", ps[1]) == 0.0
  # Dataset task: deterministic, disjoint splits covering the file.
  task = tasks.MathDatasetTask(str(f), "problem", "solution", eval_fraction=0.5)
  tr, ev = task.problems("train"), task.problems("eval")
  assert sorted(p.prompt for p in tr + ev) == sorted(r["problem"] for r in MATH_ROWS)
  assert not {p.prompt for p in tr} & {p.prompt for p in ev}
  if tr:
    assert task.generate(len(tr), seed=0) == task.generate(len(tr), seed=0)
    with pytest.raises(ValueError, match="distinct train problems"):
      task.generate(len(tr) + 1, seed=0)


def test_extract_final_answer():
  f = tasks.extract_final_answer
  assert f("blah #### 1,234 ") == "1234"
  assert f("x = \\boxed{\\frac{a}{\\sqrt{b}}}.") == "\\frac{a}{\\sqrt{b}}"
  assert f("so \\boxed 5.") == "5"
  assert f("\\fbox{3}") == "3"
  assert f(" 42 ") == "42"
  assert tasks.extract_boxed("\\boxed{unclosed") is None


def test_loader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tasks.load_math_dataset(tmp_path / "missing.jsonl")
  f = tmp_path / "data.csv"
  f.write_text("a,b\n")
  with pytest.raises(ValueError, match=r"suffix '.csv'; supported: \('.jsonl', '.json', '.parquet'\)"):
    tasks.load_math_dataset(f)
  f = tmp_path / "math.jsonl"
  f.write_text("\n".join(json.dumps(r) for r in MATH_ROWS))
  with pytest.raises(ValueError, match=r"no field 'question'; available fields: \['level', 'problem', 'solution'\]"):
    tasks.load_math_dataset(f)
  with pytest.raises(ValueError, match=r"no field 'answer'; available fields"):
    tasks.load_math_dataset(f, question_field="problem")
  f.write_text('{"question": "q"}\nnot json\n')
  with pytest.raises(ValueError, match="line 2 is not valid JSON"):
    tasks.load_math_dataset(f)
  f.write_text('{"question": "q", "answer": "#### "}\n')
  with pytest.raises(ValueError, match="empty final answer"):
    tasks.load_math_dataset(f)
  with pytest.raises(FileNotFoundError):
    tasks.get_task("math", path=str(tmp_path / "nope.jsonl"))


def test_bad_utf8_names_file_and_line(tmp_path):
  good = json.dumps(GSM_ROWS[0]).encode()
  f = tmp_path / "bad.jsonl"
  f.write_bytes(good + b"\n" + good + b"\n" + b'{"question": "caf\xe9", "answer": "#### 1"}\n')  # latin-1 e-acute
  with pytest.raises(ValueError, match=re.escape(f"{f}: line 3 is not valid UTF-8 (byte 18 of the line, b'\\xe9")):
    tasks.load_math_dataset(f)
  j = tmp_path / "bad.json"
  j.write_bytes(b'[\n' + good + b',\n{"question": "\xff", "answer": "#### 2"}\n]')
  with pytest.raises(ValueError, match=re.escape(f"{j}: line 3 is not valid UTF-8 (byte 15 of the line")):
    tasks.load_math_dataset(j)
  j.write_text('[{"question": "q", "answer": "#### 1"},\n oops]')
  with pytest.raises(ValueError, match=re.escape(f"{j}: not valid JSON at line 2 column 2")):
    tasks.load_math_dataset(j)


def test_drop_long_prompts_says_why_nothing_is_left():
  ps = [base.Problem("a b c", "1"), base.Problem("a b c d e", "2"), base.Problem("a b", "3")]
  words = lambda t: len(t.split())
  kept, dropped = tasks.math_data.drop_long_prompts(ps, words, 3)
  assert [p.answer for p in kept] == ["1", "3"] and dropped == 1
  with pytest.raises(ValueError, match=r"all 3 problems of train.jsonl are longer than max_prompt_tokens=1 \(the "
                                       r"shortest prompt has 2 tokens\); raise --max-prompt-tokens to at least 2"):
    tasks.math_data.drop_long_prompts(ps, words, 1, "train.jsonl")
  with pytest.raises(ValueError, match="max_prompt_tokens=0 must be >= 1"):
    tasks.math_data.drop_long_prompts(ps, words, 0)


def test_problem_is_frozen_and_meta_not_compared():
  a = base.Problem("1+1=", "2", meta={"x": 1})
  assert a == base.Problem("1+1=", "2", meta={"x": 2}) and hash(a) == hash(base.Problem("1+1=", "2"))
  with pytest.raises(AttributeError):
    a.prompt = "x"  # type: ignore[misc]
