"""Takes the web demo's screenshot: `python docs/screenshot_app.py --checkpoint DIR [--out docs/demo.png]`.

Starts `python app.py --checkpoint DIR` on a free loopback port, opens it in headless Chromium
(Debian's `chromium` and `chromium-driver`, driven by selenium), uploads a photo (default:
scikit-image's astronaut), waits for the caption and the attention overlays, moves the word slider to
`--word`, and saves the page. Without --checkpoint it uses the model shipped in models/flickr8k.
"""

import argparse
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _wait_until_serving(process: subprocess.Popen, url: str, timeout_s: float = 600) -> None:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if process.poll() is not None:
      sys.exit(f"screenshot_app.py: app.py exited with code {process.returncode}")
    try:
      with urllib.request.urlopen(url + "/api/info", timeout=5):
        return
    except OSError:
      time.sleep(0.5)
  sys.exit(f"screenshot_app.py: app.py did not answer at {url} within {timeout_s:.0f} s")


def take_screenshot(url: str, photo: pathlib.Path, out: pathlib.Path, word: int,
                    window: tuple[int, int], profile_dir: str) -> str:
  """Uploads `photo` on the page at `url` and saves the page as `out`; returns the caption."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
  for flag in CHROMIUM_FLAGS + (f"--window-size={window[0]},{window[1]}",
                                f"--user-data-dir={profile_dir}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(
      executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver"))
  try:
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: "encoder" in d.find_element(By.ID, "model").text)
    driver.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(driver, 300).until(lambda d: d.execute_script(
        "const images = [...document.querySelectorAll('#attention-grid img.attention')];"
        "return !document.getElementById('result').hidden && images.length > 0 &&"
        " images.every((image) => image.complete && image.naturalWidth > 0);"))
    driver.execute_script("select(Math.min(arguments[0], shown.words.length - 1));", word)
    time.sleep(0.3)  # let the selected overlay paint
    out.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out))
    return driver.find_element(By.ID, "caption").text
  finally:
    driver.quit()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default=None, help="model directory (default: the shipped one)")
  parser.add_argument("--photo", default=None, help="photo to upload (default: skimage's astronaut)")
  parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "demo.png"))
  parser.add_argument("--word", type=int, default=1, help="word shown large (0 = the first)")
  parser.add_argument("--window", default="1280,780", help="browser window WIDTH,HEIGHT")
  args = parser.parse_args()
  if args.photo:
    photo = pathlib.Path(args.photo).resolve()
  else:
    import skimage.data  # pylint: disable=g-import-not-at-top
    photo = pathlib.Path(skimage.data.__file__).parent / "astronaut.png"
  port = _free_port()
  command = [sys.executable, "app.py", "--port", str(port)]
  if args.checkpoint:
    command += ["--checkpoint", args.checkpoint]
  process = subprocess.Popen(command, cwd=REPO_ROOT)
  try:
    url = f"http://127.0.0.1:{port}"
    _wait_until_serving(process, url)
    with tempfile.TemporaryDirectory() as profile_dir:
      width, height = (int(n) for n in args.window.split(","))
      caption = take_screenshot(url, photo, pathlib.Path(args.out), args.word, (width, height),
                                profile_dir)
    print(f"{args.out}: {photo.name} captioned {caption!r}")
  finally:
    process.terminate()
    process.wait(timeout=30)


if __name__ == "__main__":
  main()
