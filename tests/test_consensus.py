"""Consensus reranking: neighbours, scores against a brute-force reference, the index file, Captioner."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import cli_env
from flaxcap import checkpoints
from flaxcap import consensus
from flaxcap import errors
from flaxcap import inference
from flaxcap import metrics

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = "a dog cat man boy girl runs sits jumps on in the grass water snow red blue ball".split()


def _random_index(rng, images=40, channels=16):
  pooled = rng.normal(size=(images, channels)).astype(np.float32) + 3.0  # off-centre, like ReLU6 means
  captions = [[" ".join(rng.choice(WORDS, size=rng.integers(4, 9))) for _ in range(rng.integers(1, 4))]
              for _ in range(images)]
  return pooled, captions, consensus.ConsensusIndex.build(pooled, captions)


def test_neighbours_are_the_most_cosine_similar_after_centring():
  rng = np.random.default_rng(0)
  pooled, _, index = _random_index(rng)
  queries = rng.normal(size=(5, pooled.shape[1])) + 3.0
  centred, centred_queries = pooled - pooled.mean(0), queries - pooled.mean(0)
  cosine = (centred_queries @ centred.T) / np.outer(np.linalg.norm(centred_queries, axis=1),
                                                    np.linalg.norm(centred, axis=1))
  expected = np.argsort(-cosine, axis=1)[:, :7]
  np.testing.assert_array_equal(index.neighbours(queries, 7), expected)
  assert index.neighbours(queries, 1000).shape == (5, len(pooled))  # capped at the index size


def test_consensus_is_the_mean_cider_d_against_the_neighbours_captions():
  rng = np.random.default_rng(1)
  pooled, captions, index = _random_index(rng)
  queries = rng.normal(size=(3, pooled.shape[1])) + 3.0
  candidates = [[" ".join(rng.choice(WORDS, size=6)) for _ in range(4)] for _ in range(3)]
  candidates[1] = candidates[1][:2]  # a beam with fewer captions
  scores = index.consensus(queries, candidates, neighbours=5)
  nearest = index.neighbours(queries, 5)
  everything = dict(enumerate(captions))
  for row, texts in enumerate(candidates):
    for column, text in enumerate(texts):
      # CIDEr-D of the text as every index image's caption, document frequencies over the index.
      _, per_image = metrics.score(everything, {i: text for i in everything}, "CIDEr", per_image=True)
      expected = np.mean([per_image[i]["CIDEr"] for i in nearest[row]])
      assert scores[row, column] == pytest.approx(expected, rel=1e-9, abs=1e-12)
  assert np.isneginf(scores[1, 2:]).all()
  assert index.consensus(queries[:2], [[], []], neighbours=5).shape == (2, 0)  # nothing to score


def test_rerank_keeps_the_caption_the_neighbours_agree_with():
  rng = np.random.default_rng(2)
  pooled = rng.normal(size=(6, 8)).astype(np.float32)
  captions = [["a dog runs on the grass", "a brown dog runs in the grass"]] * 3 + [
      ["a man sits in the snow", "a man is sitting on snow"]] * 3
  index = consensus.ConsensusIndex.build(pooled, captions)
  beams = [["a man sits in the snow", "a dog runs on the grass"]] * 2
  near_dogs, near_snow = pooled[0] + 0.01, pooled[4] + 0.01
  chosen = index.rerank(np.stack([near_dogs, near_snow]), beams, neighbours=3)
  np.testing.assert_array_equal(chosen, [1, 0])
  tied = index.rerank(near_dogs[None], [["a cat", "a cat"]], neighbours=3)
  assert tied.tolist() == [0]  # on a tie the beam's own order decides


def test_rerank_adds_the_weighted_beam_score_to_the_consensus():
  rng = np.random.default_rng(4)
  pooled, _, index = _random_index(rng)
  queries = pooled[:12] + rng.normal(scale=0.3, size=(12, pooled.shape[1])).astype(np.float32)
  beams = [[" ".join(rng.choice(WORDS, size=rng.integers(3, 8))) for _ in range(3)] for _ in range(12)]
  beam_scores = -np.sort(rng.uniform(2.0, 12.0, size=(12, 3)), axis=1)  # best first, like the beam
  agreement = index.consensus(queries, beams, neighbours=5)
  by_agreement = index.rerank(queries, beams, neighbours=5)
  by_beam = index.rerank(queries, beams, neighbours=5, beam_scores=beam_scores, beam_score_weight=1e3)
  np.testing.assert_array_equal(by_agreement, np.argmax(agreement, axis=1))
  np.testing.assert_array_equal(by_beam, 0)  # a large weight keeps the beam's own best
  assert (by_agreement != 0).any()
  for weight in [consensus.BEAM_SCORE_WEIGHT, 0.1, 0.5]:
    chosen = index.rerank(queries, beams, neighbours=5, beam_scores=beam_scores,
                          beam_score_weight=weight)
    for row in range(12):  # brute force: every candidate's total, the best kept
      totals = [agreement[row, k] + weight * beam_scores[row, k] for k in range(3)]
      assert chosen[row] == max(range(3), key=lambda k: (totals[k], -k))
  with pytest.raises(errors.ConfigError, match="weight must be >= 0, not -0.1"):
    index.rerank(queries, beams, neighbours=5, beam_scores=beam_scores, beam_score_weight=-0.1)
  with pytest.raises(errors.ConfigError, match="beam scores of shape None"):
    index.rerank(queries, beams, neighbours=5, beam_score_weight=0.1)


def test_index_file_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(3)
  pooled, captions, index = _random_index(rng)
  index.save(tmp_path / "index.npz")
  loaded = consensus.ConsensusIndex.load(tmp_path / "index.npz")
  np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
  np.testing.assert_array_equal(loaded.center, index.center)
  assert loaded.captions == captions and loaded.embeddings.dtype == np.float16
  # The tokenized captions travel with the index; an index written before they did (session 16's
  # kept document frequencies instead) is tokenized on first use. All score as the index they came from.
  assert loaded.tokenized == metrics.tokenize_captions(c for texts in captions for c in texts)
  with open(tmp_path / "old.npz", "wb") as f:
    np.savez_compressed(f, embeddings=index.embeddings, center=index.center, captions=np.frombuffer(
        json.dumps(captions).encode("utf-8"), np.uint8), grams_1=np.frombuffer(b"a", np.uint8),
        counts_1=np.ones(1, np.uint32))
  old = consensus.ConsensusIndex.load(tmp_path / "old.npz")
  assert old.tokenized is None
  queries = rng.normal(size=(3, pooled.shape[1])) + 3.0
  candidates = [[" ".join(rng.choice(WORDS, size=6)) for _ in range(3)] for _ in range(3)]
  expected = index.consensus(queries, candidates, neighbours=5)
  assert expected.max() > 0
  np.testing.assert_allclose(loaded.consensus(queries, candidates, neighbours=5), expected,
                             rtol=1e-12)
  np.testing.assert_allclose(old.consensus(queries, candidates, neighbours=5), expected, rtol=1e-12)
  with open(tmp_path / "short.npz", "wb") as f:
    np.savez_compressed(f, embeddings=index.embeddings, center=index.center, captions=np.frombuffer(
        json.dumps(captions).encode("utf-8"), np.uint8), tokenized=np.frombuffer(b"a dog", np.uint8))
  with pytest.raises(errors.CheckpointError, match=r"short.npz: .*1 tokenized captions for \d+ captions"):
    consensus.ConsensusIndex.load(tmp_path / "short.npz")
  whole = (tmp_path / "index.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(whole[:len(whole) // 2])  # a copy cut short
  corrupt = bytearray(whole)
  corrupt[len(whole) // 3:len(whole) // 3 + 64] = bytes(64)  # zeros in the compressed stream
  (tmp_path / "corrupt.npz").write_bytes(bytes(corrupt))
  for name in ("cut.npz", "corrupt.npz"):
    with pytest.raises(errors.CheckpointError, match=f"{name}: not a consensus index"):
      consensus.ConsensusIndex.load(tmp_path / name)

  def saved(name, **fields):
    stored = {"embeddings": index.embeddings, "center": index.center, "captions": captions, **fields}
    stored["captions"] = np.frombuffer(json.dumps(stored["captions"]).encode("utf-8"), np.uint8)
    with open(tmp_path / name, "wb") as f:
      np.savez_compressed(f, **stored)
    return tmp_path / name

  nan = index.embeddings.copy()
  nan[0, 0] = np.nan
  for path, message in ((saved("nan.npz", embeddings=nan), "NaN or infinity"),
                        (saved("scalar.npz", center=np.float32(1)), r"not float \[images, channels\]"),
                        (saved("text.npz", embeddings=index.embeddings.astype(str)), "not float"),
                        (saved("flat.npz", captions=[c[0] for c in captions]), "non-empty lists"),
                        (saved("none.npz", captions=[[]] + captions[1:]), "non-empty lists")):
    with pytest.raises(errors.CheckpointError, match=f"{path.name}: not a usable consensus index: "
                       f".*{message}"):
      consensus.ConsensusIndex.load(path)
  (tmp_path / "bad.npz").write_bytes(b"not an npz")
  with pytest.raises(errors.CheckpointError, match="bad.npz: not a consensus index"):
    consensus.ConsensusIndex.load(tmp_path / "bad.npz")
  with pytest.raises(errors.DataError, match="40 images"):
    consensus.ConsensusIndex.build(pooled[:-1], captions)
  with pytest.raises(errors.ConfigError, match="16-channel embeddings, the encoder gives 3"):
    index.neighbours(np.ones((1, 3)), 2)
  with pytest.raises(errors.ConfigError, match="at least one neighbour, not -1"):
    index.rerank(pooled[:1], [["a dog"]], neighbours=-1)


@pytest.fixture(scope="module")
def indexed_model(tiny_checkpoint, shapes_root, tmp_path_factory):
  """The tiny run exported with a consensus index of its training images, one of them corrupt."""
  data = tmp_path_factory.mktemp("consensus") / "data"
  shutil.copytree(shapes_root, data)
  train_names = (data / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text().split()
  (data / "Flicker8k_Dataset" / train_names[0]).write_bytes(b"corrupt")
  model = checkpoints.export(tiny_checkpoint, data.parent / "model")
  consensus.write_index(model, data, batch_size=8)
  return inference.Captioner.load(model), data, train_names


def _pooled_features(captioner, paths):
  """[images, channels]: the mean of the captioner's encoder grid, computed here."""
  from flaxcap import images as images_lib  # pylint: disable=g-import-not-at-top
  images = np.stack([images_lib.load_image(p, image_size=captioner.config.image_size) for p in paths])
  grid = jax.jit(captioner.encoder.apply)(captioner.encoder_variables, images)
  return np.asarray(grid, np.float64).mean(axis=(1, 2))


def test_write_index_holds_the_encoders_mean_features_of_the_readable_training_images(indexed_model):
  captioner, data, train_names = indexed_model
  index = captioner.consensus_index
  assert index is not None and len(index.captions) == len(train_names) - 1  # the corrupt one left out
  tokens = {}
  for line in (data / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines():
    name, caption = line.split("\t")
    tokens.setdefault(name.split("#")[0], []).append(caption)
  assert index.captions == [tokens[name] for name in train_names[1:]]
  pooled = _pooled_features(captioner, [data / "Flicker8k_Dataset" / n for n in train_names[1:]])
  expected = pooled - pooled.mean(0)
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(index.embeddings, expected, atol=2e-3)


def test_captioner_keeps_the_consensus_choice_of_its_beam(indexed_model, shapes_root, tiny_checkpoint):
  captioner = indexed_model[0]
  paths = sorted(str(p) for p in (shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[:6]
  plain = list(captioner.caption(paths, beam_size=4, batch_size=4, consensus_neighbours=0))
  pooled = _pooled_features(captioner, paths)
  texts = [[text for text, _ in r.alternatives] for r in plain]
  beam_scores = np.array([[score for _, score in r.alternatives] for r in plain])
  # No options: a model with an index reranks over `consensus.NEIGHBOURS` neighbours.
  for neighbours, weight in [(3, None), (3, 0.0), (3, 0.5), (None, None)]:
    options = {} if weight is None else {"consensus_beam_weight": weight}
    if neighbours is not None:
      options["consensus_neighbours"] = neighbours
    reranked = list(captioner.caption(paths, beam_size=4, batch_size=4, **options))
    agreement = captioner.consensus_index.consensus(pooled, texts, neighbours or consensus.NEIGHBOURS)
    totals = agreement + (consensus.BEAM_SCORE_WEIGHT if weight is None else weight) * beam_scores
    assert np.argmax(totals, axis=1).any(), (neighbours, weight)  # some image's choice is not the beam's
    for before, after, row_totals in zip(plain, reranked, totals):
      assert before.beam_index == 0 and after.alternatives == before.alternatives
      assert after.beam_index == int(np.argmax(row_totals))
      assert (after.text, after.score) == after.alternatives[after.beam_index]
      assert len(after.words) == len(after.tokens) == len(after.attention)
  without_index = inference.Captioner.load(tiny_checkpoint)
  assert [r.beam_index for r in without_index.caption(paths, beam_size=4, batch_size=4)] == [0] * 6
  with pytest.raises(errors.ConfigError, match="no consensus index"):
    next(without_index.caption(paths[:1], consensus_neighbours=3))


def test_export_and_infer_command_lines_rerank_with_the_index(tiny_checkpoint, shapes_root, tmp_path):
  env = cli_env.cli_env()
  model = tmp_path / "model"
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "export.py"), f"--checkpoint={tiny_checkpoint}",
       f"--out={model}", f"--consensus_data={shapes_root}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  paths = sorted(str(p) for p in (shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[:3]
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "infer.py"), f"--checkpoint={model}", "--json", "--beam_size=4",
       "--consensus=3", "--consensus_beam_weight=0.2", "--batch_size=4"] + [f"--image={p}" for p in paths],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  printed = [json.loads(line)["caption"] for line in result.stdout.splitlines()]
  captioner = inference.Captioner.load(model)
  assert len(captioner.consensus_index.captions) == len(
      (shapes_root / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text().split())
  expected = captioner.caption(paths, beam_size=4, batch_size=4, consensus_neighbours=3,
                               consensus_beam_weight=0.2)
  assert printed == [r.text for r in expected]
