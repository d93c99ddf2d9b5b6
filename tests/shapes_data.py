"""A tiny synthetic captioning set the tests write themselves: coloured shapes at named positions."""

import itertools
import pathlib

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("square", "circle")
SIDES = ("left", "right")


def draw(colour: str, shape: str, side: str, size: int = 64) -> Image.Image:
  image = Image.new("RGB", (size, size), (245, 245, 245))
  pen = ImageDraw.Draw(image)
  left = 4 if side == "left" else size // 2 + 4
  box = (left, size // 4, left + size // 2 - 8, size // 4 + size // 2 - 8)
  (pen.rectangle if shape == "square" else pen.ellipse)(box, fill=COLOURS[colour])
  return image


def write_flickr8k_layout(root: pathlib.Path, *, size: int = 64, num_images: int = 16) -> dict[str, str]:
  """Writes `num_images` shape images in the original Flickr8k layout, train and dev both listing
  every image; returns {image file name: its caption}."""
  images_dir = root / "Flicker8k_Dataset"
  text_dir = root / "Flickr8k_text"
  images_dir.mkdir(parents=True)
  text_dir.mkdir()
  combos = list(itertools.product(COLOURS, SHAPES, SIDES))[:num_images]
  captions = {}
  token_lines = []
  for index, (colour, shape, side) in enumerate(combos):
    name = f"{index:04d}_shape.jpg"
    draw(colour, shape, side, size).save(images_dir / name, quality=95)
    captions[name] = f"a {colour} {shape} on the {side}"
    token_lines += [f"{name}#{k}\t{captions[name].capitalize()} ." for k in range(5)]
  (text_dir / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
  names = "\n".join(captions) + "\n"
  (text_dir / "Flickr_8k.trainImages.txt").write_text(names)
  (text_dir / "Flickr_8k.devImages.txt").write_text(names)
  return captions


def tiny_config(data_root=None, **overrides):
  """configs/tiny.py's config, reading `data_root` (when given), with fields overridden by name:
  `tiny_config(root, batch_size=4, eval__patience=0)` sets config.batch_size and config.eval.patience."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  if data_root is not None:
    config.data.root = str(data_root)
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split("__")
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config
