#!/usr/bin/env python3
"""Greedy decode speed of Hugging Face transformers on a DeepSeek-V2 checkpoint dir.

The baseline `dsv2 bench` is compared against, on the same prompts. Usage:

    # the same seeded random ids as `dsv2 bench --seed 0 --context 512 --batch 8`
    /opt/hfvenv/bin/python bench/hf_cpu_decode.py MODEL_DIR --seed 0 --prompt-len 512 --batch 8
    # or exactly the ids a dsv2 bench run used (`dsv2 bench --dump-prompts prompts.txt`)
    /opt/hfvenv/bin/python bench/hf_cpu_decode.py MODEL_DIR --prompt-file prompts.txt \\
        --prompt-len 512 --batch 8

Prompts: distinct by default, as in dsv2 bench: sequence i of a batch gets its own ids, drawn by
bench/prompts.py from (--seed, i) exactly as dsv2 bench draws them, or read from --prompt-file
(first --batch lines, each cut to --prompt-len). --prompt-ids gives one explicit prompt (batch 1
only); --same-prompt copies sequence 0's prompt to every row (hides the MoE cost, as in dsv2
bench, and the output says so).

Loads the directory with transformers' native DeepseekV2ForCausalLM (float32, CPU, eager
attention unless --attn says otherwise), then:
  1. warm-up (not timed): model.generate(do_sample=False) for --new-tokens tokens with eos
     disabled; its ids are kept to check the timed loop;
  2. --runs timed runs of an explicit greedy loop with a DynamicCache: one prefill forward over
     the prompts (gives new token 1), then new_tokens-1 decode forwards of the whole batch.
     The timed loop's ids must equal the warm-up generate() ids, or the script fails.
Prints one JSON line:
  tokens_per_s      decode rate of the batch: batch * (new_tokens - 1) / decode seconds, prefill
                    excluded (median over runs)
  e2e_tokens_per_s  batch * new_tokens / (prefill + decode seconds), what generate() users see
  prompt_tokens_per_s  batch * prompt_len / prefill seconds
  prefill_s, decode_s (medians), runs, new_tokens, prompt_tokens, batch, distinct_prompts,
  prompts (where they came from), threads, torch, transformers,
  output_ids (sequence 0's greedy tokens, so a run can be checked against reference.json or
  against dsv2 bench's output_ids_seq0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import DeepseekV2ForCausalLM, DynamicCache, GenerationConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prompts as bench_prompts  # noqa: E402  (bench/prompts.py: dsv2 bench's prompt ids)


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers: {err}")
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids must not be empty")
    return ids


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def greedy_loop(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float, float]:
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    logits = model(input_ids=prompt, cache=cache, use_cache=True).logits
    tok = logits[:, -1].argmax(-1, keepdim=True)
    sync()
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(new_tokens - 1):
        logits = model(input_ids=tok, cache=cache, use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    sync()
    t2 = time.perf_counter()
    out = torch.cat(out, dim=1)[0].tolist()
    return out, t1 - t0, t2 - t1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--prompt-ids", type=parse_ids, default=None,
                    help="one explicit prompt (batch 1, or with --same-prompt)")
    ap.add_argument("--prompt-file", default=None,
                    help="prompt ids written by `dsv2 bench --dump-prompts` (first --batch lines)")
    ap.add_argument("--seed", type=int, default=0, help="seed of dsv2 bench's random prompts")
    ap.add_argument("--prompt-len", type=int, default=None,
                    help="prompt tokens (random prompts: default 512; --prompt-file: cut to this)")
    ap.add_argument("--same-prompt", action="store_true",
                    help="every row gets sequence 0's prompt (hides the MoE cost)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--attn", default="eager", help="transformers attn_implementation")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU comparison, issue 4 P4)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (distinct prompts)")
    args = ap.parse_args()
    if args.new_tokens < 2 or args.runs < 1 or args.threads < 1:
        ap.error("--new-tokens must be >= 2, --runs and --threads >= 1")

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    model = DeepseekV2ForCausalLM.from_pretrained(
        args.model_dir, dtype=getattr(torch, args.dtype), attn_implementation=args.attn
    ).to(args.device).eval()
    if getattr(model.config, "norm_topk_prob", False):
        # transformers' native router ignores norm_topk_prob (tests/fixtures/README.md), so the
        # tokens are not the original model's; the speed is still representative.
        print("warning: norm_topk_prob=true is ignored by native transformers", file=sys.stderr)
    vocab = model.config.vocab_size
    try:
        seqs, source = bench_prompts.choose(
            prompt_ids=args.prompt_ids, prompt_file=args.prompt_file, seed=args.seed,
            prompt_len=args.prompt_len, batch=args.batch, same=args.same_prompt, vocab=vocab,
            special=bench_prompts.special_ids(model.config),
        )
    except ValueError as err:
        ap.error(str(err))
    distinct = len({tuple(s) for s in seqs})
    if args.same_prompt:
        print("NOTE: --same-prompt: ONE PROMPT REPEATED, which hides the MoE cost", file=sys.stderr)
    prompt = torch.tensor(seqs, dtype=torch.int64, device=args.device)

    gen_cfg = GenerationConfig(
        do_sample=False, max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0
    )
    with torch.inference_mode():
        # an explicit all-ones mask: generate() would otherwise mask prompt ids equal to the pad id
        warm = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gen_cfg
        )[0, prompt.shape[1] :].tolist()

    prefill, decode, ids = [], [], None
    for _ in range(args.runs):
        ids, p, d = greedy_loop(model, prompt, args.new_tokens)
        if ids != warm and args.dtype == "float32":
            print(f"timed loop ids {ids} != generate() ids {warm}", file=sys.stderr)
            return 1
        prefill.append(p)
        decode.append(d)
    p_med, d_med = statistics.median(prefill), statistics.median(decode)
    print(
        json.dumps(
            {
                "impl": "hf-transformers",
                "tokens_per_s": args.batch * (args.new_tokens - 1) / d_med,
                "batch": args.batch,
                "distinct_prompts": distinct,
                "prompts": source,
                "device": args.device,
                "dtype": args.dtype,
                "e2e_tokens_per_s": args.batch * args.new_tokens / (p_med + d_med),
                "prompt_tokens_per_s": prompt.numel() / p_med,
                "prefill_s": p_med,
                "decode_s": d_med,
                "runs": args.runs,
                "new_tokens": args.new_tokens,
                "prompt_tokens": prompt.shape[1],
                "threads": args.threads,
                "attn": args.attn,
                "model_dir": args.model_dir,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "output_ids": ids,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
