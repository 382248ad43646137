"""How much would sharing mc prompts' common token prefixes (the few-shot block) between the pairs of a step save?

    python experiments/bench/prefix_sharing.py --pairs $DPO_HELLASWAG_DIR/seed/dpo_000-1.json [--n 48 320]

A token count, no model run. For each optimizer step of `dpo train`'s plan (16 pairs, 4 x 4 micro-batches), it
compares today's rows (one per pair, micro-batches of length-sorted pairs, padded to their longest row) with rows
that share a prefix: the step's pairs sorted by prompt tokens, then in each micro-batch consecutive pairs whose
prompts share >= --min-shared leading tokens joined into one row [shared | pair 1 | pair 2 ...] (block mask).
Prints real tokens, padded tokens (what the matmuls compute) and attention work (sum of rows x T^2) as ratios.
"""

import argparse
import json

from dpo.core import models
from dpo.data.pairs import read_pairs
from dpo.engine.logprobs import tokenize_pairs
from dpo.train.plan import plan_steps


def shared(p: list, q: list) -> int:
    k = 0
    while k < min(len(p), len(q)) - 1 and p[k] == q[k]:
        k += 1
    return k


def rows_shared(mb: list, examples: list, min_shared: int) -> list:
    """Row lengths when consecutive pairs (sorted by prompt) sharing >= min_shared prompt tokens share one row."""
    groups = [[mb[0]]]
    for i in mb[1:]:
        if shared(examples[groups[-1][0]].prompt, examples[i].prompt) >= min_shared:
            groups[-1].append(i)
        else:
            groups.append([i])
    lengths = []
    for g in groups:
        s = min((shared(examples[g[0]].prompt, examples[i].prompt) for i in g[1:]), default=0)
        lengths.append(s + sum(examples[i].length - s for i in g))
    return lengths


def count(examples: list, step_pairs: int, micro: int, min_shared: int) -> dict:
    lengths = [ex.length for ex in examples]
    totals = dict.fromkeys(("real", "padded", "attention", "real_shared", "padded_shared", "attention_shared"), 0)
    for step in plan_steps(lengths, step_pairs, len(examples) // step_pairs, 1):
        by_prompt = sorted(step, key=lambda i: examples[i].prompt)
        for j in range(0, len(step), micro):
            for suffix, rows in (("", [lengths[i] for i in step[j:j + micro]]),
                                 ("_shared", rows_shared(by_prompt[j:j + micro], examples, min_shared))):
                totals["real" + suffix] += sum(rows)
                totals["padded" + suffix] += len(rows) * max(rows)
                totals["attention" + suffix] += len(rows) * max(rows) ** 2
    return {**totals, **{f"{k}_ratio": totals[f"{k}_shared"] / totals[k] for k in ("real", "padded", "attention")}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="mc preference pairs JSON (e.g. the seed's dpo_000-1.json)")
    p.add_argument("--n", type=int, nargs="+", default=[48, 320], help="first N pairs (a multiple of 16)")
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer counts the tokens")
    p.add_argument("--max-length", type=int, default=1024, help="as `dpo train --max-length`")
    p.add_argument("--min-shared", type=int, default=32, help="shortest common prefix worth a shared row")
    args = p.parse_args(argv)
    tokenizer = models.load_tokenizer(args.model)
    pairs = read_pairs(args.pairs)
    result = {}
    for n in args.n:
        result[n] = count(tokenize_pairs(tokenizer, pairs[:n], args.max_length), 16, 4, args.min_shared)
        r = result[n]
        print(f"{n} pairs, 4 x 4: real tokens x{r['real_ratio']:.2f}, padded tokens x{r['padded_ratio']:.2f}, "
              f"attention x{r['attention_ratio']:.2f}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
