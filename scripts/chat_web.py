"""
Chat with a model in the browser, or through any OpenAI-compatible client.

    python -m scripts.chat_web                      # latest SFT model, http://localhost:8000
    python -m scripts.chat_web --source rl --num-gpus 8

Endpoints:
    GET  /                       the chat page (nanochat/ui.html)
    POST /chat/completions       the page's own streaming endpoint (server-sent events)
    POST /v1/chat/completions    OpenAI-compatible (stream or not), for the `openai` client, curl, other front ends
    GET  /v1/models, /health
    GET  /stats                  rows in flight, queue length, tokens/s over the last minute, KV-cache memory in use

The server is a thin HTTP layer: it validates and translates requests, the batcher (nanochat/batching.py)
owns generation, the tokenizer owns the chat format. One model replica per GPU, each decoding up to
--max-batch replies together (continuous batching: a request joins the running batch at the next step and
leaves it the moment it ends). Requests beyond the slots wait in a bounded queue; when it is full the
server answers 503 with Retry-After rather than piling up work.

Clients may be hostile: request bodies over 1 MB are refused as they arrive, JSON too deep or with too
many values before it is parsed, a request must arrive whole within --request-timeout seconds, connections
beyond --max-connections get 503, and every parameter is checked before any of it reaches the model. Web pages
may be hostile too: a POST must carry JSON, a request from another site's page is refused unless --cors-origins
allows it, a loopback server answers only to loopback names (DNS rebinding), and the chat page runs under a
Content-Security-Policy. The guards live in nanochat/http_guards.py. /docs and /openapi.json only with --api-docs.
"""
import argparse
import asyncio
import json
import os
import sys
import time
import uuid

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanochat.common import COMPUTE_DTYPES, autodetect_device_type, logger
from nanochat.engine import Engine, prepare_for_inference
from nanochat.execution import find_sandbox
from nanochat.http_guards import (RequestError, allowed_hosts, check_json_shape, error_response, guard,
                                  h11_with_request_deadline, is_loopback, parse_origins)
from nanochat.batching import GenerationRequest, QueueFull, Batcher

# Limits on what one request may ask for: each violation is a 400 that names the limit.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 = no top-k
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
MAX_STOP_SEQUENCES = 4
MAX_BODY_BYTES = 1_000_000
MAX_JSON_DEPTH = 16  # a chat request needs 4 (body, messages, message, content parts)
MAX_JSON_VALUES = 20_000  # strings, and brackets and commas: MAX_MESSAGES messages of 4 text parts have ~10,000 of each
# The sampler works in float32: a temperature below ~1e-37 divides logits into inf (NaN probabilities) and
# a top_p below ~1e-45 rounds to 0 and drops every token; both crashed the generation (a 500). Below these
# floors sampling is greedy in effect anyway (the top token's probability is at least 1/vocab_size > 1e-9).
MIN_SAMPLING_TEMPERATURE = 1e-3  # a lower positive temperature samples greedily, as 0 does
MIN_TOP_P = 1e-9  # a lower top_p (0 included, which OpenAI allows) keeps only the most likely token


def _number(body, name, default, low, high, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):  # bool is an int in Python; true is not a number
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}", name, f"invalid_{name}")
    if not low <= value <= high:  # also false for NaN (json.loads reads NaN, Infinity and 1e999 as floats)
        raise RequestError(f"{name} must be between {low} and {high} (got {value})", name, f"{name}_out_of_range")
    return value


def _flag(mapping, name, param):
    value = mapping.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):  # bool("no") is True: a string or a number here is a client bug, say so
        raise RequestError(f"{param} must be true or false", param, f"invalid_{name}")
    return value


def _content_text(content, index):
    # OpenAI clients may send content as a list of parts; we keep the text parts
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
            raise RequestError(f"messages[{index}].content parts must be {{'type': 'text', 'text': str}}", "messages", "invalid_content")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{index}].content must be a string", "messages", "invalid_content")
    return content


def parse_request(raw_body, defaults):
    """Validate a chat request body (bytes) -> (messages, sampling options, stream options). Raises RequestError."""
    if len(raw_body) > MAX_BODY_BYTES:
        raise RequestError(f"request body is larger than {MAX_BODY_BYTES} bytes", None, "body_too_large", status=413)
    check_json_shape(raw_body, MAX_JSON_DEPTH, MAX_JSON_VALUES)  # before json.loads: what it costs is bounded
    try:
        body = json.loads(raw_body)
    except ValueError as e:  # bad JSON, bad UTF-8, or an integer of more than 4300 digits
        raise RequestError(f"request body is not valid JSON: {e}", None, "invalid_json")
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", None, "invalid_json")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages", "invalid_messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: {len(messages)} > {MAX_MESSAGES}", "messages", "too_many_messages")
    clean, total_chars = [], 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RequestError(f"messages[{index}] must be an object with role and content", "messages", "invalid_message")
        role = message["role"]
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{index}].role must be system, user or assistant (got {role!r})", "messages", "invalid_role")
        content = _content_text(message["content"], index)
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(f"messages[{index}] has {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}",
                               "messages", "message_too_long")
        total_chars += len(content)
        clean.append({"role": role, "content": content})
    if total_chars > MAX_TOTAL_CHARS:
        raise RequestError(f"the conversation has {total_chars} characters; the limit is {MAX_TOTAL_CHARS}",
                           "messages", "conversation_too_long")
    # the order of roles is the chat format's rule (tokenizer.render_for_completion checks it); the API's own
    # rule is only that a completion answers the user
    if clean[-1]["role"] != "user":
        raise RequestError("the last message must be from the user", "messages", "invalid_role_order")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int):
        raise RequestError("n must be an integer (only 1 is supported)", "n", "invalid_n")
    if n != 1:
        raise RequestError("only n=1 is supported", "n", "n_out_of_range")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_SEQUENCES:
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them", "stop", "invalid_stop")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("stream_options must be an object", "stream_options", "invalid_stream_options")
    stream = {"stream": _flag(body, "stream", "stream"),
              "include_usage": _flag(stream_options, "include_usage", "stream_options.include_usage")}
    options = {
        "temperature": _number(body, "temperature", defaults.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE),
        "top_k": _number(body, "top_k", defaults.top_k, MIN_TOP_K, MAX_TOP_K, integer=True),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "max_tokens": _number(body, "max_completion_tokens", None, MIN_MAX_TOKENS, MAX_MAX_TOKENS, integer=True)
                      or _number(body, "max_tokens", defaults.max_tokens, MIN_MAX_TOKENS, MAX_MAX_TOKENS, integer=True),
        "seed": _number(body, "seed", None, -2**63, 2**63 - 1, integer=True),
        "stop": stop,
    }
    if options["temperature"] < MIN_SAMPLING_TEMPERATURE:
        options["temperature"] = 0.0
    options["top_p"] = max(options["top_p"], MIN_TOP_P)
    return clean, options, stream


def render_prompt(tokenizer, messages, context_length, options):
    """
    The prompt tokens of a validated conversation. The chat format and its role rules are the tokenizer's;
    the server adds its context limit and keeps max_tokens within it.
    """
    try:
        prompt = tokenizer.render_for_completion(messages)
    except ValueError as e:
        raise RequestError(str(e), "messages", "invalid_role_order")
    if len(prompt) + 1 > context_length:
        raise RequestError(f"the conversation is {len(prompt)} tokens; this model's context is {context_length}",
                           "messages", "context_length_exceeded")
    options["max_tokens"] = min(options["max_tokens"], context_length - len(prompt))
    return prompt


def start_reply(batcher, prompt, options):
    """
    Queue one reply with the batcher. Returns (generation, events): the GenerationRequest and an asyncio.Queue
    that receives its events on this event loop. Raises a 503 RequestError when the slots and the queue are full.
    """
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    generation = GenerationRequest(prompt=prompt, emit=lambda *event: loop.call_soon_threadsafe(events.put_nowait, event),
                                   **options)
    try:
        batcher.submit(generation)
    except QueueFull as e:
        raise RequestError(str(e), None, "queue_full", status=503)
    return generation, events


UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")


def build_app(batcher, tokenizer, model_name, defaults, context_length, page_html, api_docs=False):
    """HTTP -> batcher: each handler validates and translates a request, the batcher generates, the handler relays."""
    # the interactive docs and the schema are off unless asked for: they map every endpoint for anyone
    app = FastAPI(title="nanochat", docs_url="/docs" if api_docs else None, redoc_url="/redoc" if api_docs else None,
                  openapi_url="/openapi.json" if api_docs else None)

    def log_request(path, status, started, **fields):
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        logger.info(f"{path} {status} {1000 * (time.perf_counter() - started):.0f}ms {extra}".rstrip())

    @app.get("/")
    async def root():
        log_request("/", 200, time.perf_counter())
        return HTMLResponse(page_html)

    @app.get("/health")
    async def health():
        log_request("/health", 200, time.perf_counter())
        return {"status": "ok", "model": model_name, "replicas": len(batcher.replicas)}

    @app.get("/stats")
    async def stats():
        log_request("/stats", 200, time.perf_counter())
        return batcher.snapshot()

    @app.get("/v1/models")
    async def models():
        log_request("/v1/models", 200, time.perf_counter())
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanochat"}]}

    async def start(request, path, started):
        """Parse, validate, tokenize and queue. Returns ((generation, events, stream, log fields), None) or (None, an error response)."""
        try:
            messages, options, stream = parse_request(await request.body(), defaults)
            prompt = render_prompt(tokenizer, messages, context_length, options)
            generation, events = start_reply(batcher, prompt, options)
        except RequestError as e:
            log_request(path, e.status, started, error=e.code)
            return None, error_response(e, {"Retry-After": "1"} if e.status == 503 else None)
        return (generation, events, stream, {"messages": len(messages), "prompt_tokens": len(prompt)}), None

    async def relay(generation, events, path, started, fields, watch=None):
        """
        The reply's events up to its end. Whoever stops reading (the client hung up, the stream closed) cancels
        the generation: its row leaves the batch at the next step. One log line per request, whatever happens.
        watch: the HTTP request of a non-streamed reply, polled for a hang-up (nothing is written to notice it by).
        """
        finish_reason, completion_tokens, status, received = "cancelled", 0, 200, 0
        try:
            while True:
                # yield to the loop first: uvicorn learns of a reset connection in a callback, and each write
                # before that callback runs (queued events go out back to back) logs an asyncio warning
                await asyncio.sleep(0)
                try:
                    event = await asyncio.wait_for(events.get(), timeout=None if watch is None else 0.5)
                except asyncio.TimeoutError:
                    event = None
                received += 1
                if watch is not None and (event is None or received % 32 == 0) and await watch.is_disconnected():
                    break
                if event is None:
                    continue
                yield event
                if event[0] == "end":
                    _, finish_reason, completion_tokens = event
                    break
                if event[0] == "error":
                    finish_reason, status = "error", 200 if watch is None else 500
                    break
        finally:
            batcher.cancel(generation)
            log_request(path, status, started, stream=watch is None, finish=finish_reason,
                        completion_tokens=completion_tokens, **fields)

    def sse(payload):
        return f"data: {json.dumps(payload)}\n\n"

    def server_error(message):
        return {"error": {"message": message, "type": "server_error"}}

    @app.post("/v1/chat/completions")
    async def openai_chat(request: Request):
        path, started = "/v1/chat/completions", time.perf_counter()
        started_reply, error = await start(request, path, started)
        if error is not None:
            return error
        generation, events, stream, fields = started_reply
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        prompt_tokens = fields["prompt_tokens"]

        def usage(completion_tokens):
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        if not stream["stream"]:
            pieces, finish_reason, completion_tokens, failure = [], "cancelled", 0, None
            async for event in relay(generation, events, path, started, fields, watch=request):
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "error":
                    failure = event[1]
                else:
                    _, finish_reason, completion_tokens = event
            if failure:
                return JSONResponse(server_error(failure), status_code=500)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                 "finish_reason": finish_reason}],
                    "usage": usage(completion_tokens)}

        def chunk(delta, finish_reason=None):
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            if stream["include_usage"]:
                payload["usage"] = None
            return sse(payload)

        async def body():
            yield chunk({"role": "assistant", "content": ""})
            async for event in relay(generation, events, path, started, fields):
                if event[0] == "text":
                    yield chunk({"content": event[1]})
                elif event[0] == "error":
                    yield sse(server_error(event[1]))
                else:
                    _, finish_reason, completion_tokens = event
                    yield chunk({}, finish_reason)
                    if stream["include_usage"]:
                        yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": model_name, "choices": [], "usage": usage(completion_tokens)})
                    yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/chat/completions")
    async def page_chat(request: Request):
        path, started = "/chat/completions", time.perf_counter()
        started_reply, error = await start(request, path, started)
        if error is not None:
            return error
        generation, events, _, fields = started_reply

        async def body():
            async for event in relay(generation, events, path, started, fields):
                if event[0] == "text":
                    yield sse({"token": event[1]})
                elif event[0] == "error":
                    yield sse(server_error(event[1]))
                else:
                    yield sse({"done": True, "finish_reason": event[1], "completion_tokens": event[2]})

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def allow_code_without_sandbox(host, allow_flag):
    """
    Whether tool calls that need Python (not the in-process calculator) may run when only the weak sandbox exists.
    Reachable only from this machine: yes, whoever chats is already here. Open to a network: only when asked
    (--allow-unsandboxed-code), since anyone who can chat could steer the model into running code on this host.
    """
    return is_loopback(host) or allow_flag


def sandbox_policy_line(host, allow_flag):
    """One startup log line: what contains model-written code here, and what the server does about it."""
    sandbox = find_sandbox()
    if sandbox.strong:
        return f"tool calls: calculator in-process, other code in {sandbox.description}"
    if allow_code_without_sandbox(host, allow_flag):
        return f"tool calls: calculator in-process, other code with {sandbox.description}: not a security boundary"
    return (f"tool calls: calculator only. Other code is refused on {host} because this host has {sandbox.description}; "
            f"install bubblewrap, bind to 127.0.0.1, or pass --allow-unsandboxed-code to run it anyway")


def load_engines(args):
    """One replica per GPU (--num-gpus), or a single one on CPU/MPS: an Engine each, weights in --dtype."""
    from nanochat.checkpoint_manager import load_model, most_advanced_source
    if args.source is None:
        try:
            args.source = most_advanced_source()
        except FileNotFoundError as e:
            raise SystemExit(str(e))
        logger.info(f"using the {args.source} model (the most advanced stage found; -i picks another)")
    device_type = args.device_type or autodetect_device_type()
    if device_type == "cuda":
        available = torch.cuda.device_count()
        if args.num_gpus > available:
            raise SystemExit(f"--num-gpus {args.num_gpus} but only {available} GPUs are visible; lower --num-gpus")
        devices = [torch.device("cuda", i) for i in range(args.num_gpus)]
    else:
        devices = [torch.device(device_type)]
    engines, tokenizer, meta = [], None, None
    for device in devices:
        try:
            model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
            model, decode_path = prepare_for_inference(model, args.dtype, args.decoder)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"cannot load the {args.source} model: {e}")
        engines.append(Engine(model, tokenizer, allow_weak_sandbox=allow_code_without_sandbox(args.host, args.allow_unsandboxed_code),
                              **decode_path))
    return engines, tokenizer, meta


def main():
    parser = argparse.ArgumentParser(description="Chat web server with an OpenAI-compatible API")
    parser.add_argument("--host", type=str, default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("-i", "--source", type=str, default=None, choices=["base", "mid", "sft", "rl"],
                        help="which stage's model (default: the most advanced that exists: rl, sft, mid, base)")
    parser.add_argument("--model-tag", type=str, default=None, help="model tag such as d20 (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--num-gpus", type=int, default=1, help="model replicas, one per GPU (CPU always uses one)")
    parser.add_argument("--device-type", type=str, default=None, help="cuda | mps | cpu (default: autodetect)")
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 = off)")
    parser.add_argument("--max-tokens", type=int, default=512, help="default maximum tokens per reply")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="replies each replica decodes together (continuous batching); more wait in the queue")
    parser.add_argument("--queue-size", type=int, default=32, help="requests that may wait for a free batch slot before 503")
    parser.add_argument("--dtype", type=str, default="auto", choices=COMPUTE_DTYPES,
                        help="inference weights. With the CPU decoder (a CPU, decode_kernels built): the dtype of its weight "
                             "copy, auto = whichever decodes faster here (measured at start). Otherwise: auto = bf16 on CUDA "
                             "and on CPUs with bf16 hardware (AMX, AVX512-BF16), else float32")
    parser.add_argument("--decoder", type=str, default="auto", choices=["auto", "torch"],
                        help="auto = the CPU decoder where it runs (batch-invariant Rust kernels), else GPT.forward; "
                             "torch = always GPT.forward (on a CPU with AMX or AVX512-BF16 and --dtype auto: torch's bf16 matmuls)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--request-timeout", type=float, default=10.0,
                        help="seconds a client has to send a whole request (headers and body) before it is "
                             "disconnected; stops idle and slow (slowloris) connections from holding sockets")
    parser.add_argument("--max-connections", type=int, default=256,
                        help="open connections (or requests in progress) beyond which new requests get 503 "
                             "(uvicorn's limit_concurrency)")
    parser.add_argument("--api-docs", action="store_true", help="serve /docs, /redoc and /openapi.json (off by default)")
    parser.add_argument("--cors-origins", type=str, default=None,
                        help="comma-separated origins (e.g. http://localhost:3000) whose web pages may call this server "
                             "from a browser, '*' for any; requests from other sites' pages get 403 (default: none)")
    parser.add_argument("--allowed-hosts", type=str, default=None,
                        help="comma-separated host names the server answers to (Host header, port ignored); default: "
                             "on a loopback --host only localhost, 127.0.0.1 and [::1] (stops DNS rebinding), else any")
    parser.add_argument("--allow-unsandboxed-code", action="store_true",
                        help="on a non-loopback --host without bubblewrap, still run the model's non-calculator tool code "
                             "(in the weak in-process sandbox, which is not a security boundary)")
    args = parser.parse_args()
    if args.request_timeout <= 0 or args.max_connections < 1:
        parser.error("--request-timeout must be above 0 seconds and --max-connections at least 1")
    if args.max_batch < 1 or args.queue_size < 0:
        parser.error("--max-batch must be at least 1 and --queue-size at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    # the decode threads run Python between torch calls and hold the GIL meanwhile; the event loop, which turns
    # their tokens into bytes on sockets, would otherwise wait up to 5 ms (the default) each time it needs it
    sys.setswitchinterval(0.0005)
    import uvicorn
    engines, tokenizer, meta = load_engines(args)
    config = meta["model_config"]
    model_name = f"nanochat-{args.source}-d{config['n_layer']}"
    context_length = config["sequence_len"]  # what the model was trained on; beyond it replies degrade
    batcher = Batcher(engines, max_batch=args.max_batch, queue_size=args.queue_size)
    with open(UI_PATH, encoding="utf-8") as f:
        page_html = f.read()  # read once: the Content-Security-Policy allows its inline script and style by hash
    app = build_app(batcher, tokenizer, model_name, args, context_length, page_html, api_docs=args.api_docs)
    hosts, origins = allowed_hosts(args.host, args.allowed_hosts), parse_origins(args.cors_origins)
    app = guard(app, page_html, MAX_BODY_BYTES, hosts, origins)
    logger.info(f"serving {model_name} on {len(engines)} replica(s) of up to {args.max_batch} rows, decoding with "
                f"{engines[0].describe()}, at http://{args.host}:{args.port}")
    logger.info(sandbox_policy_line(args.host, args.allow_unsandboxed_code))
    logger.info(f"answering Host names: {', '.join(sorted(hosts)) if hosts else 'any'}; "
                f"pages of other origins allowed: {', '.join(sorted(origins)) or 'none'} (--allowed-hosts, --cors-origins)")
    uvicorn.run(app, host=args.host, port=args.port, access_log=False,
                log_level="warning", http=h11_with_request_deadline(args.request_timeout),
                limit_concurrency=args.max_connections)


if __name__ == "__main__":
    main()
