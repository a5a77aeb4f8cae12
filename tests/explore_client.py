"""The explorer's tests' client: a server on a free loopback port running the toy model (the
`server` fixture, imported by the test modules), requests, job submission and waiting, and the
pictures to upload."""
import base64
import http.client
import io
import json
import threading
import time

import pytest
import torch
from PIL import Image, ImageDraw

from minip2p.explore.server import make_server
from minip2p.load import load_model

PROMPT, EDITED = "a big red circle on the left", "a big blue circle on the left"


def picture(size=(64, 64), kind="PNG") -> bytes:
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).ellipse((4, 16, 36, 48), fill="red")
    buf = io.BytesIO()
    im.save(buf, kind)
    return buf.getvalue()


def data_url(data: bytes, kind="png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


PNG, JPEG = data_url(picture()), data_url(picture(kind="JPEG"), "jpeg")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(host, port, explorer) of a server on a free loopback port; output in a tmp folder."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("explore")
    (root / "secret.png").write_bytes(b"not for the page")           # beside the output folder
    srv, explorer = make_server(load_model(None), "127.0.0.1", 0, root / "out")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[0], srv.server_address[1], explorer
    srv.shutdown()
    srv.server_close()
    explorer.close()
    torch.set_num_threads(before)


def request(server, method, path, body=None, headers=None):
    """(status, parsed JSON or raw bytes, content type)."""
    conn = http.client.HTTPConnection(server[0], server[1], timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data, kind = r.read(), r.getheader("Content-Type", "")
    conn.close()
    return r.status, (json.loads(data) if kind.startswith("application/json") else data), kind


def submit(server, **body):
    return request(server, "POST", "/api/run", json.dumps(body).encode(),
                   {"Content-Type": "application/json"})


def wait(server, job_id, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        status, job, _ = request(server, "GET", f"/api/jobs/{job_id}")
        assert status == 200
        if job["state"] in ("done", "error"):
            return job
        time.sleep(0.05)
    raise TimeoutError(job_id)
