"""Padding-free training: a micro-batch's rows laid side by side into fewer, wider rows ("bins").

A step's rows are left-padded prompts and right-padded completions; even trimmed to the longest completion, about
half of bench_rl_step's token slots are padding, and the forward and backward passes pay for every slot. `pack`
lays each row's span (its first to its last valid token) into bins of `width` tokens (a multiple of it for longer
rows), first-fit decreasing. The model runs on the bins with attention kept inside each span (`packed_segment`)
and every token at its own position, so each token sees exactly what it saw in its row. The per-token statistics
are gathered back to the rows (`unpack_index`): the loss, its aggregation and every per-row field stay as they
were, and only the model's passes shrink.

A span's first token would be predicted from the previous span's last hidden state. In a row it was predicted
from padding, so it cannot carry loss either way; `pack` checks that it does not.
"""
from __future__ import annotations

import numpy as np


def bin_rows(n: int, row_multiple: int = 1) -> int:
  """The bin count used for n bins: row_multiple x one of 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ... (four
  steps an octave), >= n. At most a fifth of the bins are spare, and a long run compiles few shapes: the count
  drifts slowly with the completions' lengths.
  """
  units = -(-max(n, 1) // row_multiple)
  step = 1 << max(units.bit_length() - 3, 0)  # 1 below 8, then 2, 4, ...
  return row_multiple * -(-units // step) * step


def spans(valid_RxT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(start_R, length_R) of each row's span from its first to its last valid token (length 0: an empty row)."""
  any_R = valid_RxT.any(1)
  T = valid_RxT.shape[1]
  start_R = np.where(any_R, valid_RxT.argmax(1), 0)
  end_R = np.where(any_R, T - valid_RxT[:, ::-1].argmax(1), 0)
  return start_R, end_R - start_R


def first_fit_decreasing(length_R: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Place spans in bins of `width` tokens, longest first, each in the first bin with room.

  Returns (bin_R, offset_R, num_bins); empty spans get bin -1.
  """
  if length_R.max(initial=0) > width:
    raise ValueError(f"a span of {int(length_R.max())} tokens does not fit a bin of width {width}")
  bin_R = np.full(len(length_R), -1, np.int64)
  offset_R = np.zeros(len(length_R), np.int64)
  used = []
  for r in np.argsort(-length_R, kind="stable"):
    if length_R[r] == 0:
      break
    b = next((i for i, u in enumerate(used) if u + length_R[r] <= width), len(used))
    if b == len(used):
      used.append(0)
    bin_R[r], offset_R[r] = b, used[b]
    used[b] += int(length_R[r])
  return bin_R, offset_R, len(used)


def pack(batch: dict[str, np.ndarray], *, width: int, row_multiple: int = 1, bins: int | None = None
         ) -> dict[str, np.ndarray] | None:
  """`batch` (micro-batched rows: fields [M, Bm, T] and [M, Bm]) with its rows packed, or None.

  Bins are W = `width` * ceil(T / width) tokens wide, and every micro-batch gets the same `bin_rows` count Bp.
  Returns the batch's fields, the per-token ones zero-padded on the right to width W (so the step's shape depends
  on the bins, not on the trimmed row width T: T <= width always gives W = width), plus
    packed_tokens / packed_valid / packed_positions / packed_segment [M, Bp, W]: the bins; segment is the span's
      row (-1 on a bin's unused tail, which is also not valid);
    unpack_index int32[M, Bm, W-1]: for the statistic predicting row token t+1 (the model's shifted outputs),
      its flat index in the bins' shifted statistics [Bp * (W-1)]; 0 where the token is padding or starts a
      span, places the loss mask must (and is checked to) zero;
    row_width int32[M, Bm]: T, the width the loss's "constant" aggregation normalises by by default.
  Returns None when packing would not save token slots (Bp * W >= Bm * T): train the rows as they are.
  bins: pack into exactly this many bins per micro-batch (>= what the rows need; processes that must agree on one
    shape pass the largest count any of them needs), and never return None.
  """
  if not isinstance(width, int) or width < 1:
    raise ValueError(f"pack width={width!r}; must be a positive int (bins are width * ceil(T / width) tokens)")
  tokens, valid, positions, loss_mask = (np.asarray(batch[k]) for k in ("tokens", "valid", "positions", "loss_mask"))
  M, Bm, T = tokens.shape
  W = width * -(-T // width)
  placed = []
  for m in range(M):
    start_R, length_R = spans(valid[m])
    _check_loss_in_spans(loss_mask[m], start_R, length_R, m)
    placed.append((start_R, length_R, *first_fit_decreasing(length_R, W)))
  Bp = bin_rows(max(p[-1] for p in placed), row_multiple)
  if bins is not None:
    if bins < Bp:
      raise ValueError(f"pack bins={bins}, but the rows need {Bp} bins of width {W}")
    Bp = bins
  elif Bp * W >= Bm * T:
    return None
  out = {k: np.pad(v, ((0, 0), (0, 0), (0, W - T))) if np.ndim(v) == 3 and np.shape(v)[2] == T else np.asarray(v)
         for k, v in batch.items()}
  out.update(packed_tokens=np.zeros((M, Bp, W), tokens.dtype), packed_valid=np.zeros((M, Bp, W), bool),
             packed_positions=np.zeros((M, Bp, W), positions.dtype),
             packed_segment=np.full((M, Bp, W), -1, np.int32), unpack_index=np.zeros((M, Bm, W - 1), np.int32),
             row_width=np.full((M, Bm), T, np.int32))
  for m, (start_R, length_R, bin_R, offset_R, _) in enumerate(placed):
    for r in np.flatnonzero(bin_R >= 0):
      a, n, b, o = start_R[r], length_R[r], bin_R[r], offset_R[r]
      for name, src in (("packed_tokens", tokens), ("packed_valid", valid), ("packed_positions", positions)):
        out[name][m, b, o:o + n] = src[m, r, a:a + n]
      out["packed_segment"][m, b, o:o + n] = r
      # Row token a + i (i >= 1) sits at bin slot o + i; its predicting statistic is shifted slot o + i - 1.
      out["unpack_index"][m, r, a:a + n - 1] = b * (W - 1) + o + np.arange(n - 1)
  return out


def _check_loss_in_spans(loss_mask_RxT: np.ndarray, start_R: np.ndarray, length_R: np.ndarray, m: int) -> None:
  """Loss only on a span's tokens after its first: the tokens whose statistics packing keeps."""
  T = loss_mask_RxT.shape[1]
  cols_T = np.arange(T)
  kept_RxT = (cols_T > start_R[:, None]) & (cols_T < (start_R + length_R)[:, None])
  bad = np.argwhere((loss_mask_RxT != 0) & ~kept_RxT)
  if len(bad):
    r, t = bad[0]
    raise ValueError(f"micro-batch {m}, row {r}: loss_mask is {loss_mask_RxT[r, t]} at token {t}, which is padding "
                     f"or the row's first valid token (span starts at {start_R[r]}, {length_R[r]} tokens); loss "
                     f"goes only on tokens after a row's first valid one")


def num_bins(batch: dict[str, np.ndarray], *, width: int, row_multiple: int = 1) -> int:
  """The bin count `pack` would use for `batch` (the shape processes agree on before packing)."""
  valid, W = np.asarray(batch["valid"]), width * -(-np.shape(batch["valid"])[2] // width)
  return bin_rows(max(first_fit_decreasing(spans(v)[1], W)[2] for v in valid), row_multiple)
