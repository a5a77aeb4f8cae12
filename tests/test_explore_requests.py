"""The explorer's refusals (minip2p/explore/requests.py, picture.py): every bad field, parameter,
word or picture is a 4xx with a one-line reason, nothing is queued and the server still serves;
no file is served from outside its output folder."""
import json

import pytest

from explore_client import (EDITED, JPEG, PNG, PROMPT, data_url, picture, request,  # noqa: F401
                            server, submit)
from minip2p.explore.server import MAX_BODY


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
