"""Parity of flaxcap.metrics with coco-caption (pycocoevalcap 1.2) and its Java PTBTokenizer.

The references are pycocoevalcap's own scorers and, where `java` is installed, its PTBTokenizer
(Stanford CoreNLP's jar) and Meteor jar. Without Java the scorers are still compared, on captions
our tokenizer prepared, and the Java-only checks are skipped.
"""

import collections
import logging
import pathlib
import random
import shutil
import subprocess
from unittest import mock

import numpy as np
import pytest

from flaxcap import errors
from flaxcap import metrics
from flaxcap import ptb_tokenizer
from flaxcap import sentence_scores

JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not JAVA, reason="java is not on the PATH")
TOLERANCE = 1e-9
SCORER_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")

# Five captions per image, written for when ../shared/data/flickr8k is absent.
WRITTEN_CAPTIONS = {
    "beach": ["A dog runs along the beach .", "A brown dog is running on the sand near the water.",
              "The dog plays at the sea-side", "A dog running by the ocean", "dog , beach , run !"],
    "bike": ["A man rides a red bike down a hill.", "A cyclist in a helmet speeds downhill .",
             "Man on a bicycle", "A person is riding a bike on a dirt road", "A biker's race."],
    "kids": ["Two kids play in a fountain", "Two children splash in the water .",
             "A boy and a girl are playing in a water fountain.", "Kids cool off in the park",
             "two young kids in swimsuits play with water"],
    "snow": ["A skier jumps off a ramp .", "A person in a red jacket is skiing down a snowy hill",
             "Skier in mid-air", "A snowboarder does a trick in the snow.",
             "Someone skis on a mountain"],
    "market": ["People shop at an outdoor market", "A crowd walks past fruit stands .",
               "Shoppers at a street market in the city.", "Many people are buying vegetables",
               "A busy market (in the afternoon)"],
    "climb": ["A woman climbs a rock wall.", "A rock climber scales a cliff face .",
              "A climber in a harness on a steep rock", "The woman is rock climbing",
              "Climbing up the red rocks"],
    "cafe": ["Three friends sit at a cafe table", "People drinking coffee outside a café .",
             "A group of people talk at an outdoor restaurant.", "friends having lunch",
             "Three people sitting and laughing at a table"],
    "soccer": ["A soccer player kicks the ball .", "Two teams play soccer on a green field",
               "A boy in a blue uniform kicks a soccer ball.", "Football game in progress",
               "The goalie dives for the ball"],
    "street": ["A man in a black coat walks down the street.", "A pedestrian crosses a busy road .",
               "A man walks past a store", "Someone walking in the city at night",
               "A guy with a bag on a sidewalk"],
    "pets": ["A cat sleeps next to a dog .", "A black cat and a white dog lie on a couch",
             "Two pets resting together.", "The dog and the cat are napping",
             "A puppy and a kitten on the sofa"],
    "music": ["A man plays the guitar on stage .", "A musician performs for a crowd",
              "A guitarist singing into a microphone.", "The band's singer plays guitar",
              "A man with long hair plays music"],
    "lake": ["A boy fishes from a wooden dock.", "A child fishing on a lake .",
             "A young boy holds a fishing rod by the water", "Kid fishing at sunset",
             "A boy sits on a pier with a fishing pole"],
}
# Deliberately odd candidates, scored against written references.
ODD_CANDIDATES = {
    "empty": "",
    "whitespace": "   \t ",
    "one word": "dog",
    "repeated": "dog dog dog dog dog dog dog dog dog",
    "punctuation only": ". , ! ? ; : -- ... ( )",
    "unicode": "Ein Hund läuft über die Wiese — 日本語の犬 😀 ΟΔΟΣ café naïve",
    "very long": " ".join(["a brown dog runs along the beach near the water"] * 40),
    "a reference": "A dog runs along the beach .",
    "quotes and brackets": "\"A dog\" [runs] {fast} (on sand)",
    "numbers": "2 dogs run 3.5 km , 1/2 an hour",
    "pipes": "a ||| dog | runs",
}

# Tricky captions and the tokens Java's PTBTokenizer gives them (run as one batch, in this
# order: the last-but-one's final "A." sees the next caption, as in coco-caption).
TOKENIZER_CASES = [
    ("A man (in red) said \"hello\" to the dog's owner.",
     "a man -lrb- in red -rrb- said hello to the dog 's owner"),
    ("It's a U.S. flag; the dog can't run, cannot stop!",
     "it 's a u.s. flag the dog ca n't run can not stop"),
    ("Two kids -- one in a 3-year-old's t-shirt -- play.",
     "two kids one in a 3-year-old 's t-shirt play"),
    ("'Twas gonna be fun... wasn't it?", "'t was gon na be fun was n't it"),
    ("A café in São Paulo; naïve ΟΔΟΣ 😀", "a café in são paulo naïve οδος"),
    ("Mr. Smith etc. went to www.example.com at 5:30 p.m.",
     "mr. smith etc. went to www.example.com at 5:30 p.m."),
    ("She paid $5.50 (about £4) for 1 1/2 cakes & AT&T stock.",
     "she paid $ 5.50 -lrb- about # 4 -rrb- for 1\xa01/2 cakes & at&t stock"),
    ("{curly} [square] <b>bold</b> :) ^_^",
     "-lcb- curly -rcb- -lsb- square -rsb- <b> bold </b> :-rrb- ^_^"),
    ("", ""),
    ("... !? --", "!?"),
    ("Call 555-1234 or (650) 555-1234; e-mail me@x.org",
     "call 555-1234 or -lrb-650-rrb-\xa0555-1234 e-mail me@x.org"),
    ("A dog jumps over the letter A.", "a dog jumps over the letter a"),
    ("A dog", "a dog"),
]


def _read_flickr8k_dev(root: pathlib.Path):
  """(references, candidates) of the dev images: caption #0 is the candidate, #1-#4 references."""
  text = root / "Flickr8k_text"
  dev_images = [line.strip() for line in
                (text / "Flickr_8k.devImages.txt").read_text().splitlines() if line.strip()]
  captions = {}
  for line in (text / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
    key, caption = line.split("\t", 1)
    image, number = key.rsplit("#", 1)
    captions.setdefault(image, {})[int(number)] = caption
  references = {image: [captions[image][k] for k in (1, 2, 3, 4)] for image in dev_images}
  candidates = {image: captions[image][0] for image in dev_images}
  return references, candidates


def _written_corpus():
  references = {key: caps[1:] for key, caps in WRITTEN_CAPTIONS.items()}
  candidates = {key: caps[0] for key, caps in WRITTEN_CAPTIONS.items()}
  return references, candidates


def _odd_corpus():
  written = list(WRITTEN_CAPTIONS.values())
  references = {("odd", name): written[i % len(written)] for i, name in enumerate(ODD_CANDIDATES)}
  references[("odd", "empty")] = ["", "dog", "..."]  # references that tokenize to nothing, too
  references[("odd", "a reference")] = WRITTEN_CAPTIONS["beach"]  # holds the candidate
  candidates = {("odd", name): caption for name, caption in ODD_CANDIDATES.items()}
  return references, candidates


@pytest.fixture(scope="module")
def pycoco():
  return pytest.importorskip("pycocoevalcap")


@pytest.fixture(scope="module")
def real_corpus(request):
  """The Flickr8k dev images, or the written captions where ../shared is absent."""
  try:
    root = request.getfixturevalue("flickr8k_root")
  except pytest.skip.Exception:
    return "written", *_written_corpus()
  references, candidates = _read_flickr8k_dev(root)
  assert len(candidates) == 1000
  return "flickr8k", references, candidates


@pytest.fixture(scope="module")
def corpus(real_corpus):
  """Real (or written) captions and the odd candidates together, so METEOR runs once per side."""
  _, references, candidates = real_corpus
  odd_references, odd_candidates = _odd_corpus()
  return {**references, **odd_references}, {**candidates, **odd_candidates}


def _reference_tokenize(pycoco, captions_by_key):
  """pycocoevalcap's PTBTokenizer (Java) where it can run, else our port (scorers still tested)."""
  if JAVA:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    return PTBTokenizer().tokenize(
        {key: [{"caption": c} for c in captions] for key, captions in captions_by_key.items()})
  keys = list(captions_by_key)
  flat = ptb_tokenizer.tokenize_captions(c for key in keys for c in captions_by_key[key])
  result, at = {}, 0
  for key in keys:
    result[key] = flat[at:at + len(captions_by_key[key])]
    at += len(captions_by_key[key])
  return result


def _reference_scores(pycoco, references, candidates, with_meteor):
  """pycocoevalcap's numbers: {name: (corpus score, [images] per-image scores)}."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.meteor.meteor import Meteor
  from pycocoevalcap.rouge.rouge import Rouge
  gts = _reference_tokenize(pycoco, references)
  res = _reference_tokenize(pycoco, {key: [caption] for key, caption in candidates.items()})
  out = {}
  bleu, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
  for n in range(4):
    out[f"BLEU-{n + 1}"] = (bleu[n], np.asarray(bleu_images[n]))
  for name, scorer in [("ROUGE-L", Rouge()), ("CIDEr", Cider())] + (
      [("METEOR", Meteor())] if with_meteor else []):
    corpus_score, image_scores = scorer.compute_score(gts, res)
    out[name] = (corpus_score, np.asarray(image_scores, dtype=np.float64))
  return out


def _assert_parity(ours, per_image, reference, keys, names):
  for name in names:
    corpus_score, image_scores = reference[name]
    ours_images = np.array([per_image[key][name] for key in keys])
    if name == "METEOR":  # the same jar on the same strings: the same numbers
      assert ours[name] == corpus_score
      np.testing.assert_array_equal(ours_images, image_scores)
    else:
      assert abs(ours[name] - corpus_score) <= TOLERANCE, (name, ours[name], corpus_score)
      np.testing.assert_allclose(ours_images, image_scores, rtol=0, atol=TOLERANCE, err_msg=name)


@pytest.fixture(scope="module")
def full_scores(corpus):
  """Ours on the whole corpus, with METEOR where Java is there; counts the processes started."""
  references, candidates = corpus
  with mock.patch.object(subprocess, "Popen", wraps=subprocess.Popen) as popen:
    scores, per_image = metrics.score(references, candidates, per_image=True)
  return scores, per_image, popen.call_count


def test_all_metrics_match_pycocoevalcap(pycoco, corpus, full_scores):
  references, candidates = corpus
  ours, per_image, processes = full_scores
  reference = _reference_scores(pycoco, references, candidates, with_meteor=JAVA)
  assert list(ours) == (["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"] + (["METEOR"] if JAVA else [])
                        + ["ROUGE-L", "CIDEr"])
  assert processes == (1 if JAVA else 0)  # one JVM for METEOR, not one per image
  _assert_parity(ours, per_image, reference, list(references), list(reference))
  assert 0.1 < ours["BLEU-1"] < 1 and 0.1 < ours["CIDEr"] < 10  # real numbers, not zeros


def test_real_captions_alone_match_pycocoevalcap(pycoco, real_corpus):
  # coco-caption's own numbers for the dev split (CIDEr's document frequencies and BLEU's
  # corpus counts depend on which images are scored together).
  _, references, candidates = real_corpus
  ours, per_image = metrics.score(references, candidates, metrics=("BLEU", "ROUGE-L", "CIDEr"),
                                  per_image=True)
  reference = _reference_scores(pycoco, references, candidates, with_meteor=False)
  _assert_parity(ours, per_image, reference, list(references), SCORER_NAMES)


def test_odd_candidates_alone_match_pycocoevalcap(pycoco):
  references, candidates = _odd_corpus()
  ours, per_image = metrics.score(references, candidates, metrics=("BLEU", "ROUGE-L", "CIDEr"),
                                  per_image=True)
  reference = _reference_scores(pycoco, references, candidates, with_meteor=False)
  _assert_parity(ours, per_image, reference, list(references), SCORER_NAMES)
  for key in [("odd", "empty"), ("odd", "whitespace")]:
    assert per_image[key]["BLEU-4"] == 0 and per_image[key]["CIDEr"] == 0
  assert per_image[("odd", "a reference")]["ROUGE-L"] == 1.0


@needs_java
def test_tokenizer_matches_java_on_every_flickr8k_caption(pycoco, flickr8k_root):
  lines = (flickr8k_root / "Flickr8k_text" / "Flickr8k.token.txt").read_text(
      encoding="utf-8").splitlines()
  captions = [line.split("\t", 1)[1] for line in lines]
  assert len(captions) == 35005
  # One JVM over all captions, in file order (PTBTokenizer batches them as one text).
  java = _reference_tokenize(pycoco, {i: [caption] for i, caption in enumerate(captions)})
  ours = ptb_tokenizer.tokenize_captions(captions)
  mismatches = [(captions[i], java[i][0], ours[i]) for i in range(len(captions))
                if java[i][0] != ours[i]]
  assert not mismatches, mismatches[:5]


@needs_java
def test_tokenizer_matches_java_on_odd_and_random_text(pycoco):
  rng = random.Random(0)
  pieces = list("aAbxU.,;:!?'\"`-_/*@#$%&()[]{}<>=+ 0123") + [
      " ", " ", "\t", "\u00a0", "’", "“", "…", "—", "½", "€", "é", "Σ", "日", "😀", "n't", "'s",
      "cannot", "etc.", "Mr.", "U.S.", "Inc.", "ca.", "http://", "www.", ".com", ".jpg", "&amp;",
      "&quot;", ":)", "^_^", "<b>", "1/2", "555-1234", "(650)", "The", "A", "I", "o'clock"]
  random_text = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
                 for _ in range(3000)]
  captions = ([c for caps in WRITTEN_CAPTIONS.values() for c in caps]
              + list(ODD_CANDIDATES.values()) + [c for c, _ in TOKENIZER_CASES] + random_text)
  java = _reference_tokenize(pycoco, {i: [caption] for i, caption in enumerate(captions)})
  ours = ptb_tokenizer.tokenize_captions(captions)
  mismatches = [(captions[i], java[i][0], ours[i]) for i in range(len(captions))
                if java[i][0] != ours[i]]
  assert not mismatches, mismatches[:5]


def test_tokenizer_known_cases():
  captions = [caption for caption, _ in TOKENIZER_CASES]
  assert ptb_tokenizer.tokenize_captions(captions) == [tokens for _, tokens in TOKENIZER_CASES]


def test_ptb_tokenize_one_caption():
  assert metrics.ptb_tokenize("A dog's toy (red).") == ["a", "dog", "'s", "toy", "-lrb-", "red",
                                                        "-rrb-"]
  assert metrics.ptb_tokenize("...") == []
  # Alone, nothing follows "A.", so it stays one token (compare TOKENIZER_CASES).
  assert metrics.ptb_tokenize("over the letter A.")[-1] == "a."


def test_lcs_length_matches_dynamic_programming():
  rng = random.Random(1)
  for _ in range(300):
    a = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
    b = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
    table = np.zeros((len(a) + 1, len(b) + 1), dtype=int)
    for i in range(1, len(a) + 1):
      for j in range(1, len(b) + 1):
        table[i, j] = (table[i - 1, j - 1] + 1 if a[i - 1] == b[j - 1]
                       else max(table[i - 1, j], table[i, j - 1]))
    assert metrics._lcs_length(a, b) == table[-1, -1]


def test_mismatched_keys_are_named():
  references = {"a.jpg": ["a dog"], "b.jpg": ["a cat"]}
  with pytest.raises(errors.DataError, match=r"no candidate for 1 image\(s\): 'b.jpg'"):
    metrics.score(references, {"a.jpg": "a dog"})
  with pytest.raises(errors.DataError, match=r"no references for 1 image\(s\): 'c.jpg'"):
    metrics.score(references, {"a.jpg": "a dog", "b.jpg": "a cat", "c.jpg": "a cow"})


def test_bad_inputs_raise(monkeypatch):
  monkeypatch.setattr(metrics.shutil, "which", lambda name: None)  # no JVM start for METEOR
  with pytest.raises(errors.DataError, match="nothing to score"):
    metrics.score({}, {})
  with pytest.raises(errors.DataError, match=r"references\['a'\]"):
    metrics.score({"a": []}, {"a": "a dog"})
  with pytest.raises(errors.DataError, match=r"candidates\['a'\]"):
    metrics.score({"a": ["a dog"]}, {"a": ["a dog"]})
  with pytest.raises(errors.ConfigError, match="SPICE"):
    metrics.score({"a": ["a dog"]}, {"a": "a dog"}, metrics=("BLEU", "SPICE"))
  with pytest.raises(errors.ConfigError, match="no caption metric asked for"):
    metrics.score({"a": ["a dog"]}, {"a": "a dog"}, metrics=[])
  # None asks for every metric (METEOR is left out without Java).
  assert set(metrics.score({"a": ["a dog"]}, {"a": "a dog"}, metrics=None)) == set(SCORER_NAMES)


def test_meteor_left_out_without_java(monkeypatch, caplog):
  monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
  references, candidates = _written_corpus()
  with caplog.at_level(logging.WARNING):
    scores, per_image = metrics.score(references, candidates, per_image=True)
  assert "METEOR" not in scores and "METEOR" not in per_image["beach"]
  assert set(scores) == set(SCORER_NAMES)
  assert [r.getMessage() for r in caplog.records if "METEOR" in r.getMessage()] == [
      "METEOR left out: it runs Meteor 1.5's jar, and no `java` is on the PATH."]


def test_per_image_scores_cover_every_image():
  references, candidates = _written_corpus()
  scores, per_image = metrics.score(references, candidates, metrics=("CIDEr", "ROUGE-L"),
                                    per_image=True)
  assert list(scores) == ["ROUGE-L", "CIDEr"]
  assert list(per_image) == list(references)
  assert all(set(s) == {"ROUGE-L", "CIDEr"} for s in per_image.values())
  assert scores["CIDEr"] == pytest.approx(np.mean([s["CIDEr"] for s in per_image.values()]))


def test_cider_d_reward_matches_pycocoevalcap_per_image(pycoco, corpus):
  """`CiderD` (fixed corpus: the self-critical reward) gives pycocoevalcap's CIDEr-D of each image
  when its corpus is the evaluated set, in any order and with repeats."""
  from pycocoevalcap.cider.cider import Cider
  references, candidates = corpus
  keys = list(references)
  gts = _reference_tokenize(pycoco, references)
  res = _reference_tokenize(pycoco, {key: [candidates[key]] for key in keys})
  _, expected = Cider().compute_score(gts, res)
  expected = np.asarray(expected, dtype=np.float64)
  assert expected.max() > 0.5  # some candidates do match their references
  reward = sentence_scores.CiderD([references[key] for key in keys])
  np.testing.assert_allclose(reward(range(len(keys)), [candidates[key] for key in keys]), expected,
                             rtol=0, atol=TOLERANCE)
  order = np.random.default_rng(0).integers(0, len(keys), size=3 * len(keys))
  np.testing.assert_allclose(reward(order, [candidates[keys[i]] for i in order]), expected[order],
                             rtol=0, atol=TOLERANCE)
  # Given the references tokenized (a stored consensus index), the same.
  given = sentence_scores.CiderD([references[key] for key in keys], tokenized=metrics.tokenize_captions(
      caption for key in keys for caption in references[key]))
  np.testing.assert_allclose(given(order, [candidates[keys[i]] for i in order]), expected[order],
                             rtol=0, atol=TOLERANCE)
  with pytest.raises(errors.DataError, match="non-empty"):
    sentence_scores.CiderD([["a caption"], []])
  with pytest.raises(errors.DataError, match="CiderD: 1 tokenized references for 2 captions"):
    sentence_scores.CiderD([["a caption", "another"]], tokenized=["a caption"])
  with pytest.raises(errors.DataError, match="3 candidates for 2 image indices"):
    reward([0, 1], ["a dog", "a cat", "a cow"])
  with pytest.raises(errors.DataError, match=r"image indices must be in \[0, "):
    reward([len(keys)], ["a dog"])
  with pytest.raises(errors.DataError, match="a list of captions, not one string"):
    reward([0], "a dog")


def test_cider_d_document_frequency_counts_images_not_captions(pycoco, corpus):
  """Each n-gram's document frequency is the number of images with a tokenized reference holding it."""
  references, _ = corpus
  gts = _reference_tokenize(pycoco, references)
  reward = sentence_scores.CiderD(list(references.values()))
  for n in range(1, 5):
    expected = collections.Counter()
    for texts in gts.values():
      expected.update({" ".join(words[i:i + n]) for words in map(str.split, texts)
                       for i in range(len(words) - n + 1)})
    np.testing.assert_array_equal(reward.document_frequency(list(expected)), list(expected.values()))
  assert reward.document_frequency(["a"])[0] > 1  # some words occur in several images
  assert reward.document_frequency(["zebra xylophone", "qqq"]).tolist() == [0, 0]  # in no reference


def test_sentence_bleu_reward_matches_pycocoevalcap_per_image(pycoco, corpus):
  """`SentenceBleu` (the self-critical BLEU reward) gives pycocoevalcap's BLEU-4 of each image alone,
  in any order and with repeats."""
  from pycocoevalcap.bleu.bleu import Bleu
  references, candidates = corpus
  keys = list(references)
  gts = _reference_tokenize(pycoco, references)
  res = _reference_tokenize(pycoco, {key: [candidates[key]] for key in keys})
  _, per_order = Bleu(4).compute_score(gts, res, verbose=0)
  expected = np.asarray(per_order[3], dtype=np.float64)
  assert expected.max() > 0.3 and expected.min() < 0.01  # matching and unmatched candidates
  reward = sentence_scores.SentenceBleu([references[key] for key in keys])
  np.testing.assert_allclose(reward(range(len(keys)), [candidates[key] for key in keys]), expected,
                             rtol=1e-9, atol=TOLERANCE)
  order = np.random.default_rng(1).integers(0, len(keys), size=3 * len(keys))
  np.testing.assert_allclose(reward(order, [candidates[keys[i]] for i in order]), expected[order],
                             rtol=1e-9, atol=TOLERANCE)
  with pytest.raises(errors.DataError, match="non-empty"):
    sentence_scores.SentenceBleu([["a caption"], []])


def test_cider_d_end_token_is_pycocoevalcap_with_the_token_appended(pycoco, corpus):
  """With `end_token`, `CiderD` is pycocoevalcap's CIDEr-D of texts with that word appended to every
  reference and to the candidates that ended (and only those)."""
  from pycocoevalcap.cider.cider import Cider
  references, candidates = corpus
  keys = list(references)
  ended = [i % 3 != 0 for i in range(len(keys))]
  gts = _reference_tokenize(pycoco, references)
  res = _reference_tokenize(pycoco, {key: [candidates[key]] for key in keys})
  gts = {key: [f"{text} <eos>" for text in texts] for key, texts in gts.items()}
  res = {key: [f"{texts[0]} <eos>" if done else texts[0]] for (key, texts), done
         in zip(res.items(), ended)}
  _, expected = Cider().compute_score(gts, res)
  reward = sentence_scores.CiderD([references[key] for key in keys], end_token="<eos>")
  np.testing.assert_allclose(reward(range(len(keys)), [candidates[key] for key in keys], ended),
                             expected, rtol=0, atol=TOLERANCE)
  given = sentence_scores.CiderD([references[key] for key in keys], end_token="<eos>",
                                 tokenized=metrics.tokenize_captions(
                                     caption for key in keys for caption in references[key]))
  np.testing.assert_allclose(given(range(len(keys)), [candidates[key] for key in keys], ended),
                             expected, rtol=0, atol=TOLERANCE)
  with pytest.raises(errors.DataError, match="ended flags"):
    reward([0, 1], ["a dog", "a cat"], [True])


def test_corpus_scorers_with_references_shorter_than_the_candidates():
  """References without 4-grams (or 3-grams), longer candidates, an empty one: `metrics.score`'s values."""
  references = [["a dog"], ["a cat sits", "cat"], ["two men"]]
  candidates = ["a big brown dog runs", "a cat sits on a mat", ""]
  cider = sentence_scores.CiderD(references)(range(3), candidates)
  bleu = sentence_scores.SentenceBleu(references)(range(3), candidates)
  _, per_image = metrics.score(dict(enumerate(references)), dict(enumerate(candidates)),
                               ("BLEU", "CIDEr"), per_image=True)
  np.testing.assert_allclose(cider, [per_image[i]["CIDEr"] for i in range(3)], rtol=0, atol=TOLERANCE)
  np.testing.assert_allclose(bleu, [per_image[i]["BLEU-4"] for i in range(3)], rtol=1e-9,
                             atol=TOLERANCE)
  assert cider[1] > 0 and cider[2] == 0


def test_cider_d_end_token_pays_less_for_a_caption_cut_mid_phrase():
  """The end token is what makes stopping mid-phrase cost: without it "a dog runs in the" keeps most
  of the complete caption's reward."""
  references = [["a dog runs in the grass", "a brown dog is running in the grass",
                 "a dog running on a lawn"],
                ["two children play on the beach", "kids playing in the sand", "two kids at the sea"]]
  complete, cut = "a dog runs in the grass", "a dog runs in the"

  def cut_over_complete(reward):
    values = reward([0, 0], [complete, cut])
    return values[1] / values[0]

  without_end = cut_over_complete(sentence_scores.CiderD(references))
  with_end = cut_over_complete(sentence_scores.CiderD(references, end_token="<eos>"))
  assert with_end < without_end - 0.05, (with_end, without_end)


@pytest.mark.parametrize("brk", ["\n", "\r\n", "\r", "\u2028", "\u2029", "\x0b", "\x0c"])
def test_a_line_break_inside_a_caption_is_a_space(brk):
  captions = [f"A dog{brk}runs .", "a cat", f"{brk}two birds{brk}"]
  assert ptb_tokenizer.tokenize_captions(captions) == ["a dog runs", "a cat", "two birds"]


def test_scores_of_captions_with_line_breaks_are_those_without():
  references = {"a": ["a dog runs on the grass", "a brown dog runs"], "b": ["a cat sleeps"]}
  with_breaks = {"a": "a dog\nruns on the grass", "b": "a cat\r\nsleeps"}
  plain = {key: " ".join(text.split()) for key, text in with_breaks.items()}
  assert metrics.score(references, with_breaks, metrics=("BLEU", "CIDEr")) == pytest.approx(
      metrics.score(references, plain, metrics=("BLEU", "CIDEr")))
