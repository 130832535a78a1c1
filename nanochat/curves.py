"""
Training curves: every training stage appends the points of its curve to <base dir>/report/curves/<stage>.jsonl
(the train loss after each step, the evaluations when they run), and the report plots them.

One JSON object a line, {"step": 120, "train_loss": 3.1} or {"step": 250, "val_bpb": 0.91}: an append, not
an atomic artifact, so a crash loses at most the line being written. A run resumed from an earlier step
simply records its steps again, and the reader keeps each step's last value: the curve shows the run that
carried on. This module owns the format; training writes it and nanochat/report.py reads it through here.
"""
import json
import os

from nanochat.common import get_base_dir, get_dist_info


def curves_dir(base_dir=None):
    # under report/: `report reset` clears a run's curves together with its sections
    return os.path.join(base_dir or get_base_dir(), "report", "curves")


def record_curve_point(stage, step, **values):
    """
    Append {"step": step, **values} to the stage's curve (rank 0 only). Names are stored with underscores
    ("val bpb" -> "val_bpb"), so a script can pass its metrics dict as it is.
    """
    # rank 0 only: the loss it logs is already the mean over all ranks (train_step all-reduces it)
    if get_dist_info()[1] != 0:
        return
    # float(): a 0-d tensor or a numpy float32 would not serialise to JSON
    point = {"step": step, **{name.replace(" ", "_"): float(value) for name, value in values.items()}}
    os.makedirs(curves_dir(), exist_ok=True)
    # opened per point rather than held open: an open costs nothing next to a training step, and nothing sits
    # in a buffer when the process dies
    with open(os.path.join(curves_dir(), f"{stage}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(point) + "\n")


def read_curve(path):
    """{step: {name: value}} from a curve's lines; the last value recorded for a step wins, a line cut short is skipped."""
    points = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                point = json.loads(line)
                step = int(point.pop("step"))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            # numbers only: a hand-edited or foreign value must not break the plot
            points.setdefault(step, {}).update({k: v for k, v in point.items() if isinstance(v, (int, float))})
    return points
