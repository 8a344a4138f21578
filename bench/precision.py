"""bf16 against fp32 on the CPU: verdict agreement, score drift and speed on the UCI messages.

    python -m bench.precision --model work/demo/model --json bench/results/precision_tiny.json
    python -m bench.precision --base random:gpt2 --messages 1000 --json bench/results/precision_gpt2.json

Both dtypes score the same messages through Engine.classify_texts (length-grouped batches). A
trained model (`--model`) gives a meaningful verdict agreement; a random one (`--base`) measures
speed and score drift only (its verdicts sit near its threshold by chance).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from filterd.model.engine import Engine
from filterd.model.tokenizer import Tokenizer
from trainer.data import read_sms

from bench.daemon_redis import SHARED, make_model


def run(model: Path, texts: list[str], dtype: str) -> tuple[Engine, list, float]:
    engine = Engine.load(model, device="cpu", dtype=dtype)
    engine.classify_texts(texts[:64])  # warm-up
    t0 = time.perf_counter()
    verdicts = engine.classify_texts(texts)
    return engine, verdicts, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a trained model directory")
    src.add_argument("--base", help="random weights of this base, e.g. random:gpt2")
    ap.add_argument("--messages", type=int, default=0, help="first N UCI messages (0: all)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    texts = [e.text for e in read_sms(SHARED / "data/sms-spam-collection/SMSSpamCollection")]
    texts = texts[: args.messages] if args.messages else texts
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(args.base, Path(tmp) / "model", min(1024, max(Tokenizer.count(t) for t in texts)))
        e32, v32, s32 = run(model, texts, "float32")
        e16, v16, s16 = run(model, texts, "bfloat16")
    diff = torch.tensor([a.score - b.score for a, b in zip(v32, v16)]).abs()
    result = {
        "model": e32.version, "base": e32.meta.base, "messages": len(texts), "served_dtype": e16.dtype,
        "load_check": vars(e16.precision) if e16.precision else None,
        "verdict_agreement": sum(a.verdict == b.verdict for a, b in zip(v32, v16)) / len(texts),
        "mean_abs_score_diff": float(diff.mean()), "max_abs_score_diff": float(diff.max()),
        "fp32_messages_per_s": len(texts) / s32, "bf16_messages_per_s": len(texts) / s16,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
    }  # fmt: skip
    print(f"{result['base']} ({result['model']}), {len(texts)} UCI messages, served as {result['served_dtype']}")
    print("| verdict agreement | mean |Δscore| | max |Δscore| | fp32 msg/s | bf16 msg/s |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {100 * result['verdict_agreement']:.2f}% | {result['mean_abs_score_diff']:.5f} | {result['max_abs_score_diff']:.4f} | "
          f"{result['fp32_messages_per_s']:.1f} | {result['bf16_messages_per_s']:.1f} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
