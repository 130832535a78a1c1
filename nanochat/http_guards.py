"""
What stands between the network and the chat server's handlers (scripts/chat_web.py). A model server is
expensive to run and easy to hurt; each guard here answers one way a client, or a web page open in someone's
browser, could hurt it, and refuses with an OpenAI-style JSON error that names the problem:

    memory      refuse_large_bodies        a body over the limit is refused as it arrives, not after it is read
    sockets     h11_with_request_deadline  a request must arrive whole in time (idle and slowloris connections)
    CPU, stack  check_json_shape           JSON too deep (json.loads recurses per level) or with too many values
                                           (a 1 MB body of [],[],... is 333,000 lists to build, then collect,
                                           while every other client waits) is refused from counts of its bytes
    browsers    refuse_cross_site_requests a page on another site may make the visitor's browser POST here:
                                           only same-origin requests (or --cors-origins) with a JSON body pass,
                                           and on a loopback bind only loopback Host names (DNS rebinding)
    the page    security_headers           the page runs only its own inline script and style, talks only to
                                           this server, and cannot be framed (clickjacking)

The JSON limits bound the work rather than moving it to a thread: json.loads and the bytes scans run in C
holding the GIL, so in another thread they would stall the event loop just the same.
"""
import base64
import hashlib
import re
from itertools import accumulate

from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat.common import logger


class RequestError(Exception):
    """A bad request: becomes an OpenAI-style JSON error naming the parameter and the limit (`code`)."""

    def __init__(self, message, param=None, code="invalid_request", status=400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_response(error, headers=None):
    """The JSON error body OpenAI's API uses, so an OpenAI client library shows the message as it is."""
    body = {"error": {"message": error.message, "type": "invalid_request_error", "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=headers)


async def refuse(scope, receive, send, error, **fields):
    """Answer `error` from an ASGI guard, log it, and close the connection: any body it had goes unread."""
    extra = "".join(f" {k}={v}" for k, v in fields.items())
    logger.info(f"{scope['path']} {error.status} error={error.code}{extra}")
    await error_response(error, headers={"Connection": "close"})(scope, receive, send)


# ---- JSON shape: bounded before json.loads ------------------------------------------------------

# every byte except the five that give JSON its structure: bytes.translate(None, NOT_STRUCTURE) deletes them all
# in one pass in C, leaving only brackets and commas
NOT_STRUCTURE = bytes(byte for byte in range(256) if byte not in b"[]{},")
# how each structural byte changes the nesting depth; the running sum over the bytes is the depth at each point
NESTING_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1, ord(","): 0}


def check_json_shape(raw_body, max_depth, max_values):
    """
    Raise a 400 RequestError when raw_body's JSON would cost json.loads too much: more than max_values values
    (counted two ways, strings by their quotes, containers and items by the brackets and commas outside strings)
    or nesting deeper than max_depth (it recurses once per level: 5,000 levels crashed it). Found without
    parsing, each count before the step whose cost it bounds: the split makes an object per string, the depth
    walk takes a Python-speed step per bracket or comma.
    """
    # drop escaped backslashes, then escaped quotes: every quote left opens or closes a string. (A regex for
    # strings with escapes is no shortcut: on 1 MB of \" it backtracks quadratically, for hours.)
    unescaped = raw_body.replace(b"\\\\", b"").replace(b'\\"', b"")
    # every string has an opening and a closing quote
    strings = unescaped.count(b'"') // 2
    if strings > max_values:
        raise RequestError(f"request body has more than {max_values} JSON values ({strings} strings)", None,
                           "json_too_many_values")
    outside_strings = b"".join(unescaped.split(b'"')[::2])  # brackets and commas inside strings are text
    structure = outside_strings.translate(None, NOT_STRUCTURE)
    if len(structure) > max_values:
        raise RequestError(f"request body has more than {max_values} JSON values ({len(structure)} brackets and "
                           f"commas)", None, "json_too_many_values")
    # the deepest point of the running sum; cheap now that `structure` holds at most max_values bytes
    if max(accumulate(map(NESTING_STEP.get, structure)), default=0) > max_depth:
        raise RequestError(f"request body nests arrays/objects more than {max_depth} levels deep", None, "json_too_deep")


# ---- bodies and slow clients ----------------------------------------------------------------------

def refuse_large_bodies(app, max_bytes):
    """
    ASGI wrapper: read each request's body before the app sees it, and answer 413 as soon as its
    Content-Length or the bytes received so far exceed max_bytes, without reading the rest. Starlette's
    request.body() reads the whole body first: a 1 GB upload took 2 GB of memory before its 413.
    """
    async def guarded_app(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        too_large = RequestError(f"request body is larger than {max_bytes} bytes", None, "body_too_large", status=413)
        declared = dict(scope["headers"]).get(b"content-length")  # h11 has checked it is a number
        if declared is not None and int(declared) > max_bytes:
            return await refuse(scope, receive, send, too_large, content_length=int(declared))
        # ASGI hands the body over in pieces as it arrives; each is counted before the next is awaited
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left (or missed --request-timeout) before its body was complete
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > max_bytes:  # chunked uploads have no Content-Length: count what arrives
                return await refuse(scope, receive, send, too_large, received=size)
            if not message.get("more_body", False):
                break
        # the app still expects to receive() its body: replay what was read, as one piece
        body, replayed = b"".join(chunks), False

        async def replay_receive():  # the body once, then what the client does next (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await app(scope, replay_receive, send)
    return guarded_app


def h11_with_request_deadline(seconds):
    """
    uvicorn's HTTP/1.1 protocol plus a deadline per request: from connecting (or from the end of its
    previous response) a client has `seconds` to send a whole request, headers and body, or it is
    disconnected. uvicorn 0.54 has no such timer: timeout_keep_alive only runs between requests and any
    byte cancels it, so an idle connection, or headers sent a byte at a time (slowloris), held a socket forever.
    """
    class H11WithRequestDeadline(H11Protocol):
        deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.start_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            self.start_deadline()  # the next request on this keep-alive connection gets its own time

        def connection_lost(self, exc):
            # a timer left behind would fire on a closed connection and keep the protocol object alive
            self.deadline.cancel()
            super().connection_lost(exc)

        def start_deadline(self):
            if self.deadline is not None:
                self.deadline.cancel()
            # call_later: a timer on the event loop, no thread; it fires once, `seconds` from now
            self.deadline = self.loop.call_later(seconds, self.drop_if_request_incomplete)

        def drop_if_request_incomplete(self):
            # a request fully received and being answered (a long stream, say) keeps its connection
            # uvicorn's cycle is the request being answered: it exists once the headers are in, and more_body
            # says the body is still arriving
            request_received = self.cycle is not None and not self.cycle.more_body and not self.cycle.response_complete
            if not request_received and not self.transport.is_closing():
                logger.info(f"dropped a connection: no complete request within {seconds} s (--request-timeout)")
                self.transport.close()

    return H11WithRequestDeadline


# ---- browsers: cross-site requests and DNS rebinding ---------------------------------------------

# the Host names a browser sends for this machine; IPv6 literals keep their brackets in a Host header
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}


def is_loopback(host):
    """Whether a --host address is reachable only from this machine."""
    # 127.0.0.0/8 is all loopback, not only 127.0.0.1
    return host == "localhost" or host.startswith("127.") or host == "::1"


def hostname(host):
    """A Host header (or a name given on the command line) without its port: 'localhost:8000' -> 'localhost'."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 address keeps its brackets: '[::1]:8000' -> '[::1]'
        return host[:host.find("]") + 1]
    return host.split(":", 1)[0]


def allowed_hosts(bind_host, listed=None):
    """
    The Host names the server answers to (None: any). A loopback server is reachable by any page in a local
    browser through DNS rebinding: evil.com's DNS answers 127.0.0.1, and the page's requests to evil.com, now
    "same-origin", reach this server, but with `Host: evil.com`. So on a loopback bind only loopback names
    (and the bind address) pass. `listed` (--allowed-hosts, comma-separated) replaces either default.
    """
    if listed:
        return {hostname(name) for name in listed.split(",") if name.strip()}
    if is_loopback(bind_host):
        return LOOPBACK_NAMES | {hostname(f"[{bind_host}]" if ":" in bind_host else bind_host)}
    return None


def parse_origins(listed):
    """--cors-origins 'https://a.example, http://localhost:3000' -> a set of origins as browsers send them."""
    return {origin.strip().rstrip("/").lower() for origin in (listed or "").split(",") if origin.strip()}


def cross_site_problem(scheme, method, headers, hosts, origins):
    """
    What makes a request one to refuse from its headers alone (a RequestError), or None. headers: ASGI's
    {name: value} bytes. hosts: allowed_hosts(); origins: parse_origins(), "*" for any.
    """
    host = headers.get(b"host", b"").decode("latin-1")
    if hosts is not None and hostname(host) not in hosts:
        return RequestError(f"Host {host!r} is not a name of this server (allowed: {', '.join(sorted(hosts))}; "
                            f"--allowed-hosts adds others)", "Host", "host_not_allowed", status=421)
    # browsers send Origin with every cross-origin request and every POST: a page elsewhere cannot leave it out
    origin = headers.get(b"origin", b"").decode("latin-1").lower()
    # no Origin: not a browser's cross-origin request (curl, a script, a same-origin GET), which CORS does not cover.
    # The page's own requests carry this server's origin, scheme://host as the client addressed it.
    if origin and origin != f"{scheme}://{host.lower()}" and origin not in origins and "*" not in origins:
        return RequestError(f"cross-origin requests from {origin} are refused (--cors-origins allows them)",
                            "Origin", "origin_not_allowed", status=403)
    # a form or a fetch with text/plain is a "simple" request: the browser sends it without asking first
    # (no CORS preflight), so without this check any page could make its visitor's browser start a generation
    media_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
    if method == "POST" and media_type != "application/json":
        return RequestError(f"Content-Type must be application/json (got {media_type or 'none'!r})", "Content-Type",
                            "unsupported_media_type", status=415)
    return None


def refuse_cross_site_requests(app, hosts, origins):
    """ASGI wrapper: refuse (421, 403, 415) what cross_site_problem finds, before the body is read."""
    async def guarded_app(scope, receive, send):
        if scope["type"] == "http":
            error = cross_site_problem(scope["scheme"], scope["method"], dict(scope["headers"]), hosts, origins)
            if error is not None:
                return await refuse(scope, receive, send, error)
        await app(scope, receive, send)
    return guarded_app


# ---- the page: what it may run and load -----------------------------------------------------------

def inline_hashes(html, tag):
    """CSP source expressions ('sha256-...') for the text of each inline <tag> element of html."""
    # the browser hashes the text after its HTML parser turned CR LF (and lone CR) into LF
    # re.S: the element's text spans lines; *? stops at the first closing tag, so each element is hashed alone
    texts = [text.replace("\r\n", "\n").replace("\r", "\n") for text in re.findall(rf"<{tag}[^>]*>(.*?)</{tag}>", html, re.S)]
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'" for text in texts) or "'none'"


def security_headers(page_html):
    """
    Headers for every response. The Content-Security-Policy lets the page run exactly its own inline script
    and style (by hash: an injected <script> or onerror= attribute, were the page's escaping ever to fail,
    would not run), connect only to this server, load nothing else, submit no form and sit in no frame.
    """
    policy = (f"default-src 'none'; script-src {inline_hashes(page_html, 'script')}; "
              f"style-src {inline_hashes(page_html, 'style')}; connect-src 'self'; base-uri 'none'; "
              f"form-action 'none'; frame-ancestors 'none'")
    # X-Frame-Options: frame-ancestors for browsers that predate CSP; nosniff: a response is only ever read as the
    # type it declares (a JSON reply cannot be run as a script); no-referrer: links leak nothing of the page's URL
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"}


def add_headers(app, headers):
    """ASGI wrapper: `headers` ({name: value}) on every HTTP response."""
    extra = [(name.lower().encode(), value.encode()) for name, value in headers.items()]

    async def with_headers(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_with_headers(message):
            # the headers travel in the first message of a response; the body messages that follow have none
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)
        await app(scope, receive, send_with_headers)
    return with_headers


def guard(app, page_html, max_body_bytes, hosts, origins):
    """
    app behind every guard, outermost first: security headers on every answer, refusals included; a foreign
    Host, a foreign Origin or a non-JSON POST refused from the headers; CORS answers for the --cors-origins
    (Starlette's middleware: preflights, Access-Control-Allow-Origin); a large body refused as it arrives.
    """
    # wrapped inside out: the last wrapper applied is the first to see a request
    app = refuse_large_bodies(app, max_body_bytes)
    if origins:
        app = CORSMiddleware(app, allow_origins=sorted(origins), allow_methods=["GET", "POST"], allow_headers=["*"],
                             max_age=600)
    app = refuse_cross_site_requests(app, hosts, origins)
    return add_headers(app, security_headers(page_html))
