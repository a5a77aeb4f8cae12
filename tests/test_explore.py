"""The explorer's HTTP API (minip2p/explore/) on the shipped toy model: every method that needs no
extra weights run over HTTP (with an uploaded picture where it edits one, and each inversion),
the method list the page builds its form from, every bad input (field, parameter, picture) as a
4xx with a one-line reason (and the server still serving), no file served from outside its output
folder, and 5 concurrent jobs all done, in order."""
import base64
import http.client
import io
import json
import socket
import threading
import time

import pytest
import torch
from PIL import Image, ImageDraw

from minip2p import methods
from minip2p.cli import main
from minip2p.explore.server import MAX_BODY, make_server
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


def test_the_page_is_served(server):
    status, page, kind = request(server, "GET", "/")
    assert status == 200 and kind.startswith("text/html") and b"minip2p explorer" in page


def test_an_edit_gives_images_every_tokens_maps_steps_svd_and_words(server):
    status, answer, _ = submit(server, prompt=PROMPT, edits=[EDITED], steps=3,
                               blend="circle circle", reweight="blue=2")
    assert status == 202, answer
    job = wait(server, answer["id"])
    assert job["state"] == "done", job.get("error")
    r = job["result"]
    assert r["prompts"] == [PROMPT, EDITED] and len(r["images"]) == 2
    assert job["step"] == job["steps"] == 3 and job["method"] == "p2p"       # the progress
    assert r["tokens"][0] == ["<start>", "a", "big", "red", "circle", "on", "the", "left", "<end>"]
    m = r["maps"]
    assert (m["rows"], m["cols"]) == (8, 8)                        # the toy's coarse maps
    assert len(m["final"][1]) == 9 and len(m["final"][1][4]) == 64
    assert len(m["steps"]) == len(r["x0"]) == 3 and len(r["x0"][0]) == 2
    assert m["steps"][0][0][4] != m["steps"][2][0][4]               # the map changes over steps
    assert len(r["svd"]["components"][0]) == 6
    words = r["words"]
    assert [w["word"] for w in words["maps"][0]] == PROMPT.split()
    assert len(words["maps"][0][0]["map"]) == words["rows"] * words["cols"] == 16 * 16
    for url in [*r["images"], r["x0"][0][0], r["x0"][2][1]]:
        status, png, kind = request(server, "GET", url)
        assert status == 200 and kind == "image/png" and png.startswith(b"\x89PNG")


def test_masactrl_and_a_prompt_alone_run(server):
    ids = [submit(server, prompt=PROMPT, edits=["a small red circle on the left"], steps=2,
                  method="masactrl", masa_step=1)[1]["id"],
           submit(server, prompt=PROMPT, steps=2)[1]["id"]]
    for i in ids:
        job = wait(server, i)
        assert job["state"] == "done", job.get("error")
    assert len(job["result"]["images"]) == 1


RUNS = [    # method, prompts, params, picture: every method that needs no extra weights
    ("p2p", [PROMPT, EDITED], {"cross_replace": [0, 0.6], "blend": ["circle", "circle"]}, None),
    ("masactrl", [PROMPT, "a small red circle on the left"], {"start_step": 1}, None),
    ("pnp", [PROMPT, EDITED], {"features": 0.5}, PNG),
    ("sdedit", [EDITED], {"strength": 0.7}, JPEG),
    ("attend-excite", [PROMPT], {"words": "red circle"}, None),
    ("pix2pix-zero", [PROMPT, EDITED], {}, None),
    ("self-guidance", [PROMPT], {"move": {"circle": [0.7, 0.5]}}, None),
    ("p2p", [PROMPT, EDITED], {"inversion": "ddim"}, PNG),
    ("p2p", [PROMPT, EDITED], {"inversion": "null-text", "inner_steps": 2}, PNG),
    ("p2p", [PROMPT, EDITED], {"inversion": "negative-prompt"}, PNG),
]


@pytest.mark.parametrize("name,prompts,params,image", RUNS,
                         ids=[f"{r[0]}-{r[2].get('inversion', 'noise')}" for r in RUNS])
def test_every_method_runs(server, name, prompts, params, image):
    body = dict(method=name, prompt=prompts[0], edits=prompts[1:], steps=3, params=params)
    status, answer, _ = submit(server, **body, **({"image": image} if image else {}))
    assert status == 202, answer
    job = wait(server, answer["id"])
    assert job["state"] == "done", job.get("error")
    r = job["result"]
    assert r["method"] == name and len(r["images"]) == len(r["prompts"]) >= 1
    assert len(r["inputs"]) == (image is not None)
    for url in r["images"] + r["inputs"]:
        status, png, kind = request(server, "GET", url)
        assert status == 200 and kind == "image/png" and png.startswith(b"\x89PNG")
    if name in ("p2p", "masactrl"):                     # a store: maps; per step from noise
        assert len(r["maps"]["final"]) == len(prompts) and r["svd"] and r["words"]
        assert len(r["maps"]["steps"]) == len(r["x0"]) == (0 if image else 3)
    else:
        assert r["maps"] is None and r["x0"] == [] and r["tokens"] == []


def test_the_methods_and_their_parameters_are_listed(server):
    status, answer, _ = request(server, "GET", "/api/methods")
    assert status == 200
    listed = {m["name"]: m for m in answer["methods"]}
    assert list(listed) == methods.names()
    masactrl = {p["name"]: p for p in listed["masactrl"]["parameters"]}
    assert masactrl["start_step"]["type"] == "int" and masactrl["start_step"]["help"]
    assert masactrl["inversion"]["choices"] == ["ddim", "null-text", "negative-prompt"]
    assert listed["pnp"]["edits_pictures"] == "required" and listed["pnp"]["summary"]
    assert listed["attend-excite"]["edits_pictures"] == "no"
    assert answer["limits"]["max_body"] == MAX_BODY


def test_a_word_missing_from_the_prompt_is_refused_with_one_line(server):
    for extra, word in [({"blend": "circle square"}, "blend 'square': the word is not in"),
                        ({"reweight": "green=2"}, "reweight 'green': the word is in none")]:
        status, answer, _ = submit(server, prompt=PROMPT, edits=[EDITED], steps=2, **extra)
        assert status == 400 and word in answer["error"] and "\n" not in answer["error"], answer


TRUNCATED = picture()[:120]
BAD = [
    ({"prompt": ""}, "empty"),
    ({"prompt": "   "}, "empty"),
    ({"prompt": PROMPT, "steps": 0}, "steps must be in [1, 100]"),
    ({"prompt": PROMPT, "steps": 101}, "steps must be in [1, 100]"),
    ({"prompt": PROMPT, "steps": 2.5}, "steps must be an integer"),
    ({"prompt": PROMPT, "steps": "many"}, "steps must be a number"),
    ({"prompt": PROMPT, "height": 2048}, "height must be in"),
    ({"prompt": PROMPT, "width": 66}, "multiple of 4"),
    ({"prompt": PROMPT, "seed": -1}, "seed must be in"),
    ({"prompt": PROMPT, "guidance": "nan"}, "guidance must be a number"),
    ({"prompt": PROMPT, "edits": [EDITED], "blend": "circle"}, "one word per prompt"),
    ({"prompt": PROMPT, "edits": [EDITED], "reweight": "blue=x"}, "WORD=FACTOR"),
    ({"prompt": PROMPT, "reweight": "red=2"}, "give an edited prompt"),
    ({"prompt": PROMPT, "edits": [EDITED], "cross": "2"}, "window"),
    ({"prompt": PROMPT, "edits": [EDITED], "method": "dreambooth"}, "unknown method"),
    ({"prompt": PROMPT, "edits": [EDITED], "method": "masactrl", "masa_step": 10, "steps": 5},
     "start_step must be in [0, 5)"),
    ({"prompt": PROMPT, "edits": [EDITED], "method": "masactrl", "steps": 5,
      "params": {"start_step": 5}}, "start_step must be in [0, 5)"),
    ({"prompt": PROMPT, "edits": [EDITED], "params": {"nope": 1}}, "nope is not a parameter"),
    ({"prompt": PROMPT, "edits": [EDITED], "params": {"start_step": 1}}, "another method (masactrl), not"),
    ({"prompt": PROMPT, "edits": [EDITED], "params": {"steps": 3}}, "steps is a run setting"),
    ({"prompt": PROMPT, "edits": [EDITED], "params": {"mode": "swap"}}, "mode must be one of"),
    ({"prompt": PROMPT, "edits": [EDITED], "params": {"cross_replace": "x"}}, "cross_replace"),
    ({"prompt": PROMPT, "edits": [EDITED], "params": {"inner_steps": 1.5}}, "inner_steps must"),
    ({"prompt": PROMPT, "edits": [EDITED], "params": []}, "params must be an object"),
    ({"prompt": EDITED, "method": "sdedit", "image": PNG, "params": {"strength": 1.5}},
     "strength must be in (0, 1]"),
    ({"prompt": PROMPT, "edits": [EDITED], "method": "pnp"}, "image is needed"),
    ({"prompt": PROMPT, "method": "attend-excite", "image": PNG}, "edits no picture"),
    ({"prompt": "make it blue", "method": "instruct", "image": PNG}, "not an InstructPix2Pix"),
    ({"prompt": EDITED, "method": "sdedit", "image": data_url(b"hello")}, "not a PNG or JPEG"),
    ({"prompt": EDITED, "method": "sdedit", "image": "data:image/png;base64,%%"}, "base64"),
    ({"prompt": EDITED, "method": "sdedit", "image": "http://x/a.png"}, "data:image/png"),
    ({"prompt": EDITED, "method": "sdedit", "image": 3}, "image must be a data"),
    ({"prompt": EDITED, "method": "sdedit", "image": data_url(TRUNCATED)}, "cannot be read"),
    ({"prompt": EDITED, "method": "sdedit", "image": data_url(picture((2049, 8)))},
     "at most 2048 a side"),
    ({"prompt": EDITED, "method": "sdedit", "image": data_url(picture((8, 64)))},
     "image is 8×64 pixels; a picture needs at least 16 on each side"),
    ({"prompt": EDITED, "method": "sdedit", "image": data_url(picture((300, 64)))},
     "keep less than 1/4 of its width"),
    ({"prompt": PROMPT, "edits": [EDITED] * 4}, "at most 3"),
    ({"prompt": PROMPT, "edits": "x" * 500}, "at most 400"),
    ([PROMPT], "JSON object"),
]


@pytest.mark.parametrize("body,needle", BAD, ids=[n for _, n in BAD])
def test_bad_fields_are_400_with_one_line(server, body, needle):
    before = len(server[2].jobs)
    status, answer, _ = request(server, "POST", "/api/run", json.dumps(body).encode())
    assert status == 400 and needle in answer["error"], answer
    assert "\n" not in answer["error"] and len(server[2].jobs) == before     # nothing queued
    assert request(server, "GET", "/")[0] == 200                             # still serving


@pytest.mark.parametrize("method,path,body,headers,code,needle", [
    ("POST", "/api/run", b"{\"prompt\": ", {}, 400, "malformed JSON"),
    ("POST", "/api/run", b"\xff\xfe", {}, 400, "malformed JSON"),
    ("POST", "/api/run", b"x", {"Content-Length": str(MAX_BODY + 1)}, 413, "at most"),
    ("POST", "/api/run", None, {"Content-Length": str(10 ** 9)}, 413, "at most"),
    ("POST", "/api/run", None, {"Content-Length": "ten"}, 411, "Content-Length"),
    ("POST", "/api/other", b"{}", {}, 404, "/api/run"),
    ("GET", "/nothing", None, {}, 404, "no page"),
    ("GET", "/api/jobs/999999", None, {}, 404, "no job"),
    ("PUT", "/api/run", b"{}", {}, 405, "not used"),
    ("DELETE", "/out/1-image-0.png", None, {}, 405, "not used"),
])
def test_bad_requests_are_4xx_with_one_line(server, method, path, body, headers, code, needle):
    status, answer, _ = request(server, method, path, body, headers)
    assert status == code and needle in answer["error"] and "\n" not in answer["error"], answer
    assert request(server, "GET", "/")[0] == 200


@pytest.mark.parametrize("path", [
    "/out/../secret.png", "/out/%2e%2e/secret.png", "/out/..%2fsecret.png", "/out//etc/passwd",
    "/out/1-image-0.png/../../secret.png", "/../secret.png", "/out/explore.html",
    "/explore.py", "/out/", "/out/.minip2p-x.png", "/out/1-image-0.PNG",
])
def test_no_file_outside_the_output_folder_is_served(server, path):
    status, answer, _ = request(server, "GET", path)
    assert status == 404 and "error" in answer


def test_five_concurrent_jobs_all_finish_in_order(server):
    explorer = server[2]
    go, answers = threading.Barrier(5), [None] * 5

    def post(i):
        go.wait()
        answers[i] = submit(server, prompt=PROMPT, steps=2, seed=i)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a[0] == 202 for a in answers), answers
    ids = sorted(a[1]["id"] for a in answers)
    assert len(set(ids)) == 5
    assert max(a[1]["ahead"] for a in answers) >= 1                 # some waited in the queue
    jobs = [wait(server, i) for i in ids]
    assert all(j["state"] == "done" for j in jobs)
    done = [i for i in explorer.finished if i in ids]
    assert done == ids                                             # in the order they came


def test_cli_refuses_a_busy_port_and_warns_off_loopback(capsys):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["explore", "--host", "0.0.0.0", "--port", str(port)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("minip2p: warning: serving on 0.0.0.0")
    assert err[1].startswith("minip2p: cannot serve on 0.0.0.0") and len(err) == 2
    assert main(["explore", "--port", "-1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_long_prompt_comes_back_with_its_warning(server):
    long = " ".join(["red"] * 90)                                  # 90 tokens: 15 past the window
    status, answer, _ = submit(server, prompt=long, steps=1)
    assert status == 202, answer
    job = wait(server, answer["id"])
    assert job["state"] == "done", job.get("error")
    assert len(job["warnings"]) == 1 and "15 tokens too long" in job["warnings"][0]
    assert "warnings" not in wait(server, submit(server, prompt=PROMPT, steps=1)[1]["id"])
