"""The report card: sections in pipeline order, the summary table last, stage times, cost, code size, training curves."""
import contextlib
import datetime
import os
import re
import sys

import pytest
import torch

from nanochat.common import DummyWandb
from nanochat.curves import curves_dir, read_curve, record_curve_point
from nanochat.report import PLOTS_HINT, SUMMARY_METRICS, Report, code_files, code_size, cost_line, format_wall_time, main
from nanochat.training_log import StepLogger
from nanochat.training_setup import Compute

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def summary_rows(text):
    """{metric: [BASE, MID, SFT, RL cells]} from the report's summary table."""
    table = text[text.index("## Summary"):]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in SUMMARY_METRICS:
            rows[cells[0]] = cells[1:]
    return rows


def write_marker(directory, name, text):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.done"), "w", encoding="utf-8") as f:
        f.write(text)


def test_sections_in_pipeline_order_then_the_full_summary_table_then_the_total_time(base_dir, monkeypatch, tmp_path):
    report = Report()
    report.reset()
    # written out of order on purpose; no RL stage at all (SKIP_RL=1)
    report.log("Base model evaluation", [{"CORE": 0.2213, "tasks": 22}])
    report.log("Tokenizer training", [{"vocab size": 32768}, "trained on the sample corpus"])
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.39, "ChatCORE": 0.11}])
    # what scripts/chat_eval.py writes offline (NANOCHAT_DATA=sample)
    report.log("Chat evaluation mid", [{"WordNet-MC (stand-in)": 0.41, "Arithmetic (stand-in)": 0.05,
                                        "SpellingBee (stand-in)": 0.5, "ChatCORE (stand-ins)": 0.2}])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    path = report.generate(num_gpus=0)
    text = open(path).read()
    assert text.startswith("# nanochat training report")
    assert "git: commit" in text and "torch" in text and "- CPU:" in text and "- RAM:" in text and "GPUs: none (CPU run)" in text
    assert text.index("## Tokenizer training") < text.index("## Base model evaluation") < text.index("## Chat evaluation mid") \
        < text.index("## Chat evaluation sft") < text.index("## Summary")
    assert "- vocab size: 32,768" in text and "trained on the sample corpus" in text

    summary = text[text.index("## Summary"):]
    assert "| Metric | BASE | MID | SFT | RL |" in summary
    rows = summary_rows(text)
    assert list(rows) == SUMMARY_METRICS  # every metric, always, in order
    assert rows["CORE"] == ["0.2213", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "-", "0.3900", "-"]
    assert rows["MMLU"] == ["-", "0.4100 *", "-", "-"]  # WordNet-MC stands in for MMLU
    assert rows["GSM8K"] == ["-", "0.0500 *", "-", "-"]  # synthetic arithmetic for GSM8K
    assert rows["ChatCORE"] == ["-", "0.2000 *", "0.1100", "-"]
    assert all(cells[3] == "-" for cells in rows.values())  # RL never ran
    assert "offline stand-in task, not the real benchmark" in summary
    # the table and the total time end the report
    tail = [line for line in text[text.index("## Summary"):].splitlines() if line]
    assert tail[-2].startswith("Total wall clock time: ") and "since `report reset`" in tail[-2]
    assert tail[-1] == "Estimated cost: n/a (CPU run)"
    assert (cwd / "report.md").read_text() == text


def test_a_real_score_wins_over_a_stand_in_of_the_same_stage(base_dir):
    report = Report()
    report.log("Chat evaluation rl", [{"GSM8K": 0.12, "Arithmetic (stand-in)": 0.9}])
    text = open(report.generate(copy_to_cwd=False, num_gpus=0)).read()
    assert summary_rows(text)["GSM8K"] == ["-", "-", "-", "0.1200"]
    assert "offline stand-in task" not in text


def test_reset_starts_a_new_run(base_dir):
    report = Report()
    report.log("Tokenizer training", [{"a": 1}])
    record_curve_point("base", 1, train_loss=5.0)  # report/curves/ is a folder: reset removes it too
    report.reset()
    assert not os.path.exists(curves_dir())
    text = open(report.generate(copy_to_cwd=False, num_gpus=0)).read()
    assert "Tokenizer training" not in text and "Training curves" not in text
    assert all(cells == ["-"] * 4 for cells in summary_rows(text).values())  # the table is there, empty


def test_stage_markers_give_a_stage_table_and_the_total_is_their_sum(base_dir, capsys):
    report = Report()
    report.reset()
    # the run started three days ago (resumed since): the gap must not count
    with open(os.path.join(report.report_dir, "start_time.txt"), "w") as f:
        f.write((datetime.datetime.now() - datetime.timedelta(days=3)).isoformat())
    stages = os.path.join(base_dir, "speedrun_stages")
    write_marker(stages, "base_train", "stage: base_train\ncommand: python -m scripts.base_train --depth 4\n"
                                       "seconds: 3600.4\nfinished: 2026-01-02T10:00:00\n")
    write_marker(stages, "chat_eval_rl", "junk without a colon\nstage: chat_eval_rl\ncommand: python -m scripts.chat_eval -i rl -a 'ARC-Easy|MMLU'\n"
                                         "seconds: 125\nfinished: 2026-01-02T11:00:00\n")
    write_marker(stages, "tok_train", "stage: tok_train\ncommand: python -m scripts.tok_train\nseconds: 62\n"
                                      "finished: 2026-01-01T09:00:00Z\n")  # UTC, as speedrun.sh writes it
    write_marker(stages, "broken", "\x00\x01 half a marker\nstage: broken\nseconds: soon\n")
    write_marker(stages, "empty", "")
    text = open(report.generate(copy_to_cwd=False, num_gpus=0)).read()
    warnings = capsys.readouterr().err
    assert "broken.done" in warnings and "empty.done" in warnings
    table = text[text.index("## Stage times"):text.index("## Summary")]
    assert [line.split("|")[1].strip() for line in table.splitlines()[4:] if line.startswith("|")] == \
        ["tok_train", "base_train", "chat_eval_rl"]  # in the order they finished
    assert "| base_train | 1h 00m 00s | `python -m scripts.base_train --depth 4` |" in table
    assert "| tok_train | 1m 02s |" in table and "'ARC-Easy\\|MMLU'" in table
    assert "broken" not in table
    assert "Total wall clock time: 1h 03m 07s (sum of 3 stages)" in text  # 62 + 3600.4 + 125 s


def test_wall_time_format():
    assert format_wall_time(3723.4) == "1h 02m 03s"
    assert format_wall_time(245) == "4m 05s"
    assert format_wall_time(0) == "0m 00s"


def test_cost_is_gpu_hours_at_an_eighth_of_the_node_rate(base_dir):
    assert cost_line(2.0, 8, 24.0).startswith("Estimated cost: $48.00 ")
    assert cost_line(2.0, 4, 30.0).startswith("Estimated cost: $30.00 (4 GPUs x 2.00 h = 8.00 GPU-hours")
    assert cost_line(5.0, 0, 24.0) == "Estimated cost: n/a (CPU run)"
    report = Report()
    write_marker(os.path.join(base_dir, "speedrun_stages"), "base_train", "stage: base_train\nseconds: 5400\n")
    text = open(report.generate(copy_to_cwd=False, hourly_rate=32.0, num_gpus=2)).read()
    assert text.rstrip().endswith("Estimated cost: $12.00 (2 GPUs x 1.50 h = 3.00 GPU-hours, at $32/h per 8-GPU node)")


def test_cli_generate_takes_an_hourly_rate(base_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    main(["reset"])
    main(["generate", "--hourly-rate", "10"])
    assert "Total wall clock time" in (tmp_path / "report.md").read_text()
    for argv, env_rate in [(["generate", "--hourly-rate", "-3"], None), (["generate"], "ten dollars")]:
        if env_rate:
            monkeypatch.setenv("NANOCHAT_HOURLY_RATE", env_rate)
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and "hourly" in capsys.readouterr().err.lower()


def test_code_size_from_git_and_without_it(tiny_tokenizer, tmp_path):
    files = code_files()
    assert "nanochat/report.py" in files and "speedrun.sh" in files and all(f.endswith((".py", ".rs", ".sh", ".md", ".toml", ".html")) for f in files)
    size = code_size(files, tokenizer=tiny_tokenizer)
    assert size["files"] == len(files) and size["lines"] > 0 and size["characters"] > size["lines"]
    assert 0 < size["tokens"] < size["characters"]  # BPE merges: fewer tokens than characters
    assert code_size(files)["tokens"] is None
    # outside a git checkout (a tarball): the stack's folders and the top-level files
    for path, text in [("nanochat/a.py", "x = 1\ny = 2\n"), ("nanochat/__pycache__/a.py", "stale\n"), ("scripts/b.sh", "echo hi\n"),
                       ("README.md", "# hi\n"), ("data.parquet", "binary"), ("elsewhere/c.py", "not the stack\n")]:
        os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
        (tmp_path / path).write_text(text)
    files = code_files(str(tmp_path))
    assert files == ["README.md", "nanochat/a.py", "scripts/b.sh"]
    assert code_size(files, str(tmp_path)) == {"files": 3, "lines": 4, "characters": 25, "tokens": None}


def code_figures(text):
    line = next(line for line in text.splitlines() if line.startswith("- code: "))
    return line, [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) (?:files|lines|characters|tokens)", line)]


def test_header_counts_code_tokens_at_reset_or_else_at_generate(base_dir, tiny_tokenizer):
    report = Report()
    report.reset()  # no tokenizer yet (as in speedrun.sh)
    line, figures = code_figures(open(report.generate(copy_to_cwd=False, num_gpus=0)).read())
    assert "tokenizer not trained yet" in line and len(figures) == 3 and all(n > 0 for n in figures)
    tiny_tokenizer.save(os.path.join(base_dir, "tokenizer"))
    line, figures = code_figures(open(report.generate(copy_to_cwd=False, num_gpus=0)).read())
    assert "tokens (our tokenizer, counted at generate)" in line and len(figures) == 4 and all(n > 0 for n in figures)
    report.reset()  # a tokenizer exists: counted right away
    line, figures = code_figures(open(os.path.join(report.report_dir, "header.md")).read())
    assert line.endswith("tokens (our tokenizer)") and len(figures) == 4 and figures[3] < figures[2]


def record_a_resumed_base_run():
    """Steps 1-3 and val bpb at 0 and 2, then a resume from step 2 that trains step 3 again, and a line cut short."""
    for step, loss in [(1, 5.0), (2, 4.0), (3, 3.5)]:
        record_curve_point("base", step, train_loss=loss)
    record_curve_point("base", 0, val_bpb=2.0)
    record_curve_point("base", 2, val_bpb=1.5)
    record_curve_point("base", 3, train_loss=3.0)
    with open(os.path.join(curves_dir(), "base.jsonl"), "a") as f:
        f.write('{"step": 4, "train_lo')
    record_curve_point("rl", 1, reward=0.25)


def test_curves_keep_the_last_value_of_each_step(base_dir):
    record_a_resumed_base_run()
    points = read_curve(os.path.join(curves_dir(), "base.jsonl"))
    assert points == {0: {"val_bpb": 2.0}, 1: {"train_loss": 5.0}, 2: {"train_loss": 4.0, "val_bpb": 1.5}, 3: {"train_loss": 3.0}}


def test_step_logger_records_the_train_loss_of_its_stage(base_dir):
    compute = Compute(False, 0, 1, torch.device("cpu"), torch.float32, contextlib.nullcontext(), DummyWandb())
    silent = StepLogger(compute, num_iterations=2, flops_per_token=1.0)
    logger = StepLogger(compute, num_iterations=2, flops_per_token=1.0, stage="sft")
    for step, loss in enumerate([2.5, 2.0]):
        for each in (silent, logger):
            with each.timer:
                pass
            each.log(step, loss, tokens=100, lr_multiplier=1.0)
    record_curve_point("sft", 2, **{"val bpb": 1.25})  # chat_sft passes its metrics dict as it is
    assert os.listdir(curves_dir()) == ["sft.jsonl"]
    assert read_curve(os.path.join(curves_dir(), "sft.jsonl")) == {1: {"train_loss": 2.5}, 2: {"train_loss": 2.0, "val_bpb": 1.25}}


def test_without_matplotlib_the_report_says_how_to_get_plots(base_dir, monkeypatch):
    record_a_resumed_base_run()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    report = Report()
    text = open(report.generate(copy_to_cwd=False, num_gpus=0)).read()
    assert PLOTS_HINT in text and "uv sync --extra plots" in text
    assert not any(name.endswith(".png") for name in os.listdir(report.report_dir))


def test_generate_plots_the_curves_and_links_them(base_dir, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    record_a_resumed_base_run()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    report = Report()
    text = open(report.generate(num_gpus=0)).read()
    for stage in ("base", "rl"):
        png = os.path.join(report.report_dir, f"{stage}_curves.png")
        with open(png, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
        # relative beside report.md in the base dir; absolute in the copy in the current directory
        assert f"![{stage} training curves](report/{stage}_curves.png)" in text
        assert f"![{stage} training curves]({png})" in (cwd / "report.md").read_text()
    assert PLOTS_HINT not in text
    assert text.index("## Training curves") < text.index("## Summary")
