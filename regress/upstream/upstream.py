#!/usr/bin/env python3
"""upstream.py -- a local stand-in for the provider HTTP APIs pg_beat scrapes.

Python 3 standard library only.  Listens on 127.0.0.1 only, HTTP/1.1 with
keep-alive, one daemon thread per connection.  Every response carries a
Content-Length (except 204/304, which carry no body).

    upstream.py [--port N] [--port-file F] [--max-seconds S] [--verbose]

--port 0 (the default) picks a free port.  Once listening it prints
`listening on 127.0.0.1:PORT` on one line to stdout (and writes PORT to
--port-file F, atomically).  It exits 0 on SIGTERM/SIGINT and by itself after
--max-seconds (default 3600).  No per-request logging unless --verbose.

Routes (every method works on every route unless noted; HEAD gets no body)
  /json                  200, echo: {"n", "method", "path", "query", "headers",
                         "body", "body_bytes", "body_is_json"}; n = request counter
  /redirect?to=URL       302 (or code=301|303|307|308) with Location: URL
  /redirect_loop         302 to itself (same path and query), forever
  /pages?page_size=N&total=M[&cursor=C]
                         {"items": [{"id": k}, ...], "next_cursor": "..."|null};
                         ids run 1..M; Link: <url>; rel="next" while a next page exists
  /profile/<handle>      fixed-shape profile, numbers derived from a hash of the handle
  /posts/<handle>        all of the handle's 0..40 posts, newest first, unpaginated:
                         {"posts": [{"id", "created_at", "likes", "comments", "caption"}]}
  Personas: the same profile and posts in three fake "social" providers' shapes,
  paginated with opaque cursors (a bad one gets 400 {"error": "invalid cursor"}):
  /acme/v1/profiles/<handle>         {"data": {...}}
  /acme/v1/profiles/<handle>/posts?limit=N&cursor=C
                         {"data": [...], "paging": {"next_cursor", "has_more"}}; the
                         last page keeps a stale non-null next_cursor, has_more false
  /bravo/api/user?username=<handle>  {"user": {...}}, numbers as strings, bio
                         missing for ~1 handle in 10
  /bravo/api/posts?username=<handle>&count=N&page_token=T
                         {"posts": [...], "next_page_token": T}; no key on the last page
  /charlie/graph?fields=profile&id=<handle>       {"result": [{"type": "profile", ...}]}
  /charlie/graph/posts?id=<handle>&limit=N&after=C
                         {"result": [...]}; next page only in a Link: <url>; rel="next"
  /delta/channels/<handle>           a second platform ("video"): {"channel": {...}}
  GET  /_stats           counters (see below); never subject to the options
  POST /_reset           zero the counters and the rate-limit buckets, clear the faults
  POST /_faults          merge {"API_KEY": {"status", "retry_after", "for_s", "count",
                         "body", "headers"}, ...} into the fault table -> {"faults": N}
  GET  /_faults          the active faults; DELETE /_faults clears them all
  anything else          404 {"error": "no such route"}

Faults: a request's API key is header X-Api-Key, else the token of
`Authorization: Bearer T`, else query parameter api_key.  When that key has a
fault, the fault (status, Retry-After, headers, body) is the whole answer, right
after delay_ms and before anything else; a 2xx fault without a body lets the
route answer as usual (with the fault's headers added).

Options (query string, any route except /_stats, /_reset and /_faults), applied in order
  key=K                  count this request under by_key[K] in /_stats
  delay_ms=N             sleep N ms before doing anything else
                         (then the request's API-key fault, if it has one)
  fail_pct=P             with probability P percent (0..100, may be fractional)
                         answer 503 {"error": "flaky upstream"}
  limit_pct=P&limit_retry_after=S
                         then, with probability P percent, answer 429
                         {"error": "flaky rate limit"} with Retry-After: S (whole
                         seconds >= 0, default 1).  Each is an independent draw from
                         one process-wide random.Random; a bad value is a 400 even
                         when no draw hits.  Both answers are counted in /_stats
                         like any other; status= does not replace them, the later
                         options (retry_after=, header=, body=, ...) still apply
  reset=1                close abruptly with SO_LINGER 0 (client sees a RST, curl exit 56)
  hang=1                 never answer; hold the connection until the client closes it
  expires=EPOCH          403 {"error": "URL signature expired"} once time() > EPOCH
  require_key=K          401 unless request header X-Api-Key equals K
  ratelimit=N&window_s=W&bucket=B
                         sliding window: at most N admitted requests per W seconds
                         (W may be fractional; default 1) in bucket B (default
                         "default"); otherwise 429 + Retry-After (whole seconds until a
                         slot frees).  Only admitted requests occupy the window.
  status=NNN             answer with status NNN (200..599); body {"error": ...} for >= 400
  retry_after=S          add Retry-After: S
  retry_after_date=S     add Retry-After: <HTTP-date of now + S seconds>
  header=Name:Value      add a response header (repeatable; replaces a default one)
  body=badjson|text|html|empty
                         truncated JSON (application/json) | text/plain | text/html | 0 bytes
  size=N                 pad the body to ~N bytes with a "pad" field (streamed; <= 1 GB)
  partial=1              send the headers and half the body, then close (curl exit 18)

/_stats: {"total", "by_path", "by_status", "by_key", "by_api_key", "by_api_key_status",
"dropped": {"reset", "hang", "partial"}, "in_flight", "max_in_flight", "uptime_s"}.
/_stats, /_reset and /_faults are not counted themselves; by_status counts responses
sent (keys are strings); by_api_key counts requests per API key as they arrive and
by_api_key_status responses per API key per status ({"KEY": {"200": n}}).
"""

import argparse
import base64
import collections
import email.utils
import hashlib
import http
import http.server
import json
import math
import os
import random
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse

CHUNK = b"x" * 65536
MAX_PAD = 1 << 30
MAX_REQUEST_BODY = 64 << 20
ECHO_HEADERS = {"host", "user-agent", "accept", "accept-encoding", "content-type",
                "content-length", "transfer-encoding", "authorization", "cookie",
                "if-none-match", "if-modified-since", "expect"}
NO_BODY_STATUS = {204, 304}
REASONS = {s.value: s.phrase for s in http.HTTPStatus}


class BadRequest(Exception):
    pass


class Stats:
    """All counters, the rate-limit windows and the fault table, behind one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.in_flight = 0
        self.max_in_flight = 0
        self.windows = {}
        self.zero()

    def zero(self):
        self.total = 0
        self.by_path = collections.Counter()
        self.by_status = collections.Counter()
        self.by_key = collections.Counter()
        self.by_api_key = collections.Counter()
        self.by_api_key_status = collections.defaultdict(collections.Counter)
        self.dropped = collections.Counter()
        self.windows = {}
        self.faults = {}  # API key -> Fault
        self.max_in_flight = self.in_flight

    def received(self, path, key, api_key):
        with self.lock:
            self.total += 1
            self.by_path[path] += 1
            if key is not None:
                self.by_key[key] += 1
            if api_key is not None:
                self.by_api_key[api_key] += 1
            return self.total

    def sent(self, status, api_key=None):
        with self.lock:
            self.by_status[str(status)] += 1
            if api_key is not None:
                self.by_api_key_status[api_key][str(status)] += 1

    def drop(self, how):
        with self.lock:
            self.dropped[how] += 1

    def enter(self, delta):
        with self.lock:
            self.in_flight += delta
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def snapshot(self):
        with self.lock:
            return {"total": self.total, "by_path": dict(self.by_path),
                    "by_status": dict(self.by_status), "by_key": dict(self.by_key),
                    "by_api_key": dict(self.by_api_key),
                    "by_api_key_status": {k: dict(v) for k, v in self.by_api_key_status.items()},
                    "dropped": {k: self.dropped[k] for k in ("reset", "hang", "partial")},
                    "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                    "uptime_s": round(time.monotonic() - self.started, 3)}

    def admit(self, bucket, limit, window):
        """Sliding-window log.  Returns (admitted, remaining, retry_after_s)."""
        now = time.monotonic()
        with self.lock:
            q = self.windows.setdefault(bucket, collections.deque())
            while q and q[0] <= now - window:
                q.popleft()
            if len(q) < limit:
                q.append(now)
                return True, limit - len(q), 0
            if limit <= 0:
                return False, 0, max(1, math.ceil(window))
            # the slot that frees first is the limit-th newest admission
            return False, 0, max(1, math.ceil(q[len(q) - limit] + window - now))

    # ---- per-API-key faults (POST/GET/DELETE /_faults) ----------------------
    def _prune_faults(self, now):
        """Drop the faults whose for_s ran out (call with the lock held)."""
        for k in [k for k, f in self.faults.items() if f.until is not None and f.until <= now]:
            del self.faults[k]

    def set_faults(self, faults):
        """Merge {api_key: Fault} into the table; returns the number active."""
        with self.lock:
            self.faults.update(faults)
            self._prune_faults(time.monotonic())
            return len(self.faults)

    def clear_faults(self):
        with self.lock:
            self.faults = {}

    def list_faults(self):
        now = time.monotonic()
        with self.lock:
            self._prune_faults(now)
            return {k: f.describe(now) for k, f in sorted(self.faults.items())}

    def take_fault(self, api_key):
        """The fault for api_key, if one is active; a counted one is used up by one."""
        if api_key is None:
            return None
        with self.lock:
            self._prune_faults(time.monotonic())
            f = self.faults.get(api_key)
            if f is not None and f.left is not None:
                f.left -= 1
                if f.left <= 0:
                    del self.faults[api_key]
            return f


class Fault:
    """One entry of the fault table, validated from its POST /_faults JSON."""

    FIELDS = {"status", "retry_after", "for_s", "count", "body", "headers"}

    def __init__(self, key, spec, now):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        where = "fault for %s: " % json.dumps(key)
        if not key:
            raise BadRequest("an API key must not be empty")
        if not isinstance(spec, dict):
            raise BadRequest(where + "must be an object")
        unknown = sorted(set(spec) - self.FIELDS)
        if unknown:
            raise BadRequest(where + "unknown field(s) " + ", ".join(unknown))
        self.status = spec.get("status")
        if not is_int(self.status) or not 200 <= self.status <= 599:
            raise BadRequest(where + "status must be an integer 200..599")
        self.retry_after = spec.get("retry_after")
        if self.retry_after is not None and (not is_int(self.retry_after) or self.retry_after < 0):
            raise BadRequest(where + "retry_after must be an integer >= 0")
        for_s = spec.get("for_s")
        if for_s is not None and (not isinstance(for_s, (int, float)) or isinstance(for_s, bool)
                                  or not 0 < for_s < math.inf):
            raise BadRequest(where + "for_s must be a number > 0")
        self.until = None if for_s is None else now + for_s
        self.left = spec.get("count")
        if self.left is not None and (not is_int(self.left) or self.left < 1):
            raise BadRequest(where + "count must be an integer >= 1")
        self.has_body = "body" in spec  # "body": null is a body too (the JSON null)
        self.body = spec.get("body")
        self.headers = []
        hdrs = spec.get("headers", {})
        if not isinstance(hdrs, dict):
            raise BadRequest(where + "headers must be an object")
        for name, value in hdrs.items():
            if not name or any(c in name for c in " \t\r\n:"):
                raise BadRequest(where + "bad header name %s" % json.dumps(name))
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise BadRequest(where + "header %s must be a string or a number" % name)
            self.headers.append((name, str(value)))

    def extra_headers(self):
        """Retry-After (from retry_after), then the fault's own headers."""
        extra = []
        if self.retry_after is not None:
            extra.append(("Retry-After", str(self.retry_after)))
        for name, value in self.headers:
            set_header(extra, name, value)
        return extra

    def passes_through(self):
        """A 2xx fault without a body lets the route answer (a no-op fault)."""
        return self.status < 300 and not self.has_body

    def describe(self, now):
        d = {"status": self.status}
        if self.retry_after is not None:
            d["retry_after"] = self.retry_after
        if self.has_body:
            d["body"] = self.body
        if self.headers:
            d["headers"] = dict(self.headers)
        d["remaining_count"] = self.left
        d["remaining_s"] = None if self.until is None else round(max(0.0, self.until - now), 3)
        return d


STATS = Stats()


class Body:
    """A response body: head + pad*'x' + tail, so big bodies are streamed."""

    def __init__(self, head=b"", ctype="application/json", pad=0, tail=b""):
        self.head, self.ctype, self.pad, self.tail = head, ctype, pad, tail

    def __len__(self):
        return len(self.head) + self.pad + len(self.tail)


_date_cache = [0, ""]


def http_date(t=None):
    if t is not None:
        return email.utils.formatdate(t, usegmt=True)
    now = int(time.time())
    if _date_cache[0] != now:  # a benign race: both writers compute the same string
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _date_cache[1]


def make_cursor(offset):
    return "c1." + base64.urlsafe_b64encode(b"%d" % offset).decode().rstrip("=")


def read_cursor(cursor):
    try:
        assert cursor.startswith("c1.")
        raw = cursor[3:] + "=" * (-len(cursor[3:]) % 4)
        return int(base64.urlsafe_b64decode(raw.encode()).decode())
    except Exception:
        raise BadRequest("invalid cursor") from None


def int_opt(q, name, default=None, lo=0, hi=None):
    if name not in q:
        return default
    try:
        v = int(q[name][-1])
    except ValueError:
        raise BadRequest("%s must be an integer" % name) from None
    if v < lo or (hi is not None and v > hi):
        raise BadRequest("%s out of range" % name)
    return v


def float_opt(q, name, default):
    try:
        v = float(q[name][-1]) if name in q else default
    except ValueError:
        raise BadRequest("%s must be a number" % name) from None
    if not v > 0 or math.isinf(v):
        raise BadRequest("%s out of range" % name)
    return v


def pct_opt(q, name):
    """A probability in percent, 0..100 (fractional allowed); 0 when absent."""
    if name not in q:
        return 0.0
    try:
        v = float(q[name][-1])
    except ValueError:
        raise BadRequest("%s must be a number" % name) from None
    if not 0 <= v <= 100:  # also rejects nan
        raise BadRequest("%s out of range (0..100)" % name)
    return v


_rng = random.Random()
_rng_lock = threading.Lock()


def chance(pct):
    """True with probability pct percent (never for 0, always for 100)."""
    if pct <= 0:
        return False
    with _rng_lock:
        return _rng.random() * 100 < pct


def flag(q, name):
    return q.get(name, ["0"])[-1] not in ("", "0", "false", "no")


def set_header(extra, name, value):
    """Add a header, replacing any of the same name (case-insensitive)."""
    extra[:] = [(k, v) for k, v in extra if k.lower() != name.lower()]
    extra.append((name, value))


def profile(handle):
    h = hashlib.sha256(handle.encode("utf-8")).digest()
    u = lambda a, b: int.from_bytes(h[a:b], "big")
    return {"id": str(u(0, 6) % 10**12), "handle": handle,
            "display_name": handle.replace("_", " ").title(),
            "followers": u(6, 14) % 1_000_000, "following": u(14, 18) % 5_000,
            "posts": u(18, 22) % 10_000, "verified": h[22] % 10 == 0,
            "engagement_rate": round(0.5 + h[23] / 255 * 9.5, 2),
            "bio": "Profile of %s on the pg_beat test upstream." % handle,
            "avatar_url": "https://example.invalid/avatar/%s.jpg" % urllib.parse.quote(handle)}


POSTS_EPOCH = 1704067200  # 2024-01-01T00:00:00Z: post n is created on day n after it
MAX_POSTS = 40


def post_count(handle):
    """How many posts a handle has: 0..40, from byte 25 of SHA-256(handle)."""
    return hashlib.sha256(handle.encode("utf-8")).digest()[25] % (MAX_POSTS + 1)


def posts(handle):
    """Every post of a handle, newest first, in the canonical /posts/<handle> shape.
    Post n (1 = oldest) takes its numbers from SHA-256("<handle>#<n>")."""
    pid, out = profile(handle)["id"], []
    for n in range(post_count(handle), 0, -1):
        d = hashlib.sha256(("%s#%d" % (handle, n)).encode("utf-8")).digest()
        t = POSTS_EPOCH + n * 86400 + int.from_bytes(d[6:10], "big") % 86400
        out.append({"id": "%s_%d" % (pid, n),
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)),
                    "likes": int.from_bytes(d[0:4], "big") % 50_000,
                    "comments": int.from_bytes(d[4:6], "big") % 2_000,
                    "caption": "Post %d by @%s" % (n, handle)})
    return out


def bravo_has_bio(handle):
    """The "bravo" persona leaves bio out for about 1 handle in 10."""
    return hashlib.sha256(handle.encode("utf-8")).digest()[24] % 10 != 0


# ---- personas: the same profile and posts in each fake provider's JSON shape ----
def acme_profile(p):
    return {"data": {"username": p["handle"], "full_name": p["display_name"],
                     "follower_count": p["followers"], "following_count": p["following"],
                     "media_count": p["posts"], "is_verified": p["verified"],
                     "engagement": p["engagement_rate"], "biography": p["bio"],
                     "profile_pic": p["avatar_url"]}}


def bravo_profile(p):
    """Numbers and booleans as strings; bio sometimes missing, like untidy APIs."""
    user = {"handle": p["handle"], "name": p["display_name"],
            "stats": {"followers": str(p["followers"]), "following": str(p["following"]),
                      "posts": str(p["posts"])},
            "verified": json.dumps(p["verified"]), "engagement_rate": json.dumps(p["engagement_rate"]),
            "bio": p["bio"], "avatar": p["avatar_url"]}
    if not bravo_has_bio(p["handle"]):
        del user["bio"]
    return {"user": user}


def charlie_profile(p):
    return {"result": [{"type": "profile", "attributes": {
        "screen_name": p["handle"],
        "counts": {"followers": p["followers"], "friends": p["following"], "statuses": p["posts"]},
        "verified": p["verified"], "er": p["engagement_rate"], "description": p["bio"],
        "image": p["avatar_url"]}}]}


def delta_channel(p):
    """The second platform ("video"): derived from the same canonical profile."""
    return {"channel": {"slug": p["handle"], "title": p["display_name"],
                        "subscribers": p["followers"], "videos": p["posts"],
                        "views": 50 * p["followers"] + p["posts"]}}


def acme_post(x):
    return {"id": x["id"], "taken_at": x["created_at"], "like_count": x["likes"],
            "comment_count": x["comments"], "caption": x["caption"]}


def bravo_post(x):
    return {"post_id": x["id"], "created": x["created_at"],
            "metrics": {"likes": str(x["likes"]), "comments": str(x["comments"])}, "text": x["caption"]}


def charlie_post(x):
    return {"type": "post", "attributes": {"id": x["id"], "time": x["created_at"],
                                           "favorites": x["likes"], "replies": x["comments"],
                                           "text": x["caption"]}}


def persona_cursor(tag, handle, offset):
    """An opaque cursor: "<tag>." + base64url("<offset>:<handle>"), bound to one handle."""
    raw = ("%d:%s" % (offset, handle)).encode("utf-8")
    return tag + "." + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_persona_cursor(tag, handle, cursor, total):
    """The offset in a persona_cursor(); BadRequest unless it is this tag's, this
    handle's and within 0..total."""
    try:
        assert cursor.startswith(tag + ".")
        b64 = cursor[len(tag) + 1:]
        off, sep, who = base64.urlsafe_b64decode((b64 + "=" * (-len(b64) % 4)).encode()).decode().partition(":")
        assert sep and who == handle and off.isdigit()
        offset = int(off)
        assert 0 <= offset <= total
        return offset
    except Exception:
        raise BadRequest("invalid cursor") from None


def pieces(body):
    yield body.head
    left = body.pad
    while left > 0:
        n = min(left, len(CHUNK))
        yield CHUNK if n == len(CHUNK) else CHUNK[:n]
        left -= n
    yield body.tail


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pg_beat-upstream/1"
    disable_nagle_algorithm = True
    error_content_type = "application/json"  # send_error(): malformed requests, 414, 431
    error_message_format = '{"error": "%(code)d %(message)s"}\n'
    verbose = False
    max_seconds = 3600.0
    n = None
    api_key = None

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("%s %s\n" % (self.log_date_time_string(), fmt % args))

    def log_request(self, code="-", size="-"):
        if self.verbose:
            self.log_message('"%s" %s %s', self.requestline, code, size)

    def __getattr__(self, name):  # do_GET, do_POST, ...: every method token is dispatched
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    # ---- request side -------------------------------------------------
    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, total = [], 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                total += size
                if total > MAX_REQUEST_BODY:
                    raise BadRequest("request body too large")
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_REQUEST_BODY:
            raise BadRequest("request body too large")
        return self.rfile.read(n) if n > 0 else b""

    def request_api_key(self, q):
        """The request's API key: header X-Api-Key, else the token of
        `Authorization: Bearer T`, else query parameter api_key; None if none
        of them is present and non-empty."""
        key = (self.headers.get("X-Api-Key") or "").strip()
        if key:
            return key
        scheme, _, token = (self.headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return q.get("api_key", [""])[-1] or None

    def dispatch(self):
        try:
            self._dispatch()
        except OSError:  # the client went away (reset, broken pipe, timeout)
            self.close_connection = True

    def _dispatch(self):
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        q = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        control = path in ("/_stats", "/_reset", "/_faults")
        self.api_key = None if control else self.request_api_key(q)
        self.n = None if control else STATS.received(path, q["key"][-1] if "key" in q else None,
                                                     self.api_key)
        try:
            req_body = self.read_body()
        except (BadRequest, ValueError) as e:
            self.close_connection = True  # the stream is out of sync now
            return self.send_json(400, {"error": str(e) or "bad request body", "n": self.n},
                                  count=not control)
        if path == "/_stats":
            return self.send_json(200, STATS.snapshot(), count=False)
        if path == "/_reset":
            if self.command != "POST":
                return self.send_json(405, {"error": "use POST"}, [("Allow", "POST")], count=False)
            with STATS.lock:
                STATS.zero()
            return self.send_json(200, {"reset": True}, count=False)
        if path == "/_faults":
            return self.faults(req_body)
        STATS.enter(1)
        try:
            self.route(path, q, req_body)
        except BadRequest as e:
            self.send_json(400, {"error": str(e), "n": self.n})
        finally:
            STATS.enter(-1)

    def faults(self, req_body):
        """GET lists the active faults, POST merges a {api_key: fault} object into
        the table, DELETE clears it.  Never counted, never subject to options."""
        if self.command in ("GET", "HEAD"):
            return self.send_json(200, {"faults": STATS.list_faults()}, count=False)
        if self.command == "DELETE":
            STATS.clear_faults()
            return self.send_json(200, {"faults": 0}, count=False)
        if self.command != "POST":
            return self.send_json(405, {"error": "use GET, POST or DELETE"},
                                  [("Allow", "GET, POST, DELETE")], count=False)
        try:
            spec = json.loads(req_body.decode("utf-8"))
            if not isinstance(spec, dict):
                raise BadRequest("the body must be a JSON object {api_key: fault}")
            now = time.monotonic()  # validate every fault before any is applied
            table = {key: Fault(key, f, now) for key, f in spec.items()}
        except (BadRequest, ValueError) as e:
            msg = str(e) if isinstance(e, BadRequest) else "the body must be JSON"
            return self.send_json(400, {"error": msg}, count=False)
        return self.send_json(200, {"faults": STATS.set_faults(table)}, count=False)

    def route(self, path, q, req_body):
        n, extra = self.n, []
        delay = int_opt(q, "delay_ms", 0)
        if delay:
            time.sleep(min(delay / 1000.0, self.max_seconds))
        fault = STATS.take_fault(self.api_key)
        if fault is not None:
            if not fault.passes_through():
                return self.send_fault(fault)
            extra += fault.extra_headers()  # a no-op fault only adds its headers
        # flaky upstream: validate all three before either draw
        fail_pct, limit_pct = pct_opt(q, "fail_pct"), pct_opt(q, "limit_pct")
        limit_retry = int_opt(q, "limit_retry_after", 1, hi=10**9)
        if chance(fail_pct):
            return self.answer(q, 503, {"error": "flaky upstream"}, extra, False)
        if chance(limit_pct):
            set_header(extra, "Retry-After", str(limit_retry))
            return self.answer(q, 429, {"error": "flaky rate limit"}, extra, False)
        if flag(q, "reset"):
            return self.drop_reset()
        if flag(q, "hang"):
            return self.drop_hang()
        if "expires" in q and time.time() > float_opt(q, "expires", 1):
            return self.answer(q, 403, {"error": "URL signature expired", "n": n}, extra, False)
        if "require_key" in q and self.headers.get("X-Api-Key") != q["require_key"][-1]:
            extra.append(("WWW-Authenticate", 'ApiKey realm="upstream"'))
            return self.answer(q, 401, {"error": "invalid or missing X-Api-Key", "n": n}, extra, False)
        if "ratelimit" in q:
            limit = int_opt(q, "ratelimit")
            ok, remaining, wait = STATS.admit(q.get("bucket", ["default"])[-1], limit,
                                              float_opt(q, "window_s", 1.0))
            extra += [("X-RateLimit-Limit", str(limit)), ("X-RateLimit-Remaining", str(remaining))]
            if not ok:
                extra.append(("Retry-After", str(wait)))
                return self.answer(q, 429, {"error": "rate limit exceeded", "n": n,
                                            "retry_after": wait}, extra, False)
        status = 200
        if path == "/json":
            obj = self.echo(path, q, req_body)
        elif path == "/redirect":
            if "to" not in q:
                raise BadRequest("missing to=URL")
            status = int_opt(q, "code", 302, lo=300, hi=308)
            obj = {"redirect": q["to"][-1], "n": n}
            extra.append(("Location", q["to"][-1]))
        elif path == "/redirect_loop":
            status, obj = 302, {"redirect": self.path, "n": n}
            extra.append(("Location", self.path))
        elif path == "/pages":
            obj = self.page(q, extra)
        elif path.startswith("/profile/") and len(path) > len("/profile/"):
            obj = profile(urllib.parse.unquote(path[len("/profile/"):]))
        elif path.startswith("/posts/") and len(path) > len("/posts/"):
            obj = {"posts": posts(urllib.parse.unquote(path[len("/posts/"):]))}
        else:
            obj = self.persona(path, q, extra)
            if obj is None:
                status, obj = 404, {"error": "no such route", "path": path, "n": n}
        return self.answer(q, status, obj, extra, True)

    def persona(self, path, q, extra):
        """The fake providers' routes; None when the path is none of them."""
        if path.startswith("/acme/v1/profiles/"):
            handle, sep, rest = path[len("/acme/v1/profiles/"):].partition("/")
            handle = urllib.parse.unquote(handle)
            if handle and not sep:
                return acme_profile(profile(handle))
            if handle and rest == "posts":
                cursor = q.get("cursor", [""])[-1]
                items, offset, end, total = self.post_page(q, "ac1", handle, cursor, "limit")
                # the quirk: the last page still has a (stale) non-null next_cursor,
                # its own; only has_more says that there is no more
                return {"data": [acme_post(x) for x in items],
                        "paging": {"next_cursor": persona_cursor("ac1", handle, end if end < total else offset),
                                   "has_more": end < total}}
            return None
        if path == "/bravo/api/user":
            return bravo_profile(profile(self.need(q, "username")))
        if path == "/bravo/api/posts":
            handle = self.need(q, "username")
            items, _, end, total = self.post_page(q, "br1", handle, q.get("page_token", [""])[-1], "count")
            obj = {"posts": [bravo_post(x) for x in items]}
            if end < total:  # the last page has no next_page_token key at all
                obj["next_page_token"] = persona_cursor("br1", handle, end)
            return obj
        if path == "/charlie/graph":
            if q.get("fields", ["profile"])[-1] != "profile":
                raise BadRequest("fields must be profile")
            return charlie_profile(profile(self.need(q, "id")))
        if path == "/charlie/graph/posts":
            handle = self.need(q, "id")
            items, _, end, total = self.post_page(q, "ch1", handle, q.get("after", [""])[-1], "limit")
            if end < total:  # the next cursor is only in the Link header
                params = [("id", handle), ("after", persona_cursor("ch1", handle, end)),
                          ("limit", str(int_opt(q, "limit", 10, lo=1, hi=100)))]
                params += [(k, v) for k, vs in q.items() if k not in ("id", "after", "limit") for v in vs]
                extra.append(("Link", '<%s/charlie/graph/posts?%s>; rel="next"'
                              % (self.base_url(), urllib.parse.urlencode(params))))
            return {"result": [charlie_post(x) for x in items]}
        if path.startswith("/delta/channels/") and len(path) > len("/delta/channels/"):
            return delta_channel(profile(urllib.parse.unquote(path[len("/delta/channels/"):])))
        return None

    @staticmethod
    def need(q, name):
        """A required, non-empty query parameter."""
        v = q.get(name, [""])[-1]
        if not v:
            raise BadRequest("missing %s=" % name)
        return v

    def post_page(self, q, tag, handle, cursor, size_param):
        """One page of a handle's posts: (items, offset, end, total).  An empty
        cursor is the first page; page size from size_param (1..100, default 10)."""
        size = int_opt(q, size_param, 10, lo=1, hi=100)
        every = posts(handle)
        offset = read_persona_cursor(tag, handle, cursor, len(every)) if cursor else 0
        end = min(offset + size, len(every))
        return every[offset:end], offset, end, len(every)

    def base_url(self):
        return "http://" + (self.headers.get("Host") or "127.0.0.1:%d" % self.server.server_port)

    def echo(self, path, q, req_body):
        headers = {k.lower(): v for k, v in self.headers.items()
                   if k.lower() in ECHO_HEADERS or k.lower().startswith("x-")}
        body, is_json = None, False
        if req_body:
            text = req_body.decode("utf-8", "replace")
            try:
                body, is_json = json.loads(text), True
            except ValueError:
                body = text
        return {"n": self.n, "method": self.command, "path": path,
                "query": {k: (v[0] if len(v) == 1 else v) for k, v in q.items()},
                "headers": headers, "body": body, "body_bytes": len(req_body),
                "body_is_json": is_json}

    def page(self, q, extra):
        size = int_opt(q, "page_size", 10, lo=1, hi=100_000)
        total = int_opt(q, "total", 25, hi=10**9)
        offset = read_cursor(q["cursor"][-1]) if q.get("cursor", [""])[-1] else 0
        if not 0 <= offset <= total:
            raise BadRequest("invalid cursor")
        end = min(offset + size, total)
        nxt = make_cursor(end) if end < total else None
        if nxt:
            params = [(k, v) for k, vs in q.items() if k != "cursor" for v in vs] + [("cursor", nxt)]
            extra.append(("Link", '<%s/pages?%s>; rel="next"' % (self.base_url(), urllib.parse.urlencode(params))))
        return {"items": [{"id": k} for k in range(offset + 1, end + 1)], "next_cursor": nxt}

    # ---- response side ------------------------------------------------
    def answer(self, q, status, obj, extra, overridable):
        """Apply status=, retry_after*, header=, body=, size=, partial= and send.
        status= only replaces the route's own answer, not a 401/403/429 the
        auth, signature or rate-limit simulation produced."""
        if "status" in q and overridable:
            new = int_opt(q, "status", lo=200, hi=599)
            if new >= 400 and status < 400:
                obj = {"error": REASONS.get(new, "error"), "status": new, "n": self.n}
            status = new
        if "retry_after" in q:
            set_header(extra, "Retry-After", q["retry_after"][-1])
        if "retry_after_date" in q:
            secs = int_opt(q, "retry_after_date", lo=-10**9)
            set_header(extra, "Retry-After", http_date(time.time() + secs))
        for h in q.get("header", []):
            name, sep, value = h.partition(":")
            name, value = name.strip(), value.strip()
            if not sep or not name or any(c in name for c in " \t\r\n:"):
                raise BadRequest("header must be Name:Value")
            set_header(extra, name, value)
        kind = q.get("body", ["json"])[-1]
        text = json.dumps(obj)
        if kind == "json":
            body = Body(text.encode())
        elif kind == "badjson":
            body = Body(text[:max(1, len(text) // 2)].encode())
        elif kind == "text":
            body = Body(("%d %s\n" % (status, REASONS.get(status, ""))).encode(), "text/plain; charset=utf-8")
        elif kind == "html":
            body = Body(b"<!DOCTYPE html><html><head><title>Just a moment...</title></head>"
                        b"<body><h1>Checking your browser</h1></body></html>\n", "text/html; charset=utf-8")
        elif kind == "empty":
            body = Body()
        else:
            raise BadRequest("body must be json, badjson, text, html or empty")
        size = int_opt(q, "size", 0, hi=MAX_PAD)
        if size > len(body):
            if kind in ("json", "badjson") and text.endswith("}"):
                # {... , "pad": "xxxx"}  (badjson: the pad string is never closed)
                head = text[:-1] + (', "pad": "' if len(text) > 2 else '"pad": "')
                body = Body(head.encode(), body.ctype, 0, b'"}' if kind == "json" else b"")
            body.pad = max(0, size - len(body))
        self.send(status, body, extra, partial=flag(q, "partial"))

    def send_fault(self, fault):
        """A fault's answer, as it is: no option applies to it afterwards."""
        if fault.has_body:
            obj = fault.body
        else:
            obj = {"error": REASONS.get(fault.status, "error"), "status": fault.status, "n": self.n}
        self.send(fault.status, Body(json.dumps(obj).encode()), fault.extra_headers())

    def send_json(self, status, obj, extra=(), count=True):
        self.send(status, Body(json.dumps(obj).encode()), list(extra), count=count)

    def send(self, status, body, extra, partial=False, count=True):
        has_body = status not in NO_BODY_STATUS
        length = len(body)
        lines = ["HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Status")),
                 "Server: %s\r\nDate: %s\r\n" % (self.server_version, http_date())]
        if has_body:
            if not any(k.lower() == "content-type" for k, _ in extra):
                lines.append("Content-Type: %s\r\n" % body.ctype)
            lines.append("Content-Length: %d\r\n" % length)
        lines += ["%s: %s\r\n" % (k, v.replace("\r", " ").replace("\n", " "))
                  for k, v in extra if k.lower() != "content-length"]
        if partial:
            self.close_connection = True
            STATS.drop("partial")
        if self.close_connection:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1", "replace")
        if count:
            STATS.sent(status, self.api_key)
        self.log_request(status, length)
        if self.command == "HEAD" or not has_body:
            return self.wfile.write(head)
        budget = length // 2 if partial else length
        out, pending = [head], len(head)
        for p in pieces(body):
            if budget <= 0:
                break
            if len(p) > budget:
                p = p[:budget]
            budget -= len(p)
            if pending and pending + len(p) > len(CHUNK):
                self.wfile.write(b"".join(out))
                out, pending = [], 0
            out.append(p)
            pending += len(p)
        if out:
            self.wfile.write(b"".join(out))

    def drop_reset(self):
        STATS.drop("reset")
        self.close_connection = True
        sock = self.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # no shutdown() first: with linger 0 close() sends a RST

    def drop_hang(self):
        STATS.drop("hang")
        self.close_connection = True
        sock = self.connection
        sock.settimeout(self.max_seconds)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # never wait for hung/keep-alive threads at exit
    request_queue_size = 1024  # libcurl multi opens ~100 connections at once
    verbose = False

    def server_bind(self):  # skip HTTPServer's reverse DNS lookup
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if self.verbose or not isinstance(exc, OSError):  # OSError: the client went away
            super().handle_error(request, client_address)


def main():
    ap = argparse.ArgumentParser(description="Local stand-in for provider HTTP APIs (127.0.0.1 only).")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (0 = pick a free one)")
    ap.add_argument("--port-file", help="write the chosen port to this file")
    ap.add_argument("--max-seconds", type=float, default=3600, help="exit after this long (default 3600)")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args()

    Handler.verbose = Server.verbose = args.verbose
    Handler.max_seconds = args.max_seconds
    try:
        server = Server(("127.0.0.1", args.port), Handler)
    except OSError as e:
        sys.exit("upstream: cannot listen on 127.0.0.1:%d: %s" % (args.port, e.strerror or e))
    port = server.server_address[1]
    if args.port_file:
        tmp = "%s.tmp.%d" % (args.port_file, os.getpid())
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.replace(tmp, args.port_file)

    stop = threading.Event()
    why = []
    signal.signal(signal.SIGTERM, lambda s, f: (why.append("SIGTERM"), stop.set()))
    signal.signal(signal.SIGINT, lambda s, f: (why.append("SIGINT"), stop.set()))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                     daemon=True, name="accept").start()
    print("listening on 127.0.0.1:%d" % port, flush=True)
    if not stop.wait(args.max_seconds):
        why.append("max-seconds reached")
    server.shutdown()
    server.server_close()
    if args.verbose or why[0] != "SIGTERM":
        sys.stderr.write("upstream: exiting (%s)\n" % why[0])
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(0)  # daemon threads may sit in hang=1 or in a keep-alive read


if __name__ == "__main__":
    main()
