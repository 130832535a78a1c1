"""
scripts/export_hf.py: a tiny model exported both ways (transformers' native nanochat, and nanochat_plus with value
embeddings and x0 mixing through remote code) loads with AutoModelForCausalLM and computes what ours computes
(logits, greedy generation, the pipeline's chat), its tokenizer and chat template give our ids, lm-eval scores it as
our chat_eval does, bad input gets one clear message, and --push-to-hub uploads the folder to a stand-in hub.
Needs the `export` extra (uv sync --extra export); skipped without it.
"""
import base64
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from conftest import REPO_ROOT, sample_texts  # noqa: E402
from nanochat.checkpoint_manager import save_checkpoint  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.report import Report  # noqa: E402
from scripts.export_hf import main as export_main  # noqa: E402

# the conversation of docs/chat_format.md, one more user turn: a system message, a tool call, several turns
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12*7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute: "}, {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"}, {"type": "text", "text": " The answer is 84."}]},
    {"role": "user", "content": "And 12*8? Show the code: `print(12*8)`"},
]
MIXED_TEXT = ("def f(x):\n    return x ** 2  # it's 12345 ünïcødé, 日本語, emoji 🤖\r\n\n\t  tabs  and  spaces "
              "<|bos|>special<|user_start|> tokens <|assistant_end|>  trailing   \n")


def tiny_gpt(tokenizer, value_embeds, x0_mixing, seed=0):
    """A random 3-layer GQA model (random_gpt's recipe): special tokens never win the argmax, so greedy runs go the distance."""
    torch.manual_seed(seed)
    # 256 tokens of context: lm-eval cuts prompts to max_position_embeddings, and an ARC prompt here is ~100 tokens
    config = GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                       value_embeds=value_embeds, x0_mixing=x0_mixing)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # the mixing gains too: every path of the model carries weight
        for name in tokenizer.get_special_tokens():
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    return model.eval()


@pytest.fixture(scope="module")
def run(tiny_tokenizer, tmp_path_factory):
    """A base dir with the tokenizer, two base checkpoints (tags native, plus) and a report, and both exported."""
    base_dir = tmp_path_factory.mktemp("base")
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    models = {"native": tiny_gpt(tiny_tokenizer, value_embeds=False, x0_mixing=False),
              "plus": tiny_gpt(tiny_tokenizer, value_embeds=True, x0_mixing=True)}
    for tag, model in models.items():
        meta = {"model_config": dataclasses.asdict(model.config), "step": 5}
        save_checkpoint(str(base_dir / "base_checkpoints" / tag), 5, model.state_dict(), None, meta)
    report = Report(str(base_dir))
    report.log("Base model training", [{"Calculated number of iterations": 5, "Number of training tokens": 20480}])
    report.log("Base model evaluation", [{"CORE": 0.1234}])
    out = tmp_path_factory.mktemp("exports")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base_dir)
    try:
        for tag in models:
            export_main(["-i", "base", "--model-tag", tag, "--out", str(out / tag)])
    finally:
        os.environ.pop("NANOCHAT_BASE_DIR") if old is None else os.environ.update(NANOCHAT_BASE_DIR=old)
    return {"base_dir": base_dir, "models": models, "dirs": {tag: str(out / tag) for tag in models}}


def load_hf(run, tag):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    trust = tag == "plus"  # the native export must load without remote code
    model, info = AutoModelForCausalLM.from_pretrained(run["dirs"][tag], trust_remote_code=trust, output_loading_info=True)
    assert not any(info.values()), info  # every weight found its place: nothing missing, unexpected or misshapen
    return model.eval(), AutoTokenizer.from_pretrained(run["dirs"][tag], trust_remote_code=trust)


def test_native_and_remote_code_exports_are_what_their_cards_say(run):
    native, plus = run["dirs"]["native"], run["dirs"]["plus"]
    assert sorted(os.listdir(native)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                          "tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(plus)) == sorted(os.listdir(native) + ["modeling_nanochat_plus.py"])
    with open(os.path.join(native, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "nanochat" and "auto_map" not in config
    with open(os.path.join(plus, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "nanochat_plus" and config["value_embed_layers"] == [0, 2] and config["x0_mixing"]
    with open(os.path.join(native, "README.md")) as f:
        card = f.read()
    assert "runs no code from this repository" in card and "trust_remote_code" not in card
    assert "| base | 5 | 20,480 |" in card and "| CORE | 0.1234 |" in card and "| 3 | " in card
    with open(os.path.join(plus, "README.md")) as f:
        card = f.read()
    assert "value embeddings and x0 mixing" in card and "trust_remote_code=True" in card
    # without trust_remote_code the extended model is refused, never loaded as plain nanochat minus its extras
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(plus, trust_remote_code=False)


@pytest.mark.parametrize("tag", ["native", "plus"])
def test_logits_and_greedy_generation_match_ours(run, tiny_tokenizer, tag):
    model, hf_model = run["models"][tag], load_hf(run, tag)[0]
    held_out = "Photosynthesis turns light, water and carbon dioxide into sugar; 2 + 2 = 4, naïve café."
    ids = torch.tensor([tiny_tokenizer.encode(held_out, prepend="<|bos|>")[:64]])
    with torch.no_grad():
        difference = (model(ids) - hf_model(ids).logits).abs().max().item()
    print(f"{tag}: max |logit difference| {difference:.2e} over {ids.numel()} tokens")
    assert difference < 1e-4
    prompt = tiny_tokenizer.render_for_completion(CONVERSATION[:2])
    results, _ = Engine(model, tiny_tokenizer, decoder="torch").generate_batch(prompt, max_tokens=24, temperature=0.0)
    ours = results[0][len(prompt):]
    inputs = torch.tensor([prompt])
    theirs = hf_model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=24, do_sample=False)
    assert theirs[0, len(prompt):].tolist() == ours and len(ours) == 24


def test_pipeline_chats_with_the_chat_template(run, tiny_tokenizer):
    from transformers import pipeline
    chat = pipeline("text-generation", model=run["dirs"]["plus"], trust_remote_code=True)
    reply = chat(CONVERSATION, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]
    prompt = tiny_tokenizer.render_for_completion(CONVERSATION)
    results, _ = Engine(run["models"]["plus"], tiny_tokenizer, decoder="torch").generate_batch(prompt, max_tokens=12, temperature=0.0)
    assert reply == {"role": "assistant", "content": tiny_tokenizer.decode(results[0][len(prompt):])}


def test_tokenizer_and_chat_template_give_our_ids(run, tiny_tokenizer):
    hf_tokenizer = load_hf(run, "native")[1]
    ours = tiny_tokenizer.enc.encode(MIXED_TEXT, allowed_special="all")
    assert hf_tokenizer.encode(MIXED_TEXT, add_special_tokens=False) == ours
    assert hf_tokenizer(MIXED_TEXT)["input_ids"] == [tiny_tokenizer.get_bos_token_id()] + ours  # plain text starts a document
    assert hf_tokenizer.decode(ours) == MIXED_TEXT
    for text in sample_texts(200_000)[:300]:  # real prose, code and lists from the sample corpus
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)

    def template(conversation, add_generation_prompt):
        return hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True,
                                                return_dict=True)["input_ids"]
    # the prompt of the next reply: system folded into the first user turn, the tool call as parts
    assert template(CONVERSATION, True) == tiny_tokenizer.render_for_completion(CONVERSATION)
    # a trailing assistant message is dropped for the prompt (a task's reference answer), kept when rendering it all
    answered = CONVERSATION + [{"role": "assistant", "content": "96."}]
    assert template(answered, True) == tiny_tokenizer.render_for_completion(answered)
    assert template(answered, False) == tiny_tokenizer.render_conversation(answered, max_tokens=10**9)[0]
    with pytest.raises(Exception, match="alternate"):
        template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], True)


def write_arc_file(path, num_questions=20, seed=0):
    """An ARC-format parquet (id, question, choices {text, label}, answerKey): 3-5 choices, some labelled 1-4."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(seed)
    words = sorted({w.strip(".,;:()\"'").lower() for t in sample_texts(50_000) for w in t.split() if w.isalpha() and len(w) > 3})
    rows = []
    for i in range(num_questions):
        count = rng.choice([3, 4, 4, 4, 5])
        labels = [str(n + 1) for n in range(count)] if i % 5 == 0 else list("ABCDE"[:count])
        rows.append({"id": f"q{i}", "question": f"Which word means the same as {rng.choice(words)}?",
                     "choices": {"text": rng.sample(words, count), "label": labels}, "answerKey": rng.choice(labels)})
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.slow
def test_lm_eval_accuracy_equals_our_categorical_eval(run, tiny_tokenizer, tmp_path, monkeypatch):
    """
    The same scoring both ways: our chat_eval reads the logits of the answer letters after <|assistant_start|>;
    lm-eval's acc on nanochat_chat_arc_easy (with --apply_chat_template) compares the loglikelihoods of the
    one-token letter continuations after the same prompt, the same argmax. Equality matters, not the (random) value.
    """
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from nanochat.task_eval import run_categorical_eval
    from tasks.arc import ARC
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arc_file = str(tmp_path / "arc_test.parquet")
    write_arc_file(arc_file)
    # ours, problem by problem (a one-problem slice of the task each), so the comparison is per question, not a total
    ours = [run_categorical_eval(ARC("ARC-Easy", "test", path=arc_file, start=i, stop=i + 1), tiny_tokenizer,
                                 run["models"]["plus"], batch_size=1)[0] for i in range(20)]
    # the repo's task, pointed at this file (the README's recipe for files kept elsewhere)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "local_arc.yaml").write_text(
        f"include: {os.path.join(REPO_ROOT, 'dev', 'lm_eval_tasks', 'nanochat_chat_arc_easy.yaml')}\n"
        f"task: local_chat_arc\ndataset_kwargs:\n  data_files:\n    test: {arc_file}\n  cache_dir: {tmp_path / 'datasets'}\n")
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": run["dirs"]["plus"], "trust_remote_code": True, "dtype": "float32", "device": "cpu"},
        tasks=["local_chat_arc"], task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        apply_chat_template=True, batch_size=8, log_samples=True)
    accuracy = results["results"]["local_chat_arc"]["acc,none"]
    theirs = [sample["acc"] for sample in sorted(results["samples"]["local_chat_arc"], key=lambda sample: sample["doc_id"])]
    print(f"lm-eval acc {accuracy:.4f}, our categorical eval {sum(ours)}/{len(ours)}")
    assert theirs == ours and accuracy == pytest.approx(sum(ours) / 20, abs=1e-12)


# -----------------------------------------------------------------------------
# bad input: one message each, no traceback


def test_unknown_stage_step_and_damaged_checkpoint_are_one_message(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(run["base_dir"]))
    with pytest.raises(SystemExit):
        export_main(["-i", "pretrain", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'pretrain'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"no complete checkpoint for step 7 .*available steps: \[5\]"):
        export_main(["-i", "base", "--model-tag", "plus", "--step", "7", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no model tags"):
        export_main(["-i", "sft", "--out", str(tmp_path / "x")])
    damaged = tmp_path / "damaged"
    shutil.copytree(run["base_dir"], damaged)
    model_file = damaged / "base_checkpoints" / "plus" / "model_000005.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # truncated, as by a full disk
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(damaged))
    with pytest.raises(SystemExit, match="model_000005.pt.*rerun the stage"):
        export_main(["-i", "base", "--model-tag", "plus", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".x.")]


def test_existing_folder_needs_force_and_is_replaced_whole(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(run["base_dir"]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        export_main(["-i", "base", "--model-tag", "native", "--out", str(out)])
    assert "is not empty: pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --force deletes only an earlier export, never any folder
        export_main(["-i", "base", "--model-tag", "native", "--out", str(out), "--force"])
    assert "replaces only an earlier export" in capsys.readouterr().err and (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    export_main(["-i", "base", "--model-tag", "native", "--out", str(out)])  # an empty folder is fine
    (out / "stale.txt").write_text("from before")
    export_main(["-i", "base", "--model-tag", "plus", "--out", str(out), "--force"])
    assert "modeling_nanochat_plus.py" in os.listdir(out) and not (out / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left beside it
    assert all(os.stat(out / name).st_mode & 0o044 == 0o044 for name in os.listdir(out))  # readable by all, to share


# -----------------------------------------------------------------------------
# --push-to-hub against a stand-in hub


class StandInHub(BaseHTTPRequestHandler):
    """
    The few hub API endpoints HfApi.whoami, create_repo and upload_folder call, answered from memory. Every file is
    taken as a "regular" upload (inline, base64, in the commit), so no LFS or Xet storage is involved.
    """
    repos, requests = {}, []

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.requests.append(("GET", self.path))
        if self.headers.get("Authorization") != "Bearer hf_standin":
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        if self.path == "/api/whoami-v2":
            return self.reply(200, {"type": "user", "name": "tester"})
        self.reply(404, {"error": "not here"})

    def do_POST(self):
        self.requests.append(("POST", self.path))
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Authorization") != "Bearer hf_standin":
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        endpoint = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            self.repos.setdefault(repo_id, {"private": request.get("visibility") == "private", "files": {}})
            return self.reply(200, {"url": f"{endpoint}/{repo_id}", "name": repo_id})
        if self.path == "/api/validate-yaml":
            return self.reply(200, {"errors": [], "warnings": []})
        repo_id, _, action = self.path.removeprefix("/api/models/").rpartition("/")[0].rpartition("/")
        if repo_id not in self.repos:
            return self.reply(404, {"error": f"Repository {repo_id} not found"})
        if action == "preupload":
            files = json.loads(body)["files"]
            return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if action == "commit":
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.repos[repo_id]["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self.reply(200, {"commitUrl": f"{endpoint}/{repo_id}/commit/{'0' * 40}", "commitOid": "0" * 40})
        self.reply(404, {"error": "not here"})


@pytest.fixture
def stand_in_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    StandInHub.repos.clear()
    StandInHub.requests.clear()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def run_export(args, base_dir, hub, home, token=None):
    """scripts.export_hf in a fresh process (the hub client reads HF_ENDPOINT and the token at import), -> its result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(NANOCHAT_BASE_DIR=str(base_dir), HF_ENDPOINT=hub, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "scripts.export_hf"] + args, cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_push_to_hub_needs_a_login_then_uploads_the_folder(run, stand_in_hub, tmp_path):
    out = tmp_path / "nanochat-tiny"
    args = ["-i", "base", "--model-tag", "plus", "--out", str(out), "--push-to-hub", "tester/nanochat-tiny", "--private"]
    # no token anywhere (HF_HOME is empty): one message naming the login, before any export
    result = run_export(args, run["base_dir"], stand_in_hub, tmp_path / "hf_home")
    assert result.returncode == 1 and "huggingface-cli login" in result.stderr and "HF_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists() and StandInHub.requests == []
    # a token the hub refuses: the same advice, still nothing exported
    result = run_export(args, run["base_dir"], stand_in_hub, tmp_path / "hf_home", token="hf_revoked")
    assert result.returncode == 1 and "did not accept the login" in result.stderr and not out.exists()
    # logged in: exported, then the whole folder lands in the named repo, as one commit
    result = run_export(args, run["base_dir"], stand_in_hub, tmp_path / "hf_home", token="hf_standin")
    assert result.returncode == 0, result.stderr
    assert "uploaded: http://127.0.0.1" in result.stdout and "tester/nanochat-tiny/commit/" in result.stdout
    repo = StandInHub.repos["tester/nanochat-tiny"]
    assert repo["private"] and set(repo["files"]) == set(os.listdir(out))
    for name, content in repo["files"].items():
        assert content == (out / name).read_bytes(), name
    assert "tester/nanochat-tiny" in repo["files"]["README.md"].decode()  # the card names the repo it lives in
    commits = [path for method, path in StandInHub.requests if path.endswith("/commit/main")]
    assert commits == ["/api/models/tester/nanochat-tiny/commit/main"]
