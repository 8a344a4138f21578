"""`filterd` command line: serve, classify, check-config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from filterd import __version__
from filterd.errors import FilterdError
from filterd.obs.logs import setup_logging

CHUNK = 512  # messages scored per engine call when streaming from stdin


def run_main(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, dispatch to args.func, and turn every failure into one line on stderr."""
    args = parser.parse_args(argv)
    setup_logging("warning")  # escaped lines from the start; `serve` sets [logging] once it has the config
    try:
        return int(args.func(args) or 0)
    except FilterdError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `filterd classify ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # never a traceback for users; FILTERD_DEBUG=1 shows it
        if os.environ.get("FILTERD_DEBUG"):
            traceback.print_exc()
        print(f"{prog}: internal error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 70


def safe_text(s: str) -> str:
    """Undo surrogate escapes from argv/filenames: invalid UTF-8 becomes U+FFFD, not a crash."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _stdin_lines() -> Iterator[str]:
    for raw in sys.stdin.buffer:
        yield raw.rstrip(b"\r\n").decode("utf-8", "replace")


def _email_texts(paths: Sequence[str]) -> Iterator[str]:
    from filterd.mail.text import extract_text

    for p in paths:
        try:
            raw = Path(p).read_bytes()
        except OSError as e:
            raise FilterdError(f"{safe_text(p)}: cannot read ({e.strerror})") from None
        yield extract_text(raw)


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def cmd_classify(args: argparse.Namespace) -> int:
    from filterd.model.engine import Engine

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise FilterdError(f"--threshold must be within 0..1, got {args.threshold}")
    engine = Engine.load(args.model, device=args.device)
    if args.email:
        if not args.text:
            raise FilterdError("--email needs one or more message files")
        texts: Iterable[str] = _email_texts(args.text)
    else:
        texts = (safe_text(t) for t in args.text) if args.text else _stdin_lines()
    if args.top < 1:
        raise FilterdError(f"--top must be at least 1, got {args.top}")
    for chunk in chunks(texts, CHUNK):
        for text, v in zip(chunk, engine.classify_texts(chunk, threshold=args.threshold)):
            line = {"verdict": v.verdict, "score": round(v.score, 6), "model": engine.version, "tokens": v.tokens}
            if args.explain:
                from filterd.model.explain import explain

                line["explanation"] = explain(engine, text, top=args.top, method=args.method).to_json()
            sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from filterd.config import check_config
    from filterd.daemon import serve

    cfg = check_config(args.config, args.set)
    setup_logging(cfg.logging.level, cfg.logging.format)
    for warning in cfg.warnings():
        logging.getLogger("filterd").warning("config: %s", warning)
    for line in cfg.deprecations():
        logging.getLogger("filterd").warning("config: %s", line)
    return serve(cfg)


def cmd_check_config(args: argparse.Namespace) -> int:
    from filterd.config import check_config

    cfg = check_config(args.config, args.set)
    for warning in [*cfg.warnings(), *_operating_point_warnings(cfg)]:
        print(f"warning: {warning}", file=sys.stderr)
    for line in cfg.deprecations():
        print(f"deprecated: {line}", file=sys.stderr)
    if args.print:
        sys.stdout.write(cfg.to_toml())
    print(f"{args.config or '(defaults)'}: ok", file=sys.stderr)
    return 0


def _operating_point_warnings(cfg: Any) -> list[str]:
    """"fpr:" levels checked against the model at [model] path now, not first at the daemon's start:
    a ConfigError when that model lacks a point they need, a warning when there is no model to ask yet."""
    from filterd.errors import ConfigError, ModelError
    from filterd.model.weights import META_FILE, ModelMeta
    from filterd.policy.decision import Policy

    policy = Policy.from_config(cfg)
    if not policy.targets():
        return []
    meta_file = Path(cfg.model.path) / META_FILE
    if not meta_file.is_file():
        return [f"[policy] has fpr: levels; {meta_file} is not there to check them against (the daemon checks at load)"]
    try:
        meta = ModelMeta.from_json(meta_file.read_text(), str(meta_file))
        policy.check_model(meta.fpr_thresholds(), meta.version)
    except (ModelError, OSError) as e:
        raise ConfigError(str(e)) from None
    return []


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def _config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", required=required, help="TOML configuration file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one key (repeatable)")


def _explain_args(p: argparse.ArgumentParser) -> None:
    from filterd.config import EXPLAIN_METHODS

    p.add_argument(
        "--explain", action="store_true", help="add the words that raised and lowered P(spam) most (filterd/model/explain.py)"
    )
    p.add_argument("--top", type=int, default=5, help="with --explain: words of each sign")
    p.add_argument(
        "--method", default=EXPLAIN_METHODS[0], choices=EXPLAIN_METHODS, help="with --explain: how contributions are computed"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="filterd", description="GPT-2 spam filter for mail and SMS")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("classify", help="classify texts (or raw RFC 822 files with --email); JSON lines out")
    p.add_argument("--model", required=True, help="model directory (filterd.json + model.safetensors)")
    p.add_argument("--threshold", type=float, help="P(spam) at or above which a message is spam (default: the model's)")
    p.add_argument("--email", action="store_true", help="TEXT arguments are files holding raw RFC 822 messages")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _explain_args(p)
    p.add_argument("text", nargs="*", metavar="TEXT", help="messages; none: one message per line on stdin")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("serve", help="the daemon: Redis ingress, micro-batched inference, metrics")
    _config_args(p, required=False)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a configuration; non-zero exit and a one-line reason when invalid")
    _config_args(p, required=True)
    p.add_argument("--print", action="store_true", help="print the effective configuration as TOML")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("filterd", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
