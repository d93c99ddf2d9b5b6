"""The model shipped in models/flickr8k loads with no arguments and captions real photos sensibly."""

import pathlib

import pytest

from flaxcap import inference

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "docs" / "examples"
# Each photo's caption must name at least one of these (the photos are scikit-image's, not Flickr8k's).
EXPECTED_WORDS = {
    "coffee.jpg": {"cup", "coffee", "mug", "drink", "table", "food", "plate"},
    "astronaut.jpg": {"woman", "man", "person", "girl", "boy", "people", "lady", "flag"},
}


@pytest.fixture(scope="module")
def shipped():
  if not (inference.default_checkpoint() / "params.msgpack").exists():
    pytest.fail(f"{inference.default_checkpoint()}: the shipped model is missing")
  return inference.Captioner.load()


@pytest.mark.parametrize("name", sorted(EXPECTED_WORDS))
def test_shipped_model_names_what_is_in_the_photo(shipped, name):
  (result,) = shipped.caption([str(EXAMPLES / name)], beam_size=3)
  assert isinstance(result, inference.Caption), result
  assert set(result.text.split()) & EXPECTED_WORDS[name], result.text
