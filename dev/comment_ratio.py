"""
Comment share of the Python code: per directory and in total, the lines that are
comments ('#' lines, found with tokenize) or docstrings (found with ast) over the
non-blank lines. Run from the repo root: python dev/comment_ratio.py
"""
import ast, io, os, sys, tokenize

def count(path):
    src = open(path, encoding="utf-8").read()
    lines = src.splitlines()
    nonblank = {i for i, l in enumerate(lines, 1) if l.strip()}
    comment, doc = set(), set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        # only whole-line comments count, not trailing ones after code
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].strip().startswith("#"):
            comment.add(tok.start[0])
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                doc.update(range(body[0].lineno, body[0].end_lineno + 1))
    return len(comment & nonblank), len(doc & nonblank), len(nonblank)

total = [0, 0, 0]
print(f"{'':<10} {'#':>5} {'doc':>5} {'lines':>6}  share (# only)")
for d in sys.argv[1:] or ["nanochat", "scripts", "tasks"]:
    sums = [0, 0, 0]
    for f in sorted(os.listdir(d)):
        if f.endswith(".py"):
            sums = [x + y for x, y in zip(sums, count(os.path.join(d, f)))]
    total = [x + y for x, y in zip(total, sums)]
    c, ds, n = sums
    print(f"{d + '/':<10} {c:5d} {ds:5d} {n:6d}  {100 * (c + ds) / max(n, 1):5.1f}% ({100 * c / max(n, 1):4.1f}%)")
c, ds, n = total
print(f"{'total':<10} {c:5d} {ds:5d} {n:6d}  {100 * (c + ds) / max(n, 1):5.1f}% ({100 * c / max(n, 1):4.1f}%)")
