"""Tiny image files and dataset layouts written by the tests themselves (good and broken ones)."""

import io
import json
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image

GOOD_KINDS = ("rgb_jpeg", "gray_jpeg", "cmyk_jpeg", "rgba_png", "png16_gray", "png16_rgb", "gif_animated",
              "bmp", "palette_png_transparent")
BROKEN_KINDS = ("truncated_jpeg", "garbled_jpeg", "empty", "text", "bomb_png")


def pixels(seed: int, size=(40, 30)) -> np.ndarray:
  """A smooth random RGB picture, uint8 [height, width, 3] (smooth so JPEG keeps it close)."""
  width, height = size
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, size=(3, 4, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(array: np.ndarray, *, declared_size=None) -> bytes:
  """A PNG written by hand: 8/16-bit gray [h, w] or RGB [h, w, 3] (Pillow cannot write 16-bit RGB)."""
  height, width = array.shape[:2]
  bit_depth = 16 if array.dtype == np.uint16 else 8
  color_type = 2 if array.ndim == 3 else 0
  declared_width, declared_height = declared_size or (width, height)
  header = struct.pack(">IIBBBBB", declared_width, declared_height, bit_depth, color_type, 0, 0, 0)
  rows = array.astype(">u2" if bit_depth == 16 else np.uint8).reshape(height, -1).view(np.uint8)
  raw = b"".join(b"\x00" + row.tobytes() for row in rows)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw)) +
          _png_chunk(b"IEND", b""))


def image_bytes(kind: str, seed: int = 0, size=(40, 30)) -> bytes:
  """Encoded bytes of a test image of `kind` (see GOOD_KINDS and BROKEN_KINDS)."""
  rgb = pixels(seed, size)
  image = Image.fromarray(rgb)
  buffer = io.BytesIO()
  if kind == "rgb_jpeg":
    image.save(buffer, "JPEG", quality=95)
  elif kind == "gray_jpeg":
    image.convert("L").save(buffer, "JPEG", quality=95)
  elif kind == "cmyk_jpeg":
    image.convert("CMYK").save(buffer, "JPEG", quality=95)
  elif kind == "rgba_png":
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, : rgb.shape[1] // 2] = 0  # left half transparent -> white
    Image.fromarray(np.dstack([rgb, alpha])).save(buffer, "PNG")
  elif kind == "png16_gray":
    return png_bytes(rgb[:, :, 0].astype(np.uint16) * 257)
  elif kind == "png16_rgb":
    return png_bytes(rgb.astype(np.uint16) * 257)
  elif kind == "gif_animated":
    frames = [image.quantize(64), Image.fromarray(255 - rgb).quantize(64)]
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
  elif kind == "bmp":
    image.save(buffer, "BMP")
  elif kind == "palette_png_transparent":
    palette_image = image.quantize(16)
    palette_image.info["transparency"] = 0
    palette_image.save(buffer, "PNG", transparency=0)
  elif kind == "truncated_jpeg":  # header intact, scan data cut
    Image.fromarray(pixels(seed, (160, 120))).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3]
  elif kind == "garbled_jpeg":  # JPEG start and end markers around noise
    noise = np.random.default_rng(seed).integers(0, 256, size=600, dtype=np.uint8).tobytes()
    return b"\xff\xd8\xff\xe0" + noise + b"\xff\xd9"
  elif kind == "empty":
    return b""
  elif kind == "text":
    return b"this is not an image, just text in a file named .jpg\n"
  elif kind == "bomb_png":
    return png_bytes(np.zeros((2, 2), np.uint8), declared_size=(20000, 20000))
  else:
    raise ValueError(kind)
  return buffer.getvalue()


def write_image(path: pathlib.Path, kind: str, seed: int = 0, size=(40, 30)) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(image_bytes(kind, seed, size))
  return path


def captions_for(index: int, count: int = 5) -> list[str]:
  animals = ["dog", "cat", "horse", "bird", "child", "man", "woman"]
  return [f"A {animals[(index + k) % len(animals)]} runs on the grass number {k} ." for k in range(count)]


def make_flickr8k(root: pathlib.Path, splits: dict, *, image_kind="rgb_jpeg", size=(40, 30)):
  """The original Flickr8k layout. splits: {"train": [names], "dev": [...], ...} (None = no file)."""
  images_dir = root / "Flicker8k_Dataset"
  text_dir = root / "Flickr8k_text"
  text_dir.mkdir(parents=True, exist_ok=True)
  lines = []
  index = 0
  for split, names in splits.items():
    for name in names or []:
      write_image(images_dir / name, image_kind, seed=index, size=size)
      lines += [f"{name}#{k}\t{caption}" for k, caption in enumerate(captions_for(index))]
      index += 1
    if names is not None:
      (text_dir / f"Flickr_8k.{split}Images.txt").write_text("".join(f"{n}\n" for n in names))
  (text_dir / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
  return root


def write_kaggle_csv(path: pathlib.Path, rows) -> None:
  """captions.txt with a header; captions with commas are quoted, as in the Kaggle file."""
  out = ["image,caption"]
  for name, caption in rows:
    out.append(f"{name},\"{caption}\"" if "," in caption else f"{name},{caption}")
  path.write_text("\n".join(out) + "\n")


def karpathy_json(entries) -> str:
  """entries: (filename, split, captions[, extra dict])."""
  images = []
  for index, (filename, split, captions, *extra) in enumerate(entries):
    image = {"filename": filename, "split": split, "imgid": index,
             "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions]}
    if extra:
      image.update(extra[0])
    images.append(image)
  return json.dumps({"images": images, "dataset": "flickr8k"})


def coco_json(images, annotations) -> str:
  """images: (id, file_name); annotations: (image_id, caption)."""
  return json.dumps({
      "info": {}, "licenses": [],
      "images": [{"id": i, "file_name": f, "width": 40, "height": 30} for i, f in images],
      "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(annotations)],
  })
