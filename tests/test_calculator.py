"""
The in-process calculator: the tool calls our tasks emit evaluate to what the sandbox prints; hostile
expressions are refused (not calculator syntax) or bounded (too large) before any work is done.
"""
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.calculator import MAX_INT_BITS, MAX_LENGTH, CalculatorError, NotCalculable, _printed_length, calculate
from nanochat.engine import REFUSED_TOOL_CODE, run_tool_call
from nanochat.execution import execute_code
from tasks.arithmetic import Arithmetic
from tasks.gsm8k import solution_to_parts
from tasks.spellingbee import SpellingBee

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def tool_calls(conversation_parts):
    """(expression, annotated result) for every python tool call among assistant content parts."""
    return [(call["text"], output["text"]) for call, output in zip(conversation_parts, conversation_parts[1:])
            if call["type"] == "python" and output["type"] == "python_output"]


def task_tool_calls():
    calls = []
    with open(os.path.join(FIXTURES, "gsm8k_test.jsonl")) as f:
        for line in f:
            calls += tool_calls(solution_to_parts(json.loads(line)["answer"]))
    for task in [Arithmetic(split="train", size=20), SpellingBee(size=20)]:
        for index in range(len(task)):
            content = task[index]["messages"][-1]["content"]
            calls += tool_calls(content if isinstance(content, list) else [])
    return calls


def test_every_tool_call_of_our_tasks_is_calculated_to_its_annotated_value():
    calls = task_tool_calls()
    assert len(calls) > 30
    for expression, annotated in calls:
        value = calculate(expression)
        assert float(value) == pytest.approx(float(annotated), rel=1e-9), expression


COMMON = ["25*.20", "(1/2)*10", "3+4*2", "2**10", "round(7/3, 2)", "7//2", "-5 % 3", "'strawberry'.count('r')",
          "len('hello')", "'hello'[::-1]", "'hello'[1]", "max(3, 9)", "min([4, 2, 8])", "sum([1.5, 2])", "10 > 3 >= 3",
          "'a' in 'banana'", "abs(-4.5)", "int('12') + 1", "float('2.5') * 2", "'Hello'.upper()", "'a b c'.split()",
          "1 if 2 > 1 else 0", "not 0", "0 or 'x'", "2**-2", "(-8)**(1/3)", "True + True", "1e308 * 10", "str(3) * 3"]


def test_results_match_what_the_sandbox_prints():
    # one sandbox run for all of them: the same text, character for character, as print(eval(...)) gives
    program = "\n".join(f"print(repr(str(eval({expression!r}))))" for expression in COMMON)
    result = execute_code(program, timeout=10.0)
    assert result.success, result
    sandbox_values = [eval(line) for line in result.stdout.splitlines()]
    assert [calculate(expression) for expression in COMMON] == sandbox_values


@pytest.mark.parametrize("expression", [
    "__import__('os').system('touch /tmp/calculator_escape')", "().__class__.__bases__[0].__subclasses__()",
    "(lambda: 1)()", "[x for x in range(10)]", "open('/etc/passwd').read()", "globals()", "x", "'%0999999999d' % 1",
    "'a'.__class__", "print(1)", "x = 1", "import os", "sum([[1], [2]], [])", "[[1], [2]]", "'{}'.format(1)",
    "'abc'.join(['x'] * 3)", "len", "f'{1}'", "b'bytes'", "1j"])
def test_anything_outside_the_whitelist_is_not_calculable(expression):
    with pytest.raises(NotCalculable):
        calculate(expression)


@pytest.mark.parametrize("expression", [
    "9**9**9", "2**10**10", "10**4000 * 10**4000", "'a' * 10**10", "'a' * 10**5 * 10**5", "['a' * 99999] * 99999",
    "('a' * 1000).replace('a', 'a' * 1000)", "round(5, -10**9)", "int('9' * 5000)", "'x' * 99999 + 'y' * 99999"])
def test_huge_results_are_refused_before_they_are_computed(expression):
    with pytest.raises(CalculatorError):
        calculate(expression)


@pytest.mark.parametrize("expression", [
    "[2**4095] * 49999", "[-2**4095] * 100", "str([2**4095] * 100)", "[2**4095, 2**4095] * 50", "['\\x00' * 1000] * 30",
    "[1.5e300] * 9999", "[True] * 30000", "(2**4095,) * 200"])
def test_a_result_is_judged_by_the_text_it_prints(expression):
    """Each of these was accepted before (an int, a float or a bool counted as one character) and printed far more."""
    with pytest.raises(CalculatorError, match="too long"):
        calculate(expression)


scalars = st.one_of(st.booleans(), st.integers(min_value=-2**MAX_INT_BITS, max_value=2**MAX_INT_BITS),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=50))


@settings(max_examples=300, deadline=None)
@given(st.one_of(scalars, st.lists(scalars, max_size=20), st.lists(scalars, max_size=20).map(tuple)))
def test_the_printed_length_bounds_what_print_shows(value):
    assert _printed_length(value) >= len(str(value))


def test_results_near_the_limit_are_still_calculated():
    assert len(calculate("[2**4095] * 70")) == 70 * (1233 + 2)  # 70 numbers of 1,233 digits, ", " between, "[]" around
    assert len(calculate("'ab' * 50000")) == MAX_LENGTH


def test_run_tool_call_reports_errors_like_the_sandbox():
    assert run_tool_call("1/0") == "Error: ZeroDivisionError: division by zero"
    assert execute_code("print(1/0)").error == "ZeroDivisionError: division by zero"
    assert run_tool_call("9**9**9").startswith("Error: CalculatorError: number too large")
    assert run_tool_call("'strawberry'.count('r')") == "3"


def test_without_bubblewrap_a_server_runs_calculator_calls_but_refuses_other_code():
    # with only the weak sandbox and allow_weak_sandbox=False (chat_web on a public address), the calculator still
    # answers, which shows it runs in-process; code that would need a process is refused with a clear message
    code = ("from nanochat.engine import run_tool_call\n"
            "print(run_tool_call('12*7', allow_weak_sandbox=False))\n"
            "print(run_tool_call('import os\\nprint(1)', allow_weak_sandbox=False))\n"
            "print(run_tool_call('import os\\nprint(1)', allow_weak_sandbox=True))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "NANOCHAT_SANDBOX": "weak"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["84", REFUSED_TOOL_CODE, "1"]
