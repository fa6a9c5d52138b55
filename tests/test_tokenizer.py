"""Tokenizer tests: an HF tokenizer built offline in the test, and trained SentencePiece models."""
import json
import random

import pytest

from exrl import tokenizer as tk

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _corpus(n=600, seed=0):
  r = random.Random(seed)
  out = [f"{r.randint(0, 999)}+{r.randint(0, 999)}=" for _ in range(n)]
  out += [f"{a}+{b}={a + b},{a + b}+3={a + b + 3}. answer: {a + b + 3}" for a, b in
          ((r.randint(0, 9), r.randint(0, 9)) for _ in range(n // 4))]
  return out


def _save_hf_tokenizer(path, *, pad=False, bos=True, chat_template=None, gen_eos=None):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_end|>"]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus() + ["hello world, the quick brown fox"] * 20, trainer=trainer)
  kw = dict(eos_token="</s>", unk_token="<unk>", additional_special_tokens=["<|im_end|>"])
  if bos:
    kw["bos_token"] = "<s>"
  if pad:
    kw["pad_token"] = "<pad>"
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
  if chat_template:
    fast.chat_template = chat_template
  fast.save_pretrained(str(path))
  if gen_eos is not None:
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": gen_eos}))
  return fast


def test_hf_round_trip_special_ids_and_chat_template(tmp_path):
  oracle = _save_hf_tokenizer(tmp_path, chat_template=CHAT_TEMPLATE, gen_eos=[2, 4])
  tok = tk.load_tokenizer(tmp_path)
  assert isinstance(tok, tk.HFTokenizer) and isinstance(tok, tk.Tokenizer)
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  assert tok.pad_id == tok.eos_id  # No pad token -> the documented fallback to eos.
  assert tok.stop_ids == (2, 4)
  assert tok.vocab_size == len(oracle)
  for s in ["123+45=168", "hello world, the quick brown fox", "7+5=12. answer: 12", "ünïcode ok"]:
    ids = tok.encode(s)
    assert ids == oracle.encode(s, add_special_tokens=False)
    assert tok.decode(ids) == s
  ids = tok.encode("12+3=", add_bos=True, add_eos=True)
  assert ids[0] == 1 and ids[-1] == 2
  assert tok.decode(ids) == "12+3="
  assert tok.decode(ids, skip_special=False) == "<s>12+3=</s>"
  msgs = [{"role": "user", "content": "2+2="}]
  assert tok.apply_chat_template(msgs) == "<|user|>2+2=\n<|assistant|>"
  assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<|user|>2+2=\n"


def test_hf_explicit_pad_no_bos_and_plain_chat_fallback(tmp_path):
  _save_hf_tokenizer(tmp_path, pad=True, bos=False)
  tok = tk.load_tokenizer(tmp_path)
  assert tok.pad_id == 0 and tok.eos_id == 2 and tok.stop_ids == (2,) and tok.bos_id is None
  assert tok.encode("1+1=", add_eos=True)[-1] == 2
  with pytest.raises(ValueError, match="add_bos=True but the tokenizer .* has no bos token"):
    tok.encode("1+1=", add_bos=True)
  msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}]
  assert tok.apply_chat_template(msgs) == "system: be brief\nuser: 1+1=\nassistant: "


def test_sentencepiece_deterministic_round_trip_and_digits(tmp_path):
  texts = _corpus()
  a = tk.train_sentencepiece(texts, 320, tmp_path / "a" / "sp")
  b = tk.train_sentencepiece(iter(texts), 320, tmp_path / "b" / "sp")  # An iterator, not a list.
  assert (tmp_path / "a" / "sp.model").read_bytes() == (tmp_path / "b" / "sp.model").read_bytes()
  assert (tmp_path / "a" / "sp.vocab").read_bytes() == (tmp_path / "b" / "sp.vocab").read_bytes()
  assert (a.pad_id, a.bos_id, a.eos_id) == (0, 2, 3)
  assert a.vocab_size == b.vocab_size <= 320
  assert isinstance(a, tk.Tokenizer)
  # Reloading through the dispatcher gives the same tokenizer, from the file or its directory.
  for p in (tmp_path / "a" / "sp.model", tmp_path / "a"):
    c = tk.load_tokenizer(p)
    assert isinstance(c, tk.SentencePieceTokenizer) and c.vocab_size == a.vocab_size
  for s in ["9876+123=9999", "7+5=12,12+9=21. answer: 21", "  two  spaces\tand ü€ unseen chars"]:
    ids = a.encode(s)
    assert a.decode(ids) == s
    assert all(i not in (a.pad_id, a.bos_id, a.eos_id) for i in ids)
  # Digits are split: each digit of a number is its own piece.
  pieces = [a.backend.id_to_piece(i) for i in a.encode("98765+4321=")]
  assert pieces == list("98765+4321=")
  ids = a.encode("1+2=", add_bos=True, add_eos=True)
  assert ids[0] == 2 and ids[-1] == 3
  assert a.decode(ids) == "1+2="
  assert a.decode(ids + [0, 0], skip_special=False) == "<s>1+2=</s><pad><pad>"
  assert a.apply_chat_template([{"role": "user", "content": "1+2="}]) == "user: 1+2=\nassistant: "


def test_sentencepiece_different_corpus_differs(tmp_path):
  a = tk.train_sentencepiece(_corpus(seed=0), 320, tmp_path / "a")
  b = tk.train_sentencepiece(_corpus(seed=0) + ["zebra zebra zebra quux"] * 50, 320, tmp_path / "b")
  assert (tmp_path / "a.model").read_bytes() != (tmp_path / "b.model").read_bytes()
  assert "zebra" not in [a.backend.id_to_piece(i) for i in range(a.vocab_size)]
  assert len(b.encode("zebra")) < len(a.encode("zebra"))


def test_sentencepiece_user_defined_symbols(tmp_path):
  tok = tk.train_sentencepiece(_corpus(), 320, tmp_path / "sp", user_defined_symbols=["<sep>"])
  ids = tok.encode("1+2=<sep>3")
  assert tok.backend.piece_to_id("<sep>") in ids
  assert tok.decode(ids) == "1+2=<sep>3"


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tk.load_tokenizer(tmp_path / "nope")
  (tmp_path / "vocab.txt").write_text("a\n")
  with pytest.raises(ValueError, match=r"unknown tokenizer file .*\.model"):
    tk.load_tokenizer(tmp_path / "vocab.txt")
  with pytest.raises(ValueError, match="no tokenizer found.*vocab.txt"):
    tk.load_tokenizer(tmp_path)
  tok = tk.train_sentencepiece(_corpus(), 320, tmp_path / "sp")
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size + 5])
  with pytest.raises(ValueError, match="no non-empty texts"):
    tk.train_sentencepiece(["", ""], 320, tmp_path / "empty")
  with pytest.raises(ValueError, match="only num_threads=1"):
    tk.train_sentencepiece(_corpus(), 320, tmp_path / "t", num_threads=4)
  with pytest.raises(ValueError, match="chat message 0 must have 'role' and 'content'"):
    tok.apply_chat_template([{"text": "hi"}])
