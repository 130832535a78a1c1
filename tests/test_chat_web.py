"""
The web server, started for real (uvicorn in a subprocess on 127.0.0.1) with a tiny random model:
the official openai client (stream and not), limits and malformed requests, disconnects, the
bounded queue, hostile clients (odd numbers, deep or wide JSON, huge uploads, slowloris, too many connections),
hostile web pages (cross-site POSTs, foreign origins, DNS rebinding), and the chat page in headless Chromium under
its Content-Security-Policy, hostile markdown included.
"""
import base64
import dataclasses
import fcntl
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from nanochat.checkpoint_manager import save_checkpoint
from conftest import random_gpt

# every test here talks to a real subprocess that imports torch and loads a model (seconds each)
pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_tiny_model(base_dir, tokenizer, sequence_len=4096, n_embd=64):
    """A random 2-layer model as a real SFT checkpoint; its special tokens never win the argmax, so greedy replies run to max_tokens."""
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    model = random_gpt(tokenizer, sequence_len=sequence_len, n_head=2, n_kv_head=2, n_embd=n_embd)
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", "d2"), 1, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(model.config), "step": 1})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REQUEST_TIMEOUT = 1.5  # the server's --request-timeout here: short, so the slowloris test is quick
MAX_CONNECTIONS = 16  # the server's --max-connections here
MAX_BATCH = 2  # the server's --max-batch here: replies decoded together
ALLOWED_ORIGIN = "http://allowed.example:3000"  # the server's --cors-origins here


@pytest.fixture(scope="module")
def server(tiny_tokenizer, tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("web_base")
    # width 256, not 64: the exact kernels decode the narrow model at ~4,000 tok/s, so even a 4000-token reply
    # (the most one request may ask) would end before the request-timeout test's 1.5 s deadline
    save_tiny_model(str(base_dir), tiny_tokenizer, n_embd=256)
    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": REPO_ROOT}
    log_path = base_dir / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--host", "127.0.0.1", "--port", str(port),
                                "--device-type", "cpu", "--threads", "1", "--max-batch", str(MAX_BATCH), "--queue-size", "1",
                                "--request-timeout", str(REQUEST_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS),
                                "--cors-origins", ALLOWED_ORIGIN],
                               cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail("server did not start:\n" + log_path.read_text())
        time.sleep(0.2)
    yield {"url": url, "log": log_path, "pid": process.pid, "port": port}
    process.terminate()
    process.wait(timeout=10)
    log.close()


def wait_until_idle(url, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = httpx.get(url + "/stats").json()
        if stats["rows_in_flight"] == 0 and stats["requests_waiting"] == 0:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"replies still in flight after {timeout} s: {stats}")


def test_health_models_and_page(server):
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    # default flags on a CPU: the CPU decoder, whatever the CPU, with the weight copy measured faster; log and /stats say so
    decode = httpx.get(server["url"] + "/stats").json()["decode"]
    assert decode.startswith("the CPU decoder") and "--dtype auto: the faster weight copy" in decode, decode
    assert f"decoding with {decode}" in server["log"].read_text()
    models = httpx.get(server["url"] + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "nanochat-sft-d2"
    page = httpx.get(server["url"] + "/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert "http://" not in page.text.replace("http://127", "") and "https://" not in page.text, "the page must not load anything from the network"


def test_openai_client_stream_and_non_stream(server):
    from openai import OpenAI
    client = OpenAI(base_url=server["url"] + "/v1", api_key="unused")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there! Tell me a story."}]
    reply = client.chat.completions.create(model="nanochat-sft-d2", messages=messages, max_tokens=20, temperature=0.9, seed=7)
    text = reply.choices[0].message.content
    assert isinstance(text, str) and text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 20
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    stream = client.chat.completions.create(model="nanochat-sft-d2", messages=messages, max_tokens=20, temperature=0.9, seed=7,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text, "same seed, same reply, streamed or not"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1, "the reply arrives in pieces"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [reply.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    # a different seed gives a different reply; temperature 0 is deterministic
    other = client.chat.completions.create(model="x", messages=messages, max_tokens=20, temperature=0.9, seed=8)
    assert other.choices[0].message.content != text
    greedy = [client.chat.completions.create(model="x", messages=messages, max_tokens=10, temperature=0.0).choices[0].message.content
              for _ in range(2)]
    assert greedy[0] == greedy[1]
    wait_until_idle(server["url"])


def test_raw_stream_ends_with_done_and_stop_sequences_apply(server):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 30, "temperature": 0.0, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    full = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines[:-1])
    assert len(full) > 10
    stop = full[5:8]
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 30, "temperature": 0.0, "stop": [stop, "\x00never"]}
    reply = httpx.post(server["url"] + "/v1/chat/completions", json=body).json()
    assert reply["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert reply["choices"][0]["finish_reason"] == "stop"
    # top_p and the top_k extension are accepted; top_k=1 is greedy
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 30, "temperature": 1.0, "top_k": 1, "top_p": 0.9}
    assert httpx.post(server["url"] + "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == full
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "seed": -3, "max_completion_tokens": 2}
    assert httpx.post(server["url"] + "/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 2


GOOD = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 300}, "too_many_messages"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "message_too_long"),
    ({"messages": [{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "y" * 7000}] * 2 + GOOD * 0
      + [{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "y" * 7000}, {"role": "user", "content": "z"}]},
     "conversation_too_long"),
    ({"messages": GOOD, "temperature": 2.5}, "temperature_out_of_range"),
    ({"messages": GOOD, "temperature": -0.1}, "temperature_out_of_range"),
    ({"messages": GOOD, "temperature": "hot"}, "invalid_temperature"),
    ({"messages": GOOD, "top_k": 201}, "top_k_out_of_range"),
    ({"messages": GOOD, "top_k": 1.5}, "invalid_top_k"),
    ({"messages": GOOD, "max_tokens": 0}, "max_tokens_out_of_range"),
    ({"messages": GOOD, "max_tokens": 100000}, "max_tokens_out_of_range"),
    ({"messages": GOOD, "top_p": 1.5}, "top_p_out_of_range"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "invalid_role"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "invalid_role_order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "invalid_role_order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "invalid_role_order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "invalid_role_order"),
    ({"messages": [{"role": "user", "content": 5}]}, "invalid_content"),
    ({"messages": [{"role": "user"}]}, "invalid_message"),
    ({"messages": []}, "invalid_messages"),
    ({"messages": "hi"}, "invalid_messages"),
    ({"messages": GOOD, "stop": ["a", "b", "c", "d", "e"]}, "invalid_stop"),
    ({"messages": GOOD, "n": 3}, "n_out_of_range"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_each_limit_gets_a_4xx_naming_it(server, path):
    for body, code in BAD_REQUESTS:
        response = httpx.post(server["url"] + path, json=body)
        assert response.status_code == 400, (code, response.text)
        error = response.json()["error"]
        assert error["code"] == code, (code, error)
    for raw in [b"{not json", b"", b"[1, 2]", b"\xff\xfe", b'"just a string"']:
        response = httpx.post(server["url"] + path, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json", raw
    assert httpx.get(server["url"] + "/health").status_code == 200


def test_page_endpoint_streams_tokens(server):
    body = {"messages": GOOD, "max_tokens": 15, "temperature": 0.0}
    with httpx.stream("POST", server["url"] + "/chat/completions", json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert len([e for e in events if "token" in e]) > 1
    assert events[-1]["done"] is True and events[-1]["finish_reason"] == "length"


def test_disconnect_frees_the_row_and_full_queue_gives_503(server):
    url = server["url"]
    wait_until_idle(url)
    before = httpx.get(url + "/stats").json()
    long_body = {"messages": GOOD, "max_tokens": 4000, "temperature": 0.0, "stream": True}
    # one client reads a little and hangs up: its row must be free right away, not after 4000 tokens
    with httpx.stream("POST", url + "/v1/chat/completions", json=long_body) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        time.sleep(0.3)
        stats = httpx.get(url + "/stats").json()
        assert stats["rows_in_flight"] == 1, "still streaming to a connected client"
        assert stats["kv_cache_bytes_in_use"] > 0 and stats["kv_cache_bytes_allocated"] >= stats["kv_cache_bytes_in_use"]
    t0 = time.time()
    stats = wait_until_idle(url, timeout=3.0)
    assert time.time() - t0 < 1.5
    assert stats["tokens_generated"] - before["tokens_generated"] < 2000
    assert stats["kv_cache_bytes_in_use"] == 0 and stats["tokens_per_s_last_minute"] > 0

    # every row busy (--max-batch 2) + one request waiting fills the queue (--queue-size 1): the next one is turned away
    let_go = threading.Event()

    def waiting_client():  # queued behind the busy rows (its first line comes at once), stays until let go, hangs up
        with httpx.stream("POST", url + "/v1/chat/completions", json=long_body, timeout=60) as response:
            lines = response.iter_lines()  # keep a reference: a collected iterator closes the connection
            next(lines)
            let_go.wait(10)

    with httpx.stream("POST", url + "/v1/chat/completions", json=long_body, timeout=60) as first, \
            httpx.stream("POST", url + "/v1/chat/completions", json=long_body, timeout=60) as second:
        first_lines, second_lines = first.iter_lines(), second.iter_lines()
        next(first_lines)
        next(second_lines)
        assert httpx.get(url + "/stats").json()["rows_in_flight"] == MAX_BATCH
        waiter = threading.Thread(target=waiting_client)
        waiter.start()
        deadline = time.time() + 5
        while httpx.get(url + "/stats").json()["requests_waiting"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        rejected = httpx.post(url + "/v1/chat/completions", json=long_body)
        assert rejected.status_code == 503, httpx.get(url + "/stats").json()
        assert int(rejected.headers["retry-after"]) >= 1 and rejected.json()["error"]["code"] == "queue_full"
        let_go.set()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    wait_until_idle(url, timeout=5.0)


def test_concurrent_replies_share_the_batch_and_equal_each_alone(server):
    url = server["url"]
    wait_until_idle(url)
    bodies = [{"messages": [{"role": "user", "content": text}], "max_tokens": n, "temperature": 0.0}
              for text, n in [("Tell me about the sea.", 40), ("hi", 25)]]
    alone = [httpx.post(url + "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] for body in bodies]
    together = [None] * len(bodies)

    def ask(i):
        together[i] = httpx.post(url + "/v1/chat/completions", json=bodies[i], timeout=60).json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert together == alone
    # content as a list of text parts (as the official clients send it) is the same message as a string
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "about the sea."}]}],
             "max_tokens": 40, "temperature": 0.0}
    assert httpx.post(url + "/v1/chat/completions", json=parts).json()["choices"][0]["message"]["content"] == alone[0]


def test_one_log_line_per_request_without_message_text(server):
    secret = "purple-elephant-secret"
    httpx.post(server["url"] + "/v1/chat/completions", json={"messages": [{"role": "user", "content": secret}], "max_tokens": 3})
    httpx.post(server["url"] + "/v1/chat/completions", json={"messages": [{"role": "user", "content": secret}], "temperature": 9})
    time.sleep(0.3)
    log = server["log"].read_text()
    assert secret not in log
    lines = [line for line in log.splitlines() if "/v1/chat/completions" in line]
    assert any("200" in line and "completion_tokens=3" in line for line in lines)
    assert any("400" in line and "temperature_out_of_range" in line for line in lines)


# ---- hostile clients: odd values, deep JSON, huge uploads, slow and idle connections ------------

def post_raw(server, raw):
    return httpx.post(server["url"] + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})


def request_with(**fields):
    """A small valid request with `fields` added, as raw JSON (NaN and Infinity written as Python's json does)."""
    return json.dumps({"messages": GOOD, "max_tokens": 5, **fields}).encode()


NUMERIC_EDGE_CASES = [  # (field, value, expected error code); None: a well-defined 200
    ("top_p", 1e-300, None), ("top_p", 0, None), ("top_p", 1e300, "top_p_out_of_range"),
    ("top_p", float("nan"), "top_p_out_of_range"), ("top_p", float("inf"), "top_p_out_of_range"),
    ("top_p", float("-inf"), "top_p_out_of_range"), ("top_p", "0.5", "invalid_top_p"), ("top_p", True, "invalid_top_p"),
    ("temperature", 1e-300, None), ("temperature", 1e300, "temperature_out_of_range"),
    ("temperature", float("nan"), "temperature_out_of_range"), ("temperature", float("inf"), "temperature_out_of_range"),
    ("temperature", float("-inf"), "temperature_out_of_range"), ("temperature", "1", "invalid_temperature"),
    ("temperature", False, "invalid_temperature"),
    ("top_k", 1e300, "invalid_top_k"), ("top_k", float("nan"), "invalid_top_k"), ("top_k", float("inf"), "invalid_top_k"),
    ("top_k", -1, "top_k_out_of_range"), ("top_k", 10**30, "top_k_out_of_range"), ("top_k", "5", "invalid_top_k"),
    ("top_k", True, "invalid_top_k"),
    ("max_tokens", 1e300, "invalid_max_tokens"), ("max_tokens", float("nan"), "invalid_max_tokens"),
    ("max_tokens", float("-inf"), "invalid_max_tokens"), ("max_tokens", -1, "max_tokens_out_of_range"),
    ("max_tokens", 10**30, "max_tokens_out_of_range"), ("max_tokens", "5", "invalid_max_tokens"),
    ("max_tokens", True, "invalid_max_tokens"),
    ("seed", 2**70, "seed_out_of_range"), ("seed", 1.5, "invalid_seed"), ("seed", True, "invalid_seed"),
    ("stream", "yes", "invalid_stream"), ("stream", 1, "invalid_stream"), ("n", 2.5, "invalid_n"), ("n", True, "invalid_n"),
    ("stream_options", {"include_usage": "yes"}, "invalid_include_usage"),
]


def test_numeric_edge_cases_and_deep_json_get_a_400_or_a_well_defined_reply(server):
    greedy = post_raw(server, request_with(temperature=0)).json()
    greedy_text = greedy["choices"][0]["message"]["content"]
    for field, value, code in NUMERIC_EDGE_CASES:
        response = post_raw(server, request_with(**{field: value}))
        if code is None:  # a vanishing temperature or top_p means "only the most likely token": the greedy reply
            assert response.status_code == 200, (field, value, response.text)
            assert response.json()["choices"][0]["message"]["content"] == greedy_text, (field, value)
        else:
            assert response.status_code == 400, (field, value, response.text)
            assert response.json()["error"]["code"] == code, (field, value, response.json())
    deep = b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    for raw in [deep, b"[" * 5000, b"{\"a\":" * 5000]:
        response = post_raw(server, raw)
        assert response.status_code == 400 and response.json()["error"]["code"] == "json_too_deep", response.text
    # brackets inside strings are text, not nesting; escapes are no trap for the depth count (nor slow: 800 KB of \")
    assert post_raw(server, request_with(stop="[" * 100)).status_code == 200
    assert post_raw(server, request_with(stop='\\"[' * 20)).status_code == 200
    assert post_raw(server, b'\\"' * 400_000).json()["error"]["code"] == "invalid_json"
    huge_integer = b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}"
    assert post_raw(server, huge_integer).json()["error"]["code"] == "invalid_json"
    assert "Traceback" not in server["log"].read_text()


WIDE_BODIES = [b'{"messages": [' + b"[]," * 333_000 + b"[]]}", b"[" + b"{}," * 333_000 + b"{}]"]  # just under 1 MB each


def test_json_with_too_many_values_is_refused_without_stalling_the_server(server):
    """A 1 MB body of empty containers is a million objects for json.loads to build and the GC to walk: the old
    server held its event loop ~0.1-0.9 s per body (every other client waited). Now the body is refused from
    a count of its brackets and commas, and /health, asked meanwhile, answers at once."""
    answers, latencies = [], []

    def send(raw):
        response = post_raw(server, raw)
        answers.append((response.status_code, response.json()["error"]["code"], response.elapsed.total_seconds()))

    senders = [threading.Thread(target=send, args=(WIDE_BODIES[i % 2],)) for i in range(5)]
    with httpx.Client() as client:
        client.get(server["url"] + "/health")  # connect first: only the event loop's own delays are measured
        for sender in senders:
            sender.start()
        while any(sender.is_alive() for sender in senders):
            started = time.perf_counter()
            assert client.get(server["url"] + "/health").status_code == 200
            latencies.append(time.perf_counter() - started)
    assert [answer[:2] for answer in answers] == [(400, "json_too_many_values")] * 5, answers
    assert max(answer[2] for answer in answers) < 2.0, answers
    assert len(latencies) >= 3 and max(latencies) < 0.2, f"/health took up to {1000 * max(latencies):.0f} ms ({len(latencies)} asked)"
    # a long conversation in content parts, the widest a real client sends, is well within the limit
    parts = [{"role": role, "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
             for role in ["user", "assistant"] * 249 + ["user"]]
    assert post_raw(server, json.dumps({"messages": parts, "max_tokens": 1}).encode()).status_code == 200


def server_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def upload(server, head, piece, give_up_after):
    """Send `head`, then `piece` over and over until the server answers or hangs up (or give_up_after bytes).
    Returns (body bytes sent, the start of the server's answer or b"" if it reset the connection, peak server RSS)."""
    sock = socket.create_connection(("127.0.0.1", server["port"]), timeout=2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)  # little in flight: `sent` is near what the server read
    sent, answer, peak_rss = 0, b"", server_rss_mb(server["pid"])
    try:
        sock.sendall(head)
        while sent < give_up_after and not select.select([sock], [], [], 0)[0]:
            sock.sendall(piece)
            sent += len(piece)
            peak_rss = max(peak_rss, server_rss_mb(server["pid"]))
        answer = sock.recv(1 << 16)
    except (socket.timeout, BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading and closed: a reset may overtake its 413
    finally:
        sock.close()
    return sent, answer, peak_rss


def test_a_huge_upload_is_refused_while_it_arrives(server):
    path = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    rss_before = server_rss_mb(server["pid"])
    # a declared 1 GB body: refused from the headers alone, before any of it is sent
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=3) as sock:
        sock.sendall(path + b"Content-Length: 1000000000\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(1 << 16), b""))  # all of it: the server closes after its 413
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer, answer[:200]
    # chunked, no length: the server counts what arrives and stops reading past the limit
    data = b"x" * (1 << 16)
    chunk = b"%x\r\n" % len(data) + data + b"\r\n"
    give_up_after = 64 << 20  # the old server read all of it (and would have read 1 GB)
    sent, answer, peak_rss = upload(server, path + b"Transfer-Encoding: chunked\r\n\r\n", chunk, give_up_after)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 8 << 20, f"sent {sent} bytes before the server stopped reading"
    assert peak_rss - rss_before < 50, f"server RSS grew from {rss_before:.0f} MB to {peak_rss:.0f} MB"
    assert httpx.get(server["url"] + "/health").status_code == 200


def test_idle_and_slow_clients_are_dropped_after_the_request_timeout_but_a_long_reply_is_not(server):
    reply = {}

    def long_reply():  # sent whole at once, then answered for longer than the timeout: must not be cut
        started = time.time()
        body = {"messages": GOOD, "max_tokens": 4000, "temperature": 0.0, "stream": True}  # ~3 s on a 2-core CPU
        with httpx.stream("POST", server["url"] + "/chat/completions", json=body, timeout=60) as response:
            reply["events"] = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
        reply["seconds"] = time.time() - started

    replier = threading.Thread(target=long_reply)
    replier.start()

    def connect():
        sock = socket.create_connection(("127.0.0.1", server["port"]))
        sock.setblocking(False)
        return sock

    clients = {"idle": connect(), "slow headers": connect(), "slow body": connect()}
    slow_headers = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 1000
    clients["slow body"].sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 1000\r\n\r\n{")
    started, closed_after, drip = time.time(), {}, 0
    while len(closed_after) < len(clients) and time.time() - started < REQUEST_TIMEOUT + 3:
        for name, sock in clients.items():
            try:
                if name not in closed_after and sock.recv(1 << 16) == b"":
                    closed_after[name] = time.time() - started
            except BlockingIOError:
                pass  # still open, nothing to read
            except ConnectionResetError:
                closed_after[name] = time.time() - started
        try:  # a byte every 50 ms keeps each slow client busy but never done
            clients["slow headers"].send(slow_headers[drip:drip + 1])
            clients["slow body"].send(b" ")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed: the next recv notices
        drip += 1
        time.sleep(0.05)
    for sock in clients.values():
        sock.close()
    assert set(closed_after) == set(clients), f"still open after {REQUEST_TIMEOUT + 3} s: {closed_after}"
    assert all(REQUEST_TIMEOUT - 0.2 < seconds < REQUEST_TIMEOUT + 1.5 for seconds in closed_after.values()), closed_after
    time.sleep(0.1)
    assert server["log"].read_text().count("no complete request within") >= 3
    replier.join(timeout=60)
    assert reply["seconds"] > REQUEST_TIMEOUT, "make the reply longer: it must outlast the request timeout"
    assert reply["events"][-1]["done"] is True and reply["events"][-1]["finish_reason"] == "length"


def test_connections_beyond_the_cap_get_503(server):
    idle = [socket.create_connection(("127.0.0.1", server["port"])) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # the server accepts them (they count once accepted)
        refused = httpx.get(server["url"] + "/health")
        assert refused.status_code == 503, refused.text
    finally:
        for sock in idle:
            sock.close()
    deadline = time.time() + 3
    while httpx.get(server["url"] + "/health").status_code != 200:
        assert time.time() < deadline, "still refusing after the other connections closed"
        time.sleep(0.05)


def test_api_docs_are_off(server):
    for path in ["/docs", "/redoc", "/openapi.json"]:
        assert httpx.get(server["url"] + path).status_code == 404, path


# ---- hostile web pages: cross-site requests, DNS rebinding, what the page may run -----------------

def test_a_post_without_a_json_content_type_gets_415(server):
    """A page on any site may POST text/plain (or a form) here without the browser asking first (no CORS preflight)."""
    body = json.dumps({"messages": GOOD, "max_tokens": 2}).encode()
    for path in ["/v1/chat/completions", "/chat/completions"]:
        for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]:
            headers = {} if content_type is None else {"Content-Type": content_type}
            response = httpx.post(server["url"] + path, content=body, headers=headers)
            assert response.status_code == 415, (path, content_type, response.text)
            assert response.json()["error"]["code"] == "unsupported_media_type" and "Content-Type" in response.json()["error"]["message"]
        response = httpx.post(server["url"] + path, content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"})
        assert response.status_code == 200, (path, response.text)


def test_a_foreign_origin_gets_403_and_its_own_or_an_allowed_origin_passes(server):
    url, body = server["url"], {"messages": GOOD, "max_tokens": 2}
    for path in ["/v1/chat/completions", "/chat/completions"]:
        for origin in ["http://evil.example", f"http://localhost.evil.example:{server['port']}", "null",
                       f"https://127.0.0.1:{server['port']}", "http://127.0.0.1"]:  # another scheme or port is another site
            response = httpx.post(url + path, json=body, headers={"Origin": origin})
            assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed", (origin, response.text)
            assert "access-control-allow-origin" not in response.headers
        # the page's own origin (browsers send Origin with a same-origin POST) and the --cors-origins one pass
        assert httpx.post(url + path, json=body, headers={"Origin": url}).status_code == 200
        allowed = httpx.post(url + path, json=body, headers={"Origin": ALLOWED_ORIGIN})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert httpx.get(url + "/v1/models", headers={"Origin": "http://evil.example"}).status_code == 403
    # a cross-origin POST of JSON is preflighted: answered for the allowed origin, refused for another
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, authorization"}
    answer = httpx.options(url + "/v1/chat/completions", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in answer.headers["access-control-allow-methods"]
    assert "content-type" in answer.headers["access-control-allow-headers"].lower()
    assert httpx.options(url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight}).status_code == 403


def test_a_foreign_host_is_refused_on_a_loopback_bind(server):
    """DNS rebinding: evil.example resolves to 127.0.0.1, and its page's "same-origin" requests arrive with its Host."""
    port, url = server["port"], server["url"]
    body = {"messages": GOOD, "max_tokens": 2}
    for host in ["evil.example", f"evil.example:{port}", f"localhost.evil.example:{port}", "127.0.0.1.nip.io", ""]:
        for path in ["/", "/health"]:
            response = httpx.get(url + path, headers={"Host": host})
            assert response.status_code == 421 and response.json()["error"]["code"] == "host_not_allowed", (host, response.text)
        origin = f"http://{host}"  # the rebound page's POST carries a matching Origin: the Host check still stops it
        response = httpx.post(url + "/v1/chat/completions", json=body, headers={"Host": host, "Origin": origin})
        assert response.status_code == 421, (host, response.text)
    for host in [f"localhost:{port}", "localhost", f"127.0.0.1:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"]:
        assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host
        assert httpx.post(url + "/chat/completions", json=body, headers={"Host": host, "Origin": f"http://{host}"}).status_code == 200


def test_every_response_carries_the_security_headers(server):
    from nanochat.http_guards import inline_hashes
    with open(os.path.join(REPO_ROOT, "nanochat", "ui.html"), encoding="utf-8") as f:
        html = f.read()
    url = server["url"]
    responses = [httpx.get(url + "/"), httpx.get(url + "/health"), httpx.get(url + "/missing"), post_raw(server, b"[]"),
                 httpx.post(url + "/v1/chat/completions", content=b"{}"), httpx.get(url + "/", headers={"Host": "evil.example"}),
                 httpx.get(url + "/", headers={"Origin": "http://evil.example"})]
    assert [r.status_code for r in responses] == [200, 200, 404, 400, 415, 421, 403]
    for response in responses:
        policy = response.headers["content-security-policy"]
        for directive in ["default-src 'none'", "connect-src 'self'", "frame-ancestors 'none'", "base-uri 'none'",
                          "form-action 'none'", f"script-src {inline_hashes(html, 'script')}", f"style-src {inline_hashes(html, 'style')}"]:
            assert directive in policy, (directive, policy)
        assert "unsafe" not in policy
        assert response.headers["x-frame-options"] == "DENY" and response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
    assert inline_hashes(html, "script").count("sha256-") == 1 and inline_hashes(html, "style").count("sha256-") == 1
    markup = re.sub(r"<script[^>]*>.*?</script>", "", html, flags=re.S)
    assert not re.search(r"<[^>]*\s(on[a-z]+|style)\s*=", markup), "an onclick= or style= attribute would not run under the CSP"


def test_a_client_disconnect_logs_one_line_and_no_traceback(server):
    wait_until_idle(server["url"])
    log_before = len(server["log"].read_text())
    body = {"messages": GOOD, "max_tokens": 4000, "temperature": 0.0}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json={**body, "stream": True}) as response:
        lines = response.iter_lines()
        next(lines)
        next(lines)
    wait_until_idle(server["url"])
    with pytest.raises(httpx.ReadTimeout):  # not streamed: give up while it generates
        httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=0.3)
    wait_until_idle(server["url"])
    time.sleep(0.2)
    log = server["log"].read_text()
    new_lines = [line for line in log[log_before:].splitlines() if "/stats" not in line]  # wait_until_idle polls /stats
    assert len(new_lines) == 2, new_lines
    assert all("/v1/chat/completions 200" in line and "finish=cancelled" in line for line in new_lines), new_lines
    assert "Traceback" not in log and "Exception" not in log


# ---- the chat page in a real browser -------------------------------------------------------------

class Chromium:
    """Drives headless Chromium over the DevTools protocol on a pipe (fd 3 in, fd 4 out; messages end with NUL)."""

    def __init__(self, executable, user_data_dir):
        to_browser_read, self.to_browser = os.pipe()
        self.from_browser, from_browser_write = os.pipe()

        def wire_fds():  # the browser expects the pipe on fds 3 and 4 (move both out of the way first)
            high_read = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 10)
            high_write = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)
            os.dup2(high_read, 3)
            os.dup2(high_write, 4)

        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={user_data_dir}", "about:blank"],
            preexec_fn=wire_fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self.next_id, self.buffer, self.session = 0, b"", None

    def send(self, method, params=None, session=True):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                data = os.read(self.from_browser, 1 << 20)
                if not data:
                    raise RuntimeError("chromium closed the pipe")
                self.buffer += data
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url, width, height, mobile=False):
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
        # what the Content-Security-Policy blocks, from the first byte on (scripts added here are exempt from it)
        self.send("Page.enable")
        self.send("Page.addScriptToEvaluateOnNewDocument", {"source": "window.cspViolations = []; document.addEventListener("
                  "'securitypolicyviolation', e => cspViolations.push(e.effectiveDirective + ' ' + e.blockedURI))"})
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for: {expression}")

    def screenshot(self, path):
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        self.process.kill()
        self.process.wait()
        os.close(self.to_browser)
        os.close(self.from_browser)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="needs the Debian package chromium (apt-get install -y chromium)")
def test_chat_page_in_headless_chromium(server, tmp_path):
    browser = Chromium(CHROMIUM, tmp_path / "profile")
    artifacts = os.environ.get("NANOCHAT_TEST_ARTIFACTS", str(tmp_path))
    try:
        browser.open(server["url"] + "/", 1000, 720)
        browser.wait_for("document.readyState === 'complete' && document.getElementById('model-name').textContent.length > 0")
        # greedy and long enough to watch the reply stream in
        browser.evaluate("document.getElementById('temperature').value = 0; document.getElementById('max-tokens').value = 600;"
                         "document.getElementById('input').value = 'Write a haiku about the sea';"
                         "document.getElementById('composer').requestSubmit(); true")
        partial = browser.wait_for("(() => { const b = document.querySelector('.message.assistant .bubble.streaming');"
                                   " return b && b.textContent.length > 0 ? b.textContent.length : 0; })()")
        browser.wait_for("document.querySelector('.message.assistant') && !document.querySelector('.streaming')")
        final = browser.evaluate("document.querySelector('.message.assistant .bubble').textContent")
        assert 0 < partial < len(final), "the reply should be visible while it streams"
        # under the Content-Security-Policy the page's own inline style and script run (the chat above), and
        # a script put in the page by other means does not
        assert browser.evaluate("cspViolations") == []
        assert browser.evaluate("getComputedStyle(document.body).display") == "flex", "the inline <style> was blocked"
        assert browser.evaluate("(() => { const s = document.createElement('script'); s.textContent = 'window.__injected = 1';"
                                " document.body.appendChild(s); return window.__injected === undefined; })()")
        browser.wait_for("cspViolations.length === 1 && cspViolations[0].startsWith('script-src-elem inline')")
        assert browser.evaluate("document.querySelector('.message.user .bubble').textContent") == "Write a haiku about the sea"
        browser.screenshot(os.path.join(artifacts, "chat_page.png"))

        # regenerate replaces the answer (still two messages); greedy: the same text again
        browser.evaluate("document.querySelector('.action-regenerate').click(); true")
        browser.wait_for("document.querySelectorAll('.message').length === 2 && !document.querySelector('.streaming')")
        assert browser.evaluate("document.querySelector('.message.assistant .bubble').textContent") == final

        # editing the user message drops what followed and asks again
        browser.evaluate("document.querySelector('.action-edit').click(); true")
        browser.evaluate("document.querySelector('.edit-box').value = 'Another question';"
                         "document.querySelector('.action-save').click(); true")
        browser.wait_for("document.querySelectorAll('.message').length === 2 && !document.querySelector('.streaming')")
        assert browser.evaluate("document.querySelector('.message.user .bubble').textContent") == "Another question"

        # code blocks render as code
        html = browser.evaluate("render('see:\\n```python\\nprint(1 < 2)\\n```\\ndone')")
        assert "<pre><code" in html and "print(1 &lt; 2)" in html

        # new chat empties the conversation; the page fits a phone screen without sideways scrolling
        browser.evaluate("document.getElementById('new-chat').click(); true")
        assert browser.evaluate("document.querySelectorAll('.message').length") == 0
        browser.open(server["url"] + "/", 390, 760, mobile=True)
        browser.wait_for("document.readyState === 'complete'")
        browser.evaluate("document.getElementById('input').value = 'hi'; document.getElementById('composer').requestSubmit(); true")
        browser.wait_for("document.querySelector('.message.assistant') && !document.querySelector('.streaming')", timeout=30)
        assert browser.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        browser.screenshot(os.path.join(artifacts, "chat_page_phone.png"))
    finally:
        browser.close()
    wait_until_idle(server["url"])


HOSTILE_MARKDOWN = "\n".join([
    'plain <script>window.__pwned = "script"</script> text',
    '<img src=x onerror="window.__pwned = \'img\'">',
    '[click me](javascript:window.__pwned=\'link\') <a href="javascript:window.__pwned=\'a\'">a</a>',
    '`<b onmouseover="window.__pwned=\'inline\'">x</b>` and `" onmouseover="window.__pwned=\'inline2\'`',
    '```" onmouseover="window.__pwned=\'fence\'" x="',
    "print(1)",
    "```",
    "```' onmouseover='window.__pwned=\"fence2\"' x='",
    "code",
    "```",
    '<svg onload="window.__pwned=\'svg\'"></svg><iframe src="javascript:parent.__pwned=\'iframe\'"></iframe>',
])

# fire every handler an injected attribute could hang on, then report what the bubbles hold
PROBE_BUBBLES = """(async () => {
  const bubbles = [...document.querySelectorAll('.bubble')];
  for (const element of bubbles.flatMap(b => [b, ...b.querySelectorAll('*')])) {
    for (const type of ['mouseover', 'mouseenter', 'focus', 'load', 'error']) element.dispatchEvent(new Event(type, {bubbles: true}));
    element.click();
  }
  await new Promise(resolve => setTimeout(resolve, 300));  // time for an <img onerror> or <svg onload> to fire
  const elements = bubbles.flatMap(b => [...b.querySelectorAll('*')]);
  return {pwned: window.__pwned === undefined ? null : String(window.__pwned), location: location.href,
          tags: [...new Set(elements.map(e => e.tagName))], attributes: [...new Set(elements.flatMap(e => e.getAttributeNames()))],
          languages: [...document.querySelectorAll('.bubble code[data-language]')].map(e => e.getAttribute('data-language')),
          texts: bubbles.map(b => b.textContent)};
})()"""


def assert_shown_as_text(probe, url):
    assert probe["pwned"] is None, f"an injected handler ran: {probe['pwned']}"
    assert probe["location"] == url
    assert set(probe["tags"]) <= {"PRE", "CODE"}, probe["tags"]
    assert set(probe["attributes"]) <= {"data-language"}, probe["attributes"]
    assert '" onmouseover="window.__pwned=\'fence\'" x="' in probe["languages"], probe["languages"]
    assert "' onmouseover='window.__pwned=\"fence2\"' x='" in probe["languages"], probe["languages"]
    shown = probe["texts"][-1]
    for literal in ['<script>window.__pwned = "script"</script>', '<img src=x onerror="window.__pwned = \'img\'">',
                    "[click me](javascript:window.__pwned='link')", '<b onmouseover="window.__pwned=\'inline\'">x</b>',
                    "print(1)", '<iframe src="javascript:parent.__pwned=\'iframe\'"></iframe>']:
        assert literal in shown, (literal, shown)


@pytest.mark.skipif(CHROMIUM is None, reason="needs the Debian package chromium (apt-get install -y chromium)")
def test_hostile_markdown_is_shown_as_text_in_headless_chromium(server, tmp_path):
    browser = Chromium(CHROMIUM, tmp_path / "profile")
    page = server["url"] + "/"
    try:
        browser.open(page, 1000, 720)
        browser.wait_for("document.readyState === 'complete' && document.getElementById('model-name').textContent.length > 0")
        hostile = json.dumps(HOSTILE_MARKDOWN)
        # as a model reply, through the page's own render path (the whole conversation redrawn, then the streaming repaint)
        browser.evaluate(f"messages = [{{role: 'user', content: 'hi'}}, {{role: 'assistant', content: {hostile}}}]; draw(); true")
        assert_shown_as_text(browser.evaluate(PROBE_BUBBLES), page)
        browser.evaluate(f"updateLast({{content: {hostile}}}); true")
        assert_shown_as_text(browser.evaluate(PROBE_BUBBLES), page)
        # as a user message, typed and sent
        browser.evaluate("messages = []; draw();"
                         f"document.getElementById('input').value = {hostile}; document.getElementById('max-tokens').value = 5;"
                         "document.getElementById('composer').requestSubmit(); true")
        browser.wait_for("document.querySelector('.message.assistant') && !document.querySelector('.streaming')")
        probe = browser.evaluate(PROBE_BUBBLES)
        probe["texts"] = probe["texts"][:1]  # the user's bubble
        assert_shown_as_text(probe, page)
    finally:
        browser.close()
    wait_until_idle(server["url"])


def test_a_server_open_to_the_network_without_bubblewrap_runs_only_calculator_code(monkeypatch):
    from nanochat.execution import find_sandbox
    from scripts.chat_web import allow_code_without_sandbox, sandbox_policy_line

    assert allow_code_without_sandbox("127.0.0.1", False) and allow_code_without_sandbox("::1", False)
    assert allow_code_without_sandbox("localhost", False)
    assert not allow_code_without_sandbox("0.0.0.0", False) and allow_code_without_sandbox("0.0.0.0", True)
    monkeypatch.setenv("NANOCHAT_SANDBOX", "weak")
    find_sandbox.cache_clear()
    try:
        refused = sandbox_policy_line("0.0.0.0", False)
        assert "calculator only" in refused and "--allow-unsandboxed-code" in refused and "install bubblewrap" in refused
        assert "not a security boundary" in sandbox_policy_line("0.0.0.0", True)
        assert "not a security boundary" in sandbox_policy_line("127.0.0.1", False)
    finally:
        monkeypatch.delenv("NANOCHAT_SANDBOX")
        find_sandbox.cache_clear()


def test_the_startup_log_says_what_contains_model_written_code(server):
    assert "tool calls: calculator in-process, other code" in server["log"].read_text()
