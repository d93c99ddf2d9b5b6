"""A local web demo: `python app.py [--checkpoint DIR] [--port 8000]`, then open http://127.0.0.1:8000.

Upload or drop a photo, choose the beam size, and see the caption, every beam's sentence with its
score, and where the model looked for each word (a slider over the words and a grid of overlays).

    curl --data-binary @photo.jpg 'http://127.0.0.1:8000/api/caption?beam_size=3&name=photo.jpg'

answers JSON: the caption, the alternatives and one JPEG data URL per word's attention overlay (the
endpoints: `flaxcap/web_demo.py`). The model loads once and the default beam size compiles at
start-up; other sizes compile on their first request.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import logging  # noqa: E402

from flaxcap import errors  # noqa: E402
from flaxcap import web_demo  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="app.py", description="A local web demo: caption a photo, see where each word looked.")
  parser.add_argument("--checkpoint", default=None,
                      help="model directory: a training workdir or exported model "
                      "(default: the model shipped in models/flickr8k)")
  parser.add_argument("--port", type=int, default=8000,
                      help="port to serve on at 127.0.0.1, this machine only (default 8000)")
  parser.add_argument("--beam_size", type=int, default=web_demo.DEFAULT_BEAM_SIZE,
                      choices=range(1, web_demo.MAX_BEAM_SIZE + 1),
                      metavar=f"1..{web_demo.MAX_BEAM_SIZE}",
                      help=f"beam size compiled at start-up (default {web_demo.DEFAULT_BEAM_SIZE})")
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
  service = web_demo.CaptionService(
      captioner, checkpoint=str(args.checkpoint or inference.default_checkpoint()))
  logging.info("compiled beam size %d in %.1f s", args.beam_size, service.warm_up(args.beam_size))
  uvicorn.run(web_demo.create_app(service), host="127.0.0.1", port=args.port, log_level="info")
  return 0


if __name__ == "__main__":
  sys.exit(main())
