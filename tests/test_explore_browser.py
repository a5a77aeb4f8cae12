"""The explorer page in a real headless Chromium (Debian's `chromium`; skipped where it is not
installed): type a source and an edited prompt, run, wait for both images, click a token and see
its map, move the step slider and see x̂₀ change, submit a bad input and see its error; pick a
method and see its parameters as fields, upload a picture for plug-and-play and see the result.
The test keeps a screenshot in its tmp folder (and writes it to $MINIP2P_EXPLORER_SCREENSHOT when set:
that is how weights/toy/figures/explorer.png is made) and prints the measured round trip.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
ending in NUL, read on its fd 3, written on its fd 4): no websocket, no driver, no package."""
import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time

import pytest
import torch

from minip2p.explore.server import make_server
from minip2p.load import load_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe", "--window-size=1000,1200"]


class Chromium:
    """A headless Chromium and one page of it, driven by DevTools protocol commands."""

    def __init__(self, profile):
        to_chrome, self._out = os.pipe()          # we write commands, Chromium reads fd 3
        self._in, from_chrome = os.pipe()         # Chromium writes fd 4, we read

        def fds():
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)
        # Chromium's socket folder (org.chromium.Chromium.*) goes under $TMPDIR: one of ours,
        # short (a socket's path is at most 107 bytes), removed in close()
        self.tmp = tempfile.mkdtemp(prefix="chromium-")
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                                      "about:blank"], pass_fds=(3, 4), preexec_fn=fds,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "TMPDIR": self.tmp})
        os.close(to_chrome)
        os.close(from_chrome)
        self.buffer, self.next_id, self.session = b"", 0, None
        page = next(t for t in self.send("Target.getTargets")["targetInfos"]
                    if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"],
                                 flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=1000, height=1200,
                  deviceScaleFactor=1, mobile=False)

    def send(self, method, timeout=60, **params):
        """Send one command (to the page once attached) and return its result."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        end = time.time() + timeout
        while True:                                          # skip events and other answers
            while b"\0" not in self.buffer:
                if not select.select([self._in], [], [], max(0, end - time.time()))[0]:
                    raise TimeoutError(method)
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise EOFError("chromium closed the pipe")
                self.buffer += chunk
            raw, _, self.buffer = self.buffer.partition(b"\0")
            answer = json.loads(raw)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def js(self, expression):
        """Evaluate in the page (promises awaited) and return the value."""
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            if self.js(expression):
                return
            time.sleep(0.05)
        said = self.js("document.getElementById('status').textContent + ' | ' + "
                       "document.getElementById('error').textContent")
        raise TimeoutError(f"{expression} (the page says: {said})")

    def click(self, selector, at=0.5):
        """A real mouse click at the element's centre (`at`: fraction of its width)."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                      "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                      "return [r.x, r.y, r.width, r.height]; })()")
        x, y = box[0] + box[2] * at, box[1] + box[3] / 2
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      clickCount=1)

    def type(self, selector, text):
        """Replace the field's text as a user typing it would."""
        self.click(selector)
        self.js(f"document.querySelector({json.dumps(selector)}).select()")
        if text:
            self.send("Input.insertText", text=text)
        else:
            for kind in ("rawKeyDown", "keyUp"):
                self.send("Input.dispatchKeyEvent", type=kind, key="Backspace",
                          code="Backspace", windowsVirtualKeyCode=8)

    def screenshot(self, path):
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self._out)
        os.close(self._in)
        shutil.rmtree(self.tmp, ignore_errors=True)


PIXELS = ("(sel) => { const i = document.querySelector(sel), c = document.createElement('canvas');"
          "c.width = i.naturalWidth; c.height = i.naturalHeight; const x = c.getContext('2d');"
          "x.drawImage(i, 0, 0); return Array.from(x.getImageData(0, 0, c.width, c.height).data)"
          ".reduce((a, b) => a + b, 0); }")
X0_LOADED = ("(() => { const i = document.getElementById('x0-img'); "
             "return i.complete && i.naturalWidth > 0 })()")   # decoded, not just requested


LOADED = ("document.readyState === 'complete' && "
          "document.querySelectorAll('#method option').length > 1")   # /api/methods read


def choose(browser, name):
    browser.js(f"(() => {{ const s = document.getElementById('method'); s.value = "
               f"{json.dumps(name)}; s.dispatchEvent(new Event('change')); }})()")


def visible(browser, selector):
    return browser.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                      "return !!e && e.offsetParent !== null; })()")


@pytest.fixture()
def explorer(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    srv, ex = make_server(load_model(None), "127.0.0.1", 0, tmp_path / "out")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()
    ex.close()
    torch.set_num_threads(before)


def test_the_page_in_chromium(explorer, tmp_path):
    browser = Chromium(tmp_path / "profile")
    try:
        browser.send("Page.navigate", url=explorer)
        browser.wait(LOADED)
        browser.type("#prompt", "a big red circle on the left")
        browser.type("#edits", "a big blue circle on the left")
        browser.type("#steps", "10")
        start = time.perf_counter()
        browser.click("#run")
        browser.wait("[...document.querySelectorAll('#images img')]"
                     ".filter(i => i.complete && i.naturalWidth > 0).length === 2")
        round_trip = time.perf_counter() - start
        print(f"\nexplorer round trip (edit, 2 prompts, 10 steps, maps, per-step x̂₀): "
              f"{round_trip:.1f} s")
        assert browser.js("document.getElementById('status').textContent").endswith(" s")
        assert browser.js("document.getElementById('error').textContent") == ""

        # a token: its button lights up and its map is drawn over the image
        browser.click(".token[data-p='1'][data-t='3']")                  # "blue"
        assert browser.js("document.getElementById('big-label').textContent") \
            == '"blue" in: a big blue circle on the left'
        assert browser.js("document.querySelector('.token.on').textContent") == "blue"
        assert browser.js("(() => { const c = document.getElementById('big-map');"
                          "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);"
                          "return [c.width, c.height, d.data.some(v => v > 0 && v < 255)] })()") \
            == [8, 8, True]

        # the step slider: at its left end, step 1's x̂₀ and map replace the last step's
        browser.wait(X0_LOADED)                          # the image may still be loading
        last = (browser.js("document.getElementById('x0-img').src"),
                browser.js(f"({PIXELS})('#x0-img')"))
        browser.click("#step", at=0.02)
        assert browser.js("document.getElementById('step-label').textContent") == "1 / 10"
        browser.wait(X0_LOADED)
        first = (browser.js("document.getElementById('x0-img').src"),
                 browser.js(f"({PIXELS})('#x0-img')"))
        assert first[0] != last[0] and first[0].endswith("-x0-0-1.png")
        assert first[1] != last[1]                                        # x̂₀ changed
        browser.click("#step", at=0.6)
        browser.wait(X0_LOADED)
        shot = tmp_path / "explorer.png"
        browser.screenshot(shot)
        assert shot.read_bytes().startswith(b"\x89PNG")
        if os.environ.get("MINIP2P_EXPLORER_SCREENSHOT"):
            shutil.copy(shot, os.environ["MINIP2P_EXPLORER_SCREENSHOT"])

        # a bad input: the server's one line shows on the page, and the page still works
        browser.type("#prompt", "")
        browser.click("#run")
        browser.wait("document.getElementById('error').textContent !== ''", timeout=30)
        assert browser.js("document.getElementById('error').textContent") \
            == "error: the prompt is empty; type what to draw"
        browser.type("#prompt", "a big red circle on the left")
        browser.type("#edits", "a big blue circle on the left")
        browser.type("#param-blend", "circle triangle")
        browser.click("#run")
        browser.wait("document.getElementById('error').textContent !== ''", timeout=30)
        assert "'triangle': the word is not in the prompt" in \
            browser.js("document.getElementById('error').textContent")
    finally:
        browser.close()


def test_the_method_picker_shows_each_methods_parameters(explorer, tmp_path):
    from PIL import Image, ImageDraw
    photo = tmp_path / "photo.png"
    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).ellipse((4, 16, 36, 48), fill="red")
    im.save(photo)
    browser = Chromium(tmp_path / "profile")
    try:
        browser.send("Page.navigate", url=explorer)
        browser.wait(LOADED)
        names = browser.js("[...document.querySelectorAll('#method option')].map(o => o.value)")
        assert names[0] == "p2p" and {"masactrl", "pnp", "sdedit", "self-guidance"} <= set(names)
        assert visible(browser, "#param-cross_replace") and visible(browser, "#image")  # optional
        choose(browser, "attend-excite")
        assert visible(browser, "#param-words") and not visible(browser, "#image")     # no picture
        choose(browser, "masactrl")
        assert visible(browser, "#param-start_step") and not visible(browser, "#param-blend")
        assert browser.js("document.getElementById('param-start_step').type") == "number"
        assert browser.js("document.getElementById('param-inversion').tagName") == "SELECT"
        choose(browser, "self-guidance")
        assert browser.js("document.getElementById('param-keep_appearance').type") == "checkbox"
        choose(browser, "pnp")
        assert visible(browser, "#image") and visible(browser, "#param-features")
        assert "needed" in browser.js("document.getElementById('image-note').textContent")

        # a picture for plug-and-play: the input and both images come back; no maps
        root = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
        browser.send("DOM.setFileInputFiles", files=[str(photo)], nodeId=node)
        browser.wait("!document.getElementById('image-preview').classList.contains('hidden')")
        browser.type("#steps", "3")
        browser.type("#param-features", "0.5")
        browser.click("#run")
        browser.wait("[...document.querySelectorAll('#images img')]"
                     ".filter(i => i.complete && i.naturalWidth > 0).length === 3")
        assert browser.js("document.getElementById('error').textContent") == ""
        assert visible(browser, "#no-maps") and not visible(browser, "#map-views")
        assert browser.js("document.querySelector('#images .tile').textContent") == "input"

        # a bad parameter: the server's one line names it
        browser.type("#param-features", "2")
        browser.click("#run")
        browser.wait("document.getElementById('error').textContent !== ''", timeout=30)
        assert browser.js("document.getElementById('error').textContent").startswith(
            "error: features must be a fraction")
    finally:
        browser.close()
