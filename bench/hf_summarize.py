#!/usr/bin/env python3
"""Summaries from Hugging Face transformers, for `dsv2 summarize --hf-outputs`.

Runs the same procedure as `dsv2 summarize` (TensorRT-LLM examples/summarize.py's) with HF
transformers on a DeepSeek-V2 checkpoint dir, one sample at a time (summarize.py's HF path
warns that batching changes results through padding), and writes one JSON line per sample:

    {"index": i, "output": "...", "output_tokens": n, "latency_s": s}

Usage:

    /opt/hfvenv/bin/python bench/hf_summarize.py --model-dir DIR --dataset test.parquet \\
        --max-samples 20 --max-output-len 100 --out hf.jsonl
    dsv2 summarize --endpoint http://HOST:50051 --dataset test.parquet --max-samples 20 \\
        --hf-outputs hf.jsonl

Procedure (identical on both sides):
  prompt text  (article + " TL;DR: ").strip().replace(" n't", "n't")
  prompt ids   [bos_token_id] + tokenizer.json's encoding of the prompt (no specials), cut to the first
               --max-input-len ids (923, summarize.py's default): DeepSeek's tokenizer adds BOS
               and no EOS, which is what the router does for a text prompt
  generation   greedy (do_sample=False), --max-output-len new tokens, stops at eos_token_id
  output       the new tokens decoded with skip_special_tokens=True; output_tokens counts the
               new tokens including a final EOS, as summarize.py does
  latency_s    wall time of model.generate for that sample

Datasets: .jsonl and .csv (stdlib), .parquet (needs pyarrow). Samples are the first N in file
order, as `dsv2 summarize --max-samples N` takes them.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM


def load_samples(path: Path, limit: int | None) -> list[tuple[str, str]]:
    ext = path.suffix.lower()
    if ext in (".jsonl", ".ndjson"):
        rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    elif ext == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    elif ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            sys.exit("reading parquet needs pyarrow (pip install pyarrow)")
        rows = pq.read_table(path, columns=["article", "highlights"]).to_pylist()
    else:
        sys.exit(f"{path}: the name must end in .parquet, .jsonl or .csv")
    if limit is not None:
        rows = rows[:limit]
    for i, r in enumerate(rows):
        if "article" not in r or "highlights" not in r:
            sys.exit(f"{path}: sample {i} lacks `article` or `highlights`")
    return [(r["article"], r["highlights"]) for r in rows]


def prompt_text(article: str) -> str:
    return (article + " TL;DR: ").strip().replace(" n't", "n't")


def load_tokenizer(model_dir: Path) -> Tokenizer:
    # The model's tokenizer.json through the `tokenizers` library, the same library (and file)
    # the router tokenizes with; BOS is added by hand below, as DeepSeek's tokenizer config
    # (add_bos_token) does. Avoids AutoTokenizer's tokenizer_config.json parsing, which the
    # embedded tiny model's file does not satisfy in transformers 5.
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--dataset", required=True, type=Path)
    ap.add_argument("--max-samples", type=int)
    ap.add_argument("--max-output-len", type=int, default=100)
    ap.add_argument("--max-input-len", type=int, default=923)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto (device_map=auto)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    samples = load_samples(args.dataset, args.max_samples)
    config = AutoConfig.from_pretrained(args.model_dir)
    tok = load_tokenizer(args.model_dir)
    dtype = getattr(torch, args.dtype)
    if args.device == "auto":
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, device_map="auto")
        device = model.device
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(args.device)
        device = torch.device(args.device)
    model.eval()
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])

    with args.out.open("w", encoding="utf-8") as out, torch.no_grad():
        for i, (article, _) in enumerate(samples):
            ids = [config.bos_token_id] + tok.encode(prompt_text(article), add_special_tokens=False).ids
            ids = ids[: args.max_input_len]
            x = torch.tensor([ids], device=device)
            t0 = time.perf_counter()
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=args.max_output_len,
                do_sample=False,
                eos_token_id=list(eos_ids),
                pad_token_id=next(iter(eos_ids)),
            )
            latency = time.perf_counter() - t0
            new = y[0, len(ids):].tolist()
            text = tok.decode(new, skip_special_tokens=True)
            out.write(json.dumps({"index": i, "output": text, "output_tokens": len(new),
                                  "latency_s": latency}, ensure_ascii=False) + "\n")
            print(f"[{i + 1}/{len(samples)}] {len(new)} tokens in {latency:.2f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
