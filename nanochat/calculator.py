"""
The calculator: tool calls that are plain arithmetic or string counting, evaluated in-process.

Most tool calls a chat model makes need no Python interpreter at all. GSM8K's annotations
(`<<48/2=24>>`) become calls like `48/2`, the spelling tasks emit `'strawberry'.count('r')`.
Starting a sandboxed interpreter for those costs tens of milliseconds; walking their syntax tree
costs microseconds.

So we parse the call with `ast` and evaluate the tree ourselves, accepting only a whitelist:
numbers, string literals, lists and tuples, arithmetic, comparisons, `and`/`or`/`not`, a few
builtins (len, abs, round, min, max, sum, int, float, str) and a few methods of strings and lists.
There are no names, no attribute access beyond those methods and no statements, so
`__import__('os')` or `().__class__.__bases__` is not something this evaluator can express.
Anything outside the whitelist raises NotCalculable and the caller hands it to the real sandbox
(nanochat/execution.py).

Python's own arithmetic will happily try to compute `9**9**9` or `'a' * 10**10` and take the
process down with it, so every operation whose result could be huge checks the size *before*
computing: integers stay under MAX_INT_BITS, and strings and lists under MAX_LENGTH characters of printed text
(a list of big numbers is judged by its digits, not by its number of items).
The answer is the text `print()` would show, so a call gives the same text here as in the sandbox.
"""
import ast
import operator

# checked before parsing: ast.parse itself takes time and memory in proportion to the text
MAX_EXPRESSION_CHARS = 2000
MAX_NODES = 500  # bounds the work of one call; a GSM8K annotation has a few dozen
MAX_INT_BITS = 4096  # about 1,200 decimal digits, well under Python's 4,300-digit str() limit
MAX_LENGTH = 100_000  # characters a string or a list prints as


class NotCalculable(Exception):
    """The code is not a whitelisted expression: run it in the sandbox instead."""


class CalculatorError(ArithmeticError):
    """A whitelisted expression whose result would exceed the bounds (`9**9**9`)."""


# The whitelist, as dispatch tables from syntax-tree node types to the Python operation they mean. A node type
# that is not a key here (bit operators, matrix multiplication, walrus, lambda, comprehension, ...) is simply
# never evaluated: _evaluate raises NotCalculable for it.
BINARY_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
                    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY_OPERATORS = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
COMPARISONS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
               ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
# called by bare name only; there are no other names, so no variable or builtin outside this table is reachable
FUNCTIONS = {"len": len, "abs": abs, "round": round, "min": min, "max": max, "sum": sum, "int": int, "float": float, "str": str}
STRING_METHODS = {"count", "find", "rfind", "index", "upper", "lower", "strip", "lstrip", "rstrip", "startswith",
                  "endswith", "split", "replace", "isdigit", "isalpha", "isupper", "islower", "title", "capitalize"}
# only methods that read: those that change a list in place (append, sort) return None, useless without a name
# to hold the list
LIST_METHODS = {"count", "index"}


def _printed_length(value, inside_container=False):
    """
    An upper bound on the characters print() shows for value, computed without building that text: the size a
    result is judged by. An int counts its decimal digits (a 4096-bit int prints 1,234 of them: 49,999 copies of
    one in a list were a 62 MB string, built while the server's event loop waited), a string in a list its repr
    (quotes and escapes), a list the separators too.
    """
    if isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return int(value.bit_length() * 0.30103) + 2  # log10(2) digits per bit, plus the sign and the rounding
    if isinstance(value, float):
        return 24  # the longest repr of a double, e.g. -2.2250738585072014e-308
    if isinstance(value, str):
        return len(repr(value)) if inside_container else len(value)
    if isinstance(value, (list, tuple)):
        return 2 + sum(_printed_length(item, inside_container=True) + 2 for item in value)  # items are never lists
    return len(str(value))


def _check_size(value):
    """Every intermediate result passes through here, so no later step can start from something huge."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"number too large (more than {MAX_INT_BITS} bits)")
    if isinstance(value, (str, list, tuple)) and _printed_length(value) > MAX_LENGTH:
        raise CalculatorError(f"result too long (more than {MAX_LENGTH:,} characters)")
    return value


def _check_binary(op, left, right):
    """Refuse an operation whose result would be huge before Python spends time and memory computing it."""
    is_int = lambda x: isinstance(x, int)  # bool is an int too, and harmless
    # float powers need no check: they overflow to an OverflowError (or inf) at once, without building anything
    if op is ast.Pow and is_int(left) and is_int(right) and right > 0 and abs(left) > 1:
        # |left| ** right has about bit_length(left) * right bits
        if (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
            raise CalculatorError(f"number too large (more than {MAX_INT_BITS} bits)")
    if op is ast.Mult:
        # a product has at most bits(left) + bits(right) bits
        if is_int(left) and is_int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
            raise CalculatorError(f"number too large (more than {MAX_INT_BITS} bits)")
        # repetition: 'ab' * n or n * [1, 2] grows the sequence n times, in either operand order
        for sequence, count in ((left, right), (right, left)):
            if isinstance(sequence, (str, list, tuple)) and is_int(count) and _printed_length(sequence) * count > MAX_LENGTH:
                raise CalculatorError(f"result too long (more than {MAX_LENGTH:,} characters)")
    if op is ast.Mod and isinstance(left, str):
        # printf-style formatting: '%0999999999d' % 1 would build a gigabyte string
        raise NotCalculable("string formatting")


def _call_method(receiver, name, arguments):
    """receiver.name(*arguments) for the whitelisted methods of its type; NotCalculable for any other."""
    allowed = STRING_METHODS if isinstance(receiver, str) else LIST_METHODS if isinstance(receiver, (list, tuple)) else ()
    if name not in allowed:
        raise NotCalculable(f"method {name!r} of {type(receiver).__name__}")
    if name == "replace" and len(arguments) >= 2 and isinstance(arguments[1], str):
        # each occurrence can grow the string by len(new): bound it before replacing
        if len(receiver) + receiver.count(arguments[0]) * len(arguments[1]) > MAX_LENGTH:
            raise CalculatorError(f"result too long (more than {MAX_LENGTH:,} characters)")
    return getattr(receiver, name)(*arguments)


def _evaluate(node):
    """
    The value of one syntax-tree node, evaluating its children first. Each accepted node is evaluated with
    Python's own semantics (the operator module, the real builtins), so the result is what the sandbox would
    print; only which nodes are accepted, and how big their results may get, is ours.
    """
    # constants of the four plain types only: no None, bytes, complex or Ellipsis
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str, bool):
        return _check_size(node.value)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_evaluate(item) for item in node.elts]
        if any(isinstance(item, (list, tuple)) for item in items):
            # nesting would let [[1]*99999]*99999 hold 10**10 items behind a few references
            raise NotCalculable("nested lists")
        return _check_size(items if isinstance(node, ast.List) else tuple(items))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        _check_binary(type(node.op), left, right)
        return _check_size(BINARY_OPERATORS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPERATORS:
        # no size check: a sign or a `not` never makes a value bigger
        return UNARY_OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BoolOp):
        value = _evaluate(node.values[0])
        for operand in node.values[1:]:
            # short-circuit like Python: `and` stops at the first falsy value, `or` at the first truthy one
            if bool(value) == isinstance(node.op, ast.Or):
                return value
            value = _evaluate(operand)
        return value
    if isinstance(node, ast.Compare) and all(type(op) in COMPARISONS for op in node.ops):
        # a chain like 1 < x < 5 means (1 < x) and (x < 5), each operand evaluated once, stopping at the first False
        left = _evaluate(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator)
            if not COMPARISONS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        # only the branch taken is evaluated, as in Python: `0 if n == 0 else 10 / n` never divides by zero
        return _evaluate(node.body) if _evaluate(node.test) else _evaluate(node.orelse)
    if isinstance(node, ast.Subscript):
        container = _evaluate(node.value)
        if not isinstance(container, (str, list, tuple)):
            raise NotCalculable("subscript of a non-sequence")
        # an index or a slice never yields more than the container holds: no size check needed
        index = node.slice
        if isinstance(index, ast.Slice):
            parts = [None if part is None else _evaluate(part) for part in (index.lower, index.upper, index.step)]
            return container[slice(*parts)]
        return container[_evaluate(index)]
    # calls with keyword arguments are not calculator syntax: they go to the sandbox
    if isinstance(node, ast.Call) and not node.keywords:
        arguments = [_evaluate(argument) for argument in node.args]
        if isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
            if node.func.id == "int" and arguments and isinstance(arguments[0], str) and len(arguments[0]) > 1000:
                raise CalculatorError("int() of a string longer than 1000 characters")
            if node.func.id == "round" and len(arguments) > 1 and isinstance(arguments[1], int) and abs(arguments[1]) > 1000:
                raise CalculatorError("round() to more than 1000 digits")  # round(5, -10**8) computes 10**(10**8)
            if node.func.id == "sum" and len(arguments) != 1:
                raise NotCalculable("sum() with a start value")  # sum(lists, []) concatenates before we can check
            return _check_size(FUNCTIONS[node.func.id](*arguments))
        if isinstance(node.func, ast.Attribute):
            return _check_size(_call_method(_evaluate(node.func.value), node.func.attr, arguments))
    raise NotCalculable(f"{type(node).__name__} is not calculator syntax")


def calculate(code):
    """
    The value of a whitelisted expression, as the text print() would show.
    Raises NotCalculable for anything else, CalculatorError or Python's own error (ZeroDivisionError, ...)
    when the expression is calculator syntax but cannot be computed:

        calculate("48/2")                     -> "24.0"  (true division, as in Python)
        calculate("'strawberry'.count('r')")  -> "3"
        calculate("[1, 2] * 3")               -> "[1, 2, 1, 2, 1, 2]"
        calculate("__import__('os')")         NotCalculable: the sandbox decides
        calculate("9**9**9")                  CalculatorError (more than MAX_INT_BITS)
        calculate("1/0")                      ZeroDivisionError
    """
    code = code.strip()
    if len(code) > MAX_EXPRESSION_CHARS:
        raise NotCalculable("too long for the calculator")
    try:
        # mode="eval": one expression or a SyntaxError, so statements (import, def, assignments) never get here.
        # ValueError: a null byte in the source; MemoryError/RecursionError: absurdly nested brackets.
        tree = ast.parse(code, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise NotCalculable("not a single expression")
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise NotCalculable("too many operations for the calculator")
    try:
        # str(): the text print() shows, so the engine gets the same output here as from the sandbox
        return str(_evaluate(tree.body))
    except RecursionError:
        raise CalculatorError("expression nested too deeply")
