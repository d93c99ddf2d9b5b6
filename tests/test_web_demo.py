"""Tests of flaxcap/web_demo.py and app.py: the handlers over a stand-in model (no browser), the command
line, and the page in headless Chromium."""

import concurrent.futures
import contextlib
import http.client
import json
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import data_fixtures
import ml_collections
import numpy as np
import pytest

from flaxcap import inference
from flaxcap import web_demo

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000")


def _astronaut_png() -> pathlib.Path:
  import skimage.data  # pylint: disable=g-import-not-at-top
  return pathlib.Path(skimage.data.__file__).parent / "astronaut.png"


def _have_selenium() -> bool:
  try:
    import selenium  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError:
    return False
  return True


class StandInCaptioner:
  """What `web_demo.CaptionService` uses of `inference.Captioner`: fixed words, random attention."""

  WORDS = ["a", "square", "<eos>"]

  def __init__(self):
    self.config = ml_collections.ConfigDict({"image_size": 32, "encoder": {"name": "stand_in"}})
    self.vocab = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "square"]
    self.calls = []  # (image shape, beam size, batch size) per captioned image
    self.before_caption = None  # called with the beam size inside each caption, from a worker

  def caption(self, images_or_paths, *, beam_size=3, max_len=None, length_penalty=None,
              batch_size=16):
    del max_len, length_penalty
    for image in images_or_paths:
      self.calls.append((np.asarray(image).shape, beam_size, batch_size))
      if self.before_caption:
        self.before_caption(beam_size)
      attention = np.random.default_rng(len(self.calls)).random((3, 2, 2)).astype(np.float32)
      alternatives = [("a square", -0.25), ("a a square", -1.5), ("square", -2.0), ("a", -3.0)]
      yield inference.Caption(text="a square", score=-0.25, tokens=np.array([4, 5, 2], np.int32),
                              words=list(self.WORDS), attention=attention,
                              alternatives=alternatives[:beam_size])


@contextlib.contextmanager
def _serving(asgi_app):
  """Serves `asgi_app` with uvicorn in a thread on a free loopback port; yields its base URL."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(asgi_app, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
    time.sleep(0.02)
  try:
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(timeout=10)
    listener.close()


def _post(url: str, data: bytes) -> tuple[int, dict]:
  request = urllib.request.Request(url, data=data, method="POST",
                                   headers={"Content-Type": "application/octet-stream"})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.load(response)
  except urllib.error.HTTPError as e:
    return e.code, json.load(e)


def _get(url: str) -> tuple[int, bytes]:
  with urllib.request.urlopen(url, timeout=30) as response:
    return response.status, response.read()


@pytest.fixture
def stand_in():
  captioner = StandInCaptioner()
  service = web_demo.CaptionService(captioner, checkpoint="stand-in")
  with _serving(web_demo.create_app(service)) as url:
    yield captioner, url


def test_page_and_info_are_served(stand_in):
  _, url = stand_in
  status, page = _get(url + "/")
  assert status == 200
  assert b'id="file"' in page and b'id="beam"' in page
  assert b"http://" not in page and b"https://" not in page  # nothing fetched from elsewhere
  status, info = _get(url + "/api/info")
  info = json.loads(info)
  assert info["encoder"] == "stand_in" and info["image_size"] == 32 and info["vocab_size"] == 6
  assert info["max_upload_bytes"] == 20 * 1024 * 1024


def test_caption_returns_caption_alternatives_and_one_overlay_per_word(stand_in):
  captioner, url = stand_in
  photo = data_fixtures.image_bytes("rgb_jpeg", size=(90, 60))
  status, body = _post(url + "/api/caption?beam_size=2&name=photo.jpg", photo)
  assert status == 200, body
  assert body["caption"] == "a square" and body["beam_size"] == 2
  assert body["alternatives"] == [{"text": "a square", "score": -0.25},
                                  {"text": "a a square", "score": -1.5}]
  assert body["kept"] == 0
  assert body["words"] == StandInCaptioner.WORDS
  assert len(body["attention"]) == len(StandInCaptioner.WORDS)
  assert all(u.startswith("data:image/jpeg;base64,") for u in body["attention"] + [body["photo"]])
  # The whole decoded photo goes to the captioner (which resizes it), one image per batch.
  assert captioner.calls[-1] == ((60, 90, 3), 2, 1)


@pytest.mark.parametrize("kind, expected", [
    ("text", "notes.txt: not an image"),
    ("empty", "notes.txt: empty file"),
    ("truncated_jpeg", "notes.txt: truncated or corrupt"),
    ("bomb_png", "decompression bomb"),
])
def test_bad_uploads_get_one_line_and_the_server_keeps_serving(stand_in, kind, expected):
  captioner, url = stand_in
  status, body = _post(url + "/api/caption?name=notes.txt", data_fixtures.image_bytes(kind))
  assert status == 400
  assert expected in body["error"] and "\n" not in body["error"]
  assert not captioner.calls
  status, body = _post(url + "/api/caption?name=ok.png", data_fixtures.image_bytes("rgba_png"))
  assert status == 200 and body["caption"] == "a square"


@pytest.mark.parametrize("beam_size", ["0", "9", "three", "-1", "%C2%B2"])  # the last: a superscript 2
def test_bad_beam_size_is_refused(stand_in, beam_size):
  _, url = stand_in
  status, body = _post(url + f"/api/caption?beam_size={beam_size}",
                       data_fixtures.image_bytes("rgb_jpeg"))
  assert status == 400 and "beam_size must be a whole number from 1 to 8" in body["error"]


def test_upload_over_the_size_limit_is_refused_with_its_size(stand_in):
  captioner, url = stand_in
  too_big = b"\xff\xd8" + bytes(25 * 1024 * 1024)
  status, body = _post(url + "/api/caption?name=huge.jpg", too_big)
  assert status == 413
  assert body["error"] == ("huge.jpg: 25.0 MB is over the 20 MB upload limit; "
                           "choose a smaller photo.")
  assert not captioner.calls
  status, _ = _post(url + "/api/caption?name=ok.jpg", data_fixtures.image_bytes("rgb_jpeg"))
  assert status == 200


def test_chunked_upload_is_cut_off_at_the_size_limit(stand_in):
  captioner, url = stand_in
  host, port = url.removeprefix("http://").split(":")
  chunks = (bytes(1024 * 1024) for _ in range(25))  # 25 MB with no Content-Length
  connection = http.client.HTTPConnection(host, int(port), timeout=60)
  try:
    connection.request("POST", "/api/caption?name=stream.jpg", body=chunks, encode_chunked=True)
    response = connection.getresponse()
    status, body = response.status, json.load(response)
  finally:
    connection.close()
  assert status == 413
  assert body["error"] == ("stream.jpg: 25 MB is over the 20 MB upload limit; "
                           "choose a smaller photo.")
  assert not captioner.calls


def test_concurrent_requests_are_captioned_at_the_same_time(stand_in):
  captioner, url = stand_in
  photo = data_fixtures.image_bytes("rgb_jpeg")
  assert _post(url + "/api/caption", photo)[0] == 200  # compiles beam size 3 first
  both_inside = threading.Barrier(2, timeout=30)  # breaks (500s) if requests were serialized
  captioner.before_caption = lambda beam_size: both_inside.wait()
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda _: _post(url + "/api/caption", photo), range(2)))
  assert [status for status, _ in results] == [200, 200], results


def test_first_request_of_a_beam_size_compiles_alone_without_blocking_other_sizes(stand_in):
  captioner, url = stand_in
  photo = data_fixtures.image_bytes("rgb_jpeg")
  assert _post(url + "/api/caption?beam_size=3", photo)[0] == 200
  compiling = threading.Event()
  release = threading.Event()

  def hold_first_beam_4(beam_size):
    if beam_size == 4 and not compiling.is_set():
      compiling.set()
      assert release.wait(timeout=30)

  captioner.before_caption = hold_first_beam_4
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    first = pool.submit(_post, url + "/api/caption?beam_size=4", photo)
    assert compiling.wait(timeout=30)
    second = pool.submit(_post, url + "/api/caption?beam_size=4", photo)
    # Beam size 3 is compiled already: it is served while beam size 4 is still compiling.
    assert _post(url + "/api/caption?beam_size=3", photo)[0] == 200
    assert [beam for _, beam, _ in captioner.calls].count(4) == 1  # the second one waits
    release.set()
    assert first.result()[0] == 200 and second.result()[0] == 200
  assert [beam for _, beam, _ in captioner.calls].count(4) == 2


def test_missing_checkpoint_is_one_line_on_stderr(tmp_path):
  missing = tmp_path / "no_such_run"
  result = subprocess.run([sys.executable, "app.py", "--checkpoint", str(missing)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"app.py: error: {missing}: checkpoint directory does not exist"]


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


@pytest.fixture
def app_process(tiny_checkpoint, tmp_path):
  """`python app.py --checkpoint <tiny run>` on a free port; yields its URL once it answers."""
  port = _free_port()
  log_path = tmp_path / "app.log"
  with open(log_path, "w") as log:
    process = subprocess.Popen(
        [sys.executable, "app.py", "--checkpoint", str(tiny_checkpoint), "--port", str(port)],
        cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 300
    while True:
      assert process.poll() is None, f"app.py exited:\n{log_path.read_text()[-3000:]}"
      assert time.monotonic() < deadline, f"app.py never answered:\n{log_path.read_text()[-3000:]}"
      try:
        if _get(url + "/api/info")[0] == 200:
          break
      except OSError:
        time.sleep(0.5)
    yield url
  finally:
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def browser(tmp_path):
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path / 'chromium_profile'}",):
    options.add_argument(flag)
  driver = webdriver.Chrome(options=options,
                            service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
  try:
    yield driver
  finally:
    driver.quit()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER and _have_selenium()),
                    reason="needs Debian's chromium and chromium-driver and selenium "
                    "(apt-get install chromium chromium-driver; pip install selenium)")
def test_page_in_headless_chromium(app_process, browser, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.keys import Keys  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top

  def by_id(name):
    return browser.find_element(By.ID, name)

  def upload(path):
    by_id("file").send_keys(str(path))

  def caption_shown(driver):
    return driver.execute_script(
        "const images = [...document.querySelectorAll('#attention-grid img.attention')];"
        "return !document.getElementById('result').hidden && images.length > 0 &&"
        " images.every((image) => image.complete && image.naturalWidth > 0) &&"
        " document.getElementById('focus').naturalWidth > 0;")

  browser.get(app_process)
  WebDriverWait(browser, 30).until(lambda d: "encoder" in by_id("model").text)
  upload(_astronaut_png())
  WebDriverWait(browser, 120).until(caption_shown)
  words = browser.execute_script("return shown.words;")
  assert by_id("caption").text  # the tiny model's words, or "(empty caption)"
  assert len(browser.find_elements(By.CSS_SELECTOR, "#attention-grid img.attention")) == len(words)
  assert len(browser.find_elements(By.CSS_SELECTOR, "#alternatives li")) == 3  # beam size 3
  kept = browser.find_elements(By.CSS_SELECTOR, "#alternatives li.kept")
  assert len(kept) == 1 and kept[0].text.startswith(by_id("caption").text)
  by_id("word-slider").send_keys(Keys.END)  # the slider shows the last word's attention
  assert by_id("focus-word").text.endswith(f"({len(words)}/{len(words)})")
  assert by_id("focus").get_attribute("src") == browser.execute_script(
      "return shown.attention[shown.attention.length - 1];")
  browser.save_screenshot(str(tmp_path / "demo.png"))

  notes = tmp_path / "notes.txt"
  notes.write_text("a shopping list, not a photo\n")
  upload(notes)
  WebDriverWait(browser, 60).until(lambda d: by_id("error").is_displayed())
  assert "notes.txt: not an image" in by_id("error").text
  assert not by_id("result").is_displayed()

  huge = tmp_path / "huge.jpg"
  with open(huge, "wb") as f:
    f.truncate(21 * 1024 * 1024)
  upload(huge)
  WebDriverWait(browser, 30).until(
      lambda d: "huge.jpg: 21 MB is over the 20 MB upload limit" in by_id("error").text)

  assert _get(app_process + "/api/info")[0] == 200  # still serving
  upload(_astronaut_png())
  WebDriverWait(browser, 60).until(caption_shown)
  assert not by_id("error").is_displayed()


@pytest.mark.parametrize("height, width, longest, expected", [
    (30, 60, 120, (60, 120)), (90, 30, 45, (45, 15)), (50, 50, 20, (20, 20))])
def test_fit_scales_the_longest_side_and_keeps_the_aspect_ratio(height, width, longest, expected):
  photo = np.zeros((height, width, 3), np.uint8)
  photo[:, : width // 2] = 255  # left half white: still the left half after scaling
  fitted = web_demo._fit(photo, longest)  # pylint: disable=protected-access
  assert fitted.shape == expected + (3,) and fitted.dtype == np.uint8
  assert fitted[:, : expected[1] // 2 - 1].min() > 200 and fitted[:, expected[1] // 2 + 1:].max() < 50


def test_beam_size_range_includes_its_maximum():
  assert web_demo._beam_size(str(web_demo.MAX_BEAM_SIZE)) == web_demo.MAX_BEAM_SIZE  # pylint: disable=protected-access
  assert web_demo._beam_size("1") == 1  # pylint: disable=protected-access
  for bad in ("0", str(web_demo.MAX_BEAM_SIZE + 1)):
    with pytest.raises(ValueError, match="beam_size must be a whole number"):
      web_demo._beam_size(bad)  # pylint: disable=protected-access
