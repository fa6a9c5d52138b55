"""report.md for the accelerator report: markdown tables from result.json, tolerant of missing or failed sections."""
from __future__ import annotations


def _f(x, scale=1.0, digits=3) -> str:
  if x is None or isinstance(x, str):
    return "—" if x is None else x
  return f"{x * scale:.{digits}g}"


def _table(header, rows) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _env(sec) -> list[str]:
  dev, ver = sec.get("device", {}), sec.get("versions", {})
  mm, cp = sec.get("matmul_bf16", {}), sec.get("copy", {})
  out = _table(["device kind", "count", "backend", "jax / jaxlib", "flax", "platform", "torch (CUDA)"],
               [[str(dev.get("device_kind")), str(dev.get("device_count")), str(dev.get("backend")),
                 f"{ver.get('jax')} / {ver.get('jaxlib')}", str(ver.get("flax")), str(ver.get("platform_version")),
                 f"{ver.get('torch')} ({ver.get('torch_cuda')})"]])
  plugins = {k: v for k, v in ver.items() if k.startswith(("jax-cuda", "libtpu"))}
  if plugins:
    out.append(f"\nPlugins: {plugins}")
  out += [""] + _table(
      ["table peak bf16 TFLOP/s", f"timed bf16 matmul TFLOP/s (n={mm.get('n')})", "matmul / peak",
       "copy GB/s (timed)", "spec GB/s", "copy / spec"],
      [[_f(dev.get("peak_bf16_flops"), 1e-12), _f(mm.get("flops_per_s"), 1e-12), _f(mm.get("fraction_of_table_peak")),
        _f(cp.get("bytes_per_s"), 1e-9), _f(dev.get("spec_hbm_bytes_per_s"), 1e-9), _f(cp.get("fraction_of_spec"))]])
  return out


def _stats(sec) -> list[str]:
  shape, impls = sec.get("shape", {}), sec.get("implementations", {})
  out = [f"N={shape.get('N')}, D={shape.get('D')}, V={shape.get('V')}, {shape.get('dtype')}, "
         f"loss {shape.get('loss')}; errors are max |Δ| against the materialised-logits reference.", ""]
  rows = []
  for name, r in impls.items():
    if "fwd_bwd_s" not in r:
      rows.append([name] + [r.get("error", r.get("skipped", "?"))[:200]] + [""] * 7)
      continue
    err = r.get("max_abs_err", {})
    rows.append([name, _f(r["compile_s"]), _f(r["temp_bytes"], 2 ** -20), _f(r["fwd_bwd_s"], 1e3)]
                + [_f(err.get(k)) if err else "oracle" for k in ("logp", "entropy", "dhidden", "dw")])
  out += _table(["implementation", "compile s", "temp MiB", "fwd+bwd ms", "logp err", "entropy err", "dhidden err",
                 "dw err"], rows)
  d = sec.get("gpu_default", {})
  out += ["", f"GPU default: **{d.get('recommendation')}** ({d.get('reason')})"]
  return out


def _parity(sec) -> list[str]:
  r = sec.get("result", {})
  out = [f"torch on {r.get('torch_device')}; tokens {r.get('batch')} x {r.get('seq_len')}; max |logit| (torch fp32) "
         f"{_f(r.get('max_abs_logit_torch_fp32'))}.", ""]
  rows = [["torch bf16", _f(r.get("torch_bf16_vs_torch_fp32")), "—"]]
  for name in ("exrl_fp32_default_precision", "exrl_fp32_highest_precision", "exrl_bf16"):
    rows.append([name.replace("_", " "), _f(r.get(f"{name}_vs_torch_fp32")), _f(r.get(f"{name}_argmax_agree"))])
  return out + _table(["model", "max |Δlogit| vs torch fp32", "argmax agreement"], rows)


def _sampler(sec) -> list[str]:
  r = sec.get("result", {})
  out = [f"{r.get('dtype')}, prompt {r.get('prompt_len')} + {r.get('new_tokens')} new tokens, sampling at T=1. "
         f"Engines not built yet: {', '.join(r.get('engines_not_built', [])) or 'none'}.", ""]
  rows = []
  for batch, row in r.get("batches", {}).items():
    rows.append([batch, "bandwidth roofline", _f(row.get("roofline_tokens_per_s")), "", "", ""])
    for name, e in row.items():
      if not isinstance(e, dict):
        continue
      if "tokens_per_s" not in e:
        rows.append([batch, name, e.get("error", e.get("skipped", "?"))[:200], "", "", ""])
        continue
      rows.append([batch, name, _f(e["tokens_per_s"]), _f(e.get("ratio_vs_hf")), _f(e.get("fraction_of_roofline")),
                   _f(e.get("compile_s"))])
  return out + _table(["batch", "engine", "tokens/s", "vs HF generate", "of roofline", "compile s"], rows)


def _rl(sec) -> list[str]:
  r = sec.get("result", {})
  out = [f"{r.get('rows')} rows ({r.get('prompts')} prompts x {r.get('group_size')}), prompt {r.get('prompt_len')} "
         f"+ {r.get('new_tokens')} new tokens, {r.get('micro_batches')} micro-batches, {r.get('precision')}, "
         f"{r.get('loss_config')}.", ""]
  comp, steady = r.get("compile_s", {}), r.get("steady_stage_s", {})
  out += _table(["stage", "compile s", "steady s"], [[k, _f(comp.get(k)), _f(steady.get(k))]
                                                      for k in ("sample", "score", "reward", "update")])
  out += ["", f"Step {_f(r.get('steady_step_s'))} s; completion tokens/s {_f(r.get('completion_tokens_per_s'))}; "
          f"update {_f(r.get('update_tflops_per_s'))} TFLOP/s of model FLOPs; MFU {_f(r.get('update_mfu'))} against "
          f"the table peak, {_f(r.get('update_mfu_vs_timed_matmul'))} against the timed matmul."]
  if r.get("skipped"):
    out.append(f"Skipped: {r['skipped']}")
  return out


RENDERERS = {"env": ("Environment", _env), "token_stats": ("Token statistics", _stats), "parity": ("HF parity", _parity),
             "sampler": ("Sampler", _sampler), "rl_step": ("RL step (GRPO)", _rl)}


def render(result: dict) -> str:
  lines = ["# exrl accelerator report", "",
           f"`{result.get('command')}` · started {result.get('started_utc')} UTC · budget "
           f"{result.get('total_budget_s')} s · total {_f(result.get('total_s'))} s"]
  if result.get("tiny"):
    lines += ["", "**--tiny on CPU: a plumbing check of every code path, not a performance measurement.**"]
  if result.get("killed_by_watchdog"):
    lines += ["", f"**Killed by the watchdog: {result['killed_by_watchdog']}.**"]
  secs = result.get("sections", {})
  lines += [""] + _table(["section", "status", "seconds"],
                         [[k, str(v.get("status"))[:300], _f(v.get("seconds"))] for k, v in secs.items()])
  for name, (title, fn) in RENDERERS.items():
    if name in secs:
      try:
        body = fn(secs[name])
      except Exception as e:  # a half-written section renders as what it is
        body = [f"(could not render: {type(e).__name__}: {e})"]
      lines += ["", f"## {title}", ""] + body
  return "\n".join(lines) + "\n"
