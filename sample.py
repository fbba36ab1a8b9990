"""Generate text from a trained checkpoint or a Hugging Face GPT-2.

    python sample.py --out_dir=out/shakespeare_char --prompt="ROMEO:"
    python sample.py --out_dir=out/shakespeare_char --ckpt=best.pt --temperature=0   # greedy
    python sample.py --init_from=gpt2 --prompt="The meaning of life is" --top_p=0.9  # needs the network
    python sample.py --init_from=gpt2 --prompt="..." --penalty_alpha=0.6 --top_k=4   # contrastive search
    python sample.py --init_from=gpt2 --prompt="..." --num_beams=4                    # beam search
    python sample.py --out_dir=out/shakespeare_char --compile --device=cuda          # compiled decoding step

Text appears as it is generated when the output is a terminal (--stream /
--no-stream to choose). Generation of a sample ends at max_new_tokens, at the
end-of-text token, or at any --stop string.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from gpt.checkpoint import add_model_options, load_language_model
from gpt.errors import ArgumentParser, UserError, exit_on_user_error
from gpt.sampling import SamplingConfig, generate, stream
from gpt.system import autocast, pick_device, pick_dtype
from gpt.tokenizer import EOT_TEXT, Tokenizer

SEPARATOR = "\n" + "-" * 40
LONG = 2000  # tokens per sample above which a non-streamed run says that it will be silent


def text_so_far(tok: Tokenizer, tokens: list[int], stops: list[str]) -> tuple[str, bool]:
    """The decoded sample and whether it is complete (end-of-text or a stop string reached)."""
    done = tok.eot_token in tokens
    text = tok.decode(tokens[: tokens.index(tok.eot_token)] if done else tokens)
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if cuts:
        return text[: min(cuts)], True
    return text, done


def printable(text: str, stops: list[str]) -> int:
    """How much of a growing sample can be shown for sure: not a trailing half character
    (U+FFFD until its other bytes arrive), nor an end that may become a stop string."""
    end = len(text) - 1 if text.endswith("\ufffd") else len(text)
    held = [k for s in stops for k in range(1, len(s)) if text[:end].endswith(s[:k])]
    return end - max(held, default=0)


def prompt_text_of(args) -> str:
    """--prompt, or the text of --prompt_file."""
    if not args.prompt_file:
        return args.prompt
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--prompt_file {args.prompt_file} is not UTF-8 text: save it as UTF-8") from None


def prompt_ids(text: str, tok: Tokenizer) -> list[int]:
    if not text:
        print(f"note: empty prompt: starting from {EOT_TEXT}", file=sys.stderr)
        return [tok.eot_token]
    return tok.encode(text)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_model_options(p, ckpt_default="ckpt.pt", out_dir_default="out")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--prompt_file", default=None, help="read the prompt from this file")
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=500)
    for f in dataclasses.fields(SamplingConfig):  # --temperature, --top_k, ...: declared once, there
        p.add_argument(f"--{f.name}", type=f.metadata["type"], default=f.default,
                       help=f.metadata["help"] + " (default: %(default)s)")
    p.set_defaults(temperature=0.8)  # livelier than the library's 1.0 default for reading samples
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--stop", action="append", default=[], help="end a sample at this text (repeatable)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print text as it is generated (default: when the output is a terminal)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decoding step (torch.compile; CUDA graphs on GPUs): faster steps after a "
                        "compile of some seconds (default: on for CUDA, off on CPU, where it does not help)")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if any(not stop for stop in args.stop):
        raise UserError("--stop is empty: it would end every sample before it starts; give the text to stop at")
    text = prompt_text_of(args)
    sampling = SamplingConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)})
    live = sys.stdout.isatty() if args.stream is None else args.stream
    if not sampling.sample and args.num_samples > 1:
        print("note: greedy, contrastive and beam search give the same text every time: one sample", file=sys.stderr)
        args.num_samples = 1
    if sampling.num_beams > 1 and live:
        if args.stream:
            print("note: beam search chooses its text at the end: it is printed then", file=sys.stderr)
        live = False

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, tok, _, _ = load_language_model(args, device)
    idx = torch.tensor([prompt_ids(text, tok)], device=device)
    prompt_text = "" if idx[0, 0] == tok.eot_token and idx.size(1) == 1 else tok.decode(idx[0].tolist())
    generator = torch.Generator(device=device).manual_seed(args.seed)
    settings = dict(eos_token_id=tok.eot_token, generator=generator, compile=args.compile)

    with autocast(device, dtype):
        if live:  # one sample after another, each printed as it grows
            for i in range(args.num_samples):
                print(prompt_text, end="", flush=True)
                tokens, shown = [], ""
                for step in stream(model, idx, args.max_new_tokens, sampling, **settings):
                    tokens.append(int(step[0]))
                    text, done = text_so_far(tok, tokens, args.stop)
                    text = text if done else text[: printable(text, args.stop)]
                    print(text[len(shown):], end="", flush=True)
                    shown = text
                    if done:
                        break
                print(SEPARATOR if i < args.num_samples - 1 else "", flush=True)
        else:  # all samples in one batch: one prefill, rows repeated
            if sampling.num_beams > 1:  # the best beam, known at the end
                rows = [generate(model, idx, args.max_new_tokens, sampling, **settings)[0, idx.size(1):].tolist()]
            else:
                rows = [[] for _ in range(args.num_samples)]
                steps = stream(model, idx, args.max_new_tokens, sampling, num_samples=args.num_samples, **settings)
                for i, step in enumerate(tqdm(steps, total=args.max_new_tokens, unit="tok", leave=False, disable=None,
                                              file=sys.stderr)):
                    if i == 0 and args.max_new_tokens > LONG and not sys.stderr.isatty():  # once it has started
                        print(f"note: generating up to {args.max_new_tokens:,} tokens per sample without --stream: "
                              f"nothing is printed until the end (--stream shows the text as it comes)", file=sys.stderr)
                    for row, token in zip(rows, step.tolist()):
                        row.append(token)
                    if all(text_so_far(tok, row, args.stop)[1] for row in rows):
                        break
            texts = [prompt_text + text_so_far(tok, row, args.stop)[0] for row in rows]
            print((SEPARATOR + "\n").join(texts))


if __name__ == "__main__":
    main()
