"""n-gram counting: `ngrams.Corpus` against brute-force Counters of word tuples."""

import collections

import numpy as np
import pytest

from flaxcap import ngrams

WORDS = "a dog cat runs on the grass in".split()


def _brute_force(texts, order):
  """{(caption, n-gram words): count} of every caption."""
  counts = {}
  for caption, text in enumerate(texts):
    words = text.split()
    for gram, count in collections.Counter(tuple(words[i:i + order])
                                           for i in range(len(words) - order + 1)).items():
      counts[caption, gram] = count
  return counts


def _random_texts(rng, count, words=WORDS):
  return [" ".join(rng.choice(words, size=rng.integers(0, 9))) for _ in range(count)]


@pytest.fixture
def corpus_texts():
  rng = np.random.default_rng(0)
  return _random_texts(rng, 60)


def test_corpus_counts_every_captions_ngrams(corpus_texts):
  corpus = ngrams.Corpus(corpus_texts)
  np.testing.assert_array_equal(corpus.lengths, [len(t.split()) for t in corpus_texts])
  for order in range(1, ngrams.MAX_N + 1):
    grams = corpus.grams[order - 1]
    expected = _brute_force(corpus_texts, order)
    # The same n-gram has the same id everywhere, and different ones different ids.
    id_of = {}
    for words in sorted({gram for _, gram in expected}):
      id_of[words] = int(corpus.ids([" ".join(words)])[0])
    assert sorted(id_of.values()) == list(range(corpus.num_grams[order - 1]))
    got = {(int(c), int(g)): int(k) for c, g, k in zip(grams.caption, grams.gram, grams.count)}
    assert got == {(c, id_of[words]): k for (c, words), k in expected.items()}
    keys = grams.caption * corpus.num_grams[order - 1] + grams.gram
    assert (np.diff(keys) > 0).all()  # sorted by caption, then n-gram, each pair once


def test_count_uses_the_corpus_ids_and_numbers_new_ngrams_after_them(corpus_texts):
  corpus = ngrams.Corpus(corpus_texts)
  rng = np.random.default_rng(1)
  # Other captions: corpus words and words the corpus lacks, repeated so that counts exceed 1.
  texts = _random_texts(rng, 40, WORDS + ["zebra", "kite", "a"]) + ["", "zebra zebra zebra kite"]
  expected = {order: _brute_force(texts, order) for order in range(1, ngrams.MAX_N + 1)}
  # One probe caption per distinct n-gram: it adds no new word sequence, so the numbering is the
  # same, and its whole-caption n-gram says which id that n-gram got.
  probes = sorted({" ".join(words) for counts in expected.values() for _, words in counts})
  grams, lengths = corpus.count(texts + probes)
  np.testing.assert_array_equal(lengths[:len(texts)], [len(t.split()) for t in texts])
  some_new = False
  for order in range(1, ngrams.MAX_N + 1):
    order_grams, num_grams = grams[order - 1], corpus.num_grams[order - 1]
    got = {(int(c), int(g)): int(k) for c, g, k in
           zip(order_grams.caption, order_grams.gram, order_grams.count)}
    id_of = {tuple(probe.split()): gram for (caption, gram) in got if caption >= len(texts)
             for probe in [probes[caption - len(texts)]] if len(probe.split()) == order}
    for words, gram in id_of.items():
      held = int(corpus.ids([" ".join(words)])[0])
      assert gram == held if held >= 0 else gram >= num_grams  # new n-grams after the corpus's
      some_new |= held < 0
    assert len(set(id_of.values())) == len(id_of)  # distinct n-grams, distinct ids
    assert {key: count for key, count in got.items() if key[0] < len(texts)} == {
        (caption, id_of[words]): count for (caption, words), count in expected[order].items()}
  assert some_new
  assert corpus.ids(["zebra", "a b c d e"]).tolist() == [-1, -1]


def test_an_empty_corpus_and_empty_captions():
  corpus = ngrams.Corpus(["", "dog"])
  assert corpus.num_grams == [1, 0, 0, 0]
  grams, lengths = corpus.count(["dog dog", "cat dog", ""])
  assert lengths.tolist() == [2, 2, 0]
  assert grams[0].caption.tolist() == [0, 1, 1] and grams[0].count.tolist() == [2, 1, 1]
  assert grams[0].gram.tolist()[0] == 0 and grams[0].gram.tolist()[1] == 0  # "dog", held
  assert grams[0].gram.tolist()[2] == 1  # "cat": new, numbered after the corpus's one unigram
  assert grams[1].caption.tolist() == [0, 1] and (grams[1].gram >= 0).all()
  assert grams[1].gram[0] != grams[1].gram[1]  # "dog dog" and "cat dog"


def test_ranges_enumerates_each_range_with_its_owner():
  owner, index = ngrams.ranges(np.array([3, 0, 7]), np.array([5, 0, 10]))
  assert owner.tolist() == [0, 0, 2, 2, 2] and index.tolist() == [3, 4, 7, 8, 9]
