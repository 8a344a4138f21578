"""`filterd-trainer` command line: prepare, fit, pretrain, evaluate, generate, learn."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from filterd.cli import _config_args, add_version, run_main, safe_text
from filterd.errors import FilterdError
from filterd.config import EXPLAIN_METHODS

if TYPE_CHECKING:
    from filterd.config import LoggingConfig


def cmd_prepare(args: argparse.Namespace) -> int:
    from trainer.data import prepare

    manifest = prepare(
        Path(args.out), sms=args.sms, download_sms=args.download_sms, email_dir=args.email_dir,
        seed=args.seed, balance=args.balance,
    )  # fmt: skip
    for split, by_label in manifest.counts.items():
        total = sum(by_label.values())
        print(f"{split:8s} {total:6d}  " + "  ".join(f"{k} {v}" for k, v in sorted(by_label.items())))
    for record in manifest.sources or []:  # several sources: each one's share of the splits
        print(f"  {record['source']}: " + "  ".join(f"{s} {sum(c.values())}" for s, c in record["counts"].items()))
    print(f"wrote {args.out}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from trainer.fit import FitConfig, fit

    cfg = FitConfig(
        data=Path(args.data), base=args.base, out=Path(args.out), trainable=args.trainable, epochs=args.epochs,
        lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size, max_length=args.max_length,
        seed=args.seed, device=args.device, eval_every=args.eval_every, target_ham_fpr=args.target_ham_fpr,
    )  # fmt: skip
    result = fit(cfg)
    print(json.dumps({"model": str(result.model_dir), "version": result.meta.version, "seconds": round(result.seconds, 1),
                      "threshold": result.meta.threshold, "metrics": {k: m.to_dict() for k, m in result.metrics.items()}}))  # fmt: skip
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from filterd.config import parse_duration

    from trainer.pretrain import PretrainConfig, pretrain

    if args.steps is not None and args.time is not None:
        raise FilterdError("give --steps or --time, not both")
    try:
        time_s = parse_duration(args.time) if args.time is not None else None
    except ValueError as e:
        raise FilterdError(f"--time: {e}") from None
    cfg = PretrainConfig(
        base=args.base, out=Path(args.out), text=args.text, mail=args.mail, csv=args.csv, store=args.store,
        reservoir=args.reservoir, steps=args.steps, time_s=time_s, block_size=args.block_size, batch_size=args.batch_size,
        lr=args.lr, warmup=args.warmup, val_fraction=args.val_fraction, seed=args.seed, resume=args.resume, device=args.device,
        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
    )  # fmt: skip
    result = pretrain(cfg)
    print(json.dumps({"out": str(result.out), "steps": result.steps, "tokens_seen": result.tokens_seen,
                      "val_loss_before": result.val_loss_before, "val_loss_after": result.val_loss_after,
                      "seconds": round(result.seconds, 1), "resumed_from": result.resumed_from}))  # fmt: skip
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from filterd.model.engine import Engine

    from trainer.report import format_metrics_line
    from trainer.fit import SPLITS, evaluate_model
    from trainer.operating import OperatingPoint, format_points, split_points

    data = Path(args.data)
    splits = [s for s in SPLITS if (data / f"{s}.csv").is_file()] if args.split == "all" else [args.split]
    for s in splits:
        if not (data / f"{s}.csv").is_file():
            raise FilterdError(f"{data}: no {s}.csv")
    engine = Engine.load(args.model, device=args.device)
    reports = evaluate_model(engine, data, splits)
    if args.explain:
        _explained_report(args, engine, data, reports)
    points = split_points({r.split: (r.labels, r.scores) for r in reports})
    if args.json:
        print(json.dumps({"model": engine.version, "splits": {r.split: r.metrics.to_dict() for r in reports},
                          "operating_points": [p.to_dict() for p in points],
                          "recorded_operating_points": engine.meta.operating_points}, indent=2))  # fmt: skip
    else:
        for r in reports:
            print(format_metrics_line(r.split, r.metrics))
        if points:
            print("\nOperating points on this data (thresholds set on its holdout and val ham, checked on test):")
            print("\n".join(format_points(points)))
        if engine.meta.operating_points:
            print(f"\nOperating points recorded in {engine.version}'s filterd.json (what the fit measured):")
            print("\n".join(format_points([OperatingPoint.from_dict(p) for p in engine.meta.operating_points])))
    return 0


def _explained_report(args: argparse.Namespace, engine: Any, data: Path, reports: list[Any]) -> None:
    """report.md with the metrics and the explanation of every false positive and false negative (at most --max-errors per split)."""
    from filterd.model.explain import explain

    from trainer.data import read_split
    from trainer.report import errors_section, write_report

    if args.top < 1 or args.max_errors < 0:
        raise FilterdError("--top must be at least 1 and --max-errors at least 0")
    extra: list[str] = []
    for r in reports:
        examples = read_split(data / f"{r.split}.csv")
        wrong = [("fp" if y == 0 else "fn", e, s) for e, y, s in zip(examples, r.labels, r.scores)
                 if (s >= r.metrics.threshold) != (y == 1)]  # fmt: skip
        wrong.sort(key=lambda w: -abs(w[2] - r.metrics.threshold))  # the most confident mistakes first
        errors = [(k, e.id, s, explain(engine, e.text, top=args.top, method=args.method)) for k, e, s in wrong[: args.max_errors]]
        extra += errors_section(r.split, errors)
        if len(wrong) > args.max_errors:
            extra += [
                f"({len(wrong) - args.max_errors} more errors on {r.split} not explained: --max-errors {args.max_errors})",
                "",
            ]
    info = {"version": engine.version, "base": engine.meta.base, "data": str(data)}
    write_report(Path(args.report), title=f"Evaluation of {engine.version}", model_info=info, reports=reports, extra=extra)
    print(f"wrote {args.report}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from filterd.model.tokenizer import Tokenizer
    from filterd.model.bases import build_model, resolve_base
    from filterd.model.weights import load_model_dir

    if args.max_new_tokens < 0:
        raise FilterdError("--max-new-tokens must be at least 0")
    if (Path(args.base) / "filterd.json").is_file():  # a fine-tuned filterd model keeps its backbone
        model, _ = load_model_dir(Path(args.base))
    else:
        model = build_model(resolve_base(args.base))
    model.eval()
    prompt = Tokenizer(1024).encode(safe_text(args.prompt))
    if len(prompt) + args.max_new_tokens > model.config.n_positions:
        raise FilterdError(f"prompt + new tokens exceed the model's {model.config.n_positions} positions")
    out = model.generate(torch.tensor([prompt]), args.max_new_tokens)[0, len(prompt) :].tolist()
    print(json.dumps(out) if args.ids else Tokenizer(1024).decode(prompt + out))
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    from filterd.config import load_config

    from trainer.learn import LearnReport, learn
    from filterd.store.labels import LabelStore

    if not args.sources:
        raise FilterdError("learn needs --spam PATH... and/or --ham PATH...")
    cfg = load_config(args.config, args.set)
    for _, paths in args.sources:  # a typo on the command line: say so before writing anything
        for path in paths:
            if not Path(path).exists():
                raise FilterdError(f"{safe_text(path)}: no such file or directory")
    reports: dict[str, LearnReport] = {}
    with LabelStore(cfg.trainer.store) as store:
        for label, paths in args.sources:  # in command-line order: for a message given twice, the later option wins
            report = learn(store, paths, label)
            for where, reason in report.skipped:
                print(f"skipped {safe_text(where)}: {reason}", file=sys.stderr)
            reports.setdefault(label, LearnReport(label)).merge(report)
        counts = store.counts()
    for report in reports.values():
        print(report.summary())
    print(f"store {safe_text(str(cfg.trainer.store))}: {counts['spam']} spam, {counts['ham']} ham")
    return 0


def cmd_refit(args: argparse.Namespace) -> int:
    from filterd.config import load_config

    from trainer.service import refit_command

    if not args.once:
        raise FilterdError("refit runs one cycle and needs --once; `filterd-trainer serve` runs them periodically")
    cfg = load_config(args.config, args.set)
    _setup_logging(cfg.logging)
    result = refit_command(cfg, textfile=args.textfile, base_model=args.base_model)
    print(json.dumps(result.to_dict()))
    return 1 if result.outcome == "failed" else 0  # promoted, rejected and skipped are all normal outcomes


def cmd_serve(args: argparse.Namespace) -> int:
    from filterd.config import load_config

    from trainer.service import serve

    cfg = load_config(args.config, args.set)
    _setup_logging(cfg.logging)
    return serve(cfg, args.base_model)


def cmd_rollback(args: argparse.Namespace) -> int:
    from filterd.config import load_config

    from trainer.publish import ModelStore

    cfg = load_config(args.config, args.set)
    models = ModelStore(cfg.trainer.models_dir)
    before = models.current_version()
    version = models.rollback()
    if cfg.redis.enabled and ModelStore.announce(cfg.redis.url, cfg.redis.model_channel, version) is None:
        print(
            f"warning: could not announce on {cfg.redis.model_channel}; filterd picks the change up by polling", file=sys.stderr
        )
    print(f"current: {before} -> {version}")
    return 0


def _setup_logging(cfg: LoggingConfig) -> None:
    from filterd.obs.logs import setup_logging

    setup_logging(cfg.level, cfg.format)


class _LabelledPaths(argparse.Action):
    """--spam/--ham PATH...: collect (label, paths) in the order given."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option_string: str | None = None
    ) -> None:
        sources = list(getattr(namespace, self.dest) or [])
        sources.append((self.const, list(values)))  # type: ignore[call-overload]
        setattr(namespace, self.dest, sources)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="filterd-trainer", description="prepare data, fine-tune and evaluate filterd models")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="read labelled corpora, balance, split 70/10/20 (each source on its own)")
    # One source, or SMS and e-mail together; prepare() gives the one-line error when none is given.
    src = p.add_mutually_exclusive_group()
    src.add_argument("--sms", type=Path, help="UCI SMS Spam Collection file (label<TAB>text)")
    src.add_argument("--download-sms", action="store_true", help="download the UCI zip and verify its sha256")
    p.add_argument("--email-dir", type=Path, help="folders spam*/ham* of raw messages, Maildirs or mbox files")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--balance", choices=("undersample", "none"), default="undersample")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("fit", help="fine-tune a classifier and write a model directory")
    p.add_argument("--data", required=True, help="directory written by prepare")
    p.add_argument("--base", required=True, help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | checkpoint DIR | random:NAME")
    p.add_argument("--out", required=True)
    p.add_argument("--trainable", default="last-block", choices=("head", "last-block", "last-2-blocks", "all"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="tokens per message (default: longest training message, ≤ 1024)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation-loss points")
    p.add_argument("--target-ham-fpr", type=float, help="pick the threshold on val for this ham false-positive rate")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("pretrain", help="continued next-token training of the backbone on unlabelled text")
    p.add_argument("--base", required=True, help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | checkpoint DIR | random:NAME")
    p.add_argument("--out", required=True, help="Hugging Face checkpoint directory to write (fit --base OUT)")
    p.add_argument("--text", nargs="+", action="extend", type=Path, default=[], metavar="PATH",
                   help="text files (or directories of them): one document per line")  # fmt: skip
    p.add_argument("--mail", nargs="+", action="extend", type=Path, default=[], metavar="PATH",
                   help="message files, mbox files, Maildirs or directories of them")  # fmt: skip
    p.add_argument("--csv", nargs="+", action="extend", type=Path, default=[], metavar="PATH",
                   help="split CSVs, or prepare's data directories (train, val, holdout; test stays unseen); labels ignored")  # fmt: skip
    p.add_argument("--store", type=Path, help="label store (SQLite); labels ignored")
    p.add_argument("--reservoir", nargs="+", action="extend", type=Path, default=[], metavar="SQLITE",
                   help="the daemon's reservoirs of classified texts ([trainer] reservoir)")  # fmt: skip
    p.add_argument("--steps", type=int, help="optimiser steps (default 1000 unless --time is given)")
    p.add_argument("--time", help="wall-clock budget, e.g. 10m or 2h")
    p.add_argument("--block-size", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (at most a tenth of --steps)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="documents held out for the LM loss")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its saved state")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between saves of the resume state")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out loss points")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("evaluate", help="metrics of a model on prepared splits")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=("test", "val", "train", "holdout", "all"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--explain", action="store_true", help="write --report with the explanations of false positives and false negatives"
    )
    p.add_argument("--report", default="report.md", help="with --explain: the Markdown report to write (default ./report.md)")
    p.add_argument("--top", type=int, default=5, help="with --explain: words of each sign")
    p.add_argument("--max-errors", type=int, default=100, help="with --explain: errors explained per split, most confident first")
    p.add_argument(
        "--method", default=EXPLAIN_METHODS[0], choices=EXPLAIN_METHODS, help="with --explain: how contributions are computed"
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="greedy continuation with the LM head (weight-loading check)")
    p.add_argument("--base", required=True, help="a BASE as for fit, or a filterd model directory")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--ids", action="store_true", help="print the generated token ids as a JSON list")
    p.add_argument("prompt", metavar="PROMPT")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("learn", help="add labelled messages to the label store: files, directories, mbox, Maildir")
    _config_args(p, required=True)
    for label in ("spam", "ham"):
        p.add_argument(f"--{label}", dest="sources", nargs="+", metavar="PATH", action=_LabelledPaths, const=label,
                       help=f"{label}: message files, mbox files, Maildirs or directories of them")  # fmt: skip
    p.set_defaults(func=cmd_learn, sources=[])

    p = sub.add_parser("refit", help="one refit cycle now: take in waiting labels, rebalance, fit, evaluate, gate, publish")
    _config_args(p, required=True)
    p.add_argument("--once", action="store_true", help="run one cycle and exit (0: promoted, rejected or skipped)")
    p.add_argument("--textfile", type=Path, help="also write the trainer metrics here, for node_exporter's textfile collector")
    p.add_argument("--base-model", type=Path, help="model directory to start from while models_dir has no current model")
    p.set_defaults(func=cmd_refit)

    p = sub.add_parser("serve", help="the periodic refit service with its label intake and metrics endpoint")
    _config_args(p, required=True)
    p.add_argument("--base-model", type=Path, help="model directory to start from while models_dir has no current model")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("rollback", help="point models_dir/current back at the previously published version")
    _config_args(p, required=True)
    p.set_defaults(func=cmd_rollback)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("filterd-trainer", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
