#!/usr/bin/env python3
"""Train the embedded tiny model (`dsv2 ... --model-dir tiny`) and write everything in this dir.

How the committed files were made (exactly; about 25 minutes on one CPU thread):

    apt-get download rust-doc                       # Debian bookworm rust-doc 1.63.0+dfsg1-2
    dpkg-deb -x rust-doc_1.63.0+dfsg1-2_all.deb /tmp/rustdoc
    cargo build -p dsv2-core --example train_tokenizer
    PY=/path/to/venv/bin/python                     # torch 2.15.0, transformers 5.25.0
    $PY services/core/assets/tiny-trained/train.py \
        --book /tmp/rustdoc/usr/share/doc/rust-doc/html/book

The data is the prose of "The Rust Programming Language" (the Rust book, MIT OR Apache-2.0, as
debian/copyright of rust-doc says for src/doc/*), extracted by make_text.py: 94 chapter sections,
every 12th held out (never trained on). Steps:

1. make_text.py -> train.txt / heldout.txt (one paragraph per line, ASCII) in a scratch dir.
2. The project's own byte-level BPE (dsv2_core::tiny::train_tokenizer, via the
   train_tokenizer example) on train.txt, vocab 2048, with this dir's chat_template.jinja:
   tokenizer.json and tokenizer_config.json, the format the product loads.
3. A DeepSeek-V2-architecture model (config.json: MLA with q-LoRA, YaRN, layer 0 dense, then
   MoE layers with 2 shared experts and 16 routed experts in 4 groups, group-limited greedy
   top-4 of the best 2 groups, softmax scores, routed_scaling_factor 4) built by transformers'
   DeepseekV2ForCausalLM from that config.json and trained from seed SEED on ONE CPU thread:
   AdamW, batches of [BOS] + 127 consecutive tokens drawn from random offsets of the token
   stream of train.txt, plus a small switch-style load-balancing loss on each router (so that
   every expert and group gets used; it is a training aid only, not part of the model).
4. The weights are rounded to bf16 and written under the ORIGINAL DeepSeek names (per-expert
   tensors), the format our loader and transformers' from_pretrained both read; the rounded
   model is reloaded with from_pretrained (f32, eager) for everything below.
5. Held-out perplexity: windows of [BOS] + 127 tokens over heldout.txt, exp(mean NLL of every
   predicted token); the same for heldout_sample.txt (the first paragraphs of heldout.txt,
   committed, which the Rust test recomputes) and for the untrained model of the same seed.
6. reference.safetensors: HF f32 logits (case{i}.input_ids, case{i}.logits) for the prompt
   "The router receives a request" and a held-out snippet, for the Rust parity test.
7. words.txt: every lower-cased word ([a-z]+) of train.txt: the vocabulary the demo's output
   is checked against. MANIFEST.json: seed, data, steps, losses, perplexities, versions, sha256s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import re
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy
import safetensors
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, DeepseekV2ForCausalLM

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))
from make_reference import from_native  # noqa: E402  (original <-> native expert layout)

SEED = 20261206
VOCAB = 2048
SEQ = 128  # BOS + 127 text tokens per training row and per perplexity window
BATCH = 16
LR = 3e-3
WARMUP = 100
AUX_COEF = 0.01
SAMPLE_PARAGRAPHS = 40  # heldout_sample.txt: the first paragraphs of heldout.txt
BOS, EOS = 0, 1
PROMPT = "The router receives a request"

CONFIG = OrderedDict(
    [
        ("architectures", ["DeepseekV2ForCausalLM"]),
        ("model_type", "deepseek_v2"),
        ("vocab_size", VOCAB),
        ("hidden_size", 192),
        ("intermediate_size", 512),
        ("moe_intermediate_size", 128),
        ("num_hidden_layers", 3),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 4),
        ("q_lora_rank", 96),
        ("kv_lora_rank", 64),
        ("qk_nope_head_dim", 32),
        ("qk_rope_head_dim", 16),
        ("v_head_dim", 32),
        ("n_routed_experts", 16),
        ("n_shared_experts", 2),
        ("num_experts_per_tok", 4),
        ("topk_method", "group_limited_greedy"),
        ("n_group", 4),
        ("topk_group", 2),
        ("routed_scaling_factor", 4.0),
        ("norm_topk_prob", False),
        ("scoring_func", "softmax"),
        ("first_k_dense_replace", 1),
        ("moe_layer_freq", 1),
        ("hidden_act", "silu"),
        ("rms_norm_eps", 1e-06),
        ("rope_theta", 10000),
        (
            "rope_scaling",
            {
                "type": "yarn", "factor": 40, "original_max_position_embeddings": 64,
                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
            },
        ),
        ("max_position_embeddings", 2560),
        ("bos_token_id", BOS),
        ("eos_token_id", EOS),
        ("tie_word_embeddings", False),
        ("attention_bias", False),
        ("attention_dropout", 0.0),
        ("initializer_range", 0.02),
        ("torch_dtype", "bfloat16"),
        ("use_cache", True),
    ]
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encode(tok: tokenizers.Tokenizer, text: str) -> list[int]:
    # tokenizer.json has no post-processor: no BOS here; callers add it as the product does.
    return tok.encode(text, add_special_tokens=False).ids


def windows(ids: list[int]) -> torch.Tensor:
    body = SEQ - 1
    n = len(ids) // body
    rows = [[BOS] + ids[i * body:(i + 1) * body] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def perplexity(model, rows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for i in range(0, rows.shape[0], BATCH):
        x = rows[i:i + BATCH]
        logits = model(input_ids=x).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


class BalanceLoss:
    """Switch-transformer load balancing over each router's softmax: E * sum_i f_i * P_i."""

    def __init__(self, model):
        self.terms: list[torch.Tensor] = []
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.register_forward_hook(self.hook)

    def hook(self, module, args, out):
        logits, _, idx = out
        probs = logits.softmax(dim=-1)
        e = probs.shape[-1]
        frac = torch.zeros(e).scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel())) / idx.numel()
        self.terms.append(e * (frac.detach() * probs.mean(dim=0)).sum())

    def take(self) -> torch.Tensor:
        t = torch.stack(self.terms).mean() if self.terms else torch.zeros(())
        self.terms = []
        return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--book", type=Path, required=True, help="rust-doc's html/book dir")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tiny-trained-work"))
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps, write nothing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    random.seed(SEED)
    out, work = args.out, args.work
    work.mkdir(parents=True, exist_ok=True)

    subprocess.run([sys.executable, str(HERE / "make_text.py"), str(args.book), str(work)], check=True)
    train_text = (work / "train.txt").read_text()
    held_text = (work / "heldout.txt").read_text()
    subprocess.run(
        [str(REPO / "target" / "debug" / "examples" / "train_tokenizer"), str(work / "train.txt"),
         str(VOCAB), str(out), str(HERE / "chat_template.jinja")],
        check=True,
    )
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.token_to_id("<\uff5cbegin\u2581of\u2581sentence\uff5c>") == BOS
    train_ids = encode(tok, train_text)
    held_ids = encode(tok, held_text)
    sample_text = "\n".join(held_text.splitlines()[:SAMPLE_PARAGRAPHS]) + "\n"
    sample_ids = encode(tok, sample_text)
    print(f"train tokens {len(train_ids)}, held-out tokens {len(held_ids)}, sample {len(sample_ids)}")

    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    hf_cfg = AutoConfig.from_pretrained(out)
    hf_cfg._attn_implementation = "eager"
    model = DeepseekV2ForCausalLM(hf_cfg).to(torch.float32)
    untrained = DeepseekV2ForCausalLM(hf_cfg).to(torch.float32)
    untrained.load_state_dict(model.state_dict())
    untrained.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params}")

    data = torch.tensor(train_ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    steps = args.time_steps or args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / WARMUP) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))),
    )
    balance = BalanceLoss(model)
    model.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - SEQ, (BATCH,), generator=gen)
        x = torch.stack([torch.cat([torch.tensor([BOS]), data[s:s + SEQ - 1]]) for s in starts.tolist()])
        logits = model(input_ids=x).logits
        lm = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss = lm + AUX_COEF * balance.take()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(lm.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step} loss {lm.item():.3f} {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    if args.time_steps:
        print(f"{steps} steps in {train_s:.1f}s: {train_s / steps:.3f} s/step")
        return

    # 4. bf16 weights under the original names; everything below uses the reloaded model.
    native = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    orig = from_native(native, CONFIG)
    save_file(OrderedDict((k, v.contiguous()) for k, v in orig.items()), out / "model.safetensors",
              metadata={"format": "pt"})
    ref, info = DeepseekV2ForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"from_pretrained loading info not clean: {bad}")
    ref.eval()

    # 5. perplexities
    ppl_held = perplexity(ref, windows(held_ids))
    ppl_sample = perplexity(ref, windows(sample_ids))
    ppl_random = perplexity(untrained, windows(sample_ids))
    (out / "heldout_sample.txt").write_text(sample_text)
    print(f"held-out ppl {ppl_held:.2f}, sample {ppl_sample:.2f}, untrained sample {ppl_random:.2f}")

    # 6. reference logits
    cases = [[BOS] + encode(tok, PROMPT), [BOS] + sample_ids[:24]]
    tensors = {}
    with torch.no_grad():
        for i, ids in enumerate(cases):
            x = torch.tensor([ids], dtype=torch.long)
            tensors[f"case{i}.input_ids"] = x[0].clone()
            tensors[f"case{i}.logits"] = ref(input_ids=x).logits[0].float().contiguous()
    save_file(tensors, out / "reference.safetensors", metadata={"format": "pt"})

    # 7. vocabulary and manifest
    words = sorted(set(re.findall(r"[a-z]+", train_text.lower())))
    (out / "words.txt").write_text("\n".join(words) + "\n")
    with torch.no_grad():
        greedy = ref.generate(torch.tensor([cases[0]]), do_sample=False, max_new_tokens=32,
                              eos_token_id=None, pad_token_id=EOS)
    manifest = OrderedDict(
        seed=SEED,
        data=OrderedDict(
            package="rust-doc 1.63.0+dfsg1-2 (Debian bookworm), html/book/ch*.html",
            licence="MIT OR Apache-2.0 (debian/copyright: src/doc/*)",
            sections=len(list(args.book.glob("ch[0-9][0-9]-*.html"))),
            train_chars=len(train_text), train_tokens=len(train_ids),
            heldout_chars=len(held_text), heldout_tokens=len(held_ids),
            train_txt_sha256=hashlib.sha256(train_text.encode()).hexdigest(),
            heldout_txt_sha256=hashlib.sha256(held_text.encode()).hexdigest(),
        ),
        params=n_params,
        steps=steps, batch=BATCH, seq=SEQ, lr=LR, warmup=WARMUP, aux_coef=AUX_COEF,
        threads=torch.get_num_threads(), train_seconds=round(train_s, 1),
        first_loss=round(losses[0], 4),
        final_loss_mean_last_50=round(sum(losses[-50:]) / 50, 4),
        heldout_perplexity=round(ppl_held, 3),
        heldout_sample_perplexity=round(ppl_sample, 3),
        untrained_heldout_sample_perplexity=round(ppl_random, 3),
        hf_greedy_continuation=tok.decode(greedy[0, len(cases[0]):].tolist()),
        versions=OrderedDict(python=platform.python_version(), torch=torch.__version__,
                             transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                             safetensors=safetensors.__version__, numpy=numpy.__version__),
        sha256={f: sha256(out / f) for f in ["config.json", "model.safetensors", "tokenizer.json",
                                             "tokenizer_config.json", "reference.safetensors",
                                             "heldout_sample.txt", "words.txt"]},
    )
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
