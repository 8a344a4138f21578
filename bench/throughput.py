"""Throughput of four ways to score the same UCI messages with the same GPT-2-124M-shaped weights.

    python -m bench.throughput --json bench/results/throughput_2000_fp32.json            # 2,000 messages, fp32
    python -m bench.throughput --dtype bfloat16 --json bench/results/throughput_2000_bf16.json
    python -m bench.throughput --quick --json /tmp/throughput_quick.json                 # 200 messages

A full run takes about 12 minutes on 2 CPU cores (fp32), most of it the chapter's one-at-a-time
loop and hf (a --quick run 1 to 3 minutes). Results and the commands behind them: bench/RESULTS.md.
Timings on a shared machine swing by up to 2x between runs: the matmul peak is measured before and
after the contenders in the same run so that the spread shows.

Every contender reads the same random-init weights (`--base random:gpt2`, seed 1; the head's bias is
zero, which matters because Hugging Face's `score` layer has none) and the same messages, tokenized
once with filterd's tokenizer before any clock starts (the daemon tokenizes inside its own timing).

Contenders
    chapter  the book's classify_review: one message at a time, truncated and right-padded to 120
             tokens, logits at the last (padded) position: head(ln_f(hidden_states(x)))[:, -1, :]
             under torch.no_grad, no batching. Its scores depend on the padding, so they differ
             from the others (reported as mean |diff| against engine, not checked).
    hf       transformers' GPT2ForSequenceClassification (num_labels=2, pad_token_id=50256) loaded
             with from_pretrained from a Hugging Face checkpoint written from our weights (Conv1D
             weights transposed, `score.weight` = our head weight): batches of 32 in arrival order,
             right-padded with an attention mask, torch.inference_mode, fp32 (`--hf-dtype`), i.e.
             what an ML user would write. It pools the last non-pad token, as filterd does.
    engine   filterd's Batcher + Engine in this process, default batching (64 messages, 8192 padded
             tokens, 5 ms wait): every message submitted at once, then all awaited.
    daemon   `filterd serve` as a process over a real redis-server (AOF, fsync always), every message
             XADDed in one pipeline, as bench/daemon_redis.run_daemon does (re-done here because that
             one neither passes the device/dtype nor returns the scores).

Metrics
    messages/s and real tokens/s over the contender's wall time (real = tokens it read, no padding;
    chapter reads at most 120). Latency per message: chapter, its own forward; hf, the end of the
    batch it was in, from the start of the run (every message arrives at t0); engine, submit to
    result; daemon, input entry id to result entry id (Redis clock, ms). Padding ratio: mean over
    forward passes of (padded - real) / padded (the daemon's filterd_padding_ratio), and the
    token-weighted 1 - sum(real) / sum(padded) next to it in the JSON.

Useful FLOPs (what classifying needs: counted on real tokens only, never on padding; d = n_embd, L = n_layer)
    per message of n real tokens:  2 * n * 12 * d^2 * (L - 1)  +  2 * n * 2 * d^2  +  2 * 10 * d^2
                                   +  2 * n^2 * d * (L - 1)  +  4 * n * d
    Blocks 1..L-1 run at every position: the linear layers hold 12 d^2 weights per layer (qkv 3d^2,
    attention proj d^2, MLP 4d^2 + 4d^2), 2 FLOPs per multiply-add, and causal attention costs
    QK^T + AV = 2 * 2 * d per (query, key) pair with n/2 keys per query on average. Only the last
    real position of the last block reaches the head, so that block needs keys and values at every
    position (2 * 2d^2 per token), and the query, attention (n keys) and the rest of its linear layers
    (d^2 + d^2 + 8 d^2) at one position. Contenders that compute the whole last block (chapter, hf)
    get no credit for the rest. Layer norms, GELU, softmax, embeddings and the 2-class head are left
    out (< 1%).
    Useful GFLOP/s is shown as a share of the matrix-multiply peak measured in the same run and dtype:
    torch.matmul of two N x N matrices (N = 4096; 2048 on CPU with --quick), best of several runs,
    2 * N^3 / s, measured before and after the contenders (both kept in the JSON: their spread is a
    noise gauge), the best of all used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from filterd.model.batcher import Batcher
from filterd.model.engine import BF16_MAX_SCORE_DIFF, Engine, cpu_supports_bf16
from filterd.model.gpt2 import LABELS, PAD_TOKEN_ID, GPT2Classifier, GPTConfig
from filterd.model.tokenizer import Tokenizer
from filterd.model.bases import _CONV1D  # the weights Hugging Face stores transposed
from filterd.model.weights import load_model_dir
from testing.daemon import FilterdProcess
from testing.services import RedisServer
from trainer.data import read_sms

from bench.daemon_redis import SHARED, entry_ms, make_model, pct

CONTENDERS = ("chapter", "hf", "engine", "daemon")
CHAPTER_LENGTH = 120  # the chapter's padded length (its training set's longest message)
HF_BATCH = 32
SPAM = LABELS.index("spam")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# -- FLOPs and the matmul peak -------------------------------------------------------------------
def useful_flops(n: int, cfg: GPTConfig) -> float:
    """Useful FLOPs of one message of n real tokens (see the module docstring)."""
    d, L = cfg.n_embd, cfg.n_layer
    lower = 2.0 * n * 12 * d * d * (L - 1) + 2.0 * n * n * d * (L - 1)
    return lower + 2.0 * n * 2 * d * d + 2.0 * 10 * d * d + 4.0 * n * d


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> dict:
    """torch.matmul of two n x n matrices: 2 n^3 / best time, in GFLOP/s."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=c)  # warm-up (oneDNN/cuBLAS pick their kernels)
    sync(device)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync(device)
        runs.append(time.perf_counter() - t0)
    return {
        "n": n,
        "runs_s": runs,
        "gflops": 2 * n**3 / min(runs) / 1e9,
        "gflops_median": 2 * n**3 / sorted(runs)[len(runs) // 2] / 1e9,
    }


# -- contenders ----------------------------------------------------------------------------------
def summarize(
    wall: float, lat: list[float], real: Sequence[int], batches: list[tuple[int, int]], cfg: GPTConfig, dtype: str
) -> dict:
    """Common figures; `real` = tokens read per message, `batches` = (padded, real) tokens per forward pass."""
    flops = sum(useful_flops(n, cfg) for n in real)
    return {
        "dtype": dtype, "messages": len(real), "seconds": wall, "messages_per_s": len(real) / wall,
        "real_tokens": sum(real), "real_tokens_per_s": sum(real) / wall,
        "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99),
        "batches": len(batches), "mean_batch_size": len(real) / len(batches) if batches else None,
        "mean_padding_ratio": sum((p - r) / p for p, r in batches) / len(batches) if batches else None,
        "padded_token_share": 1 - sum(r for _, r in batches) / sum(p for p, _ in batches) if batches else None,
        "useful_gflop": flops / 1e9, "useful_gflops": flops / wall / 1e9,
    }  # fmt: skip


@torch.no_grad()
def run_chapter(model: GPT2Classifier, tokens: list[list[int]], device: torch.device) -> tuple[dict, list[float]]:
    """The chapter's classify_review, one message at a time: pad/truncate to 120, logits at position -1."""

    def one(seq: list[int]) -> float:
        ids = seq[:CHAPTER_LENGTH]
        ids = ids + [PAD_TOKEN_ID] * (CHAPTER_LENGTH - len(ids))
        x = torch.tensor(ids, device=device).unsqueeze(0)
        logits = model.head(model.ln_f(model.hidden_states(x)))[:, -1, :]  # the chapter's model(x)[:, -1, :]
        return torch.softmax(logits.float(), dim=-1)[0, SPAM].item()

    one(tokens[0])  # warm-up
    scores, lat = [], []
    t0 = time.perf_counter()
    for seq in tokens:
        s = time.perf_counter()
        scores.append(one(seq))
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    real = [min(len(t), CHAPTER_LENGTH) for t in tokens]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return summarize(wall, lat, real, [(CHAPTER_LENGTH, r) for r in real], model.config, dtype), scores


def hf_state_dict(model: GPT2Classifier) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face GPT2ForSequenceClassification's names (Conv1D weights transposed)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("head."):
            continue
        out["transformer." + k] = (v.t() if k.endswith(_CONV1D) else v).detach().float().contiguous()
    out["score.weight"] = model.state_dict()["head.weight"].detach().float().contiguous()
    return out


def make_hf(model: GPT2Classifier, directory: Path, device: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """Write a Hugging Face checkpoint of `model` and load it back as an ML user would; checks the weights."""
    import transformers
    from transformers import GPT2Config, GPT2ForSequenceClassification

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    c = model.config
    hf_cfg = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        layer_norm_epsilon=c.layer_norm_epsilon, num_labels=c.n_labels, pad_token_id=PAD_TOKEN_ID,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    state = hf_state_dict(model)
    hf = GPT2ForSequenceClassification(hf_cfg)
    result = hf.load_state_dict(state, strict=False)
    if result.unexpected_keys or result.missing_keys:
        raise RuntimeError(f"weights do not map onto GPT2ForSequenceClassification: {result}")
    hf.save_pretrained(directory)
    del hf
    hf = GPT2ForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()
    loaded = hf.state_dict()
    worst = max(float((loaded[k].float() - v).abs().max()) for k, v in state.items())
    if worst != 0.0:
        raise RuntimeError(f"the Hugging Face checkpoint does not hold our weights (max |diff| {worst})")
    return hf.to(device=device, dtype=dtype)


def run_hf(hf, tokens: list[list[int]], device: torch.device, cfg: GPTConfig) -> tuple[dict, list[float]]:  # type: ignore[no-untyped-def]
    """Batches of 32 in arrival order, right-padded with an attention mask; every message arrives at t0."""

    def batch(chunk: list[list[int]]) -> list[float]:
        T = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), T), PAD_TOKEN_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logits = hf(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        return torch.softmax(logits.float(), dim=-1)[:, SPAM].tolist()

    with torch.inference_mode():
        batch(tokens[:2])  # warm-up
        scores, lat, passes = [], [], []
        t0 = time.perf_counter()
        for start in range(0, len(tokens), HF_BATCH):
            chunk = tokens[start : start + HF_BATCH]
            scores += batch(chunk)
            lat += [time.perf_counter() - t0] * len(chunk)
            passes.append((len(chunk) * max(len(s) for s in chunk), sum(len(s) for s in chunk)))
        wall = time.perf_counter() - t0
    dtype = str(next(hf.parameters()).dtype).removeprefix("torch.")
    summary = summarize(wall, lat, [len(t) for t in tokens], passes, cfg, dtype)
    summary["attn_implementation"] = hf.config._attn_implementation
    return summary, scores


class _Passes:
    """Batcher observer: (padded, real) tokens of every forward pass."""

    def __init__(self) -> None:
        self.passes: list[tuple[int, int]] = []

    def on_batch(self, size: int, padded_tokens: int, real_tokens: int, seconds: float) -> None:
        self.passes.append((padded_tokens, real_tokens))

    def on_depth(self, depth: int) -> None:
        pass


async def _engine_async(engine: Engine, tokens: list[list[int]]) -> tuple[float, list[float], list[float], _Passes, dict]:
    observer = _Passes()
    batcher = Batcher(lambda: engine, observer=observer)  # the defaults: what `filterd serve` runs with
    config = {k: getattr(batcher, k) for k in ("max_batch_size", "max_batch_tokens", "max_queue")}
    config["max_wait_ms"] = batcher.max_wait_s * 1000
    await batcher.start()
    submitted, finished = [0.0] * len(tokens), [0.0] * len(tokens)
    futures = []
    t0 = time.perf_counter()
    for i, t in enumerate(tokens):
        submitted[i] = time.perf_counter()
        f = batcher.submit_nowait(t)
        f.add_done_callback(lambda _, i=i: finished.__setitem__(i, time.perf_counter()))
        futures.append(f)
    results = await asyncio.gather(*futures)
    wall = time.perf_counter() - t0
    await batcher.stop()
    return wall, [r.score for r in results], [b - a for a, b in zip(submitted, finished)], observer, config


def run_engine(engine: Engine, tokens: list[list[int]]) -> tuple[dict, list[float]]:
    engine.score_tokens([[PAD_TOKEN_ID] * 8])  # warm-up
    overhead = engine.measure_overhead()  # before the clock starts, as `filterd serve` does while loading
    wall, scores, lat, observer, config = asyncio.run(_engine_async(engine, tokens))
    summary = summarize(wall, lat, [len(t) for t in tokens], observer.passes, engine.model.config, engine.dtype)
    summary["batching"] = config | {"overhead_tokens": overhead}
    return summary, scores


def run_daemon(
    model: Path, texts: list[str], real: list[int], work: Path, device: str, dtype: str, cfg: GPTConfig
) -> tuple[dict, list[float]]:
    """`filterd serve` over a fresh redis-server, every message added at once (as bench.daemon_redis)."""
    redis = RedisServer(work / "redis").start()
    try:
        d = FilterdProcess(model, redis.url, work / "filterd.log", model__device=device, model__dtype=dtype).start(timeout=300)
        r = redis.client()
        t0 = time.perf_counter()
        pipe = r.pipeline(transaction=False)
        for i, t in enumerate(texts):
            pipe.xadd("filterd:in", {"text": t, "id": str(i)})
        pipe.execute()
        while r.xlen("filterd:out") < len(texts):
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        out = r.xrange("filterd:out")
        n_batches = int(d.metric("filterd_batch_size_count"))
        padding = d.metric("filterd_padding_ratio_sum") / d.metric("filterd_padding_ratio_count")
        padded_tokens = d.metric("filterd_batch_tokens_sum")
        info = next((ln for ln in d.get("/metrics")[1].splitlines() if ln.startswith("filterd_model_info{")), "")
        served = (re.search(r'dtype="([^"]+)"', info) or [None, "?"])[1]
        d.stop()
    finally:
        redis.stop()
        shutil.rmtree(work / "redis", ignore_errors=True)
    lat = [(entry_ms(oid) - entry_ms(f[b"entry"])) / 1000 for oid, f in out]
    scores = [0.0] * len(texts)
    for _, f in out:
        scores[int(f[b"id"])] = float(f[b"score"])
    summary = summarize(wall, lat, real, [], cfg, served)
    summary.update(batches=n_batches, mean_batch_size=len(texts) / n_batches, mean_padding_ratio=padding,
                   padded_token_share=1 - sum(real) / padded_tokens)  # fmt: skip
    return summary, scores


# -- checks, machine, table ----------------------------------------------------------------------
def compare(a: list[float], b: list[float], tolerance: float | None) -> dict:
    diff = (torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs()
    out = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
    if tolerance is not None:
        out |= {"tolerance": tolerance, "ok": out["max_abs_diff"] <= tolerance}
    return out


def machine_info(device: torch.device) -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in ("", platform.machine(), platform.processor()):
                cpu = value.strip()
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    import transformers

    info = {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}), "onednn_bf16": cpu_supports_bf16(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(), "device": device.type,
    }  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def table(results: dict, peaks: dict) -> str:
    rows = [
        "| contender | dtype | messages | mean batch | padding | messages/s | real tokens/s | p50 ms | p99 ms | useful GFLOP/s | % of matmul peak |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        peak = peaks.get(r["dtype"], {}).get("gflops")
        share = f"{100 * r['useful_gflops'] / peak:.1f}%" if peak else "n/a"
        rows.append(
            f"| {name} | {r['dtype']} | {r['messages']} | {r['mean_batch_size']:.1f} | {r['mean_padding_ratio']:.3f} | "
            f"{r['messages_per_s']:.1f} | {r['real_tokens_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['useful_gflops']:.1f} | {share} |"
        )
    rows.append("")
    for dtype, p in peaks.items():
        rows.append(f"matmul peak {dtype}: {p['gflops']:.1f} GFLOP/s ({p['n']}x{p['n']}, best of {len(p['all_gflops'])}"
                    f" runs in {len(p['measurements'])} rounds; rounds' best: {', '.join(f'{g:.1f}' for g in p['rounds_best'])})")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 messages, a 2048x2048 matmul peak on the CPU")
    ap.add_argument("--messages", type=int, help="first N UCI messages (default 2000, 200 with --quick)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32", help="chapter, engine and daemon (bf16 is checked by Engine.load)"
    )
    ap.add_argument(
        "--hf-dtype", choices=tuple(DTYPES), default="float32", help="the hf contender (default fp32: what an ML user runs)"
    )
    ap.add_argument("--base", default="random:gpt2", help="weights (random init is fine for speed)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of " + ",".join(CONTENDERS))
    ap.add_argument("--peak-repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, help="keep the model, HF checkpoint, Redis data and filterd log here")
    args = ap.parse_args()
    contenders = [c for c in CONTENDERS if c in args.contenders.split(",")]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    n_messages = args.messages or (200 if args.quick else 2000)
    peak_n = 2048 if args.quick and device.type == "cpu" else 4096
    texts = [e.text for e in read_sms(SHARED / "data/sms-spam-collection/SMSSpamCollection")][:n_messages]
    max_length = min(1024, max(Tokenizer.count(t) for t in texts))
    load_start = os.getloadavg()

    results: dict[str, dict] = {}
    scores: dict[str, list[float]] = {}
    peaks: dict[str, dict] = {}

    def measure_peaks(dtypes: set[str]) -> None:
        for dt in sorted(dtypes):
            m = matmul_peak(peak_n, DTYPES[dt], device, args.peak_repeats)
            print(f"  matmul peak {dt}: {m['gflops']:.1f} GFLOP/s (median {m['gflops_median']:.1f})", flush=True)
            peaks.setdefault(dt, {"n": peak_n, "measurements": []})["measurements"].append(m)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = make_model(args.base, work / "model", max_length)
        engine = Engine.load(model_dir, device=args.device, dtype=args.dtype)
        cfg = engine.model.config
        head_bias = float(engine.model.head.bias.detach().abs().max())
        t = time.perf_counter()
        tokens = engine.tokenizer.encode_batch(texts)
        tokenize_s = time.perf_counter() - t
        print(f"{args.base}: {len(texts)} messages, {sum(map(len, tokens))} tokens (max {max_length}), "
              f"engine serves {engine.dtype} on {device.type}, {torch.get_num_threads()} threads", flush=True)  # fmt: skip
        measure_peaks({engine.dtype} | ({args.hf_dtype} if "hf" in contenders else set()))
        if "chapter" in contenders:
            results["chapter"], scores["chapter"] = run_chapter(engine.model, tokens, device)
            print(f"  chapter: {results['chapter']['messages_per_s']:.1f} messages/s", flush=True)
        if "hf" in contenders:
            hf = make_hf(load_model_dir(model_dir)[0], work / "hf", device, DTYPES[args.hf_dtype])  # fp32 weights
            results["hf"], scores["hf"] = run_hf(hf, tokens, device, cfg)
            del hf
            print(f"  hf: {results['hf']['messages_per_s']:.1f} messages/s", flush=True)
        if "engine" in contenders:
            results["engine"], scores["engine"] = run_engine(engine, tokens)
            print(f"  engine: {results['engine']['messages_per_s']:.1f} messages/s", flush=True)
        precision = vars(engine.precision) if engine.precision else None
        del engine
        if "daemon" in contenders:
            real = [len(t) for t in tokens]
            results["daemon"], scores["daemon"] = run_daemon(model_dir, texts, real, work, args.device, args.dtype, cfg)
            print(f"  daemon: {results['daemon']['messages_per_s']:.1f} messages/s", flush=True)
        measure_peaks({r["dtype"] for r in results.values()} | set(peaks))

    for p in peaks.values():
        p["rounds_best"] = [m["gflops"] for m in p["measurements"]]
        p["all_gflops"] = [2 * p["n"] ** 3 / s / 1e9 for m in p["measurements"] for s in m["runs_s"]]
        p["gflops"] = max(p["rounds_best"])
    for r in results.values():
        r["matmul_peak_gflops"] = peaks[r["dtype"]]["gflops"]
        r["share_of_matmul_peak"] = r["useful_gflops"] / r["matmul_peak_gflops"]

    checks: dict[str, dict] = {}
    for a, b in (("engine", "hf"), ("engine", "daemon"), ("hf", "daemon")):
        if a in scores and b in scores:
            both32 = results[a]["dtype"] == results[b]["dtype"] == "float32"
            checks[f"{a}_vs_{b}"] = compare(scores[a], scores[b], 1e-3 if both32 else BF16_MAX_SCORE_DIFF)
    if "chapter" in scores and "engine" in scores:
        checks["chapter_vs_engine"] = compare(scores["chapter"], scores["engine"], None)

    machine = machine_info(device) | {
        "dtype": args.dtype,
        "hf_dtype": args.hf_dtype,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    lines = [f"{args.base}, {len(texts)} UCI messages on {device.type}; {machine['cpu']}, {machine['cores']} cores, "
             f"{machine['threads']} threads, torch {machine['torch']}, load average {load_start[0]:.2f} -> {machine['loadavg_end'][0]:.2f}",
             "", table(results, peaks), ""]  # fmt: skip
    for name, c in checks.items():
        verdict = f" {'ok' if c['ok'] else 'FAILED'} (tolerance {c['tolerance']:g})" if "ok" in c else " (report only)"
        lines.append(f"scores {name}: max |diff| {c['max_abs_diff']:.2e}, mean {c['mean_abs_diff']:.2e}{verdict}")
    text = "\n".join(lines)
    print("\n" + text)
    out = {
        "config": {"base": args.base, "messages": len(texts), "quick": args.quick, "device": args.device, "dtype": args.dtype,
                   "hf_dtype": args.hf_dtype, "max_length": max_length, "chapter_length": CHAPTER_LENGTH, "hf_batch": HF_BATCH,
                   "tokenize_s": tokenize_s, "head_bias_abs_max": head_bias, "bf16_load_check": precision,
                   "useful_flops": "per message of n real tokens: 2*n*12*d^2*(L-1) + 2*n^2*d*(L-1) + 4*n*d^2 + 20*d^2 + 4*n*d",
                   "overhead_tokens": results.get("engine", {}).get("batching", {}).get("overhead_tokens")},
        "machine": machine, "matmul_peak": peaks, "results": results, "checks": checks, "table": text,
    }  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if any(not c.get("ok", True) for c in checks.values()):
        raise SystemExit("score check failed: contenders that should agree do not")


if __name__ == "__main__":
    main()
