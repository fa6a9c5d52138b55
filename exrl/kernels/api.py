"""One entry point for token statistics; dispatches to the reference, chunked-XLA or Pallas implementation."""
import jax

from exrl.kernels import pallas, pallas_gpu, reference, xla
from exrl.kernels.stats import TokenStats, check_inputs

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas", "pallas_gpu")
# Chunked XLA stays the GPU default until experiments.accelerator_report measures pallas_gpu against it on a GPU.
GPU_DEFAULT = "xla"


def default_implementation():
  """The Pallas kernel on TPU, GPU_DEFAULT on GPU, chunked XLA on CPU."""
  backend = jax.default_backend()
  return "pallas" if backend == "tpu" else GPU_DEFAULT if backend == "gpu" else "xla"


def token_stats(hidden_NxD, w_DxV, targets_N, *, ref_hidden_NxD=None, ref_w_DxV=None, temperature=1.0,
                implementation="auto", layout="DxV") -> TokenStats:
  """Per-token statistics of p = softmax((hidden @ w) / temperature) without materialising [N, V] logits.

  Args:
    hidden_NxD: [N, D] final hidden states (f32 or bf16; matmul accumulates in f32).
    w_DxV: [D, V] unembedding.
    targets_N: int[N] target ids in [0, V).
    ref_hidden_NxD, ref_w_DxV: optional reference model's [N, D_ref] hidden and [D_ref, V] unembedding; both or
      neither. They are stop-gradient; the same temperature applies to them.
    temperature: positive Python float dividing the logits.
    implementation: "auto" (pallas on TPU, xla elsewhere), "reference", "xla", "pallas" (TPU Mosaic) or
      "pallas_gpu" (Triton).
    layout: "DxV", or "VxD" when w and ref_w are given as [V, D] (a tied head: the embedding as stored). The
      reference and chunked-XLA implementations read that layout in place (no transposed copy, dW as [V, D]);
      the Pallas kernels take [D, V] blocks, so for them it is transposed here (a V×D copy, as before).
  Returns:
    TokenStats of float32[N]: logp, lse, entropy, self_certainty, and with a reference kl = KL(p ‖ p_ref),
    ref_logp, ref_lse. Differentiable with respect to hidden and w through every field.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
  check_inputs(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, layout)
  name = default_implementation() if implementation == "auto" else implementation
  if name in ("reference", "xla"):
    fn = {"reference": reference.token_stats, "xla": xla.token_stats}[name]
    return fn(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD=ref_hidden_NxD, ref_w_DxV=ref_w_DxV,
              temperature=temperature, layout=layout)
  if layout == "VxD":
    w_DxV, ref_w_DxV = w_DxV.T, None if ref_w_DxV is None else ref_w_DxV.T
  fn = {"pallas": pallas.token_stats, "pallas_gpu": pallas_gpu.token_stats}[name]
  return fn(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD=ref_hidden_NxD, ref_w_DxV=ref_w_DxV,
            temperature=temperature)
