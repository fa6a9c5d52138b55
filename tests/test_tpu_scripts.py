"""tpu_scripts: bash -n clean, usage text, and --dry-run prints exactly the commands a real run executes.

The oracle for the printed commands is a fake `gcloud` (and `tar`) on PATH that records its argv: the
dry-run line, split as a shell would, must equal what the script really runs.
"""
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "tpu_scripts"
NAMES = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "ckpt.sh", "teardown.sh"]
COMMON = ["--name", "exrl-v5e", "--zone", "us-west4-a", "--project", "proj"]
CASES = {
    "create": ["create.sh", *COMMON, "--accelerator", "v5litepod-64", "--spot"],
    "setup": ["setup.sh", *COMMON],
    "launch": ["launch.sh", *COMMON, "--log", "grpo", "--env", "XLA_FLAGS=--xla_dump_to=/tmp/d", "--",
               "python", "-m", "experiments.grpo", "default", "--rl.run-dir", "runs/a b"],
    "logs": ["logs.sh", *COMMON, "--worker", "all", "--no-follow"],
    "push": ["ckpt.sh", "push", *COMMON, "--run", "runs/grpo", "--bucket", "gs://bkt/exrl"],
    "pull_local": ["ckpt.sh", "pull", "--run", "runs/grpo", "--bucket", "gs://bkt/exrl", "--local"],
    "teardown": ["teardown.sh", *COMMON, "--yes"],
}


def _bash(args, env=None, **kw):
  full_env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT", "DRY_RUN")}
  full_env.update(env or {})
  return subprocess.run(["bash", str(SCRIPTS / args[0]), *args[1:]], capture_output=True, text=True, env=full_env,
                        timeout=30, **kw)


@pytest.mark.parametrize("name", NAMES + ["common.sh"])
def test_bash_n_clean(name):
  out = subprocess.run(["bash", "-n", str(SCRIPTS / name)], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", NAMES)
def test_help_prints_usage(name):
  out = _bash([name, "--help"] if name != "ckpt.sh" else [name, "--help"])
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("usage: " + name) and "--dry-run" in out.stdout


@pytest.fixture
def fake_bin(tmp_path):
  """PATH with recording gcloud/tar/mkdir: each call appends its argv (NUL-separated) to calls.log."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.log"
  for tool in ("gcloud", "tar", "mkdir"):
    p = bin_dir / tool
    p.write_text(f'#!/usr/bin/env bash\n{{ printf "%s\\0" {tool} "$@"; printf "\\n"; }} >> "{log}"\n')
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
  return bin_dir, log


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_prints_what_a_real_run_executes(case, fake_bin, tmp_path):
  bin_dir, log = fake_bin
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
  args = CASES[case]
  dry = _bash(args + ["--dry-run"] if "--" not in args else _insert_before_dashdash(args, "--dry-run"), env=env)
  assert dry.returncode == 0, dry.stderr
  assert not log.exists(), "--dry-run executed a command"
  real = _bash(args, env=env, cwd=tmp_path)
  assert real.returncode == 0, real.stderr
  executed = [line.split("\0")[:-1] for line in log.read_text().splitlines()]
  printed = [shlex.split(line) for line in dry.stdout.splitlines()]
  assert printed == executed
  assert any(cmd[0] == "gcloud" for cmd in executed)


def _insert_before_dashdash(args, flag):
  i = args.index("--")
  return args[:i] + [flag] + args[i:]


def test_launch_runs_the_command_on_all_workers_with_distributed_env(fake_bin, tmp_path):
  out = _bash(_insert_before_dashdash(CASES["launch"], "--dry-run"))
  argv = shlex.split(out.stdout.strip())
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in argv
  remote = shlex.split(argv[argv.index("--command") + 1])  # the shell line each worker runs
  assert remote[:3] == ["cd", "~/exrl", "&&"]
  assert "EXRL_DISTRIBUTED=1" in remote and "XLA_FLAGS=--xla_dump_to=/tmp/d" in remote
  i = remote.index("nohup")
  assert remote[i + 1:i + 8] == ["python", "-m", "experiments.grpo", "default", "--rl.run-dir", "runs/a b", ">"]
  assert remote[i + 8] == "logs/grpo.log"


def test_create_passes_accelerator_and_names_the_vm():
  argv = shlex.split(_bash(CASES["create"] + ["--dry-run"]).stdout)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "exrl-v5e"]
  assert argv[argv.index("--accelerator-type") + 1] == "v5litepod-64" and "--spot" in argv


@pytest.mark.parametrize("args, message", [
    (["create.sh", "--zone", "z", "--project", "p", "--accelerator", "v4-8"], "missing TPU_NAME"),
    (["create.sh", *COMMON], "missing ACCELERATOR"),
    (["launch.sh", *COMMON], "no command given"),
    (["launch.sh", *COMMON, "--log", "../x", "--", "true"], "must be a plain file name"),
    (["logs.sh", *COMMON, "--worker", "x"], "must be a worker index"),
    (["ckpt.sh", "sync"], "push or pull"),
    (["ckpt.sh", "push", "--run", "r", "--bucket", "s3://b"], "must start with gs://"),
    (["teardown.sh", *COMMON], "without --yes"),
    (["create.sh", "--bogus"], "unknown argument '--bogus'"),
    (["create.sh", "--name"], "--name needs a value"),
])
def test_bad_arguments_fail_with_a_message(args, message):
  out = _bash(args)
  assert out.returncode == 2 and message in out.stderr, (out.returncode, out.stderr)


def test_environment_variables_stand_in_for_flags():
  out = _bash(["teardown.sh", "--dry-run"], env={"TPU_NAME": "vm", "ZONE": "z", "PROJECT": "p"})
  assert shlex.split(out.stdout) == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "vm", "--project", "p",
                                     "--zone", "z", "--quiet"]
