"""A local web demo: `python app.py [--checkpoint DIR] [--port 8000]`, then open http://127.0.0.1:8000.

Upload or drop a photo, choose the beam size, and see the caption, every beam's sentence with its
score, and where the model looked for each word (a slider over the words and a grid of overlays).

  GET  /              the page: one HTML file, no external scripts, styles or fonts
  GET  /api/info      the model (checkpoint, encoder, image size, vocabulary) and the upload limit
  POST /api/caption?beam_size=3&name=photo.jpg
                      body: the image file's bytes; answers JSON with the caption, the alternatives
                      and one JPEG data URL per word's attention overlay, or {"error": one line}
                      (400 for a file that is not a readable image, 413 for one over 20 MB)

    curl --data-binary @photo.jpg 'http://127.0.0.1:8000/api/caption?beam_size=3&name=photo.jpg'

The model loads once. Photos are captioned one at a time (batch shape 1), so each beam size compiles
once: the default at start-up, others on their first request. Decoding, captioning and drawing run in
worker threads, several requests at once; the only lock is held by the first request of a beam size
while it compiles, so that concurrent requests of that size wait for it instead of compiling again.
"""

import argparse
import base64
import functools
import os
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import logging  # noqa: E402
import anyio  # noqa: E402
import anyio.to_thread  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import HTMLResponse, JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from flaxcap import errors  # noqa: E402
from flaxcap import images as images_lib  # noqa: E402
from flaxcap import visualize  # noqa: E402

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

  async def page(request: Request) -> Response:
    del request
    return HTMLResponse(PAGE)

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


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="app.py", description="A local web demo: caption a photo, see where each word looked.")
  parser.add_argument("--checkpoint", default=None,
                      help="model directory: a training workdir or exported model "
                      "(default: the model shipped in models/flickr8k)")
  parser.add_argument("--port", type=int, default=8000,
                      help="port to serve on at 127.0.0.1, this machine only (default 8000)")
  parser.add_argument("--beam_size", type=int, default=DEFAULT_BEAM_SIZE,
                      choices=range(1, MAX_BEAM_SIZE + 1), metavar=f"1..{MAX_BEAM_SIZE}",
                      help=f"beam size compiled at start-up (default {DEFAULT_BEAM_SIZE})")
  parser.add_argument("--xla_cache", default=None,
                      help="where compiled programs are kept for the next start (default: "
                      "~/.cache/flaxcap/xla, or $JAX_COMPILATION_CACHE_DIR; 'none': off)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from flaxcap import compilation_cache, inference  # pylint: disable=g-import-not-at-top
  import uvicorn  # pylint: disable=g-import-not-at-top
  compilation_cache.enable(args.xla_cache)
  try:
    captioner = inference.Captioner.load(args.checkpoint)
  except errors.FlaxcapError as e:
    print(f"app.py: error: {e}", file=sys.stderr)
    return 2
  logging.set_verbosity(logging.INFO)
  service = CaptionService(
      captioner, checkpoint=str(args.checkpoint or inference.default_checkpoint()))
  logging.info("compiled beam size %d in %.1f s", args.beam_size, service.warm_up(args.beam_size))
  uvicorn.run(create_app(service), host="127.0.0.1", port=args.port, log_level="info")
  return 0


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>flaxcap: caption a photo</title>
<link rel="icon" href="data:,">
<style>
  [hidden] { display: none !important; }
  :root { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2430;
          background: #f4f5f7; }
  body { margin: 0 auto; max-width: 1180px; padding: 16px 24px; }
  h1 { font-size: 1.3rem; margin: 0 0 2px; }
  #model { color: #667; font-size: .85rem; margin-bottom: 12px; }
  #controls { display: flex; gap: 16px; align-items: stretch; }
  #drop { flex: 1; position: relative; border: 2px dashed #9aa3b2; border-radius: 10px;
          background: #fff; padding: 18px; text-align: center; color: #445; cursor: pointer; }
  #drop.over { border-color: #2f6fde; background: #eef4ff; }
  #file { position: absolute; inset: 0; width: 100%; height: 100%; opacity: 0; cursor: pointer; }
  #beam-box { background: #fff; border-radius: 10px; padding: 12px 16px; display: flex;
              flex-direction: column; justify-content: center; gap: 6px; font-size: .9rem; }
  #beam { font-size: 1rem; padding: 2px 6px; }
  #status { min-height: 1.4em; margin: 10px 0 4px; color: #445; font-size: .9rem; }
  #error { background: #fde8e8; border: 1px solid #e0a0a0; color: #8a1c1c; border-radius: 8px;
           padding: 10px 14px; margin: 8px 0; white-space: pre-wrap; }
  #result { display: grid; grid-template-columns: 400px 1fr; gap: 22px; margin-top: 6px; }
  #focus { width: 384px; max-width: 100%; border-radius: 8px; display: block; background: #ddd; }
  #slider-row { display: flex; gap: 10px; align-items: center; margin-top: 8px; }
  #word-slider { flex: 1; }
  #focus-word { min-width: 7em; font-weight: 600; }
  #caption { font-size: 1.55rem; margin: 0 0 4px; line-height: 1.3; }
  #score { color: #667; font-size: .85rem; margin-bottom: 14px; }
  h3 { font-size: .95rem; margin: 12px 0 6px; color: #334; }
  #alternatives { margin: 0; padding-left: 1.4em; }
  #alternatives li { margin: 3px 0; }
  #alternatives li.kept { font-weight: 600; }
  #alternatives .score { color: #778; font-variant-numeric: tabular-nums; margin-left: .6em; }
  #attention-grid { display: flex; flex-wrap: wrap; gap: 8px; }
  #attention-grid figure { margin: 0; width: 118px; cursor: pointer; border-radius: 6px; padding: 3px;
                           border: 2px solid transparent; background: #fff; }
  #attention-grid figure.selected { border-color: #2f6fde; }
  #attention-grid img { width: 112px; display: block; border-radius: 4px; }
  #attention-grid figcaption { text-align: center; font-size: .85rem; padding-top: 2px;
                               overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
</style>
</head>
<body>
<h1>flaxcap: caption a photo</h1>
<div id="model">loading the model's description…</div>
<div id="controls">
  <label id="drop"><input id="file" type="file" accept="image/*">
    <strong>Drop a photo here</strong> or click to choose one
    <div id="limit" style="font-size:.8rem;color:#778;margin-top:4px"></div></label>
  <div id="beam-box"><label for="beam">Beam size</label>
    <select id="beam"><option>1</option><option>2</option><option selected>3</option>
      <option>4</option><option>5</option></select></div>
</div>
<div id="status" aria-live="polite"></div>
<div id="error" role="alert" hidden></div>
<section id="result" hidden>
  <div>
    <img id="focus" alt="the photo with the selected word's attention">
    <div id="slider-row"><input id="word-slider" type="range" min="0" max="0" value="0"
      aria-label="word"><span id="focus-word"></span></div>
  </div>
  <div>
    <h2 id="caption"></h2>
    <div id="score"></div>
    <h3>Every beam, best first (log-probability, length penalty applied if set)</h3>
    <ol id="alternatives"></ol>
    <h3>Where it looked for each word</h3>
    <div id="attention-grid"></div>
  </div>
</section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let maxBytes = 20 * 1024 * 1024, currentFile = null, latest = 0, shown = null;
const megabytes = (n) => (n / (1024 * 1024)).toFixed(n % (1024 * 1024) ? 1 : 0) + " MB";

fetch("/api/info").then((r) => r.json()).then((info) => {
  maxBytes = info.max_upload_bytes;
  $("model").textContent = `model: ${info.checkpoint} · encoder ${info.encoder} · ` +
      `${info.image_size} px · ${info.vocab_size} words`;
  $("limit").textContent = `JPEG, PNG, GIF, BMP, WebP or TIFF, up to ${megabytes(maxBytes)}`;
}).catch(() => { $("model").textContent = "the server does not answer"; });

function showError(message) {
  $("status").textContent = "";
  $("result").hidden = true;
  $("error").textContent = message;
  $("error").hidden = false;
}

function select(index) {
  const figures = $("attention-grid").children;
  $("word-slider").value = index;
  $("focus").src = shown.attention[index];
  $("focus-word").textContent = `${shown.words[index]}  (${index + 1}/${shown.words.length})`;
  for (let i = 0; i < figures.length; i++) figures[i].classList.toggle("selected", i === index);
}

function render(result) {
  shown = result;
  $("caption").textContent = result.caption || "(empty caption)";
  $("score").textContent = `${result.name} · beam size ${result.beam_size} · ` +
      `score ${result.score.toFixed(3)} · ${result.seconds.toFixed(2)} s`;
  const list = $("alternatives");
  list.replaceChildren();
  for (const [index, alternative] of result.alternatives.entries()) {
    const item = document.createElement("li");
    item.classList.toggle("kept", index === result.kept);
    const text = document.createElement("span");
    text.textContent = alternative.text || "(empty)";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = alternative.score.toFixed(3);
    item.append(text, score);
    list.append(item);
  }
  const grid = $("attention-grid");
  grid.replaceChildren();
  result.words.forEach((word, index) => {
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.className = "attention";
    image.alt = `attention for "${word}"`;
    image.src = result.attention[index];
    const label = document.createElement("figcaption");
    label.textContent = word;
    figure.append(image, label);
    figure.addEventListener("click", () => select(index));
    grid.append(figure);
  });
  $("word-slider").max = Math.max(0, result.words.length - 1);
  $("error").hidden = true;
  $("status").textContent = "";
  $("result").hidden = false;
  if (result.words.length) select(0); else $("focus").src = result.photo;
}

async function captionFile(file) {
  currentFile = file;
  const request = ++latest;
  if (file.size > maxBytes) {
    showError(`${file.name}: ${megabytes(file.size)} is over the ${megabytes(maxBytes)} upload ` +
              "limit; choose a smaller photo.");
    return;
  }
  const beam = $("beam").value;
  $("error").hidden = true;
  $("status").textContent = `Captioning ${file.name} with beam size ${beam}…`;
  let response, body = null;
  try {
    response = await fetch(`/api/caption?beam_size=${beam}&name=${encodeURIComponent(file.name)}`,
        {method: "POST", body: file, headers: {"Content-Type": "application/octet-stream"}});
    body = await response.json().catch(() => null);
  } catch (error) {
    if (request === latest) showError(`Could not reach the server (${error}).`);
    return;
  }
  if (request !== latest) return;  // a newer upload or beam size took over
  if (!response.ok || !body || body.error) {
    showError((body && body.error) || `The server answered ${response.status}.`);
    return;
  }
  render(body);
}

$("file").addEventListener("change", (event) => {
  if (event.target.files.length) captionFile(event.target.files[0]);
  event.target.value = "";  // choosing the same file again captions it again
});
$("beam").addEventListener("change", () => { if (currentFile) captionFile(currentFile); });
$("word-slider").addEventListener("input", (event) => select(Number(event.target.value)));
const drop = $("drop");
for (const kind of ["dragenter", "dragover"]) {
  drop.addEventListener(kind, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const kind of ["dragleave", "drop"]) {
  drop.addEventListener(kind, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  if (event.dataTransfer.files.length) captionFile(event.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""


if __name__ == "__main__":
  sys.exit(main())
