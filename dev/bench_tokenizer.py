"""
Tokenizer benchmark: BPE training time, MB/s and peak memory of our rustbpe side by side with the PyPI
`rustbpe` package and Hugging Face `tokenizers` (BpeTrainer, same split pattern), on >= 100 MB of real
text available offline; checks our merges equal PyPI rustbpe's; then encode throughput of the tiktoken
path (nanochat.tokenizer.RustBPETokenizer) on 1 thread and batched.

    # once: the comparison trainers live in a throwaway venv (PyPI rustbpe has our module's name)
    uv venv /tmp/venv_pypi_rustbpe --python python3
    uv pip install --python /tmp/venv_pypi_rustbpe/bin/python rustbpe tokenizers
    # once: real text for the corpus (Debian doc packages)
    apt-get update && apt-get install -y linux-doc-6.1 python3.11-doc perl-doc postgresql-doc-15 python-django-doc

    .venv/bin/python -m dev.bench_tokenizer                        # vocab 32768 and 65536
    .venv/bin/python -m dev.bench_tokenizer --vocab-sizes 4096 --max-mb 20   # quick look

Every trainer runs in its own subprocess so its peak RSS (VmHWM, see own_peak_rss_mb) is its own. All
read the same cached corpus with the same document cap, in the same order. Results: dev/BENCHMARKS.md.
"""
import argparse
import glob
import gzip
import html.parser
import json
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(REPO_ROOT, "nanochat", "sample_data")
DEFAULT_CORPUS = os.path.join(os.path.expanduser("~"), ".cache", "nanochat", "bench_tokenizer_corpus.jsonl")
DEFAULT_COMPARE_PYTHON = "/tmp/venv_pypi_rustbpe/bin/python"
# nanochat.tokenizer.SPLIT_PATTERN, repeated here because the worker runs in the throwaway venv without nanochat
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
# Corpus documents are cut to about this many characters at line breaks: web-page sized, like pretraining data
PIECE_CHARS = 8_000
APT_PACKAGES = "linux-doc-6.1 python3.11-doc perl-doc postgresql-doc-15 python-django-doc"


# -----------------------------------------------------------------------------
# The corpus: embedded sample + Debian documentation (kernel docs, Python/Django/PostgreSQL HTML, Perl pod)
# + the Python standard library source (code is part of real pretraining text too)

class TextFromHTML(html.parser.HTMLParser):
    """Visible text of an HTML page: drops script/style, keeps line structure at block tags."""

    SKIP = {"script", "style", "head"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "section", "table"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip_depth = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip_depth > 0:
            self.skip_depth -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip_depth == 0:
            self.parts.append(data)

    def text(self):
        lines = (line.rstrip() for line in "".join(self.parts).splitlines())
        out, blank = [], 0
        for line in lines:  # collapse runs of blank lines left by the markup
            blank = blank + 1 if not line else 0
            if blank <= 1:
                out.append(line)
        return "\n".join(out).strip()


def read_text_file(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    if path.endswith((".html", ".html.gz")):
        parser = TextFromHTML()
        parser.feed(text)
        text = parser.text()
    return text


def split_into_pieces(text):
    """Cut a long file into documents of about PIECE_CHARS characters at line breaks."""
    pieces, start = [], 0
    while start < len(text):
        end = start + PIECE_CHARS
        if end < len(text):
            newline = text.rfind("\n", start + PIECE_CHARS // 2, end)
            end = newline + 1 if newline != -1 else end
        pieces.append(text[start:end])
        start = end
    return pieces


def debian_doc_files():
    """(source name, sorted file list) per Debian documentation source; empty lists when not installed."""
    kernel = "/usr/share/doc/linux-doc-6.1/Documentation"
    return [
        ("linux-doc-6.1 (rst/txt/yaml)", sorted(f for f in glob.glob(f"{kernel}/**/*.gz", recursive=True) if not f.endswith((".svg.gz", ".png.gz")))),
        ("python3.11-doc (html)", sorted(glob.glob("/usr/share/doc/python3.11/html/**/*.html", recursive=True))),
        ("python-django-doc (html)", sorted(glob.glob("/usr/share/doc/python-django-doc/html/**/*.html", recursive=True))),
        ("postgresql-doc-15 (html)", sorted(glob.glob("/usr/share/doc/postgresql-doc-15/html/*.html"))),
        ("perl-doc (pod)", sorted(glob.glob("/usr/share/perl/5.*/pod/*.pod"))),
        ("python3.11 stdlib (py)", sorted(glob.glob("/usr/lib/python3.11/**/*.py", recursive=True))),
    ]


def build_corpus(path, min_mb):
    import pyarrow.parquet as pq
    documents, sizes = [], {}
    for split in ("train", "val"):
        texts = pq.read_table(os.path.join(SAMPLE_DIR, f"{split}.parquet"), columns=["text"]).column("text").to_pylist()
        documents.extend(texts)
        sizes[f"nanochat sample ({split})"] = sum(len(t.encode()) for t in texts)
    for name, files in debian_doc_files():
        started, total = time.time(), 0
        for i, file in enumerate(files):
            for piece in split_into_pieces(read_text_file(file)):
                if piece.strip():
                    documents.append(piece)
                    total += len(piece.encode())
            if (i + 1) % 1000 == 0:
                print(f"  {name}: {i + 1}/{len(files)} files, {total / 1e6:.1f} MB, {time.time() - started:.0f}s", flush=True)
        sizes[name] = total
    for name, size in sizes.items():
        print(f"  {name:32s} {size / 1e6:7.1f} MB")
    total_mb = sum(sizes.values()) / 1e6
    if total_mb < min_mb:
        sys.exit(f"corpus is only {total_mb:.1f} MB (< {min_mb} MB): install the doc packages first:\n"
                 f"  apt-get update && apt-get install -y {APT_PACKAGES}")
    # JSON lines, not parquet: reading it back costs the workers almost no memory (pyarrow's reader took
    # ~150 MB), so peak RSS measures the trainer, not the file reader
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps(document) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Worker: one trainer in its own process (runs under the venv that has that trainer)

def iterate_corpus(corpus, doc_cap, max_bytes):
    """Documents in file order, each capped at doc_cap characters, until max_bytes UTF-8 bytes are out."""
    seen = 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)[:doc_cap]
            seen += len(text.encode())
            yield text
            if seen >= max_bytes:
                return


def run_worker(args):
    documents = iterate_corpus(args.corpus, args.doc_cap, int(args.max_mb * 1e6))
    started = time.time()
    if args.worker in ("ours", "pypi", "before"):
        import rustbpe
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(documents, args.vocab_size, buffer_size=8192, pattern=SPLIT_PATTERN)
        seconds = time.time() - started
        merges = [bytes(token) for token, rank in sorted(trainer.get_mergeable_ranks(), key=lambda item: item[1])]
        module = rustbpe.__file__
    else:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, show_progress=False, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(documents, trainer=trainer)
        seconds = time.time() - started
        merges = None
        module = sys.modules["tokenizers"].__file__
    with open(args.result, "w", encoding="utf-8") as f:  # JSON, tokens as hex: the driver unpickles nothing
        json.dump({"seconds": seconds, "merges": None if merges is None else [token.hex() for token in merges],
                   "module": module, "peak_rss_mb": own_peak_rss_mb()}, f)


def own_peak_rss_mb():
    """This process's peak RSS since exec (VmHWM). Not getrusage: on Linux a child's ru_maxrss starts at
    its parent's RSS at fork time, which would put a floor under every worker's figure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None  # no /proc (macOS): the driver falls back to the wait4 figure


# -----------------------------------------------------------------------------
# Driver

def corpus_bytes(corpus, doc_cap, max_bytes):
    return sum(len(text.encode()) for text in iterate_corpus(corpus, doc_cap, max_bytes))


def run_trainer(name, python, args, vocab_size, workdir):
    """Train in a fresh subprocess; returns seconds, the child's own peak RSS (MB) and its merges."""
    result_path = os.path.join(workdir, f"{name}_{vocab_size}.json")
    command = [python, os.path.abspath(__file__), "--worker", name, "--vocab-size", str(vocab_size),
               "--corpus", args.corpus, "--doc-cap", str(args.doc_cap), "--max-mb", str(args.max_mb), "--result", result_path]
    env = dict(os.environ, PYTHONPATH="")  # the worker must import the venv's own rustbpe, never the repo's
    process = subprocess.Popen(command, env=env, cwd=workdir)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        sys.exit(f"{name} trainer failed (exit status {status}); command: {' '.join(command)}")
    with open(result_path, encoding="utf-8") as f:
        result = json.load(f)
    if result["merges"] is not None:
        result["merges"] = [bytes.fromhex(token) for token in result["merges"]]
    result["rss_mb"] = result["peak_rss_mb"] or usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def compare_merges(ours, theirs):
    if ours == theirs:
        return f"yes ({len(ours)} tokens)"
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"NO (first difference at rank {first}; {len(ours)} vs {len(theirs)} tokens)"


def best_of(repeats, work):
    """Fastest of a few runs: the machine is shared, so the minimum is the least disturbed figure."""
    best_seconds, result = float("inf"), None
    for _ in range(repeats):
        started = time.time()
        result = work()
        best_seconds = min(best_seconds, time.time() - started)
    return best_seconds, result


def bench_encode(merges, args):
    """tiktoken path: encode() one document at a time on 1 thread, and encode(list, num_threads=2)."""
    from nanochat.tokenizer import RustBPETokenizer
    tokenizer = RustBPETokenizer.from_mergeable_ranks(SPLIT_PATTERN, {token: rank for rank, token in enumerate(merges)})
    documents = list(iterate_corpus(args.corpus, args.doc_cap, int(args.encode_mb * 1e6)))
    megabytes = sum(len(text.encode()) for text in documents) / 1e6
    single_seconds, single = best_of(2, lambda: [tokenizer.encode(text) for text in documents])
    batched_seconds, batched = best_of(2, lambda: tokenizer.encode(documents, num_threads=2))
    assert batched == single, "batched encode disagrees with one-at-a-time encode"
    tokens = sum(len(ids) for ids in single)
    print(f"\nencode (tiktoken path, vocab {len(merges)}): {megabytes:.1f} MB, {tokens:,} tokens, {megabytes * 1e6 / tokens:.2f} bytes/token")
    print(f"  1 thread (encode per doc):      {single_seconds:6.2f}s  {megabytes / single_seconds:6.1f} MB/s")
    print(f"  batched (num_threads=2):        {batched_seconds:6.2f}s  {megabytes / batched_seconds:6.1f} MB/s")


def main():
    parser = argparse.ArgumentParser(description="BPE training benchmark: ours vs PyPI rustbpe vs HF tokenizers")
    parser.add_argument("--vocab-sizes", type=str, default="32768,65536", help="comma-separated vocab sizes (incl. the 256 bytes)")
    parser.add_argument("--corpus", type=str, default=DEFAULT_CORPUS, help="cached corpus, JSON lines (built when missing)")
    parser.add_argument("--min-mb", type=float, default=100, help="refuse to build a corpus smaller than this")
    parser.add_argument("--max-mb", type=float, default=1e9, help="train on at most this many MB of the corpus")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="truncate each document to this many characters (like tok_train)")
    parser.add_argument("--trainers", type=str, default="ours,pypi,hf", help="which trainers to run: ours, pypi, hf")
    parser.add_argument("--compare-python", type=str, default=DEFAULT_COMPARE_PYTHON, help="python of the venv with PyPI rustbpe + tokenizers")
    parser.add_argument("--before-python", type=str, default=None, help="python of a venv with an older build of our rustbpe: adds it as trainer 'before', to measure a change to lib.rs")
    parser.add_argument("--encode-mb", type=float, default=20, help="MB of the corpus for the encode benchmark (0: skip)")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)

    if args.doc_cap <= 0 or args.max_mb <= 0 or args.encode_mb < 0:
        parser.error("--doc-cap and --max-mb must be positive, --encode-mb at least 0")
    trainers = [name.strip() for name in args.trainers.split(",") if name.strip()]
    unknown = set(trainers) - {"ours", "pypi", "hf"}
    if unknown or "ours" not in trainers:
        parser.error(f"--trainers must include ours and otherwise only pypi, hf; got {args.trainers}")
    try:
        vocab_sizes = [int(v) for v in args.vocab_sizes.split(",")]
    except ValueError:
        parser.error(f"--vocab-sizes must be comma-separated integers, got {args.vocab_sizes!r}")
    if any(v < 256 for v in vocab_sizes):
        parser.error("every vocab size must be at least 256")
    if ("pypi" in trainers or "hf" in trainers) and not os.path.exists(args.compare_python):
        sys.exit(f"no comparison venv at {args.compare_python}; create it with:\n"
                 f"  uv venv /tmp/venv_pypi_rustbpe --python python3\n"
                 f"  uv pip install --python /tmp/venv_pypi_rustbpe/bin/python rustbpe tokenizers\n"
                 f"or pass --trainers ours")
    if not os.path.exists(args.corpus):
        print(f"building the corpus at {args.corpus} (one time)")
        build_corpus(args.corpus, args.min_mb)
    megabytes = corpus_bytes(args.corpus, args.doc_cap, int(args.max_mb * 1e6)) / 1e6
    print(f"corpus: {args.corpus}: {os.path.getsize(args.corpus) / 1e6:.1f} MB as JSON lines; training on {megabytes:.1f} MB "
          f"(UTF-8) with documents capped at {args.doc_cap:,} chars; {os.cpu_count()} CPUs")
    pythons = {"ours": sys.executable, "pypi": args.compare_python, "hf": args.compare_python, "before": args.before_python}
    if args.before_python:
        if not os.path.exists(args.before_python):
            sys.exit(f"--before-python {args.before_python} does not exist")
        trainers.insert(1, "before")

    rows, merges_for_encode = [], None
    with tempfile.TemporaryDirectory() as workdir:
        for vocab_size in vocab_sizes:
            results = {}
            for name in trainers:
                print(f"training {name} at vocab {vocab_size}...", flush=True)
                results[name] = run_trainer(name, pythons[name], args, vocab_size, workdir)
                print(f"  {results[name]['seconds']:.1f}s, peak RSS {results[name]['rss_mb']:.0f} MB ({results[name]['module']})", flush=True)
            checks = {name: compare_merges(results["ours"]["merges"], results[name]["merges"]) for name in ("pypi", "before") if name in results}
            rows.append((vocab_size, results, checks))
            merges_for_encode = results["ours"]["merges"]

    print(f"\ntraining on {megabytes:.1f} MB ({os.cpu_count()} CPUs); ratios are ours / theirs (< 1 means ours is better)")
    print(f"{'vocab':>6} {'trainer':>7} {'time s':>8} {'MB/s':>7} {'RSS MB':>8} {'time ratio':>11} {'RSS ratio':>10}")
    for vocab_size, results, checks in rows:
        ours = results["ours"]
        for name, result in results.items():
            time_ratio = f"{ours['seconds'] / result['seconds']:.2f}" if name != "ours" else ""
            rss_ratio = f"{ours['rss_mb'] / result['rss_mb']:.2f}" if name != "ours" else ""
            print(f"{vocab_size:>6} {name:>7} {result['seconds']:8.1f} {megabytes / result['seconds']:7.2f} {result['rss_mb']:8.0f} {time_ratio:>11} {rss_ratio:>10}")
        for name, verdict in checks.items():
            print(f"{vocab_size:>6} merges equal to {'PyPI rustbpe' if name == 'pypi' else 'our older build'}: {verdict}")
    if args.encode_mb > 0:
        bench_encode(merges_for_encode, args)


if __name__ == "__main__":
    main()
