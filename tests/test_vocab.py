"""Tests for flaxcap.vocab: tokenization, building, encode/decode, JSON round trip."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from flaxcap import errors
from flaxcap import vocab as vocab_lib


@pytest.mark.parametrize("text, expected", [
    ("A child in a pink dress is climbing up a set of stairs in an entry way .",
     "a child in a pink dress is climbing up a set of stairs in an entry way".split()),
    ("A man in a statefarm.com hat", ["a", "man", "in", "a", "statefarmcom", "hat"]),
    ("Two dogs , one black & one white ; playing!", ["two", "dogs", "one", "black", "one", "white",
                                                     "playing"]),
    ("A dog's \"ball\" (red)", ["a", "dogs", "ball", "red"]),
    ("  Tabs\tand\r\nnewlines  ", ["tabs", "and", "newlines"]),
    ("A boy in a t-shirt", ["a", "boy", "in", "a", "tshirt"]),
    ("Café « quoted » …", ["café", "quoted"]),
    ("", []),
    (" . , ! ", []),
])
def test_tokenize(text, expected):
  assert vocab_lib.tokenize(text) == expected


def test_tokenize_matches_karpathy_rule_on_ascii():
  """Karpathy's neuraltalk2 rule: lower(), delete string.punctuation, split()."""
  import string
  rng = np.random.default_rng(0)
  alphabet = list(string.ascii_letters + string.digits + string.punctuation + "  \t")
  for _ in range(200):
    text = "".join(rng.choice(alphabet, size=rng.integers(0, 40)))
    reference = text.lower().translate(str.maketrans("", "", string.punctuation)).split()
    assert vocab_lib.tokenize(text) == reference, text


def _small_vocab(min_count=2, max_size=0):
  captions = ["A dog runs .", "a dog jumps", "The dog runs!", "a cat sleeps", "A cat runs"]
  return vocab_lib.Vocabulary.build(captions, min_count=min_count, max_size=max_size)


def test_build_orders_by_count_then_word():
  vocab = _small_vocab()
  # counts: a 4, dog 3, runs 3, cat 2; the rest once.
  assert vocab.words == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog", "runs", "cat"]
  assert (vocab_lib.PAD, vocab_lib.BOS, vocab_lib.EOS, vocab_lib.UNK) == (0, 1, 2, 3)
  assert len(vocab) == 8
  assert "dog" in vocab and "jumps" not in vocab


def test_build_does_not_depend_on_caption_order():
  captions = ["b b a a c", "c d", "a b d d"]
  assert (vocab_lib.Vocabulary.build(captions, min_count=1) ==
          vocab_lib.Vocabulary.build(captions[::-1], min_count=1))


def test_build_default_min_count_is_five():
  captions = ["dog"] * 5 + ["cat"] * 4
  assert vocab_lib.Vocabulary.build(captions).words[4:] == ["dog"]


def test_build_max_size_counts_special_tokens():
  vocab = _small_vocab(min_count=1, max_size=6)
  assert vocab.words == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog"]
  with pytest.raises(ValueError):
    _small_vocab(max_size=3)


def test_encode_pads_and_maps_unknown_words():
  vocab = _small_vocab()
  ids = vocab.encode("A dog flies", max_len=7)
  assert ids.dtype == np.int32 and ids.shape == (7,)
  np.testing.assert_array_equal(ids, [1, 4, 5, 3, 2, 0, 0])


def test_encode_truncates_and_keeps_eos():
  vocab = _small_vocab()
  ids = vocab.encode("a dog runs a cat runs a dog", max_len=5)
  np.testing.assert_array_equal(ids, [1, 4, 5, 6, 2])
  np.testing.assert_array_equal(vocab.encode("", max_len=3), [1, 2, 0])
  with pytest.raises(ValueError):
    vocab.encode("a", max_len=1)


def test_encode_batch_matches_encode():
  vocab = _small_vocab()
  texts = ["a dog", "cat runs fast", ""]
  batch = vocab.encode_batch(texts, max_len=6)
  assert batch.shape == (3, 6) and batch.dtype == np.int32
  for row, text in zip(batch, texts):
    np.testing.assert_array_equal(row, vocab.encode(text, 6))


def test_decode_stops_at_eos_and_drops_bos_pad():
  vocab = _small_vocab()
  assert vocab.decode([1, 4, 5, 6, 2, 7, 7]) == "a dog runs"
  assert vocab.decode(np.array([4, 0, 3, 7])) == "a <unk> cat"
  assert vocab.decode([2, 4]) == ""
  assert vocab.decode(vocab.encode("The cat runs", 10)) == "<unk> cat runs"
  with pytest.raises(ValueError):
    vocab.decode([99])


def test_save_load_round_trip(tmp_path):
  vocab = vocab_lib.Vocabulary.build(["ünïcode words here", "words here"], min_count=1)
  path = tmp_path / "vocab.json"
  vocab.save(path)
  loaded = vocab_lib.Vocabulary.load(path)
  assert loaded == vocab and loaded.words[4] == "here"
  assert json.loads(path.read_text(encoding="utf-8"))["format"] == "flaxcap.vocabulary"


def test_build_counts_how_often_each_word_ends_a_caption():
  vocab = vocab_lib.Vocabulary.build(
      ["A dog runs.", "a dog", "The red dog runs", "a red ball", "a cat sits"], min_count=2)
  rate = dict(zip(vocab.words, vocab.ending_rates.tolist()))
  assert rate["runs"] == 1.0 and rate["a"] == 0.0 and rate["red"] == 0.0
  assert rate["dog"] == pytest.approx(1 / 3)
  assert rate["<unk>"] == 0.5  # the rare words the, ball, cat, sits: 2 of them end a caption
  assert rate["<bos>"] == rate["<eos>"] == rate["<pad>"] == 0.0
  banned = vocab.eos_banned_after(0.6)
  assert [w for w, b in zip(vocab.words, banned) if not b] == ["runs"]
  assert banned[vocab_lib.BOS]  # no empty caption
  assert vocab.eos_banned_after(0.0) is None
  assert vocab_lib.Vocabulary(vocab.words).eos_banned_after(0.5) is None  # rates unknown


def test_ending_rates_survive_save_and_load_and_old_files_load_without(tmp_path):
  vocab = vocab_lib.Vocabulary.build(["a dog runs", "a dog", "red dog runs"], min_count=1)
  path = tmp_path / "vocab.json"
  vocab.save(path)
  loaded = vocab_lib.Vocabulary.load(path)
  np.testing.assert_allclose(loaded.ending_rates, vocab.ending_rates, atol=1e-6)
  payload = json.loads(path.read_text(encoding="utf-8"))
  del payload["ending_rates"]  # a file written before the rates were kept
  path.write_text(json.dumps(payload), encoding="utf-8")
  old = vocab_lib.Vocabulary.load(path)
  assert old == vocab and old.ending_rates is None
  payload["ending_rates"] = [0.5] * (len(vocab) - 1)
  path.write_text(json.dumps(payload), encoding="utf-8")
  with pytest.raises(errors.DataError, match=f"{path}: bad vocabulary: ending_rates must be"):
    vocab_lib.Vocabulary.load(path)


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{\"format\": \"flaxcap.vocabulary\",\n \"words\": [", ":2:"),
    ("[1, 2, 3]", "not a flaxcap vocabulary"),
    ("{\"format\": \"flaxcap.vocabulary\", \"version\": 9, \"words\": []}", "version 9"),
    ("{\"format\": \"flaxcap.vocabulary\", \"version\": 1}", "no \"words\""),
    ("{\"format\": \"flaxcap.vocabulary\", \"version\": 1, \"words\": [\"a\", \"b\"]}", "must start"),
    ("{\"format\": \"flaxcap.vocabulary\", \"version\": 1, "
     "\"words\": [\"<pad>\", \"<bos>\", \"<eos>\", \"<unk>\", \"x\", \"x\"]}", "repeats"),
])
def test_load_bad_file_raises_data_error_naming_it(tmp_path, content, message):
  path = tmp_path / "vocab.json"
  if content is not None:
    path.write_text(content, encoding="utf-8")
  with pytest.raises(errors.DataError, match=message) as info:
    vocab_lib.Vocabulary.load(path)
  assert str(path) in str(info.value)


def test_vocab_module_does_not_import_tensorflow():
  code = ("import sys; import flaxcap.vocab; "
          "assert 'tensorflow' not in sys.modules and 'jax' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=pathlib.Path(__file__).resolve().parents[1])


def test_a_word_ending_exactly_min_ending_rate_of_its_captions_is_not_banned():
  vocab = vocab_lib.Vocabulary.build(["a dog", "a dog runs", "a cat", "the cat sits"], min_count=1)
  rate = dict(zip(vocab.words, vocab.ending_rates.tolist()))
  assert rate["dog"] == 0.5 and rate["cat"] == 0.5
  banned = dict(zip(vocab.words, vocab.eos_banned_after(0.5).tolist()))
  assert not banned["dog"] and not banned["cat"] and banned["a"]  # "fewer than" the rate
