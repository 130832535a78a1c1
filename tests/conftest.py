import glob
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample_texts(max_chars=300_000):
    """Real English text for tests: the embedded sample corpus (falls back to the repo's own docs and code)."""
    sample = os.path.join(REPO_ROOT, "nanochat", "sample_data", "train.parquet")
    texts, total = [], 0
    if os.path.exists(sample):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(sample)
        for group in range(parquet.num_row_groups):
            for text in parquet.read_row_group(group, columns=["text"]).column("text").to_pylist():
                texts.append(text)
                total += len(text)
                if total >= max_chars:
                    return texts
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "**", "*.py"), recursive=True)):
        if total >= max_chars:
            break
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
        total += len(texts[-1])
    return texts


def random_gpt(tokenizer, sequence_len=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, seed=0):
    """A small random GPT whose special tokens can never win the argmax (so greedy runs are never cut short)."""
    import torch

    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=n_layer,
                       n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for name in tokenizer.get_special_tokens():
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0  # logit 0: sampled sometimes, never the argmax
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A real tokenizer (rustbpe-trained, tiktoken-run) with a 512-token vocabulary."""
    from nanochat.tokenizer import RustBPETokenizer

    return RustBPETokenizer.train_from_iterator(iter(sample_texts()), vocab_size=512)


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A fresh NANOCHAT_BASE_DIR for one test."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def write_tiny_checkpoints(tokenizer, base_dir, sources):
    """The tokenizer and one depth-1 model (step 5, tag d1) in base_dir, under each of `sources` (checkpoint folders)."""
    import dataclasses

    import torch

    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, model_config_from_depth

    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    torch.manual_seed(0)
    config = model_config_from_depth(1, tokenizer.get_vocab_size(), 256)
    model = GPT(config)
    model.init_weights()
    for source_dir in sources:
        save_checkpoint(os.path.join(base_dir, source_dir, "d1"), 5, model.state_dict(), None,
                        {"step": 5, "model_config": dataclasses.asdict(config)})
