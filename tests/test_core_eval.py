"""
CORE on a tiny hand-made bundle in the real bundle's format (core.yaml, eval_meta_data.csv,
eval_data/...), scored with a scripted model whose right and wrong answers we choose, so every
task's accuracy and the CORE metric can be computed by hand. The bundle is downloaded from a real
HTTP server on 127.0.0.1. (The distributed run is in test_chat_eval.py, through scripts.base_eval.)
"""
import http.server
import json
import os
import threading
import zipfile

import pytest
import torch

from nanochat.core_eval import download_eval_bundle, evaluate_core, load_core_tasks, render_prompts_lm, render_prompts_mc, render_prompts_schema

CORE_YAML = """\
icl_tasks:
-
  label: tiny_mc
  dataset_uri: world_knowledge/tiny_mc.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
-
  label: tiny_schema
  dataset_uri: language_understanding/tiny_schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
-
  label: tiny_lm
  dataset_uri: language_understanding/tiny_lm.jsonl
  num_fewshot: [0, 1]
  icl_task_type: language_modeling
"""
META_CSV = """\
Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description
tiny_mc,world knowledge,multiple choice,0,4,25,,four-way questions
tiny_schema,language understanding,schema,1,2,50,,winograd-like
tiny_lm,language understanding,language modeling,0,3,0,,continue the text
"""
MC_ROWS = [
    {"query": "Question: What color is the sky?", "choices": ["green", "blue", "red", "black"], "gold": 1},
    {"query": "Question: 2+2=?", "choices": ["3", "4", "5", "6"], "gold": 1},
    {"query": "Question: Opposite of hot?", "choices": ["warm", "cold", "wet", "dry"], "gold": 1},
    {"query": "Question: Largest planet?", "choices": ["Mars", "Venus", "Jupiter", "Earth"], "gold": 2},
]
SCHEMA_ROWS = [
    {"context_options": ["The trophy did not fit in the suitcase because the suitcase",
                         "The trophy did not fit in the suitcase because the trophy"], "continuation": "was too big.", "gold": 1},
    {"context_options": ["Anna poured water from the bottle into the cup until the bottle",
                         "Anna poured water from the bottle into the cup until the cup",
                         "Anna poured water from the bottle into the cup until the sink"], "continuation": "was full.", "gold": 1},
]
LM_ROWS = [
    {"context": "The capital of France is", "continuation": "Paris"},
    {"context": "One, two, three,", "continuation": "four"},
    {"context": "The opposite of up is ", "continuation": "down"},
]
# What the scripted model "believes", written out by hand in the prompt format. Where it believes a
# wrong answer, that answer is never at index 0, so ties (a model that matched nothing) can't score.
MC_BELIEFS = [
    "Question: What color is the sky?\nAnswer: blue",  # right
    "Question: 2+2=?\nAnswer: 4",  # right
    "Question: Opposite of hot?\nAnswer: cold",  # right
    "Question: Largest planet?\nAnswer: Venus",  # wrong
]
SCHEMA_BELIEFS = [  # 1-shot from a 2-row task: the shot is necessarily the other row, shown with its gold context
    "Anna poured water from the bottle into the cup until the cup was full.\n\n"
    "The trophy did not fit in the suitcase because the trophy was too big.",  # right
    "The trophy did not fit in the suitcase because the trophy was too big.\n\n"
    "Anna poured water from the bottle into the cup until the sink was full.",  # wrong
]
LM_BELIEFS = [
    "The capital of France is Paris",  # right
    "One, two, three, four",  # right
    "The opposite of up is left",  # wrong
]
# accuracies 3/4, 1/2, 2/3; centered (0.75-0.25)/0.75, (0.5-0.5)/0.5, 2/3
EXPECTED = {"tiny_mc": 0.75, "tiny_schema": 0.5, "tiny_lm": 2 / 3}
EXPECTED_CENTERED = {"tiny_mc": 2 / 3, "tiny_schema": 0.0, "tiny_lm": 2 / 3}
EXPECTED_CORE = (2 / 3 + 0.0 + 2 / 3) / 3


class ScriptedModel(torch.nn.Module):
    """
    Logits are flat, except that after any prefix of a believed token sequence the next believed
    token gets +20. So believed continuations have near-zero loss and are what greedy decoding emits.
    """

    def __init__(self, tokenizer, beliefs):
        super().__init__()
        self.vocab_size = tokenizer.get_vocab_size()
        self.next_tokens = {}
        for ids in tokenizer.encode(beliefs, prepend=tokenizer.get_bos_token_id()):
            for t in range(len(ids) - 1):
                self.next_tokens.setdefault(tuple(ids[: t + 1]), set()).add(ids[t + 1])

    def forward(self, idx):
        batch_size, seq_len = idx.shape
        logits = torch.zeros(batch_size, seq_len, self.vocab_size)
        for b in range(batch_size):
            row = idx[b].tolist()
            for t in range(seq_len):
                for token in self.next_tokens.get(tuple(row[: t + 1]), ()):
                    logits[b, t, token] = 20.0
        return logits


def scripted_model(tokenizer):
    return ScriptedModel(tokenizer, MC_BELIEFS + SCHEMA_BELIEFS + LM_BELIEFS)


def write_bundle(root):
    """The bundle's files under root/eval_bundle/, as in the official zip."""
    bundle = os.path.join(root, "eval_bundle")
    os.makedirs(os.path.join(bundle, "eval_data", "world_knowledge"))
    os.makedirs(os.path.join(bundle, "eval_data", "language_understanding"))
    with open(os.path.join(bundle, "core.yaml"), "w") as f:
        f.write(CORE_YAML)
    with open(os.path.join(bundle, "eval_meta_data.csv"), "w") as f:
        f.write(META_CSV)
    for uri, rows in [("world_knowledge/tiny_mc.jsonl", MC_ROWS), ("language_understanding/tiny_schema.jsonl", SCHEMA_ROWS),
                      ("language_understanding/tiny_lm.jsonl", LM_ROWS)]:
        with open(os.path.join(bundle, "eval_data", uri), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return bundle


def zip_bundle(root, zip_path):
    with zipfile.ZipFile(zip_path, "w") as archive:
        for folder, _, files in os.walk(os.path.join(root, "eval_bundle")):
            for name in files:
                path = os.path.join(folder, name)
                archive.write(path, os.path.relpath(path, root))


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, but answers the first request with a 503 (to exercise the retry)."""
    requests_seen = 0

    def do_GET(self):
        FlakyHandler.requests_seen += 1
        if FlakyHandler.requests_seen == 1:
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def bundle_server(tmp_path):
    serve_dir = tmp_path / "serve"
    serve_dir.mkdir()
    write_bundle(str(tmp_path / "src"))
    zip_bundle(str(tmp_path / "src"), str(serve_dir / "eval_bundle.zip"))
    FlakyHandler.requests_seen = 0
    handler = lambda *args, **kwargs: FlakyHandler(*args, directory=str(serve_dir), **kwargs)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
    server.shutdown()
    server.server_close()


def test_prompt_formats_match_dclm():
    mc = render_prompts_mc(MC_ROWS[0], "\nAnswer: ", [MC_ROWS[1]])
    assert mc[1] == "Question: 2+2=?\nAnswer: 4\n\nQuestion: What color is the sky?\nAnswer: blue" and len(mc) == 4
    schema = render_prompts_schema(SCHEMA_ROWS[0], " ", [SCHEMA_ROWS[1]])
    assert schema[0] == ("Anna poured water from the bottle into the cup until the cup was full.\n\n"
                         "The trophy did not fit in the suitcase because the suitcase was too big.")
    without, with_continuation = render_prompts_lm(LM_ROWS[2], " ", [LM_ROWS[0]])
    assert without == "The capital of France is Paris\n\nThe opposite of up is"  # trailing spaces stripped
    assert with_continuation == "The capital of France is Paris\n\nThe opposite of up is down"


def test_download_then_score_each_task_type(tiny_tokenizer, bundle_server, tmp_path):
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    bundle_dir = download_eval_bundle(bundle_server, base_dir=str(base_dir), retries=3)
    assert FlakyHandler.requests_seen == 2  # one 503, one success
    assert bundle_dir == str(base_dir / "eval_bundle")
    assert sorted(os.listdir(base_dir)) == ["eval_bundle", "eval_bundle.zip"]  # no half-unzipped leftovers
    assert os.path.exists(os.path.join(bundle_dir, "eval_data", "language_understanding", "tiny_lm.jsonl"))
    assert download_eval_bundle(bundle_server, base_dir=str(base_dir)) == bundle_dir
    assert FlakyHandler.requests_seen == 2  # already there: no new download

    tasks = load_core_tasks(bundle_dir)
    assert [(t["label"], t["num_fewshot"], t["continuation_delimiter"], t["random_baseline"]) for t in tasks] == [
        ("tiny_mc", 0, "\nAnswer: ", 25.0), ("tiny_schema", 1, " ", 50.0), ("tiny_lm", 0, " ", 0.0)]

    out = evaluate_core(scripted_model(tiny_tokenizer), tiny_tokenizer, "cpu", bundle_dir, log=lambda *a, **k: None)
    assert out["results"] == pytest.approx(EXPECTED)
    assert out["centered_results"] == pytest.approx(EXPECTED_CENTERED)
    assert out["core_metric"] == pytest.approx(EXPECTED_CORE)
    # --max-per-task cuts every task; a short context crops from the left and still scores
    out = evaluate_core(scripted_model(tiny_tokenizer), tiny_tokenizer, "cpu", bundle_dir, max_per_task=1, log=lambda *a, **k: None)
    assert all(accuracy in (0.0, 1.0) for accuracy in out["results"].values())


def test_download_failure_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="eval_bundle.zip"):
        download_eval_bundle("http://127.0.0.1:9/eval_bundle.zip", base_dir=str(tmp_path), retries=1)
    assert os.listdir(tmp_path) == []


def test_a_host_that_does_not_resolve_is_not_retried(tmp_path, caplog):
    """.invalid never resolves (RFC 2606): an offline box gets its answer at once, not after 15 s of backoff."""
    with caplog.at_level("INFO", logger="nanochat"), pytest.raises(RuntimeError, match=r"after 1 attempt\(s\)"):
        download_eval_bundle("http://eval-bundle.invalid/eval_bundle.zip", base_dir=str(tmp_path), retries=5)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("downloading" in m for m in messages) == 1 and not any("retrying" in m for m in messages), messages
    assert os.listdir(tmp_path) == []
