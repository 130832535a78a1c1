"""The report card: sections in pipeline order, a summary of headline metrics, atomic files."""
from nanochat.report import Report


def test_sections_are_assembled_in_pipeline_order_with_a_summary(base_dir, monkeypatch, tmp_path):
    report = Report()
    report.reset()
    # written out of order on purpose
    report.log("Base model evaluation", [{"CORE": 0.2213, "tasks": 22}])
    report.log("Tokenizer training", [{"vocab size": 32768}, "trained on the sample corpus"])
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.39, "ChatCORE": 0.11}])
    monkeypatch.chdir(tmp_path)
    path = report.generate()
    text = open(path).read()
    assert text.startswith("# nanochat training report")
    assert "git:" in text and "torch" in text
    assert text.index("## Tokenizer training") < text.index("## Base model evaluation") < text.index("## Chat evaluation sft")
    assert "- vocab size: 32,768" in text and "trained on the sample corpus" in text
    summary = text[text.index("## Summary"):text.index("## Tokenizer training")]
    assert "| Metric | BASE | SFT |" in summary
    assert "| CORE | 0.2213 | - |" in summary
    assert "| ARC-Easy | - | 0.3900 |" in summary
    assert (tmp_path / "report.md").read_text() == text


def test_reset_starts_a_new_run(base_dir):
    report = Report()
    report.log("Tokenizer training", [{"a": 1}])
    report.reset()
    text = open(report.generate(copy_to_cwd=False)).read()
    assert "Tokenizer training" not in text
    assert "## Summary" not in text  # no metrics yet
