"""
Stage markers: how speedrun.sh remembers which stages of a run are finished, and how long each one took.

When a stage ends, speedrun.sh has this module write <base dir>/speedrun_stages/<name>.done, last and
atomically (nanochat/artifacts.py: written beside, then renamed), as `key: value` lines:

    stage: base-train
    command: python -m scripts.base_train --depth 20 --run dummy
    seconds: 10841
    finished: 2026-01-02T10:00:00Z
    result: done

result is `done`, or `failed` for an optional stage that failed (CORE needs the internet): settled all the
same, so a rerun does not try it again. A rerun skips a stage whose marker records the very command it would
run, resumes a training stage that has no marker (it was interrupted), and redoes one whose command changed.
The report reads the markers for its stage-times table and the run's total time.

A marker is parsed as text, never sourced or evaluated: whoever can write the base directory must not be
able to run code in the next speedrun. Lines without a colon and unknown keys are ignored.

    python -m nanochat.stage_markers status NAME -- COMMAND...    # prints done | failed | missing | changed
    python -m nanochat.stage_markers write NAME --seconds S --result done -- COMMAND...
    python -m nanochat.stage_markers clear                        # a new run: every marker goes
"""
import argparse
import datetime
import math
import os
import re
import sys

# a stage that is still running, or was killed, has no marker at all: that absence is what "resume it" means
RESULTS = ("done", "failed")


def stages_dir(base_dir):
    # in the base dir, next to the checkpoints it describes: a fresh NANOCHAT_BASE_DIR is a fresh run
    return os.path.join(base_dir, "speedrun_stages")


def marker_path(directory, name):
    # the name becomes a file name: no '/' or '..' may take the marker outside the directory
    if not re.fullmatch(r"[\w.-]+", name) or name.startswith("."):
        raise ValueError(f"a stage name is letters, digits, '.', '-' and '_' (got {name!r})")
    return os.path.join(directory, f"{name}.done")


def command_line(argv):
    """The command as one marker line: its words joined by spaces, as bash's "$*" joins them."""
    # newlines would end the `command:` line early and start a line of their own, read as another key
    return " ".join(argv).replace("\n", " ").replace("\r", " ").strip()


def write_stage_marker(directory, name, command, seconds, result="done"):
    """Record that stage `name`, run as `command` (its words), ended after `seconds` with `result`."""
    # imported here, by `write` only: `status`, run before every stage, needs nothing but the standard library
    from nanochat.artifacts import atomic_write

    if result not in RESULTS:
        raise ValueError(f"result must be one of {RESULTS} (got {result!r})")
    # UTC: the order of stages must not jump when a run spans a daylight-saving change or moves between machines
    finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with atomic_write(marker_path(directory, name), "w", encoding="utf-8") as f:
        f.write(f"stage: {name}\ncommand: {command_line(command)}\nseconds: {round(seconds)}\n"
                f"finished: {finished}\nresult: {result}\n")


def read_fields(path):
    """{key: value} of a marker's `key: value` lines (keys lower-cased); OSError when it cannot be read."""
    fields = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            # partition at the first colon only: a command's own colons (a URL) stay in the value
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
    return fields


def read_stage_marker(path):
    """
    {stage, command, seconds, finished (POSIX time), result} from a marker, or None, with a warning, when it lacks a
    stage or a usable number of seconds: a half-written or hand-edited marker costs its row of the table, never the report.
    """
    try:
        fields = read_fields(path)
    except OSError as e:
        print(f"warning: skipping the stage marker {path}: {e}", file=sys.stderr)
        return None
    try:
        seconds = float(fields.get("seconds", ""))
    except ValueError:
        seconds = float("nan")
    if not fields.get("stage") or not math.isfinite(seconds) or seconds < 0:
        print(f"warning: skipping the stage marker {path}: it needs 'stage: <name>' and 'seconds: <wall seconds>'", file=sys.stderr)
        return None
    try:  # UTC is written as "...Z", which fromisoformat reads only from Python 3.11 on
        finished = datetime.datetime.fromisoformat(re.sub(r"Z$", "+00:00", fields.get("finished", ""))).timestamp()
    except ValueError:  # only the order needs it: the file's own time says when it was written
        finished = os.path.getmtime(path)
    return {"stage": fields["stage"], "command": fields.get("command", ""), "seconds": seconds, "finished": finished,
            "result": fields.get("result", "done")}


def read_stage_markers(directory):
    """The valid markers of a directory, in the order the stages finished."""
    if not os.path.isdir(directory):
        return []
    markers = [read_stage_marker(os.path.join(directory, n)) for n in sorted(os.listdir(directory)) if n.endswith(".done")]
    # by finish time, not by name: the table then reads in the order the run went, reruns included
    return sorted((m for m in markers if m), key=lambda m: m["finished"])


def stage_status(directory, name, command=None):
    """
    "missing" (never run, or interrupted), "changed" (its marker records another command), or the recorded result,
    "done" or "failed", when the marker records this command, given as its words (any command when it is None).
    """
    try:
        fields = read_fields(marker_path(directory, name))
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "changed"  # there, but unreadable: run the stage again rather than trust it
    # the command decides, not only the name: rerunning speedrun.sh with other flags (a bigger depth, another
    # profile) must redo the stages those flags change rather than skip them as done
    if command is not None and fields.get("command") != command_line(command):
        return "changed"
    return "failed" if fields.get("result") == "failed" else "done"


def clear_stage_markers(directory):
    """Remove every marker: the next speedrun runs every stage again. Other files in the directory are left alone."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.endswith(".done"):
                os.remove(os.path.join(directory, name))


def main(argv=None):
    """The command line speedrun.sh calls around every stage (status before it, write after it, clear for a new run)."""
    parser = argparse.ArgumentParser(description="Read and write speedrun.sh's stage markers (speedrun_stages/NAME.done)",
                                     epilog="the stage's command follows a lone --: status NAME -- python -m scripts.tok_eval")
    parser.add_argument("--dir", type=str, default=None, help="the markers' directory (default: speedrun_stages/ in $NANOCHAT_BASE_DIR)")
    actions = parser.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", help="print done, failed, missing, or changed (the marker records another command)")
    write = actions.add_parser("write", help="record that a stage ended (written atomically)")
    actions.add_parser("clear", help="remove every marker: a new run")
    for action in (status, write):
        action.add_argument("name", help="the stage's name, e.g. base-train")
    write.add_argument("--seconds", type=int, required=True, help="the stage's wall-clock time in whole seconds")
    write.add_argument("--result", choices=RESULTS, default="done", help="failed: an optional stage that failed, settled all the same")
    # the command is split off by hand: argparse would take the command's own flags for ours
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    # everything after the first "--" is the stage's command, word for word
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    if args.action == "write" and not command:
        parser.error("write needs the stage's command after --")
    if args.dir is None:
        base_dir = os.environ.get("NANOCHAT_BASE_DIR")  # what speedrun.sh exports
        if not base_dir:
            from nanochat.common import get_base_dir  # imports torch (~2 s): only when the environment does not say

            base_dir = get_base_dir()
        args.dir = stages_dir(base_dir)
    try:
        # status prints one word, which speedrun.sh reads with $(...) and a case statement
        if args.action == "status":
            print(stage_status(args.dir, args.name, command or None))
        elif args.action == "write":
            write_stage_marker(args.dir, args.name, command, args.seconds, args.result)
        else:
            clear_stage_markers(args.dir)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
