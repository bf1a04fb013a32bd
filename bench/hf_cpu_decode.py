#!/usr/bin/env python3
"""Greedy CPU decode speed of Hugging Face transformers on a DeepSeek-V2 checkpoint dir.

The baseline our CPU backend is compared against. Usage:

    /opt/hfvenv/bin/python bench/hf_cpu_decode.py tests/fixtures/models/v2 \\
        --prompt-ids 5,17,300,42 --new-tokens 32 --threads 2

Loads the directory with transformers' native DeepseekV2ForCausalLM (float32, CPU, eager
attention unless --attn says otherwise), then:
  1. warm-up (not timed): model.generate(do_sample=False) for --new-tokens tokens with eos
     disabled; its ids are kept to check the timed loop;
  2. --runs timed runs of an explicit greedy loop with a DynamicCache: one prefill forward over
     the prompt (gives new token 1), then new_tokens-1 single-token decode forwards.
     The timed loop's ids must equal the warm-up generate() ids, or the script fails.
Prints one JSON line:
  tokens_per_s      decode rate: (new_tokens - 1) / decode seconds, prefill excluded
                    (median over runs)
  e2e_tokens_per_s  new_tokens / (prefill + decode seconds), what generate() users see
  prefill_s, decode_s (medians), runs, new_tokens, prompt_tokens, threads, torch, transformers,
  output_ids (the greedy tokens, so a run can be checked against reference.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import DeepseekV2ForCausalLM, DynamicCache, GenerationConfig


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
    ap.add_argument("--prompt-ids", type=parse_ids, default=[1, 2, 3])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--attn", default="eager", help="transformers attn_implementation")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU comparison, issue 4 P4)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (same prompt)")
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
    if any(not 0 <= i < vocab for i in args.prompt_ids):
        ap.error(f"--prompt-ids must lie in [0, {vocab})")
    prompt = torch.tensor([args.prompt_ids] * args.batch, dtype=torch.int64, device=args.device)

    gen_cfg = GenerationConfig(
        do_sample=False, max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0
    )
    with torch.inference_mode():
        warm = model.generate(input_ids=prompt, generation_config=gen_cfg)[0, prompt.shape[1] :].tolist()

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
                "device": args.device,
                "dtype": args.dtype,
                "e2e_tokens_per_s": args.new_tokens / (p_med + d_med),
                "prefill_s": p_med,
                "decode_s": d_med,
                "runs": args.runs,
                "new_tokens": args.new_tokens,
                "prompt_tokens": len(args.prompt_ids),
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
