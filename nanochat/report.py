"""
The report card: every stage writes a markdown section into <base dir>/report/, and
`python -m nanochat.report generate` assembles them (in pipeline order) into report.md.

    python -m nanochat.report reset      # start of a run: header with date, git, hardware, versions
    get_report().log(section="Base model training", data=[{"val bpb": 0.81, ...}])
    python -m nanochat.report generate   # -> <base dir>/report.md, copied to ./report.md
"""
import argparse
import datetime
import os
import platform
import re
import shutil
import socket
import subprocess
import sys

from nanochat.artifacts import atomic_write
from nanochat.common import get_base_dir, get_dist_info

# pipeline order of the sections; a section not listed here goes at the end, in the order written
SECTION_ORDER = [
    "Tokenizer training",
    "Tokenizer evaluation",
    "Base model training",
    "Base model loss",
    "Base model evaluation",
    "Midtraining",
    "Chat evaluation mid",
    "Chat SFT",
    "Chat evaluation sft",
    "Chat RL",
    "Chat evaluation rl",
]
# metrics shown in the summary table, looked up by key in each stage's sections
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
SUMMARY_STAGES = {"base": ["Base model evaluation"], "mid": ["Chat evaluation mid"], "sft": ["Chat evaluation sft"], "rl": ["Chat evaluation rl"]}
# on-demand price of an 8xH100 node, for the cost line (adjust to your provider)
DOLLARS_PER_GPU_HOUR = 3.0


def slugify(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _format_value(value):
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _run(command):
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_info():
    commit = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = bool(_run(["git", "status", "--porcelain"]))
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown"
    return commit, branch, dirty


def hardware_info():
    import torch

    info = {"Hostname": socket.gethostname(), "Platform": platform.platform(), "CPUs": os.cpu_count()}
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        info["GPUs"] = f"{count} x {torch.cuda.get_device_name(0)}"
        info["GPU memory"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB each"
    else:
        info["GPUs"] = "none (CPU run)"
    info["Python"] = platform.python_version()
    info["torch"] = torch.__version__
    return info


class Report:
    def __init__(self, base_dir=None):
        self.base_dir = base_dir or get_base_dir()
        self.report_dir = os.path.join(self.base_dir, "report")
        os.makedirs(self.report_dir, exist_ok=True)

    def _section_path(self, section):
        return os.path.join(self.report_dir, f"{slugify(section)}.md")

    def log(self, section, data):
        """Write one stage's section: data is a list of dicts (key -> value) and/or plain strings."""
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

    def reset(self):
        """Start a new run: remove old sections and write the header."""
        for name in os.listdir(self.report_dir):
            os.remove(os.path.join(self.report_dir, name))
        commit, branch, dirty = git_info()
        header = [
            "# nanochat training report",
            "",
            f"Run started: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}",
            "",
            "## Environment",
            f"- git: {commit} on {branch}{' (uncommitted changes)' if dirty else ''}",
        ]
        header += [f"- {key}: {value}" for key, value in hardware_info().items()]
        with open(os.path.join(self.report_dir, "header.md"), "w", encoding="utf-8") as f:
            f.write("\n".join(header) + "\n\n")
        with open(os.path.join(self.report_dir, "start_time.txt"), "w") as f:
            f.write(datetime.datetime.now().isoformat())

    def _sections(self):
        names = [n[: -len(".md")] for n in os.listdir(self.report_dir) if n.endswith(".md") and n != "header.md"]
        order = {slugify(s): i for i, s in enumerate(SECTION_ORDER)}
        written = {n: os.path.getmtime(os.path.join(self.report_dir, n + ".md")) for n in names}
        return sorted(names, key=lambda n: (order.get(n, len(order)), written[n]))

    def _read(self, name):
        with open(os.path.join(self.report_dir, name + ".md"), encoding="utf-8") as f:
            return f.read()

    def summary_table(self):
        """A metric x stage table of the headline numbers that exist so far."""
        values = {}
        for stage, sections in SUMMARY_STAGES.items():
            for section in sections:
                path = self._section_path(section)
                if not os.path.exists(path):
                    continue
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        match = re.match(r"- ([^:]+): (.+)", line.strip())
                        if match and match.group(1) in SUMMARY_METRICS:
                            values[(match.group(1), stage)] = match.group(2)
        if not values:
            return ""
        stages = [s for s in SUMMARY_STAGES if any((m, s) in values for m in SUMMARY_METRICS)]
        rows = ["| Metric | " + " | ".join(s.upper() for s in stages) + " |", "|---" * (len(stages) + 1) + "|"]
        for metric in SUMMARY_METRICS:
            if any((metric, s) in values for s in stages):
                rows.append(f"| {metric} | " + " | ".join(values.get((metric, s), "-") for s in stages) + " |")
        return "## Summary\n\n" + "\n".join(rows) + "\n\n"

    def generate(self, copy_to_cwd=True):
        header_path = os.path.join(self.report_dir, "header.md")
        parts = [open(header_path, encoding="utf-8").read()] if os.path.exists(header_path) else ["# nanochat training report\n\n"]
        start_path = os.path.join(self.report_dir, "start_time.txt")
        if os.path.exists(start_path):
            started = datetime.datetime.fromisoformat(open(start_path).read().strip())
            hours = (datetime.datetime.now() - started).total_seconds() / 3600
            parts.append(f"Total wall clock time: {hours:.2f} h\n\n")
            import torch

            if torch.cuda.is_available():
                gpus = torch.cuda.device_count()
                parts.append(f"Estimated cost: ${hours * gpus * DOLLARS_PER_GPU_HOUR:,.2f} ({gpus} GPUs at ${DOLLARS_PER_GPU_HOUR}/GPU-hour)\n\n")
        parts.append(self.summary_table())
        parts.extend(self._read(name) for name in self._sections())
        content = "".join(parts)
        out_path = os.path.join(self.base_dir, "report.md")
        with atomic_write(out_path, "w", encoding="utf-8") as f:
            f.write(content)
        if copy_to_cwd and os.path.abspath(os.getcwd()) != os.path.abspath(self.base_dir):
            shutil.copyfile(out_path, "report.md")
        return out_path


class DummyReport:
    """What ranks other than 0 get, so every rank can call report.log unconditionally."""

    def log(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass


def get_report():
    return Report() if get_dist_info()[1] == 0 else DummyReport()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Manage the nanochat report card")
    parser.add_argument("command", choices=["reset", "generate"], help="reset: start a new run; generate: assemble report.md")
    args = parser.parse_args()
    report = Report()
    if args.command == "reset":
        report.reset()
        print(f"Report reset in {report.report_dir}")
    else:
        path = report.generate()
        print(f"Report written to {path} (and ./report.md)")
    sys.exit(0)
