"""
Chat with a model in the terminal.

    python -m scripts.chat_cli                        # interactive, latest SFT model
    python -m scripts.chat_cli -i rl -p "What is 12*7?"   # one question, then exit

Interactive mode keeps the conversation; type `clear` to start over, `quit` (or Ctrl-D) to leave.
Tokens are printed as they arrive (never half a UTF-8 character).
"""
import argparse
import sys

import torch

from nanochat.common import autodetect_device_type
from nanochat.engine import Engine, IncrementalDecoder, assistant_parts, prepare_for_inference, tool_call_display


def reply(engine, tokenizer, conversation, args):
    """Stream one assistant reply to stdout; returns it as message content (tool calls kept as parts)."""
    prompt = tokenizer.render_for_completion(conversation)
    decoder = IncrementalDecoder(tokenizer, special_text=tool_call_display(tokenizer))
    tokens = []
    for token_column, _ in engine.generate(prompt, num_samples=1, max_tokens=args.max_tokens,
                                           temperature=args.temperature, top_k=args.top_k, seed=args.seed):
        token = token_column[0]
        if engine.is_reply_end(token):
            break
        tokens.append(token)
        print(decoder.feed(token), end="", flush=True)
    print(decoder.flush(), flush=True)
    return assistant_parts(tokenizer, tokens)


def main():
    parser = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal")
    parser.add_argument("-i", "--source", type=str, default=None, choices=["base", "mid", "sft", "rl"],
                        help="which stage's model (default: the most advanced that exists: rl, sft, mid, base)")
    parser.add_argument("--model-tag", type=str, default=None, help="model tag such as d20 (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("-p", "--prompt", type=str, default=None, help="ask this one question, print the reply, exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--max-tokens", type=int, default=512, help="maximum tokens per reply")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed")
    parser.add_argument("--device-type", type=str, default=None, help="cuda | mps | cpu (default: autodetect)")
    args = parser.parse_args()
    if args.temperature < 0:
        parser.error("--temperature must be 0 or more")
    if args.top_k < 0:
        parser.error("--top-k must be 0 (off) or more")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")

    from nanochat.checkpoint_manager import load_model, most_advanced_source
    device = torch.device(args.device_type or autodetect_device_type())
    try:
        if args.source is None:
            args.source = most_advanced_source()
            print(f"using the {args.source} model (the most advanced stage found; -i picks another)", file=sys.stderr)
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"cannot load the {args.source} model: {e}" if args.source else f"cannot load a model: {e}")
    model, decode_path = prepare_for_inference(model)
    engine = Engine(model, tokenizer, **decode_path)

    if args.prompt is not None:
        reply(engine, tokenizer, [{"role": "user", "content": args.prompt}], args)
        return

    print("nanochat: type a message; `clear` starts a new conversation, `quit` exits.")
    conversation = []
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if text.lower() in ("quit", "exit"):
            break
        if text.lower() == "clear":
            conversation = []
            print("(conversation cleared)")
            continue
        if not text:
            continue
        conversation.append({"role": "user", "content": text})
        print("\nAssistant: ", end="", flush=True)
        try:
            answer = reply(engine, tokenizer, conversation, args)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            print("\n(interrupted)")
            conversation.pop()
            continue
        conversation.append({"role": "assistant", "content": answer})
        args.seed += 1  # a fresh sample each turn, still reproducible from the starting seed


if __name__ == "__main__":
    main()
