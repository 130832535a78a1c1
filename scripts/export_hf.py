"""
Export a checkpoint as a Hugging Face transformers model: share it on the hub, chat with it in any transformers
code, measure it with lm-evaluation-harness.

    python -m scripts.export_hf -i sft --out nanochat-d20-sft
    python -m scripts.export_hf -i base --model-tag d20 --step 21400 --out d20-base --dtype bfloat16
    python -m scripts.export_hf -i sft --out nanochat-d20-sft --push-to-hub you/nanochat-d20   # after `hf auth login`

DIR gets model.safetensors, config.json, generation_config.json, tokenizer.json + tokenizer_config.json (a fast
tokenizer with our ids and the chat template) and README.md (a model card filled from the run's report). A model
with value embeddings or x0 mixing (base_train's defaults include value embeddings) also gets
modeling_nanochat_plus.py and needs trust_remote_code=True; one without loads as transformers' built-in nanochat
(nanochat/hf_export.py says why). Then:

    from transformers import pipeline
    chat = pipeline("text-generation", model="nanochat-d20-sft", trust_remote_code=True)
    chat([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=64)

Needs the `export` extra: uv sync --inexact --extra export.
"""
import argparse
import os
import time

import torch

from nanochat import hf_export
from nanochat.common import get_base_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOGIN_HINT = ("run `hf auth login` (`huggingface-cli login` with huggingface_hub before 1.0), "
              "or set HF_TOKEN to a token with write access")


def hub_user():
    """The logged-in hub user's name; SystemExit saying how to log in when there is no (valid) token."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError
    if get_token() is None:
        raise SystemExit(f"--push-to-hub needs a Hugging Face login: {LOGIN_HINT}")
    try:
        return HfApi().whoami()["name"]
    except (HfHubHTTPError, OSError) as error:  # a revoked token (401), or the hub unreachable
        raise SystemExit(f"--push-to-hub: the hub did not accept the login ({error}); {LOGIN_HINT}") from None


def push_to_hub(out_dir, repo_id, private):
    """Create the model repo (if new) and upload the exported folder as one commit; -> the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=out_dir, repo_id=repo.repo_id, repo_type="model",
                                   commit_message=f"Upload {os.path.basename(out_dir)} (nanochat scripts.export_hf)")
    except (HfHubHTTPError, OSError) as error:
        raise SystemExit(f"--push-to-hub {repo_id} failed: {error}\nThe export itself is complete in {out_dir}; "
                         f"upload it later with `hf upload {repo_id} {out_dir}`") from None
    return commit.commit_url


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a nanochat checkpoint as a Hugging Face transformers model")
    parser.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint to export")
    parser.add_argument("--model-tag", default=None, help="checkpoint tag, e.g. d20 (default: the largest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty; see --force)")
    parser.add_argument("--force", action="store_true", help="replace --out if it holds an earlier export")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype in the export (bfloat16 halves the size)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="then upload the folder to this hub model repo (user/name)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = parser.parse_args(argv)

    try:
        import safetensors, tokenizers, transformers  # noqa: F401 (the export extra; checked before minutes of loading)
    except ImportError as error:
        parser.error(f"the export needs the `export` extra ({error}): uv sync --inexact --extra export")
    problem = hf_export.check_out_dir(args.out, args.force)
    if problem:
        parser.error(problem)
    if args.push_to_hub:
        print(f"hub login: {hub_user()}")  # before the export: no point writing it to find the upload cannot happen

    from nanochat.checkpoint_manager import load_model
    started = time.time()
    try:
        model, tokenizer, meta = load_model(args.source, "cpu", phase="eval", model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as error:  # no checkpoint of that stage, tag or step; a damaged file
        raise SystemExit(f"cannot export the {args.source} model: {error}") from None
    native = hf_export.is_native(model.config)
    title = args.push_to_hub or os.path.basename(os.path.abspath(args.out))
    report_dir = os.path.join(get_base_dir(), "report")
    try:
        hf_export.write_atomically(args.out, lambda tmp_dir: hf_export.write_export(
            model, tokenizer, meta, tmp_dir, title, report_dir, DTYPES[args.dtype]))
    except OSError as error:  # a full disk, a folder we may not write: nothing half-written is left
        raise SystemExit(f"the export failed, {args.out} is as it was: {error}") from None
    print(f"exported {args.source} {meta['model_tag']} step {meta['step']} to {args.out} in {time.time() - started:.1f} s: "
          + ("transformers' native nanochat architecture" if native else
             "nanochat_plus (value embeddings / x0 mixing): load with trust_remote_code=True"))
    if args.push_to_hub:
        print(f"uploaded: {push_to_hub(args.out, args.push_to_hub, args.private)}")


if __name__ == "__main__":
    main()
