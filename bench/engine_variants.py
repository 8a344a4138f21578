"""Variants of the engine's forward pass, timed on the batches filterd plans: what each one buys.

    python -m bench.engine_variants --json bench/results/engine_variants_fp32.json [--dtype bfloat16] [--messages 500]

The same random 124M weights and UCI messages as bench.throughput. The messages are cut into the
batches the engine would run (filterd.model.grouping with the engine's measured overhead), and the whole
set of batches is scored by each variant (best of `--repeats`), scores compared with `pooled-row`:
    full-last-block  the last block at every position, then the pooled row (filterd before the change)
    pooled-row       the last block computes only the pooled row (filterd now)
    compiled         pooled-row under `torch.compile(model, dynamic=True)` (Inductor's C++ kernels on
                     a CPU); its compile time is the first pass over every distinct shape, which a
                     daemon would pay after each model load
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from filterd.model.engine import Engine, spam_scores
from filterd.model.grouping import partition
from filterd.model.gpt2 import LABELS
from filterd.model.tokenizer import pad_batch
from trainer.data import read_sms

from bench.daemon_redis import SHARED, make_model
from bench.throughput import machine_info


def timed(fn, batches) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = [s for b in batches for s in fn(b)]
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    texts = [e.text for e in read_sms(SHARED / "data/sms-spam-collection/SMSSpamCollection")][: args.messages]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.load(make_model("random:gpt2", Path(tmp) / "model", 512), device="cpu", dtype=args.dtype)
    tokens = engine.tokenizer.encode_batch(texts)
    groups = partition([len(t) for t in tokens], engine.overhead_tokens, 64, 8192)
    batches = [[tokens[i] for i in g] for g in groups]
    shapes = sorted({(len(b), max(map(len, b))) for b in batches})
    cpu = torch.device("cpu")
    model = engine.model

    @torch.inference_mode()
    def full_last_block(b: list[list[int]]) -> list[float]:
        ids, lengths = pad_batch(b)
        h = model.hidden_states(ids)
        logits = model.head(model.ln_f(h[torch.arange(len(b)), lengths - 1]))
        return torch.softmax(logits.float(), dim=-1)[:, LABELS.index("spam")].tolist()

    pooled_row = lambda b: spam_scores(model, b, cpu)  # noqa: E731
    compiled_model = torch.compile(model, dynamic=True)
    compiled = lambda b: spam_scores(compiled_model, b, cpu)  # noqa: E731

    pooled_row(batches[0])  # warm-up
    full_last_block(batches[0])
    t0 = time.perf_counter()
    timed(compiled, batches)  # compiles (and recompiles) on the way
    compile_s = time.perf_counter() - t0
    results = {}
    for name, fn in (("full-last-block", full_last_block), ("pooled-row", pooled_row), ("compiled", compiled)):
        runs = [timed(fn, batches) for _ in range(args.repeats)]
        best = min(r[0] for r in runs)
        results[name] = {
            "seconds": best,
            "messages_per_s": len(tokens) / best,
            "runs_s": [r[0] for r in runs],
            "scores": runs[0][1],
        }
    ref = results["pooled-row"]["scores"]
    for r in results.values():
        r["max_abs_score_diff"] = max(abs(a - b) for a, b in zip(r.pop("scores"), ref))
        r["speedup_vs_full_last_block"] = results["full-last-block"]["seconds"] / r["seconds"]
    out = {
        "config": {"messages": len(tokens), "dtype": engine.dtype, "batches": len(batches), "distinct_shapes": len(shapes),
                   "overhead_tokens": engine.overhead_tokens},
        "machine": machine_info(cpu), "compile_first_pass_s": compile_s, "results": results,
    }  # fmt: skip
    print(f"{len(tokens)} messages in {len(batches)} batches ({len(shapes)} shapes), {engine.dtype}; "
          f"torch.compile's first pass {compile_s:.1f} s\n")  # fmt: skip
    print(
        "| variant | seconds | messages/s | vs full-last-block | max \\|score diff\\| vs pooled-row |\n| --- | --- | --- | --- | --- |"
    )
    for name, r in results.items():
        print(
            f"| {name} | {r['seconds']:.2f} | {r['messages_per_s']:.1f} | {r['speedup_vs_full_last_block']:.3f}x | {r['max_abs_score_diff']:.1e} |"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
