"""A random-weight GPT-2 model folder, GPT-2 Large's shape unless told otherwise, with a tokenizer saved beside it:
for benchmarks that need the architecture, not the weights (nothing is downloaded).

    python experiments/bench/random_gpt2.py OUT_DIR --tokenizer gpt2 [--n-layer 36 --n-embd 1280 --n-head 20]

The vocabulary stays GPT-2's 50257 whatever the tokenizer (SmolLM2's ids are all below 49152); the special token
ids are the tokenizer's. Dropout is 0 (every trainer and scorer turns it off anyway). Weights are drawn with seed 0,
on the GPU when there is one (much faster than the CPU for GPT-2 Large), and saved in bf16 (half the bytes to write
and load; every loader casts to the dtype it wants). Writes OUT_DIR/bench_model.json and prints it: shape,
parameters, non-embedding parameters (N of the MFU).
"""

import argparse
import json
from pathlib import Path

import torch
from benchlib import json_text, non_embedding_params
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel


def build(out_dir, tokenizer: str, n_layer=36, n_embd=1280, n_head=20, n_positions=1024, vocab_size=50257) -> dict:
    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
               "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = GPT2LMHeadModel(config)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    info = {"model_dir": str(out_dir), "architecture": "GPT-2, random weights", "n_layer": n_layer,
            "n_embd": n_embd, "n_head": n_head, "n_positions": n_positions, "vocab_size": vocab_size,
            "tokenizer": str(tokenizer), "params": sum(p.numel() for p in model.parameters()),
            "non_embedding_params": non_embedding_params(out_dir)}
    (out_dir / "bench_model.json").write_text(json_text(info))
    return info


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="model folder to write")
    p.add_argument("--tokenizer", required=True, help="tokenizer: a hub id (gpt2) or a folder with its files")
    p.add_argument("--n-layer", type=int, default=36)
    p.add_argument("--n-embd", type=int, default=1280)
    p.add_argument("--n-head", type=int, default=20)
    args = p.parse_args()
    print(json.dumps(build(args.out_dir, args.tokenizer, args.n_layer, args.n_embd, args.n_head), indent=1))


if __name__ == "__main__":
    main()
