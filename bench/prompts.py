#!/usr/bin/env python3
"""The prompts of `dsv2 bench`, for the HF comparison scripts: the same ids from the same seed.

`dsv2 bench` draws sequence i's prompt from a SplitMix64 stream (services/cli/src/cmd_bench/
prompts.rs): state = seed XOR (i * 0xD1B54A32D192ED03) mod 2^64; each draw advances the state by
0x9E3779B97F4A7C15 and mixes it; id = draw mod vocab, drawn again when it is a special id (BOS,
EOS). A prompt of L tokens is the first L ids, a batch of B the first B sequences. This file
repeats that in Python, so `--seed S --prompt-len L --batch B` gives dsv2's ids without a file;
`read_prompt_file` reads what `dsv2 bench --dump-prompts FILE` wrote (the way to share prompts
from `--prompts TEXTFILE`, which need the tokenizer).

Self-test (the ids pinned in prompts.rs's test): python3 bench/prompts.py
"""

from __future__ import annotations

import sys

MASK = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def random_prompt(seed: int, index: int, length: int, vocab: int, special: list[int]) -> list[int]:
    """Sequence `index`'s first `length` ids under `seed` (dsv2 bench's random_prompt)."""
    state = (seed ^ (index * 0xD1B54A32D192ED03)) & MASK
    out: list[int] = []
    while len(out) < length:
        state, z = _splitmix64(state)
        tok = z % max(vocab, 1)
        if tok not in special:
            out.append(tok)
    return out


def special_ids(config) -> list[int]:
    """BOS and EOS ids of a transformers config (what dsv2 excludes from random prompts)."""
    ids = []
    for v in (getattr(config, "bos_token_id", None), getattr(config, "eos_token_id", None)):
        if v is None:
            continue
        ids.extend(v if isinstance(v, (list, tuple)) else [v])
    return sorted(set(int(v) for v in ids))


def random_batch(seed: int, batch: int, length: int, vocab: int, special: list[int], same: bool = False):
    """The prompts of a batch; `same`: every sequence is sequence 0 (dsv2 bench --same-prompt)."""
    return [random_prompt(seed, 0 if same else i, length, vocab, special) for i in range(batch)]


def read_prompt_file(path: str, batch: int, length: int | None = None) -> list[list[int]]:
    """The first `batch` sequences of a `dsv2 bench --dump-prompts` file, each cut to `length`."""
    seqs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            ids = [int(x) for x in line.split(",") if x.strip()]
            seqs.append(ids[:length] if length else ids)
    if len(seqs) < batch:
        raise ValueError(f"{path} holds {len(seqs)} prompts, fewer than the batch of {batch}")
    seqs = seqs[:batch]
    if length and any(len(s) < length for s in seqs):
        raise ValueError(f"{path}: a prompt is shorter than {length} tokens")
    return seqs


def choose(*, prompt_ids, prompt_file, seed, prompt_len, batch, same, vocab, special):
    """The prompts of an HF comparison run and where they came from (raises ValueError):
    one explicit prompt (`prompt_ids`, batch 1 unless `same`), the first `batch` lines of a
    dsv2 bench dump cut to `prompt_len`, or dsv2 bench's seeded random ids (`prompt_len`
    default 512). Every prompt must have the same length: the HF loop does not pad."""
    if prompt_ids is not None:
        if batch > 1 and not same:
            raise ValueError("--prompt-ids is one prompt: a batch of copies needs --same-prompt")
        seqs = [list(prompt_ids)] * batch
        source = {"source": "ids"}
    elif prompt_file:
        seqs = read_prompt_file(prompt_file, 1 if same else batch, prompt_len)
        if same:
            seqs = seqs * batch
        source = {"source": "file", "file": prompt_file}
    else:
        seqs = random_batch(seed, batch, prompt_len or 512, vocab, special, same)
        source = {"source": "random", "seed": seed, "special_ids_excluded": special}
    if len({len(s) for s in seqs}) > 1:
        raise ValueError("the prompts differ in length and the HF loop does not pad: give --prompt-len")
    if any(not 0 <= i < vocab for s in seqs for i in s):
        raise ValueError(f"prompt ids must lie in [0, {vocab})")
    source["same_prompt"] = same
    return seqs, source


if __name__ == "__main__":
    got = (random_prompt(0, 0, 4, 102400, []), random_prompt(1, 3, 3, 1024, [0, 1]))
    want = ([73135, 26100, 83279, 49644], [333, 13, 706])
    print("prompts.py self-test:", "ok" if got == want else f"MISMATCH {got} != {want}")
    sys.exit(0 if got == want else 1)
