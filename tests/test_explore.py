"""The explorer's HTTP API (minip2p/explore/) on the shipped toy model: every method that needs no
extra weights run over HTTP (with an uploaded picture where it edits one, and each inversion),
the method list the page builds its form from, 5 concurrent jobs all done, in order
(the refusals: test_explore_requests.py)."""
import socket
import threading

import pytest

from explore_client import (EDITED, JPEG, PNG, PROMPT, request, server,  # noqa: F401  (a fixture)
                            submit, wait)
from minip2p import methods
from minip2p.cli import main
from minip2p.explore.server import MAX_BODY


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
    assert masactrl["inversion"]["choices"] == ["ddim", "null-text", "negative-prompt", "direct",
                                               "edict", "renoise"]
    assert listed["pnp"]["edits_pictures"] == "required" and listed["pnp"]["summary"]
    assert listed["attend-excite"]["edits_pictures"] == "no"
    assert answer["limits"]["max_body"] == MAX_BODY


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


def test_a_server_that_cannot_bind_leaves_no_out_dir(tmp_path, capsys):
    """The folder --out-dir names is made for the images; a bind that fails removes it again."""
    from helpers import cli
    out = tmp_path / "kept"
    rc, _, err = cli(capsys, "explore", "--host", "999.1.1.1", "--port", "0", "--out-dir", out)
    assert rc == 2 and err.splitlines()[-1].startswith("minip2p: cannot serve on 999.1.1.1")
    assert not out.exists()
