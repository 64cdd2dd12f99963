"""`npt-ds generate`: greedy or sampled decoding with the NPT model, streamed to the terminal.

NPT layers run their attention through the model's KV cache (``NPTDecoderLayer.forward`` passes the cache
to ``self_attn``), so cached decoding gives the tokens of full recomputation (tests/tools/test_generate.py).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .session import add_np_arguments, encode, load_npt


@dataclass
class DecodeOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    chat: bool = True  # use the tokenizer's chat template when it has one
    use_cache: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p: must be in (0, 1], got {self.top_p}")


class _Streamer:
    """Prints the decoded continuation as tokens arrive (transformers' streamer protocol: put / end)."""

    def __init__(self, tokenizer, prompt_len: int, out=None):
        self.tokenizer, self.out = tokenizer, out if out is not None else sys.stdout
        self.skip, self.ids, self.shown = prompt_len, [], ""

    def put(self, value: torch.Tensor) -> None:
        new = value.reshape(-1).tolist()
        if self.skip:  # the first call carries the prompt
            self.skip = max(0, self.skip - len(new))
            return
        self.ids += new
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[len(self.shown):] + "\n")
        self.out.flush()


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer, input_ids: torch.Tensor, opts: DecodeOptions,
                 stream: bool = False) -> torch.Tensor:
    """-> the new token ids (1, n) after `input_ids`; sampled decoding is seeded by opts.seed."""
    torch.manual_seed(opts.seed)
    sample = opts.temperature > 0
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    kwargs = dict(do_sample=sample, max_new_tokens=opts.max_new_tokens, use_cache=opts.use_cache,
                  eos_token_id=eos, pad_token_id=pad if pad is not None else eos)
    if sample:
        kwargs.update(temperature=opts.temperature, top_p=opts.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    streamer = _Streamer(tokenizer, input_ids.shape[1]) if stream else None
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                         **kwargs)
    return out[:, input_ids.shape[1]:]


def generate_text(model: nn.Module, tokenizer, prompt: str, opts: DecodeOptions, stream: bool = False) -> str:
    ids = encode(tokenizer, prompt, chat=opts.chat)
    return tokenizer.decode(generate_ids(model, tokenizer, ids, opts, stream)[0].tolist(), skip_special_tokens=True)


def interactive(model: nn.Module, tokenizer, opts: DecodeOptions, read=input) -> None:
    """A prompt loop: each line is answered on its own (streamed); an empty line is skipped, EOF or 'exit' ends."""
    while True:
        try:
            line = read("> ")
        except EOFError:
            print()
            return
        if line.strip() in ("exit", "quit"):
            return
        if line.strip():
            generate_text(model, tokenizer, line, opts, stream=True)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_np_arguments(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt")
    what.add_argument("--interactive", action="store_true", help="a prompt loop (EOF or 'exit' ends)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat", action="store_true",
                        help="do not wrap the prompt in the tokenizer's chat template")


def run_generate(args) -> int:
    opts = DecodeOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, chat=not args.no_chat)
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt: the prompt is empty; give some text (or --interactive)")
    model, tokenizer, _ = load_npt(args.np, args.model)
    if args.interactive:
        interactive(model, tokenizer, opts)
    else:
        generate_text(model, tokenizer, args.prompt, opts, stream=True)
    return 0
