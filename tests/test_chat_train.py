"""
Midtraining and SFT: which tokens train, the loaders (packing, padding, sorting, exact resume), the step's
loss normalisation, the schedules, a tiny model that learns a conversation and then answers it through the
Engine, the identity override, and the real scripts end to end (bit-exact resume, torchrun == 1 process).
"""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from nanochat.dataloader import ConversationLoader, SFTLoader
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import get_lr_multiplier, train_step

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_LINE = re.compile(r"^step (\d+)/\d+ .*\| loss ([0-9.]+) ", re.M)

TOOL_CONVERSATION = {"messages": [
    {"role": "user", "content": "What is 6 times 7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute. "},
        {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": " The answer is 42."},
    ]},
]}


def spans(tokenizer, ids):
    """Label every token: bos / user / output (tool output, incl. its delimiters) / assistant."""
    special = {name: tokenizer.encode_special(name) for name in
               ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|output_start|>", "<|output_end|>", "<|assistant_start|>")}
    labels, state = [], "assistant"
    for token in ids:
        if token == special["<|bos|>"]:
            labels.append("bos")
            continue
        if token == special["<|user_start|>"]:
            state = "user"
        if token == special["<|output_start|>"]:
            state = "output"
        labels.append("start" if token == special["<|assistant_start|>"] else state)
        if token in (special["<|user_end|>"], special["<|output_end|>"]):
            state = "assistant"
    return labels


def test_which_tokens_train_in_mid_and_sft(tiny_tokenizer):
    ids, sft_mask = tiny_tokenizer.render_conversation(TOOL_CONVERSATION)
    _, mid_mask = tiny_tokenizer.render_conversation(TOOL_CONVERSATION, train_on="all")
    labels = spans(tiny_tokenizer, ids)
    for label, sft, mid in zip(labels, sft_mask, mid_mask):
        # SFT: only what the assistant produces; mid: the user's turn and chat tokens too; neither: bos, tool output
        assert sft == (label == "assistant"), (label, sft)
        assert mid == (label in ("assistant", "user", "start")), (label, mid)
    kept = tiny_tokenizer.decode([t for t, m in zip(ids, sft_mask) if m])
    assert kept.startswith("Let me compute. <|python_start|>6*7<|python_end|> The answer is 42.") and kept.endswith("<|assistant_end|>")
    with pytest.raises(ValueError, match="train_on"):
        tiny_tokenizer.render_conversation(TOOL_CONVERSATION, train_on="user")


class ListData(list):
    """A dataset is anything with len() and [i] -> conversation."""


def make_conversations(count, seed=0):
    import random
    rng = random.Random(seed)
    words = "the cat sat on a mat while seven birds sang over green hills and rivers".split()
    conversations = []
    for i in range(count):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
        conversations.append({"messages": [{"role": "user", "content": f"{i}: {question}"}, {"role": "assistant", "content": answer}]})
    for i in range(3, count, 7):
        conversations[i] = TOOL_CONVERSATION
    return ListData(conversations)


def test_conversation_loader_packs_bos_aligned_masks_tool_output_and_resumes(tiny_tokenizer):
    data = make_conversations(24)
    bos = tiny_tokenizer.get_bos_token_id()
    output_ids = {tiny_tokenizer.encode_special("<|output_start|>"), tiny_tokenizer.encode_special("<|output_end|>")}
    loader = ConversationLoader(data, tiny_tokenizer, batch_size=3, seq_len=48, rank=0, world_size=1, buffer_size=8)
    outputs_seen = 0
    for _ in range(4):
        inputs, targets = next(loader)
        assert (inputs[:, 0] == bos).all()  # every row starts a conversation
        for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist()):
            labels = spans(tiny_tokenizer, row_inputs)
            for position in range(len(row_inputs) - 1):  # target p predicts input p+1
                if labels[position + 1] in ("bos", "output"):  # tool output and bos never train...
                    assert row_targets[position] == -1
                    outputs_seen += labels[position + 1] == "output"
                else:  # ...everything else does, the user's turn included
                    assert row_targets[position] == row_inputs[position + 1]
    assert outputs_seen >= 3  # the tool conversation was packed: its <|output_start|> 42 <|output_end|> were masked
    assert not output_ids & set(targets.flatten().tolist())
    # exact resume: a loader built from the state yields the same batches as the original
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [next(loader) for _ in range(8)]
    resumed = ConversationLoader(data, tiny_tokenizer, batch_size=3, seq_len=48, rank=0, world_size=1, buffer_size=8, resume_state=state)
    for (a, b), (c, d) in zip(expected, (next(resumed) for _ in range(8))):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert loader.epoch >= 1  # 24 conversations: the stream wrapped into a new epoch on the way
    # a single pass stops, and ranks split the conversations between them
    one_pass = ConversationLoader(data, tiny_tokenizer, batch_size=2, seq_len=48, rank=1, world_size=2, single_pass=True)
    batches = list(one_pass)
    assert batches and one_pass.epoch == 0 and one_pass.next_index >= len(data)
    with pytest.raises(ValueError, match="num_conversations"):
        ConversationLoader(ListData(data[:20]), tiny_tokenizer, 3, 48, rank=0, world_size=1, resume_state=state)


def test_sft_loader_pads_sorts_and_deals_rows_like_one_process(tiny_tokenizer):
    data = make_conversations(40, seed=1)
    one = SFTLoader(data, tiny_tokenizer, batch_size=2, max_seq_len=96, grad_accum_steps=2, rank=0, world_size=1)
    ranks = [SFTLoader(data, tiny_tokenizer, batch_size=2, max_seq_len=96, grad_accum_steps=1, rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        single = [next(one) for _ in range(2)]
        distributed = [next(loader) for loader in ranks]
        # the same rows reach the step, dealt out the same way (micro-step m of 1 process == rank m of 2)
        for (a, b), (c, d) in zip(single, distributed):
            assert torch.equal(a, c) and torch.equal(b, d)
        lengths = []
        for inputs, targets in single:
            assert inputs.shape[1] % 8 == 0 or inputs.shape[1] == 96  # padded to a multiple of 8 (or the cap)
            lengths.append(inputs.shape[1])
            assert (targets[:, :1] == -1).all()  # the first target is the user's turn: never trained
        assert lengths == sorted(lengths)  # rows sorted by length: the short micro-batch is padded less
    assert 0 < one.padded_fraction < 0.6
    # exact resume from the state
    state = one.state_dict()
    expected = [next(one) for _ in range(3)]
    resumed = SFTLoader(data, tiny_tokenizer, batch_size=2, max_seq_len=96, grad_accum_steps=2, rank=0, world_size=1, resume_state=state)
    for (a, b), (c, d) in zip(expected, (next(resumed) for _ in range(3))):
        assert torch.equal(a, c) and torch.equal(b, d)
    # padding and user tokens are never targets: the targets of a row are exactly its masked-in tokens
    ids, mask = tiny_tokenizer.render_conversation(data[5], max_tokens=97)
    loader = SFTLoader(ListData([data[5]]), tiny_tokenizer, batch_size=1, max_seq_len=96, rank=0, world_size=1)
    inputs, targets = next(loader)
    assert [t for t in targets[0].tolist() if t != -1] == [t for t, m in zip(ids[1:], mask[1:]) if m]
    assert inputs[0, :len(ids) - 1].tolist() == ids[:-1]
    # a single pass ends
    assert len(list(SFTLoader(data, tiny_tokenizer, batch_size=4, max_seq_len=96, rank=0, world_size=1, single_pass=True))) == 10
    # a malformed conversation is an error that says which one, in both chat loaders
    broken = ListData([data[0], {"messages": [{"role": "assistant", "content": "I speak first"}]}])
    with pytest.raises(ValueError, match="conversation 1 of the training data is malformed: message 0 should be from the user"):
        next(SFTLoader(broken, tiny_tokenizer, batch_size=2, max_seq_len=96, rank=0, world_size=1))
    with pytest.raises(ValueError, match="conversation 1 of the training data is malformed"):
        next(ConversationLoader(broken, tiny_tokenizer, batch_size=1, seq_len=32, rank=0, world_size=1))


def tiny_model(vocab_size, seed=0, seq_len=128):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=2, n_head=1, n_kv_head=1, n_embd=128))
    model.init_weights()
    return model


def test_step_loss_is_the_mean_over_every_target_token_of_the_step(tiny_tokenizer):
    """Two micro-batches with very different numbers of targets == one batch holding both (the per-micro-batch mean would not be)."""
    vocab = tiny_tokenizer.get_vocab_size()
    generator = torch.Generator().manual_seed(0)
    short = (torch.randint(0, vocab, (2, 16), generator=generator), torch.randint(0, vocab, (2, 16), generator=generator))
    long = (torch.randint(0, vocab, (2, 16), generator=generator), torch.randint(0, vocab, (2, 16), generator=generator))
    short[1][:, 2:] = -1  # 4 targets against 32
    together = (torch.cat([short[0], long[0]]), torch.cat([short[1], long[1]]))

    def step_with(batches, accumulation):
        model = tiny_model(vocab)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        optimizer.param_groups[0]["initial_lr"] = 1.0
        loss, positions = train_step(model, [optimizer], iter(batches), accumulation, torch.autocast("cpu", enabled=False), 1.0)
        return loss.item(), positions, model.state_dict()

    loss_split, positions, weights_split = step_with([short, long], 2)
    loss_joint, _, weights_joint = step_with([together], 1)
    assert positions == 64
    assert loss_split == pytest.approx(loss_joint, rel=1e-5)
    for name in weights_joint:
        torch.testing.assert_close(weights_split[name], weights_joint[name], atol=1e-6, rtol=1e-5)
    # what a per-micro-batch mean would have given is measurably different (so this test can fail)
    model = tiny_model(vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    naive = (model(*short) + model(*long)) / 2
    assert abs(naive.item() - loss_joint) > 1e-3


def test_schedules_hold_then_decay_and_never_grow():
    mid = [get_lr_multiplier(step, 50, 0.0, 0.2, 0.0) for step in range(51)]
    assert mid[0] == 1.0 and mid[39] == 1.0 and mid[-1] == 0.0
    assert all(a >= b for a, b in zip(mid, mid[1:]))
    sft = [1.0 - step / 50 for step in range(51)]  # chat_sft's schedule
    assert all(a > b for a, b in zip(sft, sft[1:])) and sft[-1] == 0.0


@pytest.mark.slow
def test_tiny_model_learns_a_conversation_then_answers_it_through_the_engine(tiny_tokenizer):
    from nanochat.engine import Engine

    conversation = {"messages": [{"role": "user", "content": "Who made you?"},
                                 {"role": "assistant", "content": "The nanochat team trained me."}]}
    model = tiny_model(tiny_tokenizer.get_vocab_size())
    prompt = tiny_tokenizer.render_for_completion(conversation)
    engine = Engine(model, tiny_tokenizer)
    before, _ = engine.generate_batch(prompt, max_tokens=12, temperature=0.0)
    optimizers = model.setup_optimizers(unembedding_lr=0.02, embedding_lr=0.2, matrix_lr=0.02, compute_dtype=torch.float32)
    loader = SFTLoader(ListData([conversation]), tiny_tokenizer, batch_size=2, max_seq_len=64, rank=0, world_size=1)
    for step in range(40):
        loss = train_step(model, optimizers, loader, 1, torch.autocast("cpu", enabled=False), 1.0, 0.95)[0].item()
    assert loss < 0.05, loss
    model.eval()
    results, _ = engine.generate_batch(prompt, max_tokens=20, temperature=0.0)
    reply = results[0][len(prompt):]
    assert tiny_tokenizer.decode(reply) == "The nanochat team trained me."
    assert len(reply) < 20  # it stopped at <|assistant_end|> (generate_batch drops the end token)
    assert tiny_tokenizer.decode(before[0][len(prompt):]) != "The nanochat team trained me."


def test_identity_override_and_malformed_lines(base_dir):
    from tasks.customjson import IDENTITY_CONVERSATIONS, CustomJSON, identity_conversations_path

    assert identity_conversations_path() == IDENTITY_CONVERSATIONS  # nothing dropped in: the shipped set
    override = base_dir / "identity_conversations.jsonl"
    override.write_text(json.dumps([{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Robin."}]) + "\n")
    assert identity_conversations_path() == str(override)
    task = CustomJSON(identity_conversations_path())
    assert len(task) == 1 and task[0]["messages"][1]["content"] == "I am Robin."
    override.write_text(override.read_text() + '{"messages": "not a list"}\n')
    with pytest.raises(ValueError, match=r"identity_conversations.jsonl:2: expected a JSON list"):
        CustomJSON(identity_conversations_path())
    override.write_text('[{"role": "user", "content": "hi"}]\n{oops\n')
    with pytest.raises(ValueError, match=r"identity_conversations.jsonl:1: .*at least one user and one assistant"):
        CustomJSON(identity_conversations_path())


# ---------------------------------------------------------------------------- the scripts, end to end

@pytest.fixture(scope="module")
def chat_base_dir(tmp_path_factory, tiny_tokenizer):
    """A NANOCHAT_BASE_DIR with the tiny tokenizer and a random depth-2 base checkpoint (256-token context)."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import model_config_from_depth

    base_dir = tmp_path_factory.mktemp("chat")
    tiny_tokenizer.save(os.path.join(base_dir, "tokenizer"))
    torch.manual_seed(0)
    config = dataclasses.replace(model_config_from_depth(2, tiny_tokenizer.get_vocab_size(), 256), value_embeds=True)
    model = GPT(config)
    model.init_weights()
    save_checkpoint(os.path.join(base_dir, "base_checkpoints", "d2"), 10, model.state_dict(), None,
                    {"step": 10, "model_config": dataclasses.asdict(config)})
    return base_dir


def run_script(base_dir, module, args, torchrun=False, timeout=300):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATA="sample", OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [sys.executable]
    command = launcher + ["-m", module] + (["--"] if torchrun else []) + args
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def losses_of(log):
    return {int(step): float(loss) for step, loss in LOSS_LINE.findall(log)}


def assert_resume_is_bit_exact(base_dir, module, stage_dir, flags):
    from nanochat.checkpoint_manager import load_checkpoint

    log = run_script(base_dir, module, flags + ["--num-iterations", "6", "--save-every", "3"])
    losses = losses_of(log)
    assert sorted(losses) == list(range(1, 7))
    checkpoint_dir = os.path.join(base_dir, stage_dir, "d2")
    final, _, meta = load_checkpoint(checkpoint_dir, 6, "cpu")
    resumed_log = run_script(base_dir, module, flags + ["--num-iterations", "6", "--save-every", "3", "--resume-from-step", "3"])
    resumed = losses_of(resumed_log)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == losses[step], f"step {step}: {resumed[step]} after resume vs {losses[step]}"
    again, _, _ = load_checkpoint(checkpoint_dir, 6, "cpu")
    for name, tensor in final.items():
        assert torch.equal(again[name], tensor), name
    return log, meta


@pytest.mark.slow
def test_mid_then_sft_scripts_resume_bit_exact(chat_base_dir):
    mid_flags = ["--device-batch-size", "4", "--total-batch-size", "2048", "--eval-every", "3", "--eval-tokens", "2048",
                 "--stand-in-size", "300", "--compile", "0"]
    log, meta = assert_resume_is_bit_exact(chat_base_dir, "scripts.mid_train", "mid_checkpoints", mid_flags)
    assert "STAND-INS" in log and meta["source"] == {"stage": "base", "model_tag": "d2", "step": 10}
    assert "## Midtraining" in open(os.path.join(chat_base_dir, "report", "midtraining.md")).read()

    # eager (SFT's changing row lengths): bit for bit with or without --deterministic; with it here, so the flag
    # is exercised in a finetuning stage (the compiled case is test_base_train's)
    sft_flags = ["--device-batch-size", "2", "--examples-per-step", "8", "--eval-every", "3", "--eval-steps", "4",
                 "--eval-max-problems", "8", "--stand-in-size", "200", "--deterministic"]
    log, meta = assert_resume_is_bit_exact(chat_base_dir, "scripts.chat_sft", "chatsft_checkpoints", sft_flags)
    assert "deterministic: torch.use_deterministic_algorithms(True)" in log
    assert meta["source"]["stage"] == "mid" and "WordNet-MC (stand-in) accuracy" in log
    section = open(os.path.join(chat_base_dir, "report", "chat-sft.md")).read()
    assert "Replies ending their turn, SFT model" in section and "Padded fraction of the rows" in section
    # chat_eval and chat_cli on these checkpoints: tests/test_speedrun.py runs them after SFT and RL


@pytest.mark.slow
def test_sft_under_torchrun_matches_one_process_with_twice_the_accumulation(chat_base_dir):
    """Rows of very different lengths, 2 ranks x 1 micro-step == 1 process x 2: the loss is normalised over the whole step."""
    from nanochat.checkpoint_manager import load_checkpoint

    flags = ["--source", "base", "--dtype", "float32", "--examples-per-step", "4", "--eval-every", "-1", "--eval-steps", "1",
             "--eval-max-problems", "4", "--stand-in-size", "200", "--num-iterations", "3"]
    dist_losses = losses_of(run_script(chat_base_dir, "scripts.chat_sft", flags + ["--device-batch-size", "2", "--model-tag", "d2"],
                                       torchrun=True))
    dist_weights, _, _ = load_checkpoint(os.path.join(chat_base_dir, "chatsft_checkpoints", "d2"), 3, "cpu")
    single_losses = losses_of(run_script(chat_base_dir, "scripts.chat_sft", flags + ["--device-batch-size", "1"]))
    single_weights, _, _ = load_checkpoint(os.path.join(chat_base_dir, "chatsft_checkpoints", "d2"), 3, "cpu")
    assert sorted(dist_losses) == [1, 2, 3]
    for step in (1, 2, 3):
        assert dist_losses[step] == pytest.approx(single_losses[step], abs=1e-5)
    for name, tensor in single_weights.items():
        torch.testing.assert_close(dist_weights[name], tensor, atol=1e-4, rtol=1e-4)
