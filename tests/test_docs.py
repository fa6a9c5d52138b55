"""The docs stay true to the code: every `python -m ...` command shown in README.md and docs/ runs with --help
and every flag it shows is in that help; every relative link and repository path in the docs and in the
docstrings of exrl/ and experiments/ exists inside the repository; nothing points outside it."""
import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("exrl", "experiments")
# a repository path: starts with a top-level folder of the repo (runs/ holds outputs, never checked), or a
# capitalised document name (README.md, DESIGN.md); bare lower-case names (decoder.py, report.md) are read in
# their sentence's context (a folder just named, a run's output) and left alone
TOP_DIRS = tuple(sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
                        and p.name not in ("runs", "__pycache__") and not p.name.endswith(".egg-info")))
PATH_RE = re.compile(r"(?<![\w./-])(?:\./)?((?:%s)/[\w./-]*|[A-Z][A-Z0-9_-]*\.md)(?![\w/-])"
                     % "|".join(map(re.escape, TOP_DIRS)))
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SHARED = "../" + "shared"  # spelled in two parts so this file does not match itself
OUTSIDE_RE = re.compile(r"\.\./shared\b|\bshared/(?:DESIGN|RESEARCH)\.md")


def doc_files() -> list[Path]:
  files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
  if (ROOT / "experiments" / "README.md").exists():
    files.append(ROOT / "experiments" / "README.md")
  return [f for f in files if f.exists()]


def code_files() -> list[Path]:
  return [f for d in CODE_DIRS for f in sorted((ROOT / d).rglob("*.py")) if "__pycache__" not in f.parts]


def docstrings(path: Path) -> list[tuple[int, str]]:
  tree = ast.parse(path.read_text(), str(path))
  out = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=False)
      if doc:
        out.append((node.body[0].lineno, doc))
  return out


# ---------------------------------------------------------------------------------------------------------
# (a) commands


def _logical_lines(text: str) -> list[str]:
  """Code-block lines with backslash continuations joined, plus inline code spans."""
  lines, blocks = [], re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
  for block in blocks:
    lines += block.replace("\\\n", " ").splitlines()
  prose = re.sub(r"```.*?```", "", text, flags=re.S)
  lines += re.findall(r"`([^`\n]*python -m [^`\n]*)`", prose)
  return lines


def commands(text: str) -> list[list[str]]:
  """Each `python -m MODULE ...` command as tokens from MODULE on (chains split at && ; |)."""
  out = []
  for line in _logical_lines(text):
    line = line.split(" #")[0]  # a shell comment after the command
    for part in re.split(r"&&|\|\||;|\|", line):
      m = re.search(r"\bpython3? -m ([\w.]+)(.*)", part)
      if not m:
        continue
      rest = m.group(2).replace("[", " ").replace("]", " ").replace("...", " ")  # [optional ...] in prose
      try:
        tokens = shlex.split(rest)
      except ValueError:
        tokens = rest.split()
      out.append([m.group(1), *tokens])
  return out


def help_argv(cmd: list[str]) -> tuple[str, ...]:
  """The command as shown with --help appended: a preset word (grpo's `intuitor`) or the default preset that
  a bare flag implies picks the help that lists the flags in use."""
  return (*cmd, "--help")


def flags(cmd: list[str]) -> list[str]:
  return [t.split("=")[0] for t in cmd[1:] if re.fullmatch(r"--?[A-Za-z][\w.-]*(=.*)?", t)]


# Runs each `python -m MODULE ... --help` in one child process (jax, flax and transformers imported once),
# as `python -m` would: the module as __main__ with that argv. An alarm stops a module that ignores --help.
_HELP_RUNNER = r"""
import contextlib, io, json, runpy, signal, sys, traceback
class Late(Exception):
  pass
def late(*_):
  raise Late("still running after 120 s: does the module ignore --help and start a run?")
signal.signal(signal.SIGALRM, late)
out = []
for argv in json.load(sys.stdin):
  buf, code = io.StringIO(), 0
  signal.alarm(120)
  try:
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
      sys.argv = [argv[0], *argv[1:]]
      runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:
    code, _ = 1, buf.write(traceback.format_exc())
  finally:
    signal.alarm(0)
  out.append([code, buf.getvalue()])
print(json.dumps(out))
"""


def run_helps(argvs: list[tuple[str, ...]]) -> list[tuple[int, str]]:
  env = {**os.environ, "COLUMNS": "200", "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, "-c", _HELP_RUNNER], cwd=ROOT, input=json.dumps(argvs), capture_output=True,
                     text=True, timeout=600, env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  return [tuple(r) for r in json.loads(p.stdout.strip().splitlines()[-1])]


def test_every_documented_command_has_its_flags():
  shown: dict[tuple[str, ...], list[tuple[str, list[str]]]] = {}
  for doc in doc_files():
    for cmd in commands(doc.read_text()):
      if re.search(r"[A-Z]", cmd[0]):  # a placeholder such as experiments.NAME
        continue
      shown.setdefault(help_argv(cmd), []).append((doc.relative_to(ROOT).as_posix(), cmd))
  assert shown, "no `python -m` command found in README.md or docs/"
  helps = dict(zip(shown, run_helps(list(shown))))
  problems = []
  for argv, uses in shown.items():
    code, text = helps[argv]
    if code != 0:
      problems.append(f"`python -m {' '.join(argv)}` exited {code}: {text.strip().splitlines()[-1:]}")
      continue
    for doc, cmd in uses:
      missing = sorted({f for f in flags(cmd) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)})
      if missing:
        problems.append(f"{doc}: `python -m {' '.join(cmd)}` shows {missing}, not in its --help")
  assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------
# (b) links and paths


def _exists(ref: str, base: Path) -> bool:
  ref = ref.split("#")[0].split(":")[0].rstrip(".,;")
  if not ref:
    return True
  for start in (base, ROOT):
    target = (start / ref).resolve()
    if target.exists() and (target == ROOT or ROOT in target.parents):
      return True
  return False


def _skip(ref: str) -> bool:
  return (re.match(r"[a-z]+://|mailto:|#", ref) is not None or ref.startswith(("runs/", "/", "~"))
          or any(c in ref for c in "*<>{}$") or ref in ("__init__.py", "__main__.py", "setup.py", "conftest.py"))


def path_problems(text: str, where: str, base: Path, links: bool) -> list[str]:
  out = []
  if OUTSIDE_RE.search(text):
    out.append(f"{where}: refers outside the repository ({OUTSIDE_RE.search(text).group(0)})")
  refs = set(PATH_RE.findall(text))
  if links:
    refs |= {r for r in LINK_RE.findall(text)}
  for ref in sorted(refs):
    if not _skip(ref) and not _exists(ref, base):
      out.append(f"{where}: {ref} does not exist")
  return out


def test_links_and_paths_exist_inside_the_repository():
  problems = []
  for doc in doc_files():
    problems += path_problems(doc.read_text(), doc.relative_to(ROOT).as_posix(), doc.parent, links=True)
  for f in code_files():
    for line, doc in docstrings(f):
      problems += path_problems(doc, f"{f.relative_to(ROOT).as_posix()}:{line}", f.parent, links=False)
  assert not problems, f"{len(problems)} broken reference(s):\n" + "\n".join(problems)


def test_no_source_comment_points_outside_the_repository():
  hits = [f"{f.relative_to(ROOT).as_posix()}:{i}" for f in code_files()
          for i, line in enumerate(f.read_text().splitlines(), 1) if OUTSIDE_RE.search(line)]
  assert not hits, f"refers to {SHARED} (outside the repository): " + ", ".join(hits)


def test_the_parsers_find_what_they_should():  # the checks above are only as good as these
  cmds = commands("run `python -m experiments.grpo intuitor --model m --rl.steps 3` or\n```bash\n"
                  "pip install -e . && python -m exrl.infra.plot runs/a \\\n  --out x.png  # plot\n```\n")
  cmds = sorted(cmds)
  assert cmds == [["experiments.grpo", "intuitor", "--model", "m", "--rl.steps", "3"],
                  ["exrl.infra.plot", "runs/a", "--out", "x.png"]]
  assert help_argv(cmds[1]) == ("exrl.infra.plot", "runs/a", "--out", "x.png", "--help")
  assert flags(cmds[0]) == ["--model", "--rl.steps"]
  found = path_problems(f"see exrl/nope.py, [x](docs/missing.md), RESEARCH.md §2 and {SHARED}/DESIGN.md; "
                        "runs/grpo/tb is output; exrl/train/trainer.py exists", "t", ROOT, links=True)
  assert sorted(p.split(": ", 1)[1] for p in found) == sorted([
      "RESEARCH.md does not exist", "docs/missing.md does not exist", "exrl/nope.py does not exist",
      f"refers outside the repository ({SHARED})"]), found
