"""
dev/gpu_check.sh is the one script that runs where time is scarcest: a borrowed GPU for a few minutes. A renamed
flag or a changed function signature must fail here on CPU, not there. Part 1 (training steps) runs tiny on CPU
through the very same code; parts 2 and 3 are checked flag by flag against each script's own --help.
"""
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

GPU_CHECK = os.path.join(REPO_ROOT, "dev", "gpu_check.sh")


def commands_in_gpu_check():
    """module -> the flags the GPU check passes it, over every command line (backslash continuations joined)."""
    text = open(GPU_CHECK).read().replace("\\\n", " ")
    commands = {}
    for match in re.finditer(r"(?:-m|run) ((?:scripts|dev)\.\w+)([^\n|]*)", text):
        flags = re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", match.group(2))
        commands.setdefault(match.group(1), set()).update(flags)
    return commands


def test_the_speed_part_runs_its_training_steps_tiny_on_cpu():
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", COMPILE="0", STEPS="2", DEPTHS="2", DEVICE_BATCH="2",
               SEQ_LEN="64", VOCAB="512", PIPELINE="0", SERVING="0", OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", GPU_CHECK], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "FAILED" not in output and "Traceback" not in output, output[-3000:]
    for name in ["base depth 2", "mid step depth 2", "SFT steps depth 2 (eager)"]:
        line = re.search(rf"^{re.escape(name)} +\| .*\| tok/s ([\d,]+) \| .*\| loss ([\d.]+)$", output, re.MULTILINE)
        assert line, f"no result line for {name!r}:\n{output}"
        # random tokens over a 512 vocabulary: the loss starts near ln(512) = 6.2 and two steps cannot move it far
        assert int(line.group(1).replace(",", "")) > 0 and 4.0 < float(line.group(2)) < 9.0, line.group(0)


def test_every_command_of_the_pipeline_and_serving_parts_uses_flags_its_script_accepts():
    commands = {module: flags for module, flags in commands_in_gpu_check().items() if flags}
    expected = {"scripts.tok_train", "scripts.base_train", "scripts.mid_train", "scripts.chat_sft", "scripts.chat_eval",
                "scripts.chat_rl", "scripts.chat_cli", "dev.bench_decode", "dev.bench_server"}
    assert expected <= set(commands), f"the parser found only {sorted(commands)}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    helps = {module: subprocess.Popen([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for module in commands}
    for module, process in helps.items():
        text, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"{module} --help failed:\n{text[-2000:]}"
        unknown = sorted(flag for flag in commands[module] if not re.search(rf"(?<![\w-]){re.escape(flag)}\b", text))
        assert not unknown, f"dev/gpu_check.sh passes {module} flags its --help does not list: {unknown}"


def test_the_serving_part_benchmarks_run_tiny_on_cpu():
    """Part 3's two benchmarks, at depth 2 on CPU: decode through the KV cache and continuous batching, then the real
    server under 1 and 2 streaming clients."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda args: subprocess.run([sys.executable, "-m"] + args, cwd=REPO_ROOT, env=env, capture_output=True,
                                      text=True, timeout=180)
    decode = run(["dev.bench_decode", "--device", "cpu", "--depth", "2", "--vocab-size", "512", "--dtypes", "float32",
                  "--batch-sizes", "1,2", "--max-tokens", "8", "--repeats", "1", "--skip-naive"])
    assert decode.returncode == 0, decode.stdout[-2000:] + decode.stderr[-2000:]
    rates = re.findall(r"batch (\d+): KV cache +([\d.]+) tok/s \| batching +([\d.]+) tok/s", decode.stdout)
    assert [batch for batch, _, _ in rates] == ["1", "2"] and all(float(a) > 0 and float(b) > 0 for _, a, b in rates), decode.stdout
    server = run(["dev.bench_server", "--depth", "2", "--clients", "1,2", "--requests-per-client", "1", "--max-tokens", "16"])
    assert server.returncode == 0, server.stdout[-2000:] + server.stderr[-2000:]
    output = server.stdout + server.stderr
    rows = re.findall(r"(\d+) clients?: .*? ([\d.]+) tok/s .*first token p50 +([\d.]+) ms", output)
    assert [clients for clients, _, _ in rows] == ["1", "2"] and all(float(rate) > 0 for _, rate, _ in rows), output[-3000:]
    served = re.search(r"'requests_served': (\d+)", output)
    assert served and int(served.group(1)) == 1 + 1 + 2, "/stats should count the warm-up request and the 1 + 2 timed ones"
