"""
The report card: every stage writes a markdown section into <base dir>/report/, and
`python -m nanochat.report generate` assembles them (in pipeline order) into report.md.

    python -m nanochat.report reset      # start of a run: header with date, git, hardware, versions, code size
    get_report().log(section="Base model training", data=[{"val bpb": 0.81, ...}])
    python -m nanochat.report generate   # -> <base dir>/report.md, copied to ./report.md

report.md reads top to bottom like the run: the header, each stage's section, the training curves
(PNGs drawn from the points training recorded, nanochat/curves.py, when matplotlib is installed), the
wall time of each stage (from speedrun.sh's markers, nanochat/stage_markers.py), and last the summary
table of headline metrics x stages, the total wall-clock time and what the GPUs cost. The report only
reads what the stages wrote: nothing else in nanochat/ imports it.

On disk, under <base dir>: report/header.md (written by reset), report/<section-slug>.md (one per stage),
report/curves/<stage>.jsonl (points recorded by training), report/<stage>_curves.png (drawn by generate),
report/start_time.txt, and report.md itself beside report/ (plus a copy in the current directory).

The total is the sum of the stages' own times, not "now - reset": a run resumed the next day must not
bill the night in between. Offline stand-in scores (NANOCHAT_DATA=sample) are marked in the table, so a
score on synthetic arithmetic is never mistaken for GSM8K.
"""
import argparse
import datetime
import math
import os
import platform
import re
import shutil
import socket
import subprocess

from nanochat.artifacts import atomic_write
from nanochat.common import format_duration, get_base_dir, get_dist_info
from nanochat.curves import curves_dir, read_curve
from nanochat.stage_markers import read_stage_markers, stages_dir

# the checkout this file lives in: git and the code-size count run there, whatever directory a stage ran from
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Pipeline order of the sections; a section not listed here goes at the end, in the order written. The order is
# fixed here rather than taken from when each section was written: a stage rerun after a fix rewrites its
# section later, and the report would otherwise read out of order.
SECTION_ORDER = [
    "Tokenizer training",
    "Tokenizer evaluation",
    "Base model training",
    "Base model loss",
    "Base model evaluation",
    "Chat evaluation base",
    "Midtraining",
    "Chat evaluation mid",
    "Chat SFT",
    "Chat evaluation sft",
    "Chat RL",
    "Chat evaluation rl",
]
# the summary table: these rows x these columns, always all of them ("-" where a number is missing),
# so two report cards line up row for row
# FactQA exists only offline (tasks/factqa.py: questions about the embedded corpus' facts), so on a real run its row is "-"
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "FactQA", "ChatCORE"]
# the base column reads two sections: CORE comes from base_eval, the chat metrics from chat_eval -i base
SUMMARY_STAGES = {"base": ["Base model evaluation", "Chat evaluation base"], "mid": ["Chat evaluation mid"],
                  "sft": ["Chat evaluation sft"], "rl": ["Chat evaluation rl"]}
# scripts/chat_eval.py labels offline scores "<task> (stand-in)"; the stand-in tasks have their own names,
# so this says which benchmark each one stands in for (tasks/wordnet_mc.py copies MMLU's format,
# tasks/arithmetic.py GSM8K's). "<metric> (stand-in)" for a metric of the table maps to itself.
STAND_IN_KEYS = {"WordNet-MC (stand-in)": "MMLU", "Arithmetic (stand-in)": "GSM8K", "ChatCORE (stand-ins)": "ChatCORE"}
# appended to a stand-in's cell, and explained once under the table
STAND_IN_MARK = " *"
STAND_IN_FOOTNOTE = ("\\* offline stand-in task, not the real benchmark (NANOCHAT_DATA=sample: WordNet-MC for MMLU, "
                     "synthetic arithmetic for GSM8K, FactQA's held-out facts of the embedded corpus)")

# the price of one 8xH100 node per hour (on-demand, 2025; adjust with --hourly-rate or NANOCHAT_HOURLY_RATE)
DEFAULT_NODE_HOURLY_RATE = 24.0
# the rate is quoted per node, the run is billed per GPU: a run on fewer GPUs pays its share of a node
GPUS_PER_NODE = 8

# The code whose size the header reports: what `git ls-files` tracks with these endings, or, without git
# (a tarball), these folders and the top-level files. A repository meant to be read stays small only if its
# size is watched, so every report card records it next to the results it produced.
CODE_EXTENSIONS = (".py", ".rs", ".sh", ".md", ".toml", ".html")
CODE_FOLDERS = ("nanochat", "scripts", "tasks", os.path.join("rustbpe", "src"))
# stands in the header for the code's token count when `reset` runs before the tokenizer is trained
# (speedrun.sh resets first); `generate` replaces it with the count
TOKENS_PENDING = "(counted when the report is generated: no tokenizer yet at reset)"
# the panels that come first in a stage's figure, when recorded; any other quantity follows, alphabetically
CURVE_ORDER = ["train_loss", "val_bpb", "reward", "pass@1"]
PLOTS_HINT = "install matplotlib (`uv sync --extra plots`) for training-curve plots"


def slugify(text):
    """A section title as a file name: 'Chat evaluation sft' -> 'chat-evaluation-sft'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def read_section(report_dir, section):
    """{key: value text} of a section's "- key: value" lines, as Report.log wrote them ({} when the stage did not report)."""
    path = os.path.join(report_dir, f"{slugify(section)}.md")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return dict(match.groups() for line in f if (match := re.match(r"- ([^:]+): (.+)", line.strip())))


def _format_value(value):
    # 4 decimals for metrics (a bpb or an accuracy moves in the third digit); thousands separators for counts.
    # bool is an int subclass: True stays "True", not "1".
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def format_wall_time(seconds):
    """3723.4 -> '1h 02m 03s', 245 -> '4m 05s': rounded, where the training logs truncate."""
    return format_duration(round(seconds), separator=" ")


def _run(command, cwd=REPO_ROOT):
    """A command's stdout, stripped, or "" when it cannot run (no git, not a checkout): the header then says unknown."""
    # the timeout: a git waiting on a lock, or a hung network filesystem, must not hold up the report
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=cwd).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# -----------------------------------------------------------------------------
# the header: what ran, where, on what


def git_info():
    """(short commit, branch, dirty): which code produced the run, and whether it had uncommitted changes."""
    commit = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = bool(_run(["git", "status", "--porcelain"]))
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown"
    return commit, branch, dirty


def cpu_model():
    """The CPU's model name: on a CPU run, the timings in the report are this CPU's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform.processor() is the best the standard library offers
    return platform.processor() or "unknown"


def ram_bytes():
    """Physical memory in bytes, or None when neither /proc/meminfo nor sysconf knows."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the file says kB and means KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def gpu_count():
    """Visible CUDA devices on this machine; 0 on a CPU run (the cost line then says n/a)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_info():
    """GPU name(s), memory of the first, and the CUDA version torch was built with."""
    import torch

    count = gpu_count()
    if count == 0:
        return {"GPUs": "none (CPU run)"}
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    return {"GPUs": f"{count} x {' / '.join(names)}",
            "GPU memory": f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB each",
            "CUDA": torch.version.cuda or "unknown"}


def hardware_info():
    """{label: value} for the header's Environment list: host, platform, CPU, RAM, GPUs and versions."""
    import torch

    # os.cpu_count() counts logical CPUs (hyperthreads included), not physical cores
    ram = ram_bytes()
    info = {"Hostname": socket.gethostname(), "Platform": platform.platform(), "CPU": cpu_model(), "CPU cores": os.cpu_count(),
            "RAM": f"{ram / 2**30:.1f} GiB" if ram else "unknown"}
    info.update(gpu_info())
    info["Python"] = platform.python_version()
    info["torch"] = torch.__version__
    return info


def code_files(repo_root=REPO_ROOT):
    """The repository's source files (paths relative to repo_root): git's tracked ones, else a walk of CODE_FOLDERS."""
    listed = _run(["git", "ls-files", "-z"], cwd=repo_root)  # -z: names exactly as they are, never quoted
    if listed:
        # tracked files only: checkpoints, venvs and caches in the checkout are not code
        paths = [p for p in listed.split("\0") if p.endswith(CODE_EXTENSIONS)]
    else:
        paths = [n for n in os.listdir(repo_root) if n.endswith(CODE_EXTENSIONS)]
        for folder in CODE_FOLDERS:
            for directory, subdirs, names in os.walk(os.path.join(repo_root, folder)):
                subdirs[:] = [d for d in subdirs if d != "__pycache__"]
                paths += [os.path.relpath(os.path.join(directory, n), repo_root) for n in names if n.endswith(CODE_EXTENSIONS)]
    # a file deleted but not yet committed is still listed by git
    return sorted(p for p in paths if os.path.isfile(os.path.join(repo_root, p)))


def code_size(paths, repo_root=REPO_ROOT, tokenizer=None):
    """{files, lines, characters, tokens}; tokens (under our tokenizer) is None without one."""
    texts = []
    for path in paths:
        # errors="replace": a stray non-UTF-8 byte in one file must not cost the whole header
        with open(os.path.join(repo_root, path), encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    # tokens under the run's own tokenizer: how much of a model's context the whole code would fill
    tokens = sum(len(ids) for ids in tokenizer.encode(texts)) if tokenizer is not None and texts else None
    return {"files": len(texts), "lines": sum(t.count("\n") for t in texts), "characters": sum(len(t) for t in texts),
            "tokens": tokens}


def load_trained_tokenizer():
    """The run's tokenizer, or None when it is not trained yet (or is damaged: the report still gets written)."""
    from nanochat.artifacts import DamagedArtifactError
    from nanochat.tokenizer import get_tokenizer

    try:
        return get_tokenizer()
    except (FileNotFoundError, DamagedArtifactError, OSError, ValueError):
        return None


def format_code_size(size):
    """The header's code line. Tokens stay pending when reset runs before the tokenizer exists."""
    tokens = f"{size['tokens']:,} tokens (our tokenizer)" if size["tokens"] is not None else f"tokens {TOKENS_PENDING}"
    return f"{size['files']:,} files, {size['lines']:,} lines, {size['characters']:,} characters, {tokens}"


def fill_pending_token_count(header, repo_root=REPO_ROOT):
    """The header with TOKENS_PENDING replaced by the code's token count, now that a tokenizer may exist."""
    if TOKENS_PENDING not in header:
        return header
    tokenizer = load_trained_tokenizer()
    if tokenizer is None:
        return header.replace(f"tokens {TOKENS_PENDING}", "tokenizer not trained yet")
    tokens = code_size(code_files(repo_root), repo_root, tokenizer)["tokens"]
    return header.replace(f"tokens {TOKENS_PENDING}", f"{tokens:,} tokens (our tokenizer, counted at generate)")


# -----------------------------------------------------------------------------
# stage times: speedrun.sh writes speedrun_stages/<stage>.done when a stage finishes (nanochat/stage_markers.py)


def stage_times_table(markers):
    """A markdown table of the stage markers: stage, wall time and the exact command each stage ran."""
    rows = ["| Stage | Wall time | Command |", "|---|---|---|"]
    for m in markers:
        # a failed optional stage (CORE offline) still cost its time: it stays in the table, marked
        stage = m["stage"] if m.get("result", "done") == "done" else f"{m['stage']} ({m['result']}, optional)"
        command = m["command"].replace("|", "\\|")  # a pipe inside `-a 'ARC-Easy|MMLU'` would split the cell
        rows.append(f"| {stage} | {format_wall_time(m['seconds'])} | `{command}` |" if command else
                    f"| {stage} | {format_wall_time(m['seconds'])} | |")
    return "## Stage times\n\n" + "\n".join(rows) + "\n\n"


# -----------------------------------------------------------------------------
# cost


def hourly_rate_from_env():
    """$ per hour of an 8-GPU node: $NANOCHAT_HOURLY_RATE, or the default (ValueError when it is not a number)."""
    return float(os.environ.get("NANOCHAT_HOURLY_RATE", DEFAULT_NODE_HOURLY_RATE))


def cost_line(hours, num_gpus, node_hourly_rate):
    """GPU-hours x price: node_hourly_rate buys 8 GPUs for an hour, so a GPU-hour costs an eighth of it."""
    if num_gpus == 0:
        return "Estimated cost: n/a (CPU run)"
    # e.g. 4 h on 8 GPUs at $24/h per node: 4 x 24 x 8 / 8 = $96
    cost = hours * node_hourly_rate * num_gpus / GPUS_PER_NODE
    return (f"Estimated cost: ${cost:,.2f} ({num_gpus} GPUs x {hours:.2f} h = {hours * num_gpus:.2f} GPU-hours, "
            f"at ${node_hourly_rate:g}/h per {GPUS_PER_NODE}-GPU node)")


# -----------------------------------------------------------------------------
# training curves: points recorded by training (nanochat/curves.py), plotted here


def plot_curve(stage, points, png_path):
    """One panel per recorded quantity (train loss, val bpb, reward, pass@1...) against the step, into png_path."""
    # imported here: matplotlib is optional, and the rest of the report works without it
    import matplotlib

    matplotlib.use("Agg")  # draw into files: no display needed (a server, a container)
    import matplotlib.pyplot as plt

    recorded = {name for values in points.values() for name in values}
    # one panel per quantity, side by side: train loss and val bpb have different scales and steps (evals are sparse)
    names = [n for n in CURVE_ORDER if n in recorded] + sorted(recorded - set(CURVE_ORDER))
    # squeeze=False: axes is always 2-D, even for a stage that recorded a single quantity
    figure, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps = [s for s in sorted(points) if name in points[s]]
        # markers only on sparse curves (a few evals), where a line alone would hide how few points there are
        ax.plot(steps, [points[s][name] for s in steps], marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(f"{stage}: {name.replace('_', ' ')}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_write(png_path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    # pyplot keeps every figure alive until it is closed: one report draws a figure per stage
    plt.close(figure)


def matplotlib_available():
    """matplotlib is an optional extra (`plots`): without it the report says how to get the plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# -----------------------------------------------------------------------------


class Report:
    """
    The report card of one run: sections in <base dir>/report/<slug>.md, one file per stage, so no two stages
    write the same file and a stage rerun replaces only its own section; generate() joins them.
    """

    def __init__(self, base_dir=None):
        self.base_dir = base_dir or get_base_dir()
        self.report_dir = os.path.join(self.base_dir, "report")
        os.makedirs(self.report_dir, exist_ok=True)

    def _section_path(self, section):
        return os.path.join(self.report_dir, f"{slugify(section)}.md")

    def log(self, section, data):
        """Write one stage's section: data is a list of dicts (key -> value) and/or plain strings."""
        # "- key: value" lines: readable as markdown, and parsed back by summary_values for the summary table
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}", ""]
        for item in data:
            if isinstance(item, dict):
                lines.extend(f"- {key}: {_format_value(value)}" for key, value in item.items())
            elif item:
                lines.append(str(item))
        path = self._section_path(section)
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n\n")
        return path

    def header(self):
        """The run's header: when it started, git state, hardware, versions, and the size of the code."""
        commit, branch, dirty = git_info()
        size = code_size(code_files(), tokenizer=load_trained_tokenizer())
        lines = [
            "# nanochat training report",
            "",
            f"Run started: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}",
            "",
            "## Environment",
            f"- git: commit {commit}, branch {branch}, {'dirty (uncommitted changes)' if dirty else 'clean'}",
        ]
        lines += [f"- {key}: {value}" for key, value in hardware_info().items()]
        lines.append(f"- code: {format_code_size(size)}")
        return "\n".join(lines) + "\n\n"

    def reset(self):
        """Start a new run: remove old sections and curves, write the header."""
        # everything goes, curves included: a section or a curve point left from the previous run would be
        # reported as this run's
        for name in os.listdir(self.report_dir):
            path = os.path.join(self.report_dir, name)
            if os.path.isdir(path):  # report/curves/
                shutil.rmtree(path)
            else:
                os.remove(path)
        with atomic_write(os.path.join(self.report_dir, "header.md"), "w", encoding="utf-8") as f:
            f.write(self.header())
        # the fallback for the total time when no stage markers exist (wall_time)
        with atomic_write(os.path.join(self.report_dir, "start_time.txt"), "w", encoding="utf-8") as f:
            f.write(datetime.datetime.now().isoformat())

    def _sections(self):
        """Section names in report order: SECTION_ORDER first, then any other section by when it was written."""
        names = [n[: -len(".md")] for n in os.listdir(self.report_dir) if n.endswith(".md") and n != "header.md"]
        order = {slugify(s): i for i, s in enumerate(SECTION_ORDER)}
        written = {n: os.path.getmtime(os.path.join(self.report_dir, n + ".md")) for n in names}
        return sorted(names, key=lambda n: (order.get(n, len(order)), written[n]))

    def _read(self, name):
        with open(os.path.join(self.report_dir, name + ".md"), encoding="utf-8") as f:
            return f.read()

    def summary_values(self):
        """{(metric, stage): (value text, is a stand-in)} from the stages' evaluation sections."""
        values = {}
        for stage, sections in SUMMARY_STAGES.items():
            for section in sections:
                # the sections are the source of truth: their "- key: value" lines (Report.log's format) are
                # read back rather than having each stage also report its figures somewhere else
                for key, value in read_section(self.report_dir, section).items():
                    # the value is kept as the section's text, already formatted by Report.log
                    if key in SUMMARY_METRICS:
                        values[(key, stage)] = (value, False)
                        continue
                    # a stand-in fills a cell only when the stage has no real score for that metric
                    metric = STAND_IN_KEYS.get(key) or key.removesuffix(" (stand-in)")
                    if metric in SUMMARY_METRICS and metric != key and (metric, stage) not in values:
                        values[(metric, stage)] = (value, True)  # a real score of the same stage wins
        return values

    def summary_table(self):
        """Every headline metric x every stage: '-' where a stage did not run or did not measure it."""
        values = self.summary_values()
        # markdown table: a header row, the |---| separator row, then one row per metric
        rows = ["| Metric | " + " | ".join(s.upper() for s in SUMMARY_STAGES) + " |", "|---" * (len(SUMMARY_STAGES) + 1) + "|"]
        for metric in SUMMARY_METRICS:
            cells = []
            for stage in SUMMARY_STAGES:
                value, stand_in = values.get((metric, stage), ("-", False))
                cells.append(value + STAND_IN_MARK if stand_in else value)
            rows.append(f"| {metric} | " + " | ".join(cells) + " |")
        footnote = STAND_IN_FOOTNOTE + "\n\n" if any(stand_in for _, stand_in in values.values()) else ""
        return "## Summary\n\n" + "\n".join(rows) + "\n\n" + footnote

    def plot_curves(self):
        """Draw report/<stage>_curves.png for each recorded stage -> [(stage, png path)], or None without matplotlib."""
        # [] (nothing was recorded: no section at all) is not None (points exist but cannot be drawn: a hint)
        directory = curves_dir(self.base_dir)
        if not os.path.isdir(directory):
            return []
        if not matplotlib_available():
            return None
        plots = []
        for name in sorted(os.listdir(directory)):
            if not name.endswith(".jsonl"):
                continue
            stage = name[: -len(".jsonl")]
            points = read_curve(os.path.join(directory, name))
            if points:
                png_path = os.path.join(self.report_dir, f"{stage}_curves.png")
                plot_curve(stage, points, png_path)
                plots.append((stage, png_path))
        return plots

    def curves_section(self, plots, image_dir):
        """Markdown image links to the plots, relative to image_dir's parent (see generate)."""
        # None: curves were recorded but matplotlib is missing, so the report says how to get them
        if plots is None:
            return f"## Training curves\n\n{PLOTS_HINT}\n\n"
        if not plots:
            return ""
        links = [f"![{stage} training curves]({image_dir}/{os.path.basename(path)})" for stage, path in plots]
        return "## Training curves\n\n" + "\n\n".join(links) + "\n\n"

    def wall_time(self, markers):
        """(seconds, how they were measured) or (None, reason)."""
        # the stages' own times when speedrun.sh recorded them; "now - reset" only for a run without markers
        # (stages run by hand), where it is the best there is
        if markers:
            return sum(m["seconds"] for m in markers), f"sum of {len(markers)} stages"
        start_path = os.path.join(self.report_dir, "start_time.txt")
        if os.path.exists(start_path):
            with open(start_path, encoding="utf-8") as f:
                try:
                    started = datetime.datetime.fromisoformat(f.read().strip())
                except ValueError:
                    return None, "start_time.txt is unreadable"
            return (datetime.datetime.now() - started).total_seconds(), "since `report reset`"
        return None, "no `report reset` and no stage markers"

    def generate(self, copy_to_cwd=True, hourly_rate=None, num_gpus=None):
        """
        Write <base dir>/report.md (and ./report.md). hourly_rate: $ per hour of an 8-GPU node (default
        NANOCHAT_HOURLY_RATE or 24); num_gpus: the GPUs the run used (default: this machine's).
        """
        hourly_rate = hourly_rate_from_env() if hourly_rate is None else hourly_rate
        # this machine's GPUs: generate runs at the end of speedrun.sh, on the machine that trained
        num_gpus = gpu_count() if num_gpus is None else num_gpus
        # generate also works without a reset before it (stages run by hand): a bare title stands in for the header
        header_path = os.path.join(self.report_dir, "header.md")
        if os.path.exists(header_path):
            with open(header_path, encoding="utf-8") as f:
                header = fill_pending_token_count(f.read())
        else:
            header = "# nanochat training report\n\n"
        # the report's order: header, stage sections, curves, stage times, summary, total time and cost
        sections = "".join(self._read(name) for name in self._sections())
        plots = self.plot_curves()
        markers = read_stage_markers(stages_dir(self.base_dir))
        seconds, measured = self.wall_time(markers)
        ending = [stage_times_table(markers) if markers else "", self.summary_table()]
        # no time, no cost: a price computed from a guessed duration would look like a measurement
        if seconds is None:
            ending.append(f"Total wall clock time: unknown ({measured})\n\n")
        else:
            ending.append(f"Total wall clock time: {format_wall_time(seconds)} ({measured})\n\n")
            ending.append(cost_line(seconds / 3600, num_gpus, hourly_rate) + "\n")

        # the same report twice: beside report/ with relative image links, in the current directory with absolute ones
        def render(image_dir):
            return header + sections + self.curves_section(plots, image_dir) + "".join(ending)

        out_path = os.path.join(self.base_dir, "report.md")
        with atomic_write(out_path, "w", encoding="utf-8") as f:
            # report.md sits beside report/, so the link is relative and survives a move of the base dir
            f.write(render("report"))
        if copy_to_cwd and os.path.abspath(os.getcwd()) != os.path.abspath(self.base_dir):
            # the copy links to the PNGs where they are, by absolute path, rather than copying them into the
            # current directory (the repository, for speedrun.sh): untracked PNGs there would mark the next run's
            # git state dirty. To share the report card elsewhere, take <base dir>/report.md with <base dir>/report/.
            with atomic_write("report.md", "w", encoding="utf-8") as f:
                f.write(render(self.report_dir))
        return out_path


class DummyReport:
    """What ranks other than 0 get, so every rank can call report.log unconditionally."""

    def log(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass


def get_report():
    """The run's Report on rank 0, a DummyReport elsewhere: one section per stage, not one per rank."""
    return Report() if get_dist_info()[1] == 0 else DummyReport()


def main(argv=None):
    # argv: the tests call main([...]) directly instead of starting a process
    parser = argparse.ArgumentParser(description="Manage the nanochat report card")
    parser.add_argument("command", choices=["reset", "generate"], help="reset: start a new run; generate: assemble report.md")
    parser.add_argument("--hourly-rate", type=float, default=None,
                        help=f"$ per hour of an 8xH100 node, for the cost line (default: $NANOCHAT_HOURLY_RATE or {DEFAULT_NODE_HOURLY_RATE:g})")
    args = parser.parse_args(argv)
    report = Report()
    if args.command == "reset":
        report.reset()
        print(f"Report reset in {report.report_dir}")
    else:
        # checked here, where a bad rate can be named, rather than as a traceback from inside generate
        try:
            rate = args.hourly_rate if args.hourly_rate is not None else hourly_rate_from_env()
        except ValueError:
            parser.error(f"NANOCHAT_HOURLY_RATE must be a number of dollars (got {os.environ['NANOCHAT_HOURLY_RATE']!r})")
        if not (math.isfinite(rate) and rate >= 0):
            parser.error(f"the hourly rate must be a non-negative number of dollars (got {rate})")
        path = report.generate(hourly_rate=rate)
        print(f"Report written to {path} (and ./report.md)")


if __name__ == "__main__":
    main()
