"""mmgcs.quotas without a server: the per-client job caps, the explain reroute and the events with no server function,
on a recording ASGI app (what the page's handlers accept back: tests/test_page_checks.py)."""

from __future__ import annotations

import json

import pytest

from mmgcs.quotas import JobGuard, JobQuota, Reroute, client_address, trust_proxies

PREDICT, EXPLAINED = 1, 5


def test_the_quota_counts_a_clients_jobs_by_session_and_by_address():
    jobs = [("s1", "1.1.1.1"), ("s1", "1.1.1.1"), ("s2", "1.1.1.1"), ("s3", "2.2.2.2")]
    quota = JobQuota(max_per_session=2, max_per_ip=4, open_jobs=lambda: jobs)
    assert "2 are queued or running in this session (the limit is 2)" in quota.admit("s1", "9.9.9.9")
    assert quota.admit("s2", "1.1.1.1") is None  # s2 has 1, the address 3: both under their caps
    # a job admitted but not in the queue yet counts too: a burst cannot pass one count
    assert "4 are queued or running from this address (the limit is 4)" in quota.admit("s4", "1.1.1.1")
    quota.release("s2", "1.1.1.1")
    assert quota.admit("s4", "1.1.1.1") is None
    assert quota.admit(None, None) is None  # nothing to count it by (the address is always known in practice)
    with pytest.raises(ValueError):
        JobQuota(0, 1, lambda: [])


def test_a_space_trusts_only_its_private_proxies_for_client_addresses():
    env = {}
    assert trust_proxies(env) is None and env == {}  # not a Space: uvicorn's default (loopback) stays
    env = {"SPACE_ID": "user/space"}
    assert "10.0.0.0/8" in trust_proxies(env) and "*" not in env["FORWARDED_ALLOW_IPS"]
    env = {"SPACE_ID": "user/space", "FORWARDED_ALLOW_IPS": "10.1.2.3"}
    assert trust_proxies(env) == "10.1.2.3"  # the operator's setting wins
    assert client_address({"client": ("3.3.3.3", 5)}) == "3.3.3.3" and client_address({}) is None


class Recorder:
    """An ASGI app that records what reached it: the path and the JSON body."""

    def __init__(self):
        self.seen = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = json.loads(body)
        except ValueError:
            pass
        self.seen.append((scope["path"], body, dict(scope["headers"]).get(b"content-length")))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"event_id": "e"}'})


def _explained(data) -> bool:
    return isinstance(data, list) and len(data) == 4 and data[-1] is True


@pytest.fixture
def guarded():
    from starlette.testclient import TestClient

    app, jobs = Recorder(), []
    quota = JobQuota(2, 3, lambda: jobs)
    reroute = Reroute(PREDICT, EXPLAINED, "predict", "predict_explained", ("plot", "poster", "title", "explain"),
                      _explained)
    guard = JobGuard(app, quota, [reroute], unserved=[7, "js_fn"])
    return TestClient(guard), app, jobs


def test_an_explained_predict_joins_its_twin_event(guarded):
    client, app, _ = guarded
    plain = {"fn_index": PREDICT, "session_hash": "s", "data": ["a plot", None, None, False]}
    assert client.post("/gradio_api/queue/join", json=plain).status_code == 200
    explained = {**plain, "data": ["a plot", None, None, True]}
    assert client.post("/gradio_api/queue/join", json=explained).status_code == 200
    client.post("/gradio_api/call/predict", json={"data": ["a plot", None, None, True]})
    client.post("/gradio_api/call/predict/", json={"data": ["a plot", None, None]})
    client.post("/gradio_api/call/v2/predict", json={"plot": "a plot", "explain": True})
    client.post("/gradio_api/call/v2/predict", json={"plot": "a plot", "unknown": True})
    (p1, b1, _), (p2, b2, n2), (p3, _, _), (p4, _, _), (p5, b5, n5), (p6, b6, _) = app.seen
    assert b1["fn_index"] == PREDICT and b2["fn_index"] == EXPLAINED and p1 == p2 == "/gradio_api/queue/join"
    assert n2 == str(len(json.dumps(b2))).encode()  # the body was rewritten with its length
    assert p3 == "/gradio_api/call/predict_explained" and p4 == "/gradio_api/call/predict/"
    assert p5 == "/gradio_api/call/predict_explained" and b5 == {"data": ["a plot", None, None, True]}
    assert n5 == str(len(json.dumps(b5))).encode()
    assert p6 == "/gradio_api/call/v2/predict" and b6 == {"plot": "a plot", "unknown": True}  # Gradio answers it


def test_a_client_over_its_cap_is_refused_with_a_message_before_joining(guarded):
    client, app, jobs = guarded
    jobs += [("s", "testclient")] * 2
    answer = client.post("/gradio_api/queue/join", json={"fn_index": PREDICT, "session_hash": "s", "data": []})
    assert answer.status_code == 429 and not app.seen
    assert "Too many requests queued from this client" in answer.json()["detail"] == answer.json()["error"]
    assert "Wait for your results" in answer.json()["detail"]
    jobs.append(("other", "testclient"))  # 3 from this address: a new session is refused too
    answer = client.post("/gradio_api/call/predict", json={"data": ["a plot", None, None]})
    assert answer.status_code == 429 and "from this address" in answer.json()["detail"]
    jobs.clear()
    assert client.post("/gradio_api/call/predict", json={"data": ["a plot", None, None]}).status_code == 200


def test_other_routes_and_malformed_bodies_pass_through(guarded):
    client, app, jobs = guarded
    jobs += [("s", "testclient")] * 5  # over every cap: only joins are counted
    assert client.post("/gradio_api/queue/join", content=b"{not json").status_code == 200
    assert client.post("/gradio_api/upload", content=b"[]").status_code == 200
    assert client.post("/gradio_api/run/predict", json={"fn_index": 2, "data": []}).status_code == 200
    assert client.get("/gradio_api/call/predict/abc").status_code == 200
    assert [path for path, _, _ in app.seen] == ["/gradio_api/queue/join", "/gradio_api/upload",
                                                 "/gradio_api/run/predict", "/gradio_api/call/predict/abc"]


def test_an_event_without_a_server_function_is_refused_on_the_direct_routes(guarded):
    client, app, _ = guarded
    for answer in (client.post("/gradio_api/run/predict", json={"fn_index": 7, "data": []}),
                   client.post("/gradio_api/run/js_fn", json={"data": []}),
                   client.post("/gradio_api/api/js_fn/", json={"data": []})):
        assert answer.status_code == 404 and "runs in the page" in answer.json()["detail"]
    assert not app.seen
