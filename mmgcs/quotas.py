"""How much of a server one client may hold: a cap on the jobs each client has queued or running, checked when a job
joins the queue (before it waits there), and the routing of expensive calls to their own queue share.

`JobGuard` is ASGI middleware in front of a Gradio app's queue routes (`/queue/join`, `/call/<name>`,
`/call/v2/<name>`). For each job that asks to join it reads the JSON body (already bounded by
`mmgcs.uploads.BodySizeLimit`), then

- refuses it (HTTP 429, with a message) when the client already has its share of jobs queued or running, counted
  by its session hash and by its address (`JobQuota`), and
- sends it to another event when a `Reroute` says so (an explained `/predict` goes to its twin event, which has
  its own concurrency limit), by rewriting the body's `fn_index` or the route's name.

Nothing here imports Gradio: the app passes in how to list the queue's jobs and which events to reroute. The
client's address is the connection's (`scope["client"]`); behind a reverse proxy, uvicorn replaces it with the
client's own when the proxy is trusted (`FORWARDED_ALLOW_IPS`, see `trust_proxies`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, MutableMapping, Optional

from mmgcs.uploads import json_refusal

log = logging.getLogger("mmgcs.quotas")

# A Hugging Face Space is reached only through the platform's proxies, from private addresses: trusting those
# (and only those) makes uvicorn give each request its client's own address, which a client cannot forge.
SPACE_PROXIES = "127.0.0.1,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"
JOIN = "queue/join"
CALL = "call/"
DIRECT = ("run/", "api/")  # Gradio's routes that run an event at once, outside the queue
NO_SERVER_FUNCTION = "This event has no server function: it runs in the page."
LOG_EVERY_S = 60.0


def trust_proxies(environ: MutableMapping[str, str] = os.environ) -> Optional[str]:
    """On a Hugging Face Space (`SPACE_ID` set), trust the private-network proxies in front of it, so that the
    per-address cap counts each visitor apart rather than all of them as the proxy (uvicorn's
    `FORWARDED_ALLOW_IPS`; a value already set wins). Call before the server starts; returns the value in force."""
    if environ.get("SPACE_ID"):
        environ.setdefault("FORWARDED_ALLOW_IPS", SPACE_PROXIES)
    return environ.get("FORWARDED_ALLOW_IPS")


def client_address(scope: Mapping[str, Any]) -> Optional[str]:
    """The client's address of an ASGI scope (or a Starlette request's `.scope`), or None when unknown."""
    client = scope.get("client")
    return str(client[0]) if client else None


def too_many(count: int, limit: int, per: str) -> str:
    return (
        f"Too many requests queued from this client: {count} are queued or running {per} (the limit is {limit}). "
        "Wait for your results before sending more."
    )


class JobQuota:
    """At most `max_per_session` jobs queued or running per session hash and `max_per_ip` per client address.

    `open_jobs()` lists the (session hash, address) of every job the queue holds now, queued or running. A job that
    was admitted but has not reached the queue yet is counted apart (`admit` reserves it, `release` frees it once
    the queue has answered), so a burst of joins arriving together cannot all pass the same count.
    """

    def __init__(self, max_per_session: int, max_per_ip: int,
                 open_jobs: Callable[[], Iterable[tuple[Optional[str], Optional[str]]]]):
        if max_per_session < 1 or max_per_ip < 1:
            raise ValueError("the caps must be positive")
        self.max_per_session, self.max_per_ip = max_per_session, max_per_ip
        self.open_jobs = open_jobs
        self._arriving: Counter = Counter()
        self._lock = threading.Lock()

    def admit(self, session: Optional[str], ip: Optional[str]) -> Optional[str]:
        """None when the job may join (and it is then reserved: call `release` once it has joined or failed), else
        the refusal's message."""
        with self._lock:
            sessions, ips = Counter(), Counter()
            for job_session, job_ip in self.open_jobs():
                sessions[job_session] += 1
                ips[job_ip] += 1
            session_count = sessions[session] + self._arriving[("session", session)] if session else 0
            ip_count = ips[ip] + self._arriving[("ip", ip)] if ip else 0
            if session and session_count >= self.max_per_session:
                return too_many(session_count, self.max_per_session, "in this session")
            if ip and ip_count >= self.max_per_ip:
                return too_many(ip_count, self.max_per_ip, "from this address")
            self._arriving.update(self._keys(session, ip))
            return None

    def release(self, session: Optional[str], ip: Optional[str]) -> None:
        with self._lock:
            self._arriving.subtract(self._keys(session, ip))
            self._arriving = +self._arriving  # drop the zeros

    @staticmethod
    def _keys(session: Optional[str], ip: Optional[str]) -> list:
        return [key for key in (("session", session), ("ip", ip)) if key[1]]


@dataclass(frozen=True)
class Reroute:
    """Send a call of event `source` (fn_index) / route name `source_name` to event `target` / `target_name` when
    `applies(data)` holds for its inputs, in the order of `parameters`. A `/call/v2/<name>` call names its inputs:
    it goes to `/call/<target_name>` with them in that order (the v2 route serves only documented events)."""

    source: int
    target: int
    source_name: str
    target_name: str
    parameters: tuple[str, ...]
    applies: Callable[[Any], bool]

    def positional(self, named: dict) -> Optional[list]:
        """A `/call/v2` body's inputs in order, or None when it names others (Gradio then answers it)."""
        if not set(named) <= set(self.parameters):
            return None
        return [named.get(name) for name in self.parameters]


class JobGuard:
    """ASGI middleware: the per-client cap and the reroutes, for every job joining the queue (see the module)."""

    def __init__(self, app, quota: JobQuota, reroutes: Iterable[Reroute] = (), unserved: Iterable = ()):
        self.app = app
        self.quota = quota
        self.reroutes = tuple(reroutes)
        # fn indices and names of events that only run in the browser: Gradio answers a direct call of one with
        # a traceback in the log (IndexError: function has no backend method), so it is refused here
        self.unserved = frozenset(unserved)
        self._refused: dict = {}  # address -> (when last logged, refusals since)

    async def __call__(self, scope, receive, send):
        route = self._route(scope)
        if route is None:
            return await self.app(scope, receive, send)
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):  # Gradio answers a malformed body itself
            return await self.app(scope, _replay(raw, receive), send)
        if route.startswith(DIRECT):
            fn = body.get("fn_index", route.split("/", 1)[1])
            if isinstance(fn, (int, str)) and not isinstance(fn, bool) and fn in self.unserved:
                return await json_refusal(send, 404, NO_SERVER_FUNCTION)
            return await self.app(scope, _replay(raw, receive), send)
        session = body.get("session_hash") if isinstance(body.get("session_hash"), str) else None
        ip = client_address(scope)
        refusal = self.quota.admit(session, ip)
        if refusal is not None:
            self._log_refusal(ip)
            return await json_refusal(send, 429, refusal)
        try:
            scope, raw = self._rerouted(scope, route, body, raw)
            return await self.app(scope, _replay(raw, receive), send)
        finally:
            self.quota.release(session, ip)

    def _log_refusal(self, ip: Optional[str]) -> None:
        """One log line per address and minute at most, with the count since (a flood must not flood the log)."""
        now = time.monotonic()
        since, count = self._refused.get(ip, (-LOG_EVERY_S, 0))
        if now - since >= LOG_EVERY_S:
            log.warning("refused %d job(s) from %s over the per-client cap", count + 1, ip or "an unknown address")
            self._refused[ip] = (now, 0)
        else:
            self._refused[ip] = (since, count + 1)
        if len(self._refused) > 10_000:
            self._refused.clear()

    @staticmethod
    def _route(scope) -> Optional[str]:
        """'queue/join', 'call/<name>' or 'call/v2/<name>' for a POST that joins the queue, 'run/<name>' or
        'api/<name>' for one that runs an event at once, else None."""
        if scope["type"] != "http" or scope.get("method") != "POST":
            return None
        path = scope.get("path", "").rstrip("/")
        if path.endswith("/" + JOIN):
            return JOIN
        for direct in DIRECT:
            head, sep, tail = path.rpartition("/" + direct)
            if sep and tail and "/" not in tail:
                return direct + tail
        head, sep, tail = path.rpartition("/" + CALL)
        if sep and tail and tail.count("/") <= 1 and (tail.count("/") == 0 or tail.startswith("v2/")):
            return CALL + tail
        return None

    def _rerouted(self, scope, route: str, body: dict, raw: bytes) -> tuple[dict, bytes]:
        if route == JOIN:
            for r in self.reroutes:
                if body.get("fn_index") == r.source and r.applies(body.get("data")):
                    body["fn_index"] = r.target
                    raw = json.dumps(body).encode()
                    return _with_length(scope, len(raw)), raw
            return scope, raw
        name = route.rpartition("/")[2]
        v2 = route.startswith(CALL + "v2/")
        for r in self.reroutes:
            data = r.positional(body) if v2 else body.get("data")
            if name == r.source_name and data is not None and r.applies(data):
                path = scope["path"].rstrip("/")
                path = path[: len(path) - len(route) + len(CALL)] + r.target_name
                if v2:
                    raw = json.dumps({"data": data}).encode()
                    scope = _with_length(scope, len(raw))
                return {**scope, "path": path, "raw_path": path.encode()}, raw
        return scope, raw


def _with_length(scope, length: int) -> dict:
    headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(raw: bytes, receive):
    """A `receive` that gives the body read already, then whatever the connection says next (a disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed


__all__ = ["JobGuard", "JobQuota", "Reroute", "client_address", "too_many", "trust_proxies"]
