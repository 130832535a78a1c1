"""
The last step of the smoke speedrun: start `scripts.chat_web` on a free loopback port, send one
OpenAI-style chat request, print the reply, stop the server. Exits non-zero (with the server's log)
when the server does not come up or the reply is not a well-formed chat completion.

    python -m dev.smoke_chat_web            # serves the most advanced model in $NANOCHAT_BASE_DIR
"""
import json
import socket
import subprocess
import sys
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120  # loading the model and the tokenizer takes seconds, not minutes
        while True:
            if server.poll() is not None or time.time() > deadline:
                sys.exit(f"chat_web did not start:\n{server.stdout.read() if server.poll() is not None else '(timed out)'}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16, "temperature": 0}).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.load(response)
        message = reply["choices"][0]["message"]
        if message["role"] != "assistant" or not isinstance(message["content"], str):
            sys.exit(f"chat_web answered something that is not a chat completion: {reply}")
        print(f"chat_web on {url} answered 'Hello' with {reply['usage']['completion_tokens']} tokens: {message['content']!r}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
