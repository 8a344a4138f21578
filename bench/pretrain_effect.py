"""What `filterd-trainer pretrain` buys on the offline splits: bench.accuracy runs with and without a pretrained base.

    python -m bench.accuracy --corpus uci --seeds 1 --write-pretrain-corpus work/pt        # train+val texts only
    filterd-trainer pretrain --base random:tiny --csv work/pt/uci-seed1 --out work/pt-uci-tiny ...
    python -m bench.accuracy --corpus uci --seeds 1 --json bench/results/accuracy_uci_seed1.json
    python -m bench.accuracy --corpus uci --seeds 1 --filterd-base work/pt-uci-tiny --json bench/results/accuracy_uci_pretrained.json
    python -m bench.pretrain_effect \\
        --run "random:tiny" bench/results/accuracy_uci_seed1.json \\
        --run "random:tiny + pretrain" bench/results/accuracy_uci_pretrained.json work/pt-uci-tiny \\
        --json bench/results/pretrain_effect.json --md bench/results/pretrain_effect.md

Each --run is LABEL ACCURACY_JSON [PRETRAIN_DIR]: the filterd and TF-IDF runs of that bench.accuracy result
file, and the base's pretrain.json (held-out LM loss before/after, steps, tokens, wall time), which is copied
into the output so it survives the pretrain directory. No training here: it only reads and tabulates.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

TESTS = {"uci": ("test", "test+holdout-unseen"), "spamassassin": ("test",)}


def _pct(t: dict, key: str, scale: float = 100.0) -> str:
    v, ci = t.get(key), t.get(f"{key}_ci")
    if v is None:
        return "–"
    return f"{scale * v:.2f}" + ("" if ci is None else f" [{scale * ci[0]:.2f}–{scale * ci[1]:.2f}]")


def collect(runs: Sequence[Sequence[str]], seeds: Sequence[int] | None = None) -> dict:
    doc: dict = {"benchmark": "bench.pretrain_effect", "command": "python -m bench.pretrain_effect " + " ".join(sys.argv[1:]),
                 "rows": []}  # fmt: skip
    for spec in runs:
        if len(spec) not in (2, 3):
            raise SystemExit(f"--run takes LABEL ACCURACY_JSON [PRETRAIN_DIR], got {list(spec)}")
        label, acc_path = spec[0], Path(spec[1])
        acc = json.loads(acc_path.read_text())
        pretrain = json.loads((Path(spec[2]) / "pretrain.json").read_text()) if len(spec) == 3 else None
        if pretrain is not None:
            pretrain.pop("config", None)
        for r in sorted(acc["runs"], key=lambda r: r["seed"]):
            if seeds and r["seed"] not in seeds:
                continue
            doc["rows"].append(
                {
                    "label": label if r["model"] == "filterd" else r["model"], "model": r["model"], "corpus": r["corpus"],
                    "seed": r["seed"], "source": str(acc_path), "accuracy_command": acc["commands"][-1],
                    "base": r["info"].get("base"), "train_s": r["train_s"], "load_avg_1m": r["load_avg_1m"],
                    "pretrain": pretrain if r["model"] == "filterd" else None,
                    "tests": {k: v for k, v in r["tests"].items() if k in TESTS[r["corpus"]]},
                }
            )  # fmt: skip
    return doc


def table(doc: dict) -> str:
    lines = [
        "| corpus | test set (n, spam) | seed | model / base | pretrain steps (tokens) | held-out LM loss before → after | "
        "pretrain wall s | fine-tune wall s | accuracy % [95% CI] | ham FPR % [CI] | ham FPR % at 99% spam recall [CI] | "
        "(1-ROCA)% [CI] |",
        "| --- " * 12 + "|",
    ]
    seen_baseline = set()
    for r in doc["rows"]:
        if r["model"] != "filterd":  # one TF-IDF row per corpus and seed (the same split in every file)
            if (r["corpus"], r["model"], r["seed"]) in seen_baseline:
                continue
            seen_baseline.add((r["corpus"], r["model"], r["seed"]))
        p = r["pretrain"]
        steps = f"{p['steps']} ({p['tokens_seen']:,})" if p else "–"
        loss = f"{p['val_loss_before']:.2f} → {p['val_loss_after']:.2f}" if p else "–"
        pwall = f"{p['seconds']:.0f}" if p else "–"
        for name, t in r["tests"].items():
            lines.append(
                f"| {r['corpus']} | {name} ({t['n']}, {t['tp'] + t['fn']}) | {r['seed']} | {r['label']} | {steps} | {loss} | {pwall} | "
                f"{r['train_s']:.0f} | {_pct(t, 'accuracy')} | {_pct(t, 'ham_fpr')} | {_pct(t, 'ham_fpr_at_99')} | "
                f"{_pct(t, 'roca_pct', 1.0)} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", nargs="+", action="append", required=True, metavar="ARG", help="LABEL ACCURACY_JSON [PRETRAIN_DIR]")
    ap.add_argument("--seeds", type=int, nargs="+", help="only these seeds' runs (default: all)")
    ap.add_argument("--note", action="append", default=[], help="free text stored in the JSON (repeatable)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    doc = collect(args.run, args.seeds)
    doc["notes"] = args.note
    doc["table"] = table(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    if args.md:
        args.md.write_text(f"```sh\n{doc['command']}\n```\n\n{doc['table']}\n")
    print(doc["table"])


if __name__ == "__main__":
    main()
