"""One small tokenizer interface over two backends: a local HF tokenizer and SentencePiece.

`load_tokenizer(path)` dispatches on what is at `path`:
  - a directory holding `tokenizer.json` or `tokenizer_config.json` -> `HFTokenizer` (transformers, local files only);
  - a `*.model` file, or a directory holding exactly one `*.model` -> `SentencePieceTokenizer`.

`train_sentencepiece(texts, vocab_size, model_prefix)` trains a SentencePiece model deterministically (same texts and
options -> byte-identical `.model` file). It is meant for the built-in tasks, where no pretrained tokenizer exists offline.

Special ids are explicit on every backend:
  - `bos_id` / `eos_id`: the tokenizer's own, or None when it has none (Qwen tokenizers have no bos).
  - `pad_id`: the tokenizer's pad token when it defines one, else `eos_id` (padding is always masked, so reusing eos is
    safe). A tokenizer with neither is rejected at load time.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm

# Ids fixed by `train_sentencepiece`, so every built-in-task model agrees on them.
SP_PAD_ID, SP_UNK_ID, SP_BOS_ID, SP_EOS_ID = 0, 1, 2, 3


@runtime_checkable
class Tokenizer(Protocol):
  """What exrl needs from a tokenizer. Ids are python ints; text is str."""

  @property
  def vocab_size(self) -> int: ...
  @property
  def bos_id(self) -> int | None: ...
  @property
  def eos_id(self) -> int: ...
  @property
  def pad_id(self) -> int: ...
  @property
  def stop_ids(self) -> tuple[int, ...]: ...

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...
  def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str: ...
  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


def plain_chat_template(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
  """Fallback chat format when a tokenizer ships no template.

  Each message becomes "{role}: {content}\\n"; with `add_generation_prompt` the string ends with "assistant: ".
  """
  out = []
  for i, m in enumerate(messages):
    if "role" not in m or "content" not in m:
      raise ValueError(f"chat message {i} must have 'role' and 'content' keys; got keys {sorted(m)}")
    out.append(f"{m['role']}: {m['content']}\n")
  if add_generation_prompt:
    out.append("assistant: ")
  return "".join(out)


def _with_specials(ids: list[int], bos_id: int | None, eos_id: int, add_bos: bool, add_eos: bool,
                   where: str) -> list[int]:
  if add_bos:
    if bos_id is None:
      raise ValueError(f"add_bos=True but the tokenizer at {where} has no bos token; check `tokenizer.bos_id` first")
    ids = [bos_id] + ids
  if add_eos:
    ids = ids + [eos_id]
  return ids


class HFTokenizer:
  """A transformers tokenizer loaded from a local directory (never the hub)."""

  def __init__(self, path: str | os.PathLike):
    from transformers import AutoTokenizer  # Heavy import; only pay it when an HF tokenizer is used.

    self.path = Path(path)
    self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
    self._eos_id = self._tok.eos_token_id
    pad = self._tok.pad_token_id
    if pad is None and self._eos_id is None:
      raise ValueError(
          f"tokenizer at {self.path} defines neither a pad nor an eos token; exrl needs one to pad and stop")
    # Documented rule: no pad token -> pad with eos (padding is masked everywhere, so the id's meaning is irrelevant).
    self._pad_id = pad if pad is not None else self._eos_id
    if self._eos_id is None:
      raise ValueError(f"tokenizer at {self.path} has no eos token; exrl needs one to stop generation")
    self._stop_ids = _stop_ids_from_generation_config(self.path, self._eos_id)

  @property
  def backend(self):
    """The wrapped transformers tokenizer, for anything this interface does not cover."""
    return self._tok

  @property
  def vocab_size(self) -> int:
    return len(self._tok)  # Includes added tokens, unlike `tokenizer.vocab_size`.

  @property
  def bos_id(self) -> int | None:
    return self._tok.bos_token_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """eos plus any extra eos ids from `generation_config.json` (chat models stop on several)."""
    return self._stop_ids

  @property
  def has_chat_template(self) -> bool:
    return bool(getattr(self._tok, "chat_template", None))

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = list(self._tok.encode(text, add_special_tokens=False))
    return _with_specials(ids, self.bos_id, self.eos_id, add_bos, add_eos, str(self.path))

  def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The tokenizer's own chat template when it has one, else `plain_chat_template`."""
    if not self.has_chat_template:
      return plain_chat_template(messages, add_generation_prompt)
    return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

  def __repr__(self) -> str:
    return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _stop_ids_from_generation_config(path: Path, eos_id: int) -> tuple[int, ...]:
  ids = [eos_id]
  gen = path / "generation_config.json"
  if gen.is_file():
    extra = json.loads(gen.read_text()).get("eos_token_id")
    for i in extra if isinstance(extra, list) else [extra]:
      if i is not None and int(i) not in ids:
        ids.append(int(i))
  return tuple(ids)


class SentencePieceTokenizer:
  """A SentencePiece model file. Control pieces (pad/bos/eos) are never produced by `encode` of plain text."""

  def __init__(self, model_file: str | os.PathLike):
    self.path = Path(model_file)
    self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
    bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
    if eos < 0 and pad < 0:
      raise ValueError(f"SentencePiece model {self.path} defines neither a pad nor an eos id; retrain with eos_id set")
    if eos < 0:
      raise ValueError(f"SentencePiece model {self.path} has no eos id (eos_id=-1); retrain with eos_id set")
    self._bos_id = bos if bos >= 0 else None
    self._eos_id = eos
    self._pad_id = pad if pad >= 0 else eos  # Same rule as HF: no pad -> pad with eos.

  @property
  def backend(self) -> spm.SentencePieceProcessor:
    return self._sp

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (self._eos_id,)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = list(self._sp.encode(text, out_type=int))
    return _with_specials(ids, self.bos_id, self.eos_id, add_bos, add_eos, str(self.path))

  def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
    ids = [int(i) for i in ids]
    n = self.vocab_size
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
      raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {n}) of {self.path}")
    if skip_special:
      return self._sp.decode([i for i in ids if not self._sp.is_control(i)])
    # SentencePiece drops control pieces when decoding; render them by their piece text instead.
    out, run = [], []
    for i in ids:
      if self._sp.is_control(i):
        out.append(self._sp.decode(run))
        out.append(self._sp.id_to_piece(i))
        run = []
      else:
        run.append(i)
    out.append(self._sp.decode(run))
    return "".join(out)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """SentencePiece models carry no template: always `plain_chat_template`."""
    return plain_chat_template(messages, add_generation_prompt)

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer | SentencePieceTokenizer:
  """Loads a tokenizer from a local path; see the module docstring for the dispatch rules."""
  p = Path(path)
  if not p.exists():
    raise FileNotFoundError(f"tokenizer path {str(p)!r} does not exist")
  if p.is_file():
    if p.suffix == ".model":
      return SentencePieceTokenizer(p)
    raise ValueError(f"unknown tokenizer file {str(p)!r}: expected a SentencePiece '*.model' file, or an HF "
                     "directory holding tokenizer.json / tokenizer_config.json")
  if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
    return HFTokenizer(p)
  sp_models = sorted(p.glob("*.model"))
  if len(sp_models) == 1:
    return SentencePieceTokenizer(sp_models[0])
  found = sorted(x.name for x in p.iterdir())[:20]
  if len(sp_models) > 1:
    raise ValueError(f"directory {str(p)!r} holds several SentencePiece models {[m.name for m in sp_models]}; "
                     "pass the '*.model' file itself")
  raise ValueError(f"no tokenizer found in directory {str(p)!r}: expected tokenizer.json / tokenizer_config.json "
                   f"(HF) or one '*.model' file (SentencePiece); found {found}")


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    model_prefix: str | os.PathLike,
    *,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = (),
    byte_fallback: bool = True,
    split_digits: bool = True,
    character_coverage: float = 1.0,
    max_sentence_length: int = 16384,
    seed: int = 0,
    num_threads: int = 1,
) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on `texts` and writes `{model_prefix}.model` and `{model_prefix}.vocab`.

  Deterministic: training reads every text in order (no sampling, no shuffling) on `num_threads=1`, so the same texts
  and options give a byte-identical `.model` file. `seed` fixes SentencePiece's own random seed for the few code paths
  that draw from it (unigram seeding). Ids are fixed: pad=0, unk=1, bos=2, eos=3.

  Defaults suit tiny arithmetic corpora: every character is covered, digits are split one per token (so numbers
  tokenise digit by digit), unknown characters fall back to bytes, and text is not normalised or prefixed with a space,
  so `decode(encode(s)) == s` for any s (given byte_fallback). With byte_fallback the vocab holds 256 byte pieces, so
  `vocab_size` must exceed 256 + 4 + the number of distinct characters.

  `vocab_size` is a cap: when the corpus cannot fill it (hard_vocab_limit=False), the model is smaller; read the real
  size from `.vocab_size`.
  """
  if model_type not in ("bpe", "unigram", "char", "word"):
    raise ValueError(f"model_type={model_type!r} is not a SentencePiece model type; use 'bpe', 'unigram', 'char' or 'word'")
  if num_threads != 1:
    raise ValueError(f"num_threads={num_threads}: only num_threads=1 is deterministic; exrl requires it")
  model_prefix = Path(model_prefix)
  model_prefix.parent.mkdir(parents=True, exist_ok=True)
  texts = [t for t in texts if t]  # Empty lines carry nothing and SentencePiece rejects an all-empty corpus.
  if not texts:
    raise ValueError("train_sentencepiece got no non-empty texts")
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        split_digits=split_digits,
        user_defined_symbols=list(user_defined_symbols),
        pad_id=SP_PAD_ID, unk_id=SP_UNK_ID, bos_id=SP_BOS_ID, eos_id=SP_EOS_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1,
        input_sentence_size=0,  # Use every sentence: no random subsampling.
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        add_dummy_prefix=False,  # So encode(prompt) + encode(completion) does not grow a stray leading space.
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        max_sentence_length=max_sentence_length,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(f"SentencePiece training failed for vocab_size={vocab_size}, model_type={model_type!r}: {e}") from e
  model_file = model_prefix.with_name(model_prefix.name + ".model")
  model_file.write_bytes(model.getvalue())
  tok = SentencePieceTokenizer(model_file)
  # The .vocab file is a human-readable listing; written from the model so it is deterministic too.
  vocab_lines = [f"{tok.backend.id_to_piece(i)}\t{tok.backend.get_score(i)}" for i in range(tok.vocab_size)]
  model_prefix.with_name(model_prefix.name + ".vocab").write_text("\n".join(vocab_lines) + "\n")
  return tok
