"""
A nanochat model as a Hugging Face transformers model, so it loads, chats and is evaluated with the tools
everyone uses (AutoModelForCausalLM, pipeline, lm-evaluation-harness) and can be shared on the hub.
scripts/export_hf.py is the command; this module is what it writes.

The model. transformers ships a `nanochat` architecture that computes what nanochat/gpt.py computes, line for
line (read against transformers/models/nanochat/modeling_nanochat.py):

    ours (gpt.py)                                   transformers (NanoChat*)
    norm(): F.rms_norm, no gain, eps = float32 eps  NanoChatRMSNorm: no gain, eps = rms_norm_eps (we write float32's)
    x = norm(wte(idx)): the embedding is normed     NanoChatModel: self.norm(inputs_embeds) before the layers
    rotary: rotate-half layout, base 10000          rotate_half with NanoChat's flipped signs: the same rotation
    QK-norm after rotary                            "RoPE -> Norm", q_norm/k_norm without gain
    ReLU^2 MLP, 4x wide, no biases                  hidden_act "relu2", fc1/fc2, intermediate_size = 4 * hidden
    untied head, softcap 15 * tanh(x / 15)          tie_word_embeddings False, final_logit_softcapping 15
    GQA (n_kv_head)                                 num_key_value_heads

so a model trained without the two speedrun additions (value embeddings, x0 mixing) is exported as that
architecture and needs no code of ours. A model with them (the default: base_train --value-embeds 1) cannot be
expressed in it (no config flag adds either: a value embedding is a token lookup added inside attention, x0
mixing a learned gain per layer), so it is exported as model type `nanochat_plus`, with
nanochat/modeling_nanochat_plus.py shipped beside the weights and loaded with trust_remote_code=True.

The tokenizer. tiktoken's BPE (merge the adjacent pair whose merged token has the lowest rank, until none is in
the vocabulary) is rebuilt in the `tokenizers` library: the same split regex, byte-level tokens spelled with
GPT-2's byte-to-character table, and for each token every split into two tokens of the vocabulary as a merge,
ranked by the merged token's rank. HF's BPE applies the lowest-ranked merge first, so it picks the same pair
tiktoken does at every step and gives the same ids. The chat template renders a conversation as
RustBPETokenizer.render_conversation / render_for_completion do (docs/chat_format.md).
"""
import os
import re
import shutil
import tempfile

import torch

from nanochat.gpt import LOGIT_SOFTCAP, has_value_embed
from nanochat.report import read_section
from nanochat.tokenizer import SPECIAL_TOKENS

# gpt.py's _precompute_rotary_embeddings base: pair i turns at base^(-2i/D) radians per position
ROTARY_BASE = 10000.0
# F.rms_norm without an eps uses its dtype's machine epsilon; weights and activations are float32 here
RMS_NORM_EPS = torch.finfo(torch.float32).eps
# the remote-code file, shipped under its own name; config.json's auto_map points at its classes
REMOTE_CODE_FILE = "modeling_nanochat_plus.py"
AUTO_MAP = {"AutoConfig": "modeling_nanochat_plus.NanoChatPlusConfig",
            "AutoModelForCausalLM": "modeling_nanochat_plus.NanoChatPlusForCausalLM"}
# the exported folder: what --force may replace (a folder holding config.json is taken for an earlier export)
EXPORT_MARKER = "config.json"

# our parameter names -> transformers' NanoChat names
WEIGHT_NAMES = [
    (r"transformer\.wte\.weight", r"model.embed_tokens.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.weight", r"model.layers.\1.mlp.fc1.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.weight", r"model.layers.\1.mlp.fc2.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
    # nanochat_plus only: each value embedding lives in the attention that uses it
    (r"value_embeds\.(\d+)\.weight", r"model.layers.\1.self_attn.value_embed.weight"),
]

# nanochat's chat format (docs/chat_format.md) in Jinja, token for token as RustBPETokenizer renders it: a system
# message folded into the first user message, roles alternating user first, assistant content a string or a list
# of parts ({"type": "text" | "python" | "python_output", "text": ...}). With add_generation_prompt a trailing
# assistant message is dropped and <|assistant_start|> appended (render_for_completion); without, the whole
# conversation (render_conversation, untruncated).
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' -%}"
    "{%- if messages|length < 2 or messages[1].role != 'user' -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}{%- endif -%}"
    "{%- set messages = [{'role': 'user', 'content': messages[0].content + '\\n\\n' + messages[1].content}] + messages[2:] -%}"
    "{%- endif -%}"
    "{%- if add_generation_prompt and messages[-1].role == 'assistant' -%}{%- set messages = messages[:-1] -%}{%- endif -%}"
    "<|bos|>"
    "{%- for message in messages -%}"
    "{%- if message.role != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{- raise_exception('roles must alternate user, assistant, user, ... (a system message only first)') -}}{%- endif -%}"
    "{%- if message.role == 'user' -%}"
    "<|user_start|>{{- message.content -}}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for part in message.content -%}"
    "{%- if part.type == 'python' -%}<|python_start|>{{- part.text -}}<|python_end|>"
    "{%- elif part.type == 'python_output' -%}<|output_start|>{{- part.text -}}<|output_end|>"
    "{%- else -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def is_native(config):
    """True when transformers' own nanochat architecture computes this model (no value embeddings, no x0 mixing)."""
    return not (config.value_embeds or config.x0_mixing)


# -----------------------------------------------------------------------------
# the weights and the config


def hf_state_dict(model, dtype=torch.float32):
    """Our state dict under transformers' names; x0 mixing's per-model gain vectors become one scalar per layer."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name in ("resid_lambdas", "x0_lambdas"):
            for layer, value in enumerate(tensor):
                tensors[f"model.layers.{layer}.{name[:-1]}"] = value.clone()  # resid_lambdas -> resid_lambda
            continue
        for pattern, replacement in WEIGHT_NAMES:
            if re.fullmatch(pattern, name):
                tensors[re.sub(pattern, replacement, name)] = tensor
                break
        else:
            raise ValueError(f"no transformers name for parameter {name}: hf_export.WEIGHT_NAMES needs updating")
    # safetensors wants each tensor contiguous and in memory of its own
    return {name: tensor.detach().to(dtype).contiguous() for name, tensor in tensors.items()}


def hf_config(config, tokenizer, dtype=torch.float32):
    """The transformers config of a GPTConfig: NanoChatConfig, or NanoChatPlusConfig (with its auto_map) when needed."""
    assistant_end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=4 * config.n_embd,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.sequence_len, hidden_act="relu2", rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROTARY_BASE}, final_logit_softcapping=LOGIT_SOFTCAP,
        attention_bias=False, tie_word_embeddings=False, bos_token_id=bos,
        # pad = eos, the convention transformers' generate understands: with a pad id of its own that also occurs in
        # prompts (<|bos|> does), generate would mask those tokens out when it is given no attention mask
        eos_token_id=assistant_end, pad_token_id=assistant_end, dtype=str(dtype).removeprefix("torch."),
    )
    if is_native(config):
        from transformers import NanoChatConfig
        return NanoChatConfig(architectures=["NanoChatForCausalLM"], **fields)
    from nanochat.modeling_nanochat_plus import NanoChatPlusConfig
    value_embed_layers = [i for i in range(config.n_layer) if config.value_embeds and has_value_embed(i, config.n_layer)]
    hf = NanoChatPlusConfig(architectures=["NanoChatPlusForCausalLM"], value_embed_layers=value_embed_layers,
                            x0_mixing=config.x0_mixing, **fields)
    hf.auto_map = AUTO_MAP
    return hf


def generation_config(tokenizer):
    """Stop where our Engine stops (<|assistant_end|> or <|bos|>); sample as chat_cli does by default."""
    from transformers import GenerationConfig
    assistant_end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()
    return GenerationConfig(bos_token_id=bos, eos_token_id=[assistant_end, bos], pad_token_id=assistant_end,
                            do_sample=True, temperature=0.6, top_k=50)


# -----------------------------------------------------------------------------
# the tokenizer


def bytes_to_unicode():
    """
    GPT-2's table from the 256 byte values to printable characters: byte-level BPE vocabularies are stored as
    text (tokenizer.json), and a token may be any bytes, a lone newline or half a UTF-8 character. Printable
    ASCII and Latin-1 stand for themselves, the other bytes get the characters from 256 up.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def build_hf_tokenizer(tokenizer):
    """A `tokenizers` Tokenizer giving the same ids as ours, special tokens included (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    byte_to_char = bytes_to_unicode()

    def spell(token_bytes):
        return "".join(byte_to_char[b] for b in token_bytes)

    ranks = tokenizer.enc._mergeable_ranks  # tiktoken's {token bytes: rank}; save() reads it the same way
    vocab = {spell(token): rank for token, rank in ranks.items()}
    # every way to build a token from two tokens, ranked by the token built; two splits of one token never compete
    # for the same bytes, so the second key only makes the order deterministic
    merges = sorted((rank, ranks[token[:i]], spell(token[:i]), spell(token[i:]))
                    for token, rank in ranks.items() for i in range(1, len(token))
                    if token[:i] in ranks and token[i:] in ranks)
    # ignore_merges: a chunk that is itself a token is that token, as in tiktoken (and faster)
    hf = Tokenizer(models.BPE(vocab, [(left, right) for _, _, left, right in merges], ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.enc._pat_str), behavior="isolated"),  # our chunks; merges stay inside one
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> the table's characters
    ])
    hf.decoder = decoders.ByteLevel()
    # added in order after the BPE tokens: they get the same ids as ours (checked below)
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    # plain text starts with <|bos|>, as every pretraining document did; the chat template writes its own
    bos = tokenizer.get_bos_token_id()
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[("<|bos|>", bos)])
    for name in SPECIAL_TOKENS:
        assert hf.token_to_id(name) == tokenizer.encode_special(name), f"{name} would get another id"
    return hf


def save_tokenizer(tokenizer, out_dir, max_length):
    """tokenizer.json (the fast tokenizer) and tokenizer_config.json (special tokens, the chat template)."""
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=build_hf_tokenizer(tokenizer), bos_token="<|bos|>",
                                 eos_token="<|assistant_end|>", pad_token="<|assistant_end|>",
                                 model_max_length=max_length, chat_template=CHAT_TEMPLATE)
    # save_jinja_files=False: the template inside tokenizer_config.json, where every version of every tool looks
    hf.save_pretrained(out_dir, save_jinja_files=False)


# -----------------------------------------------------------------------------
# the model card, from the run's report


def as_number(text):
    try:
        return int(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def training_rows(report_dir, source):
    """[(stage, steps, tokens)] of the stages that led to `source`, from the report ('-' where it has no figure)."""
    stages = [("base", "Base model training"), ("mid", "Midtraining"), ("sft", "Chat SFT"), ("rl", "Chat RL")]
    rows = []
    for stage, section in stages[: [s for s, _ in stages].index(source) + 1]:
        values = read_section(report_dir, section)
        if not values:
            continue
        steps = as_number(values.get("Calculated number of iterations") or values.get("Number of iterations"))
        tokens = as_number(values.get("Number of training tokens"))
        if tokens is None and steps is not None and as_number(values.get("Tokens per step")):
            tokens = steps * as_number(values["Tokens per step"])  # midtraining packs full rows: steps x tokens per step
        rows.append((stage, "-" if steps is None else f"{steps:,}", "-" if tokens is None else f"{tokens:,}"))
    return rows


def uses_stand_ins(report_dir):
    """Whether the run trained or evaluated on the offline stand-ins (NANOCHAT_DATA=sample), as its report says."""
    if not os.path.isdir(report_dir):
        return False
    for name in os.listdir(report_dir):
        if name.endswith(".md"):
            with open(os.path.join(report_dir, name), encoding="utf-8") as f:
                if "STAND-INS" in f.read():
                    return True
    return False


DATA_LICENSES_SAMPLE = (
    "Trained offline on nanochat's embedded sample corpus, built from Wikipedia lead summaries (CC BY-SA), the King "
    "James Bible (public domain), the Jargon File (public domain) and WordNet glosses (WordNet license), and on the "
    "offline chat stand-ins, which use the ChatterBot corpus (BSD-3-Clause) and text derived from the sample corpus "
    "(nanochat's `nanochat/sample_data/NOTICE` and `tasks/NOTICE` have the details).")
DATA_LICENSES_HUB = (
    "Pretrained on FineWeb-Edu (HuggingFaceFW/fineweb-edu); midtrained and finetuned on SmolTalk, MMLU, GSM8K, ARC and "
    "nanochat's identity and spelling conversations. Each data set's license is on its hub page.")


def model_card(title, source, meta, config, num_params, report_dir):
    """README.md of the export: what the model is, how to load and chat with it, what its run reported."""
    native = is_native(config)
    trust = "" if native else ", trust_remote_code=True"
    kind = {"base": "base (pretrained) model", "mid": "midtrained chat model", "sft": "chat model (SFT)",
            "rl": "chat model (SFT + RL on GSM8K)"}[source]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- nanochat", "---", "",
             f"# {title}", "",
             f"A {kind} trained from scratch with [nanochat](https://github.com/karpathy/nanochat), exported from the "
             f"`{source}` checkpoint `{meta.get('model_tag')}` step {meta.get('step')}.", "",
             "| depth | parameters | width | heads (query / key-value) | vocabulary | context |", "|---|---|---|---|---|---|",
             f"| {config.n_layer} | {num_params:,} | {config.n_embd} | {config.n_head} / {config.n_kv_head} | "
             f"{config.vocab_size:,} | {config.sequence_len:,} |", "", "## Architecture", ""]
    if native:
        lines.append("transformers' built-in `nanochat` architecture (rotary, QK-norm, ReLU², untied head, logit softcap 15, "
                     "GQA): it loads with transformers >= 5 and runs no code from this repository.")
    else:
        extras = " and ".join(name for name, on in (("value embeddings", config.value_embeds), ("x0 mixing", config.x0_mixing)) if on)
        lines.append(f"transformers' `nanochat` architecture plus {extras}, which it lacks. The model type is "
                     f"`nanochat_plus`, implemented by `{REMOTE_CODE_FILE}` in this repository (it subclasses transformers' "
                     f"own NanoChat classes), so loading needs `trust_remote_code=True`: read that file first.")
    lines += ["", "## Use", "", "```python", "from transformers import pipeline", "",
              f'chat = pipeline("text-generation", model="{title}"{trust})',
              'reply = chat([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=128)',
              'print(reply[0]["generated_text"][-1]["content"])', "```", "",
              "The chat template renders nanochat's format (`<|bos|><|user_start|>...<|user_end|><|assistant_start|>`; a "
              "system message becomes the top of the first user message); a reply ends with `<|assistant_end|>`. "
              "Two differences from nanochat's own engine: transformers does not run the Python tool, so a reply that "
              "writes `<|python_start|>...<|python_end|>` goes on without the tool's output; and a chat template is "
              "rendered to text before it is tokenized, so a message that contains the text of a special token "
              "(`<|assistant_end|>`) gets that token, where nanochat encodes it as plain text.", "",
              "## Training", ""]
    rows = training_rows(report_dir, source)
    if rows:
        lines += ["| stage | steps | tokens |", "|---|---|---|"] + [f"| {s} | {steps} | {tokens} |" for s, steps, tokens in rows]
    else:
        lines.append("The run's report was not found, so its training figures are not included.")
    lines += ["", "## Evaluation", ""]
    if os.path.isdir(report_dir):
        from nanochat.report import Report
        lines += ["From the training run's report (nanochat's own evaluations):", "",
                  Report(os.path.dirname(report_dir)).summary_table().removeprefix("## Summary\n\n").strip()]
    else:
        lines.append("The run's report was not found.")
    lines += ["", "To measure it with lm-evaluation-harness, see nanochat's README, \"Sharing and evaluating your model\".",
              "", "## Data licenses", "", DATA_LICENSES_SAMPLE if uses_stand_ins(report_dir) else DATA_LICENSES_HUB, ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# writing it all


def write_export(model, tokenizer, meta, out_dir, title, report_dir, dtype=torch.float32):
    """Everything transformers needs into out_dir (an empty folder): weights, configs, tokenizer, card, remote code."""
    from safetensors.torch import save_file
    config = model.config
    # metadata format "pt": transformers reads a file without it, with a warning
    save_file(hf_state_dict(model, dtype), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    hf_config(config, tokenizer, dtype).save_pretrained(out_dir)
    generation_config(tokenizer).save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir, max_length=config.sequence_len)
    if not is_native(config):
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), REMOTE_CODE_FILE),
                        os.path.join(out_dir, REMOTE_CODE_FILE))
    card = model_card(title, meta["source"], meta, config, model.num_params(), report_dir)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)


def check_out_dir(out_dir, force):
    """None if out_dir may be written, else why not (a non-empty folder needs --force, and must be an earlier export)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        return f"{out_dir} exists and is not a folder"
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return None
    if not force:
        return f"{out_dir} exists and is not empty: pass --force to replace it, or choose another --out"
    # --force deletes the folder: only one that looks like an earlier export, never a home directory given by mistake
    if not os.path.exists(os.path.join(out_dir, EXPORT_MARKER)):
        return f"--force replaces only an earlier export (a folder with {EXPORT_MARKER}); {out_dir} is not one"
    return None


def share(folder):
    """The permissions any new file gets (the umask's): mkdtemp's folder and safetensors' file are private to their owner."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def write_atomically(out_dir, write):
    """
    write(tmp_dir) into a fresh folder beside out_dir, then rename it into place: an export interrupted at any
    point leaves out_dir as it was (an interrupted one leaves only a hidden .<name>.tmp-* folder beside it).
    An existing out_dir (empty, or an earlier export: check_out_dir) is replaced.
    """
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    # in the same parent: a rename is atomic only within one filesystem
    tmp_dir = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        write(tmp_dir)
        share(tmp_dir)
        if os.path.isdir(out_dir):
            # moved aside first, deleted once the new one is in place: at no moment is out_dir half written
            old_dir = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(out_dir, os.path.join(old_dir, name))
            os.replace(tmp_dir, out_dir)
            shutil.rmtree(old_dir)
        else:
            os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
