"""The ``kaon`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from kaon import __version__, bench, registry

__all__ = ["main"]


def _config(text: str) -> bench.Config:
    name, _, args = text.partition(":")
    return bench.Config(text, name.strip(), registry.parse_kwargs(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaon", description="kaon: memory-efficient, fast PyTorch optimizers."
    )
    parser.add_argument("--version", action="version", version=f"kaon {__version__}")
    commands = parser.add_subparsers(dest="command")

    b = commands.add_parser(
        "bench",
        help="state bytes per parameter and step time against torch AdamW",
        description="Optimizer state bytes per parameter and median step time of kaon "
        "configurations against torch.optim.AdamW, measured in the same run.",
    )
    b.add_argument("--suite", default="llm,sdxl,lora",
                   help="comma-separated suites: llm, sdxl, lora (default: all three)")
    b.add_argument("--safetensors", metavar="PATH",
                   help="benchmark the shapes of a model read from a .safetensors header")
    b.add_argument("--filter", default="", metavar="PREFIX",
                   help="with --safetensors: only tensors whose name starts with PREFIX")
    b.add_argument("--lora-rank", type=int, metavar="R",
                   help="with --safetensors: LoRA pairs of rank R instead of the weights")
    b.add_argument("--config", action="append", metavar="NAME[:k=v,...]",
                   help="a configuration to benchmark, e.g. 'Adakaon:momentum_dtype=int8,"
                   "betas=(0.9,0.999)' (repeatable; default: the Adakaon memory dial)")
    b.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    b.add_argument("--warmup", type=int, default=5, help="untimed warmup steps (default 5)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    b.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="parameter and gradient dtype (default float32)")
    b.add_argument("--quick", action="store_true",
                   help="smaller suites and fewer steps: a run of well under a minute on a CPU")
    b.add_argument("--json", metavar="PATH", help="also write every row as JSON")

    commands.add_parser("list", help="the registered optimizers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, cls in registry.OPTIMIZERS.items():
            print(f"{name:12s} {cls.__module__}.{cls.__qualname__}")
        return 0
    if args.command != "bench":
        parser.print_help()
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.safetensors:
        suites = [f"safetensors:{args.safetensors}"]
    else:
        suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    steps, warmup = (min(args.steps, 5), min(args.warmup, 2)) if args.quick else (
        args.steps, args.warmup)
    try:
        configs = [_config(c) for c in args.config] if args.config else None
        rows = bench.run(suites, configs=configs, quick=args.quick, steps=steps, warmup=warmup,
                         device=args.device, dtype=args.dtype, prefix=args.filter,
                         lora_rank=args.lora_rank)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"kaon bench: {error}", file=sys.stderr)
        return 2
    if args.json:
        bench.write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
