"""
Web server under load: N concurrent streaming clients on loopback, each sending R requests.
Reports throughput (requests/s, generated tokens/s) and time-to-first-token p50/p99, with 1 client
as the baseline in the same run. Load is bounded: every client waits for its reply before the next.

    python -m dev.bench_server                      # starts its own server on a random depth-4 model
    python -m dev.bench_server --url http://127.0.0.1:8000 --clients 1,4,16   # an already running server

Without --url it writes a random checkpoint (depth --depth) and tokenizer into a temp
NANOCHAT_BASE_DIR and starts `scripts.chat_web` on a free port.

Before/after in one run: --before-script starts an older chat_web.py on the same checkpoint first, loads it
the same way, then the current server, and prints the current server's figures against it

    git show c44f5ea:scripts/chat_web.py > /tmp/old_chat_web.py   # one request at a time per replica
    python -m dev.bench_server --before-script /tmp/old_chat_web.py

A script imports the current nanochat package, so it decodes with today's engine. To compare against an older
commit as a whole (its engine too), give a checkout of it:

    git worktree add /tmp/before c44f5ea && python -m dev.bench_server --before-root /tmp/before

Memory under a huge upload instead: stream 1 GB (chunked, no Content-Length) and print the server's peak RSS

    python -m dev.bench_server --upload-mb 1024
    git show 3836426:scripts/chat_web.py > /tmp/old_chat_web.py   # the server before its body limit, to compare
    python -m dev.bench_server --upload-mb 1024 --server-script /tmp/old_chat_web.py
"""
import argparse
import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

parser = argparse.ArgumentParser(description="chat_web throughput and first-token latency")
parser.add_argument("--url", type=str, default=None, help="benchmark this running server instead of starting one")
parser.add_argument("--clients", type=str, default="1,4,8,16", help="comma-separated concurrent client counts")
parser.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends, one after another")
parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply")
parser.add_argument("--depth", type=int, default=4, help="depth of the random model the self-started server uses")
parser.add_argument("--max-batch", type=int, default=16, help="--max-batch of the self-started (current) server")
parser.add_argument("--threads", type=int, default=2, help="torch threads of the self-started server")
parser.add_argument("--device-type", type=str, default="cpu", help="device of the self-started server: cpu | cuda | mps")
parser.add_argument("--upload-mb", type=int, default=0,
                    help="instead of the load test: stream this many MB as one request body and print the server's peak RSS")
parser.add_argument("--server-script", type=str, default=None,
                    help="start this file as the server instead of scripts.chat_web (e.g. an older chat_web.py, to compare)")
parser.add_argument("--before-script", type=str, default=None,
                    help="also load this older chat_web.py (first, same checkpoint) and print ratios against it")
parser.add_argument("--before-flags", type=str, default=None,
                    help="also serve this checkout's chat_web with these extra flags first (e.g. \"--dtype float32\") and "
                         "print ratios against it: two settings of one server, side by side")
parser.add_argument("--before-root", type=str, default=None,
                    help="like --before-script, with a whole older checkout: its scripts/chat_web.py on its own nanochat package")
args = parser.parse_args()


def write_checkpoint():
    import torch
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, model_config_from_depth
    from nanochat.tokenizer import RustBPETokenizer
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from conftest import sample_texts  # the same real text the tests train their tokenizer on

    base_dir = tempfile.mkdtemp(prefix="nanochat_bench_server_")
    tokenizer = RustBPETokenizer.train_from_iterator(iter(sample_texts()), vocab_size=2048)
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    config = model_config_from_depth(args.depth, tokenizer.get_vocab_size(), sequence_len=1024)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for name in tokenizer.get_special_tokens():  # replies run to max_tokens, so every request costs the same
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", f"d{args.depth}"), 1, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(config)})
    return base_dir


def start_server(base_dir, script=None, root=None, flags=()):
    """chat_web (or an older `script`, or an older checkout's at `root`) on a free port; only the current server
    gets --max-batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo_root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "scripts", "chat_web.py") if root else script
    # a --server-script imports nanochat too; a PYTHONPATH of ours comes after (e.g. an older build of an extension)
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir,
           "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))}
    server = [script] if script else ["-m", "scripts.chat_web", "--max-batch", str(args.max_batch), *flags]
    process = subprocess.Popen([sys.executable, *server, "--host", "127.0.0.1", "--port", str(port),
                                "--device-type", args.device_type, "--threads", str(args.threads), "--queue-size", "1000"], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return url, process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start in 60 s")


async def one_request(client, url):
    body = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": args.max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first_token, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if '"content": "' in line and '"content": ""' not in line and first_token is None:
                first_token = time.perf_counter() - t0
            if '"usage": {' in line:
                tokens = int(line.split('"completion_tokens": ')[1].split(",")[0])
    return first_token or (time.perf_counter() - t0), tokens


async def run_load(url, num_clients):
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=num_clients + 4)) as client:
        async def client_loop():
            return [await one_request(client, url) for _ in range(args.requests_per_client)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(client_loop() for _ in range(num_clients)))
        elapsed = time.perf_counter() - t0
    flat = [r for client_results in results for r in client_results]
    latencies = sorted(r[0] for r in flat)
    percentile = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    return {"requests_per_s": len(flat) / elapsed, "tokens_per_s": sum(r[1] for r in flat) / elapsed,
            "p50_ms": 1000 * percentile(0.50), "p99_ms": 1000 * percentile(0.99), "requests": len(flat)}


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def measure_upload(url, pid):
    """Stream --upload-mb MB as one chunked request body while a thread samples the server's RSS every 10 ms."""
    host, port = url.rsplit("/", 1)[1].split(":")
    rss_before, peak, done = rss_mb(pid), [rss_mb(pid)], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    piece = b"x" * (1 << 20)
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sent, answer, t0 = 0, b"", time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=300) as sock:
        try:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            while sent < args.upload_mb << 20:
                sock.sendall(chunk)
                sent += len(piece)
            sock.sendall(b"0\r\n\r\n")
            answer = sock.recv(1 << 16)
        except OSError as e:  # the server stopped reading and hung up
            answer = f"(connection closed: {type(e).__name__})".encode()
    time.sleep(0.5)  # the peak may come after the last byte, while the server joins what it read
    done.set()
    sampler.join()
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    print(f"sent {sent / 2**20:.0f} MB of {args.upload_mb} MB in {time.perf_counter() - t0:.1f} s; server answered: {status}")
    print(f"server RSS: {rss_before:.0f} MB before, {peak[0]:.0f} MB peak ({peak[0] - rss_before:+.0f} MB)")


def load_test(url, name, before=None):
    """Warm up, then each client count in turn; with `before` (the older server's results) print the ratios."""
    stats = httpx.get(url + "/stats").json()
    replicas = stats.get("replicas", stats.get("workers_total"))  # older servers said workers
    print(f"{name}: server {url}, {replicas} replica(s), max batch {stats.get('max_batch', 1)}, {args.max_tokens} tokens "
          f"per reply, {args.requests_per_client} requests per client", flush=True)
    asyncio.run(run_load(url, 1))  # warm-up
    results = {}
    for num_clients in [int(c) for c in args.clients.split(",")]:
        result = results[num_clients] = asyncio.run(run_load(url, num_clients))
        baseline = results[min(results)]
        line = (f"{num_clients:3d} clients: {result['requests_per_s']:6.2f} req/s  {result['tokens_per_s']:8.1f} tok/s "
                f"({result['tokens_per_s'] / baseline['tokens_per_s']:.2f}x the {min(results)}-client rate)  "
                f"first token p50 {result['p50_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms  ({result['requests']} requests)")
        if before is not None and num_clients in before:
            line += f"  | vs before: {result['tokens_per_s'] / before[num_clients]['tokens_per_s']:.2f}x tok/s"
        print(line, flush=True)
    print(f"{name} server stats: {httpx.get(url + '/stats').json()}", flush=True)
    return results


def main():
    if args.upload_mb and args.url:
        raise SystemExit("--upload-mb reads the server's memory from /proc: leave out --url so it starts its own")
    if args.url:
        return load_test(args.url, "server")
    base_dir = write_checkpoint()
    before = None
    if args.before_script or args.before_root or args.before_flags:
        url, process = start_server(base_dir, args.before_script, args.before_root, (args.before_flags or "").split())
        try:
            before = load_test(url, "before")
        finally:
            process.terminate()
            process.wait(timeout=10)
    url, process = start_server(base_dir, args.server_script)
    try:
        if args.upload_mb:
            return measure_upload(url, process.pid)
        load_test(url, "after" if before else "server", before)
    finally:
        process.terminate()
        process.wait(timeout=10)


if __name__ == "__main__":
    main()
