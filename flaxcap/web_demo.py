"""The web demo's server: the page, `/api/info` and `/api/caption` over a loaded `inference.Captioner`.

  GET  /              the page (`web_demo.html`): one HTML file, no external scripts, styles or fonts
  GET  /api/info      the model (checkpoint, encoder, image size, vocabulary) and the upload limit
  POST /api/caption?beam_size=3&name=photo.jpg
                      body: the image file's bytes; answers JSON with the caption, the alternatives
                      and one JPEG data URL per word's attention overlay, or {"error": one line}
                      (400 for a file that is not a readable image, 413 for one over 20 MB)

Photos are captioned one at a time (batch shape 1), so each beam size compiles once: the default at
start-up (`CaptionService.warm_up`), others on their first request. Decoding, captioning and drawing
run in worker threads, several requests at once; the only lock is held by the first request of a beam
size while it compiles, so that concurrent requests of that size wait for it instead of compiling
again. `app.py` is the command line that serves it.
"""

import base64
import functools
import importlib.resources
import threading
import time

from absl import logging
import anyio
import anyio.to_thread
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from flaxcap import errors
from flaxcap import images as images_lib
from flaxcap import visualize

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # "20 MB"
DRAINED_BYTES = 4 * MAX_UPLOAD_BYTES  # larger uploads are cut off unread (see `caption` below)
MAX_BEAM_SIZE = 8  # each beam size compiles once; the page offers 1..5
DEFAULT_BEAM_SIZE = 3
DISPLAY_SIZE = 384  # longest side, in pixels, of the photo and the overlays sent to the page
CONCURRENT_CAPTIONS = 8  # requests decoded, captioned and drawn at once; more wait for a worker


def _megabytes(size: int) -> str:
  megabytes = size / (1024 * 1024)
  return f"{megabytes:.0f} MB" if megabytes.is_integer() else f"{megabytes:.1f} MB"


def _data_url(image: np.ndarray) -> str:
  jpeg = visualize.encode_image(image, image_format="JPEG", quality=88)
  return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _fit(image: np.ndarray, longest_side: int) -> np.ndarray:
  """uint8 [height, width, 3] scaled so its longest side is `longest_side` (aspect ratio kept)."""
  height, width = image.shape[:2]
  scale = longest_side / max(height, width)
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), np.uint8)


class CaptionService:
  """The loaded model behind the page; thread-safe, one photo per call."""

  def __init__(self, captioner, *, checkpoint: str = ""):
    self.captioner = captioner
    self.checkpoint = checkpoint
    self._compiled_beam_sizes: set[int] = set()
    self._compile_locks: dict[int, threading.Lock] = {}
    self._compile_locks_guard = threading.Lock()

  def info(self) -> dict:
    config = self.captioner.config
    return {"checkpoint": self.checkpoint, "encoder": config.encoder.name,
            "image_size": config.image_size, "vocab_size": len(self.captioner.vocab),
            "max_upload_bytes": MAX_UPLOAD_BYTES, "max_beam_size": MAX_BEAM_SIZE,
            "default_beam_size": DEFAULT_BEAM_SIZE}

  def _compiled_once(self, beam_size: int, run):
    """Calls `run()`; the first call of a beam size holds that size's lock while it compiles."""
    if beam_size in self._compiled_beam_sizes:
      return run()
    with self._compile_locks_guard:
      lock = self._compile_locks.setdefault(beam_size, threading.Lock())
    with lock:
      if beam_size not in self._compiled_beam_sizes:
        result = run()
        self._compiled_beam_sizes.add(beam_size)
        return result
    return run()

  def _caption_photo(self, photo: np.ndarray, beam_size: int):
    """One Caption for uint8 [height, width, 3] (resized to the model's size by the captioner)."""
    return self._compiled_once(beam_size, lambda: next(iter(
        self.captioner.caption([photo], beam_size=beam_size, batch_size=1))))

  def warm_up(self, beam_size: int = DEFAULT_BEAM_SIZE) -> float:
    """Compiles `beam_size` on a blank photo; returns the seconds it took."""
    start = time.perf_counter()
    size = self.captioner.config.image_size
    self._caption_photo(np.zeros((size, size, 3), np.uint8), beam_size)
    return time.perf_counter() - start

  def caption(self, data: bytes, *, name: str, beam_size: int) -> dict:
    """Decodes an uploaded file, captions it and draws each word's attention.

    Returns:
      JSON-ready dict: caption, score, beam_size, alternatives [{text, score}] best first, kept (the
      index of the caption among them: consensus reranking may keep another than the first), words,
      photo (data URL), attention (one data URL per word), seconds.

    Raises:
      errors.ImageError: not a readable image (empty, unknown format, truncated, too many pixels).
    """
    start = time.perf_counter()
    photo = images_lib.decode_image_bytes(data, name=name,
                                          draft_size=self.captioner.config.image_size)
    result = self._caption_photo(photo, beam_size)
    shown = _fit(photo, DISPLAY_SIZE)
    overlays = [_data_url(visualize.blend_attention(shown, word_attention))
                for word_attention in result.attention]
    seconds = time.perf_counter() - start
    logging.info("%s: %r (beam %d, %.2f s)", name, result.text, beam_size, seconds)
    return {"name": name, "caption": result.text, "score": result.score, "beam_size": beam_size,
            "alternatives": [{"text": text, "score": score} for text, score in result.alternatives],
            "kept": result.beam_index,
            "words": list(result.words), "photo": _data_url(shown), "attention": overlays,
            "seconds": seconds}


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


def _upload_name(raw: str | None) -> str:
  name = "".join(c for c in (raw or "upload") if c.isprintable()).strip()[:200]
  return name or "upload"


def _beam_size(raw: str | None) -> int:
  if raw is None:
    return DEFAULT_BEAM_SIZE
  if not (raw.strip().isascii() and raw.strip().isdigit()) or not 1 <= int(raw) <= MAX_BEAM_SIZE:
    raise ValueError(f"beam_size must be a whole number from 1 to {MAX_BEAM_SIZE}, not {raw!r}")
  return int(raw)


def _too_large(name: str, size: int | None) -> JSONResponse:
  size_text = f"{_megabytes(size)} is over" if size else "over"
  return _error(413, f"{name}: {size_text} the {_megabytes(MAX_UPLOAD_BYTES)} upload limit; "
                "choose a smaller photo.")


def create_app(service: CaptionService) -> Starlette:
  """The ASGI app: the page, /api/info and /api/caption over `service`."""
  workers = anyio.CapacityLimiter(CONCURRENT_CAPTIONS)
  html = page_html()

  async def page(request: Request) -> Response:
    del request
    return HTMLResponse(html)

  async def info(request: Request) -> Response:
    del request
    return JSONResponse(service.info())

  async def caption(request: Request) -> Response:
    name = _upload_name(request.query_params.get("name"))
    try:
      beam_size = _beam_size(request.query_params.get("beam_size"))
    except ValueError as e:
      return _error(400, str(e))
    # A body over the limit is still read (and dropped) up to DRAINED_BYTES: a client that is still
    # sending when the connection closes sees a broken pipe instead of the answer.
    declared = request.headers.get("content-length", "")
    declared_size = int(declared) if declared.isdigit() else None
    if declared_size and declared_size > DRAINED_BYTES:
      return _too_large(name, declared_size)
    data, received = bytearray(), 0
    async for chunk in request.stream():
      received += len(chunk)
      if received <= MAX_UPLOAD_BYTES:
        data += chunk
        continue
      data.clear()
      if received > DRAINED_BYTES:
        return _too_large(name, declared_size)
    if received > MAX_UPLOAD_BYTES:
      return _too_large(name, received)
    try:
      result = await anyio.to_thread.run_sync(
          functools.partial(service.caption, bytes(data), name=name, beam_size=beam_size),
          limiter=workers)
    except errors.FlaxcapError as e:
      return _error(400, str(e))
    except Exception as e:  # pylint: disable=broad-except  # a bug: report it, keep serving
      logging.exception("captioning %s failed", name)
      return _error(500, f"{name}: internal error while captioning ({type(e).__name__}: {e})")
    return JSONResponse(result)

  return Starlette(routes=[Route("/", page), Route("/api/info", info),
                           Route("/api/caption", caption, methods=["POST"])])


def page_html() -> str:
  """The page: `web_demo.html`, shipped next to this module."""
  return importlib.resources.files("flaxcap").joinpath("web_demo.html").read_text(encoding="utf-8")
