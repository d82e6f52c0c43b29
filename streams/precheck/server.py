"""The pre-settlement check's HTTP API: ``POST /v1/precheck`` and ``GET /v1/openapi.json``.

Served by each worker process on its own port (not the metrics port: hospitals reach this one,
operators the other). A request goes: authenticate the caller (API key or client certificate) →
its rate limit → the body is one JSON settlement of the caller's own institution → the settlement's
partition (the producer's partitioner over ``psn_no``) → answered here if this worker holds that
partition and its state is restored, forwarded to the holder if another worker does
(streams/precheck/routing.py), "state unavailable" (503, ``Retry-After``) while it is restoring or
moving. Each answer is logged to ClickHouse (``precheck_log``: pseudonymized, never the clear
identifiers) by a background writer.

Forwarding between workers is signed with a key derived from the pseudonymization key (every worker
of a deployment has it): the holder trusts the caller id of a forwarded request only with a valid,
fresh signature over it and the body, and never forwards it again.

Logs carry the check id, the caller id, the outcome and timings: never a body, so no personal data.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ssl
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson
import structlog
from aiohttp import web

from sinks.base import Backend

from .. import metrics
from ..config import PrecheckCaller, PrecheckConfig
from .check import Answer, Invalid, Prechecker
from .openapi import document
from .routing import Owners

log = structlog.get_logger(__name__)

FORWARD_CALLER = "X-Yibao-Forwarded-Caller"
FORWARD_TIME = "X-Yibao-Forwarded-At"
FORWARD_SIGNATURE = "X-Yibao-Forward-Signature"
#: How far a forwarded request's timestamp may lie from the holder's clock.
FORWARD_SKEW_S = 30.0
#: Seconds a client is told to wait before asking again while state is restoring or moving.
RETRY_AFTER_S = 1
#: The precheck log is written at most this often, in one INSERT (small inserts cost ClickHouse merges).
LOG_FLUSH_S = 1.0
LOG_MAX_ROWS = 10_000
#: Rows kept while ClickHouse does not answer; beyond, the oldest are dropped (and counted).
LOG_BUFFER_ROWS = 200_000


class Holder(Protocol):
    """What the check needs of the settlement ingestor: which partitions it holds, whether their state
    is being restored, and how many partitions the topic has."""

    def owns(self, partition: int) -> bool: ...

    def restoring(self, partition: int) -> bool: ...

    def partitions(self) -> int: ...


def forward_key(pseudo_key: bytes) -> bytes:
    """The workers' shared key for signing forwarded checks (one secret to manage: the pseudo key)."""
    return hmac.new(pseudo_key, b"yibao/precheck-forward/v1", hashlib.sha256).digest()


def _sign(key: bytes, caller: str, at: str, body: bytes) -> str:
    return hmac.new(key, caller.encode() + b"\n" + at.encode() + b"\n" + body, hashlib.sha256).hexdigest()


class RateLimiter:
    """A token bucket per caller: ``rate_per_s`` sustained, ``burst`` at once."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, caller: PrecheckCaller, now: float) -> float:
        """0 when the request may go on, else the seconds until a token is there."""
        tokens, at = self._buckets.get(caller.id, (float(caller.burst), now))
        tokens = min(float(caller.burst), tokens + (now - at) * caller.rate_per_s)
        if tokens >= 1.0:
            self._buckets[caller.id] = (tokens - 1.0, now)
            return 0.0
        self._buckets[caller.id] = (tokens, now)
        return (1.0 - tokens) / caller.rate_per_s if caller.rate_per_s > 0 else 60.0


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    field: str | None = None
    reason_code: str | None = None
    retry_after: int | None = None

    def response(self) -> web.Response:
        body = {"code": self.code, "message": self.message, "field": self.field, "reason_code": self.reason_code}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="yibao-precheck"'
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json",
                            headers=headers)


def unavailable(message: str) -> Refusal:
    return Refusal(503, "STATE_UNAVAILABLE", message, retry_after=RETRY_AFTER_S)


class PrecheckLog:
    """Buffers answered checks and writes them to ``precheck_log`` once a second, off the event loop."""

    COLUMNS = ("check_id", "checked_at", "caller", "fixmedins_code", "insu_admdvs", "med_type", "psn_token",
               "mdtrt_id", "setl_id", "medfee_sumamt", "items", "hit_rule_ids", "hit_rule_versions",
               "hit_severities", "hit_items", "src_partition", "src_offset")

    def __init__(self, backend: Backend | None, token: Callable[[str], str]) -> None:
        self.backend = backend
        self.token = token
        self.rows: deque[tuple[Any, ...]] = deque()
        self.dropped = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="precheck-log")

    def add(self, caller: str, a: Answer) -> None:
        d = a.datum
        self.rows.append((
            a.check_id, a.checked_at_ms // 1000, caller, d["fixmedins_code"], d["insu_admdvs"], d["med_type"],
            self.token(d["psn_no"]), d["mdtrt_id"], d["setl_id"], d["medfee_sumamt"],
            [ln["hilist_code"] for ln in d["fee_details"]], [h.rule_id for h in a.hits],
            [h.rule_version for h in a.hits], [h.severity for h in a.hits], [",".join(h.items) for h in a.hits],
            a.partition, 0,
        ))
        while len(self.rows) > LOG_BUFFER_ROWS:
            self.rows.popleft()
            self.dropped += 1

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), LOG_FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        if self.backend is None or not self.rows:
            return
        batch = [self.rows.popleft() for _ in range(min(LOG_MAX_ROWS, len(self.rows)))]
        cols = {c: [r[i] for r in batch] for i, c in enumerate(self.COLUMNS)}
        backend = self.backend
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, backend.insert, "precheck_log", cols)
        except Exception as exc:  # kept for the next round; checks go on being answered
            self.rows.extendleft(reversed(batch))
            log.warning("precheck log not written; retrying", rows=len(batch), error=type(exc).__name__)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class PrecheckServer:
    """The aiohttp application answering checks for one worker process."""

    def __init__(self, config: PrecheckConfig, prechecker: Prechecker, holder: Holder, owners: Owners,
                 topic: str, fwd_key: bytes, precheck_log: PrecheckLog) -> None:
        self.config = config
        self.prechecker = prechecker
        self.holder = holder
        self.owners = owners
        self.topic = topic
        self.fwd_key = fwd_key
        self.log = precheck_log
        self.limiter = RateLimiter()
        self._by_key = {h: c for c in config.callers for h in c.api_key_sha256}
        self._by_cn = {c.cert_cn: c for c in config.callers if c.cert_cn}
        self._by_id = {c.id: c for c in config.callers}
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._doc = orjson.dumps(document())

    # --- lifecycle --------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post("/v1/precheck", self.handle)
        app.router.add_get("/v1/openapi.json", self.openapi)
        return app

    def ssl_context(self) -> ssl.SSLContext | None:
        c = self.config
        if c.tls_cert_file is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(c.tls_cert_file), str(c.tls_key_file) if c.tls_key_file else None)
        if c.client_ca_file is not None:
            ctx.load_verify_locations(cafile=str(c.client_ca_file))
            ctx.verify_mode = ssl.CERT_OPTIONAL  # API-key callers present none
        return ctx

    async def start(self) -> None:
        peer = None
        if self.config.peer_ca_file is not None:
            # the workers' own CA: a peer is one of them if its certificate chains to it; its address is a
            # pod's or host's, rarely in the certificate, so the name is not checked (the forwarded check
            # is HMAC-signed with the deployment's key as well)
            peer = ssl.create_default_context(cafile=str(self.config.peer_ca_file))
            peer.check_hostname = False
        connector = aiohttp.TCPConnector(ssl=peer if peer is not None else True)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5), connector=connector)
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, ssl_context=self.ssl_context())
        await site.start()
        log.info("precheck serving", host=self.config.host, port=self.config.port,
                 tls=self.config.tls_cert_file is not None, mtls=self.config.client_ca_file is not None,
                 callers=len(self.config.callers), advertised=self.config.advertised_url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        await self.log.flush()
        self.log.close()

    # --- handlers ---------------------------------------------------------------------------------
    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._doc, content_type="application/json")

    async def handle(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        forwarded = FORWARD_CALLER in request.headers
        try:
            res, outcome, caller = await self._handle(request, forwarded)
        except Exception:
            log.exception("precheck failed")
            res, outcome, caller = Refusal(500, "INTERNAL", "the check failed; the worker logged why").response(), \
                "INTERNAL", None
        metrics.PRECHECKS.labels(outcome, "1" if forwarded else "0").inc()
        metrics.PRECHECK_SECONDS.observe(time.perf_counter() - t0)
        log.debug("precheck answered", caller=caller, outcome=outcome, status=res.status,
                  ms=round((time.perf_counter() - t0) * 1000, 2))
        return res

    async def _handle(self, request: web.Request, forwarded: bool) -> tuple[web.Response, str, str | None]:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            r = Refusal(413, "TOO_LARGE", f"a settlement to check is at most {self.config.max_body_bytes} bytes")
            return r.response(), r.code, None
        caller = self._forwarded_caller(request, body) if forwarded else self._authenticate(request)
        if caller is None:
            r = Refusal(401, "UNAUTHENTICATED", "present an API key (Authorization: Bearer) or a client certificate "
                                                "known to this service")
            return r.response(), r.code, None
        if not forwarded:
            wait = self.limiter.take(caller, time.monotonic())
            if wait > 0:
                r = Refusal(429, "RATE_LIMITED", f"more than {caller.rate_per_s:g} checks a second",
                            retry_after=max(1, int(wait + 0.999)))
                return r.response(), r.code, caller.id
        refusal = self._refuse_body(request, body)
        parsed: Any = None
        if refusal is None:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                refusal = Refusal(400, "MALFORMED_JSON", "the body is not JSON")
        if refusal is None and isinstance(parsed, dict):
            code = parsed.get("fixmedins_code")
            if isinstance(code, str) and code not in caller.fixmedins_codes:
                refusal = Refusal(403, "FORBIDDEN_INSTITUTION",
                                  "this caller may only check settlements of its own institution",
                                  field="fixmedins_code")
        if refusal is not None:
            return refusal.response(), refusal.code, caller.id
        prepared = self.prechecker.prepare(parsed)
        if isinstance(prepared, Invalid):
            r = Refusal(400, "INVALID_SETTLEMENT", prepared.detail, field=prepared.field or None,
                        reason_code=prepared.reason_code)
            return r.response(), r.code, caller.id
        n = self.holder.partitions() or self.owners.partitions(self.topic)
        if n == 0:
            r = unavailable("no settlement partition is assigned yet")
            return r.response(), r.code, caller.id
        p = prepared.partition(n)
        if self.holder.owns(p):
            if self.holder.restoring(p):
                r = unavailable(f"partition {p}'s state is being restored")
                return r.response(), r.code, caller.id
            answer = self.prechecker.judge(prepared, p)
            self.log.add(caller.id, answer)
            return (web.Response(body=orjson.dumps(answer.to_json()), content_type="application/json"),
                    "hits" if answer.hits else "clear", caller.id)
        if forwarded:
            r = unavailable(f"partition {p} moved while the check was forwarded")
            return r.response(), r.code, caller.id
        url = self.owners.url(self.topic, p)
        if url is None:
            r = unavailable(f"no worker serving checks holds partition {p}")
            return r.response(), r.code, caller.id
        return await self._forward(url, caller, body)

    def _refuse_body(self, request: web.Request, body: bytes) -> Refusal | None:
        if request.content_type != "application/json":
            return Refusal(415, "UNSUPPORTED_MEDIA_TYPE", "send the settlement as application/json")
        return None

    def _authenticate(self, request: web.Request) -> PrecheckCaller | None:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            digest = hashlib.sha256(auth[7:].strip().encode()).hexdigest()
            for known, c in self._by_key.items():
                if hmac.compare_digest(known, digest):
                    return c
            return None
        cert = request.transport.get_extra_info("peercert") if request.transport is not None else None
        if cert:
            for rdn in cert.get("subject", ()):
                for k, v in rdn:
                    if k == "commonName" and v in self._by_cn:
                        return self._by_cn[v]
        return None

    def _forwarded_caller(self, request: web.Request, body: bytes) -> PrecheckCaller | None:
        cid = request.headers.get(FORWARD_CALLER, "")
        at = request.headers.get(FORWARD_TIME, "")
        sig = request.headers.get(FORWARD_SIGNATURE, "")
        try:
            fresh = abs(time.time() - float(at)) <= FORWARD_SKEW_S
        except ValueError:
            return None
        if not fresh or not hmac.compare_digest(sig, _sign(self.fwd_key, cid, at, body)):
            return None
        return self._by_id.get(cid)

    async def _forward(self, url: str, caller: PrecheckCaller, body: bytes) -> tuple[web.Response, str, str | None]:
        assert self._session is not None
        at = f"{time.time():.3f}"
        headers = {"Content-Type": "application/json", FORWARD_CALLER: caller.id, FORWARD_TIME: at,
                   FORWARD_SIGNATURE: _sign(self.fwd_key, caller.id, at, body)}
        try:
            async with self._session.post(url.rstrip("/") + "/v1/precheck", data=body, headers=headers) as resp:
                payload = await resp.read()
                out_headers = {k: v for k, v in resp.headers.items() if k in ("Retry-After",)}
                res = web.Response(status=resp.status, body=payload, content_type="application/json",
                                   headers=out_headers)
                outcome = "forwarded" if resp.status == 200 else f"forwarded_{resp.status}"
                return res, outcome, caller.id
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("precheck owner did not answer", owner=url, error=type(exc).__name__)
            r = unavailable("the worker holding this person's state did not answer")
            return r.response(), r.code, caller.id
