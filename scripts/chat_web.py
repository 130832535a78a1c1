"""
Chat with a model in the browser, or through any OpenAI-compatible client.

    python -m scripts.chat_web                      # latest SFT model, http://localhost:8000
    python -m scripts.chat_web --source rl --num-gpus 8

Endpoints:
    GET  /                       the chat page (nanochat/ui.html)
    POST /chat/completions       the page's own streaming endpoint (server-sent events)
    POST /v1/chat/completions    OpenAI-compatible (stream or not), for the `openai` client, curl, other front ends
    GET  /v1/models, /health, /stats

One model replica per GPU, each driven by its own thread. Requests beyond the replicas wait in a
bounded queue; when it is full the server answers 503 with Retry-After rather than piling up work.
"""
import argparse
import asyncio
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanochat.common import autodetect_device_type, logger
from nanochat.engine import Engine, IncrementalDecoder, prepare_for_inference, tool_call_display

# Limits on what one request may ask for: each violation is a 400 that names the limit.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 = no top-k
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
MAX_STOP_SEQUENCES = 4
MAX_BODY_BYTES = 1_000_000


class RequestError(Exception):
    """A bad request: becomes an OpenAI-style JSON error naming the parameter and the limit (`code`)."""

    def __init__(self, message, param=None, code="invalid_request", status=400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_response(error, headers=None):
    body = {"error": {"message": error.message, "type": "invalid_request_error", "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=headers)


def _number(body, name, default, low, high, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}", name, f"invalid_{name}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high} (got {value})", name, f"{name}_out_of_range")
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
    try:
        body = json.loads(raw_body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
    # roles and their order: optional system first, then user/assistant alternating, ending with the user
    turns = clean[1:] if clean[0]["role"] == "system" else clean
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RequestError(f"message order: expected a {expected} message at position {index + len(clean) - len(turns)} "
                               f"(after an optional system message, user and assistant alternate, user first)",
                               "messages", "invalid_role_order")
    if not turns or turns[-1]["role"] != "user":
        raise RequestError("the last message must be from the user", "messages", "invalid_role_order")
    n = body.get("n", 1)
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
    options = {
        "temperature": _number(body, "temperature", defaults.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE),
        "top_k": _number(body, "top_k", defaults.top_k, MIN_TOP_K, MAX_TOP_K, integer=True),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "max_tokens": _number(body, "max_completion_tokens", None, MIN_MAX_TOKENS, MAX_MAX_TOKENS, integer=True)
                      or _number(body, "max_tokens", defaults.max_tokens, MIN_MAX_TOKENS, MAX_MAX_TOKENS, integer=True),
        "seed": _number(body, "seed", None, -2**63, 2**63 - 1, integer=True),
        "stop": stop,
    }
    if options["top_p"] == 0.0:
        options["top_p"] = 1e-9  # OpenAI accepts 0: "only the most likely token"
    stream = {"stream": bool(body.get("stream", False)), "include_usage": bool(stream_options.get("include_usage", False))}
    return clean, options, stream


class Worker:
    """One model replica on one device, with its own thread (torch work never blocks the event loop)."""

    def __init__(self, index, model, tokenizer, device):
        self.index = index
        self.engine = Engine(model, tokenizer)
        self.device = device
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"worker{index}")


class WorkerPool:

    def __init__(self, workers, queue_size):
        self.workers = workers
        self.queue_size = queue_size
        self.free = None  # an asyncio.Queue, made inside the server's event loop
        self.waiting = 0
        self.stats = {"requests_served": 0, "tokens_generated": 0, "requests_rejected": 0}

    async def acquire(self):
        if self.free is None:
            self.free = asyncio.Queue()
            for worker in self.workers:
                self.free.put_nowait(worker)
        if self.free.empty() and self.waiting >= self.queue_size:
            self.stats["requests_rejected"] += 1
            raise RequestError(f"server busy: all {len(self.workers)} workers are busy and {self.waiting} requests are "
                               f"waiting (the queue limit); retry shortly", None, "queue_full", status=503)
        self.waiting += 1
        try:
            return await self.free.get()
        finally:
            self.waiting -= 1

    def release(self, worker):
        self.free.put_nowait(worker)

    def snapshot(self):
        free = self.free.qsize() if self.free is not None else len(self.workers)
        return {"workers_total": len(self.workers), "workers_free": free, "workers_busy": len(self.workers) - free,
                "requests_waiting": self.waiting, "queue_size": self.queue_size, **self.stats}


def start_generation(pool, worker, prompt_tokens, options):
    """
    Run the engine for one request on the worker's thread. Returns (events, cancel): an asyncio.Queue
    of ("text", str) ... ("end", finish_reason, completion_tokens) | ("error", message), and an
    Event that stops the generation at the next token. The worker goes back to the pool the moment
    its thread stops, whoever stops it (end of reply, stop sequence, or client gone).
    """
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    cancel = threading.Event()
    engine = worker.engine
    tokenizer = engine.tokenizer
    stops = options["stop"]
    hold_back = max((len(s) for s in stops), default=1) - 1  # text that might still become a stop sequence

    def emit(*event):
        loop.call_soon_threadsafe(events.put_nowait, event)

    def produce():
        decoder = IncrementalDecoder(tokenizer, special_text=tool_call_display(tokenizer))
        finish_reason, generated, pending = "length", 0, ""
        # OpenAI seeds may be negative; torch wants 0..2**64-1. No seed: a fresh random one per request.
        seed = options["seed"] % 2**63 if options["seed"] is not None else int.from_bytes(os.urandom(4), "little")
        try:
            for token_column, _ in engine.generate(prompt_tokens, num_samples=1, max_tokens=options["max_tokens"],
                                                   temperature=options["temperature"], top_k=options["top_k"],
                                                   top_p=options["top_p"], seed=seed):
                if cancel.is_set():
                    finish_reason = "cancelled"
                    break
                token = token_column[0]
                generated += 1
                if token == engine.assistant_end or token == engine.bos:
                    finish_reason = "stop"
                    break
                pending += decoder.feed(token)
                if stops:
                    hits = [pending.find(s) for s in stops if s in pending]
                    if hits:
                        pending = pending[:min(hits)]
                        finish_reason = "stop"
                        break
                if len(pending) > hold_back:
                    cut = len(pending) - hold_back
                    emit("text", pending[:cut])
                    pending = pending[cut:]
            if finish_reason == "length":
                pending += decoder.flush()
            if pending:
                emit("text", pending)
            emit("end", finish_reason, generated)
        except Exception as e:  # a crash in one request must not take the server down
            logger.exception("generation failed")
            emit("error", f"generation failed: {type(e).__name__}")
        finally:
            pool.stats["tokens_generated"] += generated
            loop.call_soon_threadsafe(pool.release, worker)

    loop.run_in_executor(worker.executor, produce)
    return events, cancel


def build_app(pool, tokenizer, model_name, defaults, context_length):
    app = FastAPI(title="nanochat")
    ui_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")

    def log_request(path, status, started, **fields):
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        logger.info(f"{path} {status} {1000 * (time.perf_counter() - started):.0f}ms {extra}".rstrip())

    @app.get("/")
    async def root():
        log_request("/", 200, time.perf_counter())
        with open(ui_path, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    async def health():
        log_request("/health", 200, time.perf_counter())
        return {"status": "ok", "model": model_name, "workers": len(pool.workers)}

    @app.get("/stats")
    async def stats():
        log_request("/stats", 200, time.perf_counter())
        return pool.snapshot()

    @app.get("/v1/models")
    async def models():
        log_request("/v1/models", 200, time.perf_counter())
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanochat"}]}

    async def prepare(request, path, started):
        """Parse, validate, tokenize and take a worker. Returns (worker, prompt, options, stream) or an error response."""
        try:
            messages, options, stream = parse_request(await request.body(), defaults)
            try:
                prompt = tokenizer.render_for_completion(messages)
            except ValueError as e:
                raise RequestError(str(e), "messages", "invalid_role_order")
            if len(prompt) + 1 > context_length:
                raise RequestError(f"the conversation is {len(prompt)} tokens; this model's context is {context_length}",
                                   "messages", "context_length_exceeded")
            options["max_tokens"] = min(options["max_tokens"], context_length - len(prompt))
            worker = await pool.acquire()
        except RequestError as e:
            log_request(path, e.status, started, error=e.code)
            headers = {"Retry-After": "1"} if e.status == 503 else None
            return None, error_response(e, headers)
        return (worker, prompt, options, stream, len(messages)), None

    def sse(payload):
        return f"data: {json.dumps(payload)}\n\n"

    async def relay(events, cancel, on_text, on_end, path, started, fields):
        """Yield what the generation thread produces; a client that goes away cancels it at once."""
        finish_reason, completion_tokens = "cancelled", 0
        try:
            while True:
                event = await events.get()
                if event[0] == "text":
                    yield on_text(event[1])
                elif event[0] == "error":
                    yield sse({"error": {"message": event[1], "type": "server_error"}})
                    finish_reason = "error"
                    break
                else:
                    _, finish_reason, completion_tokens = event
                    for chunk in on_end(finish_reason, completion_tokens):
                        yield chunk
                    break
        finally:
            cancel.set()
            pool.stats["requests_served"] += 1
            log_request(path, 200, started, stream=True, finish=finish_reason, completion_tokens=completion_tokens, **fields)

    @app.post("/v1/chat/completions")
    async def openai_chat(request: Request):
        started = time.perf_counter()
        prepared, error = await prepare(request, "/v1/chat/completions", started)
        if error is not None:
            return error
        worker, prompt, options, stream, n_messages = prepared
        events, cancel = start_generation(pool, worker, prompt, options)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        fields = {"messages": n_messages, "prompt_tokens": len(prompt), "worker": worker.index}

        def usage(completion_tokens):
            return {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens, "total_tokens": len(prompt) + completion_tokens}

        if not stream["stream"]:
            pieces, finish_reason, completion_tokens, checks = [], "length", 0, 0
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(events.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        event = None
                    checks += 1
                    if event is None or checks % 32 == 0:
                        if await request.is_disconnected():
                            finish_reason = "cancelled"
                            break
                    if event is None:
                        continue
                    if event[0] == "text":
                        pieces.append(event[1])
                    elif event[0] == "error":
                        return JSONResponse({"error": {"message": event[1], "type": "server_error"}}, status_code=500)
                    else:
                        _, finish_reason, completion_tokens = event
                        break
            finally:
                cancel.set()
                pool.stats["requests_served"] += 1
                log_request("/v1/chat/completions", 200, started, stream=False, finish=finish_reason,
                            completion_tokens=completion_tokens, **fields)
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

        def on_end(finish_reason, completion_tokens):
            yield chunk({}, finish_reason)
            if stream["include_usage"]:
                yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                           "choices": [], "usage": usage(completion_tokens)})
            yield "data: [DONE]\n\n"

        async def body():
            yield chunk({"role": "assistant", "content": ""})
            async for piece in relay(events, cancel, lambda text: chunk({"content": text}), on_end,
                                     "/v1/chat/completions", started, fields):
                yield piece

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/chat/completions")
    async def page_chat(request: Request):
        started = time.perf_counter()
        prepared, error = await prepare(request, "/chat/completions", started)
        if error is not None:
            return error
        worker, prompt, options, _, n_messages = prepared
        events, cancel = start_generation(pool, worker, prompt, options)
        fields = {"messages": n_messages, "prompt_tokens": len(prompt), "worker": worker.index}

        def on_end(finish_reason, completion_tokens):
            yield sse({"done": True, "finish_reason": finish_reason, "completion_tokens": completion_tokens})

        body = relay(events, cancel, lambda text: sse({"token": text}), on_end, "/chat/completions", started, fields)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def load_workers(args):
    """One replica per GPU (--num-gpus), or a single one on CPU/MPS."""
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
    workers, tokenizer, meta = [], None, None
    for index, device in enumerate(devices):
        try:
            model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
            model = prepare_for_inference(model)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"cannot load the {args.source} model: {e}")
        workers.append(Worker(index, model, tokenizer, device))
    return workers, tokenizer, meta


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
    parser.add_argument("--queue-size", type=int, default=32, help="requests that may wait for a busy worker before 503")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import uvicorn
    workers, tokenizer, meta = load_workers(args)
    config = meta["model_config"]
    model_name = f"nanochat-{args.source}-d{config['n_layer']}"
    context_length = config["sequence_len"]  # what the model was trained on; beyond it replies degrade
    pool = WorkerPool(workers, args.queue_size)
    app = build_app(pool, tokenizer, model_name, args, context_length)
    logger.info(f"serving {model_name} on {len(workers)} worker(s) at http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
