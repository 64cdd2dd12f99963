"""Generation with NPT layers: the KV cache gives the tokens of full recomputation; seeded sampling; the CLI."""
from __future__ import annotations

import torch

from npt_ds.cli import main
from npt_ds.model import ByteTokenizer
from npt_ds.tools.generate import DecodeOptions, generate_ids

from support.npt import strong_npt


def test_cached_and_uncached_generation_give_the_same_tokens():
    model = strong_npt().float()
    tok = ByteTokenizer()
    ids = torch.tensor([list(b"To be, or not")])
    cached = generate_ids(model, tok, ids, DecodeOptions(max_new_tokens=24, use_cache=True))
    full = generate_ids(model, tok, ids, DecodeOptions(max_new_tokens=24, use_cache=False))
    assert cached.shape == (1, 24)
    assert cached.tolist() == full.tolist()
    # and the cached decode step's logits are the full forward's
    seq = torch.cat([ids, cached], 1)
    with torch.no_grad():
        prefill = model(input_ids=seq[:, :-1], use_cache=True)
        step = model(input_ids=seq[:, -1:], past_key_values=prefill.past_key_values, use_cache=True).logits[0, -1]
        whole = model(input_ids=seq, use_cache=False).logits[0, -1]
    torch.testing.assert_close(step, whole, rtol=0, atol=1e-5)


def test_sampling_is_seeded():
    model = strong_npt().float()
    tok = ByteTokenizer()
    ids = torch.tensor([list(b"Hello")])

    def sample(seed):
        return generate_ids(model, tok, ids, DecodeOptions(max_new_tokens=16, temperature=1.0, top_p=0.9,
                                                           seed=seed)).tolist()

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_generate_cli_prints_text_and_rejects_bad_options(tmp_path, capsys):
    np_dir = str(tmp_path / "np")
    assert main(["convert", "--model", "tiny", "--layers", "1,2", "--rank", "4", "--out", np_dir]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", "tiny", "--np", np_dir, "--prompt", "To be, or not",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", "--model", "tiny", "--np", np_dir, "--prompt", "x", "--top-p", "0"]) == 2
    assert capsys.readouterr().err.strip() == "npt-ds generate: --top-p: must be in (0, 1], got 0.0"


def test_interactive_answers_each_line_until_exit(capsys):
    from npt_ds.tools.generate import interactive

    model = strong_npt().float()
    lines = iter(["Hello", "  ", "To be", "exit", "never read"])
    seen = []

    def read(prompt):
        seen.append(prompt)
        return next(lines)

    interactive(model, ByteTokenizer(), DecodeOptions(max_new_tokens=3), read=read)
    assert len(seen) == 4  # stopped at 'exit'
    assert capsys.readouterr().out.count("\n") == 2  # two answers (the blank line is skipped)
