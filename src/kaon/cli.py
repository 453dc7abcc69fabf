"""The ``kaon`` command: ``kaon battery``, ``kaon bench``, ``kaon list``, ``kaon --version``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# torch, kaon.bench, kaon.registry and kaon.battery are imported by the commands that use them,
# so ``kaon --help`` and ``kaon --version`` start in a fraction of a second
from kaon._version import __version__

__all__ = ["main"]

_BENCH_EPILOG = """\
configurations:
  Without --config the default set runs: torch AdamW foreach and fused, Adakaon with
  betas=(0.0, 0.999) (no momentum), 4bit, int8 and bfloat16 momentum, and on the lora suite
  also int8 with foreach=False (the per-parameter loop). Each --config NAME[:k=v,...] adds one
  row instead (repeat it for several); NAME is a registered optimizer (see `kaon list`) and the
  arguments use Python literals, with bare words taken as strings. The two torch AdamW rows
  always run, and every row uses lr=1e-4 unless it sets lr.

examples:
  kaon bench                                  # llm, sdxl and lora suites, default rows
  kaon bench --quick                          # smaller suites, 3 timed steps (about a minute)
  kaon bench --suite lora --dtype bfloat16 --threads 2
  kaon bench --config "Adakaon:momentum_dtype=int8,betas=(0.9,0.99)" --config AdamW
  kaon bench --safetensors model.safetensors --filter model.diffusion_model. --lora-rank 16
  kaon bench --suite safetensors:model.safetensors --json rows.json
  kaon bench --device cuda --dtype bfloat16     # adds kaon's Triton kernels and 8/4-bit peers
"""


_BATTERY_EPILOG = """\
examples:
  kaon battery                                   # the quick profile, default set
  kaon battery --only "torch.AdamW,Lion,Nekaon"   # a few entries (names from --list)
  kaon battery --optimizer torch.optim:SGD "lr=0.05,momentum=0.9"
  kaon battery --render-only                     # tables and plots from the cache
  kaon battery --only Autokaon --dry-run         # check the selection, train nothing
  kaon battery --profile full --seeds 0,1        # the upstream-sized protocol
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaon", description="kaon: memory-efficient, fast PyTorch optimizers."
    )
    parser.add_argument("--version", action="version", version=f"kaon {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    b = commands.add_parser(
        "bench",
        help="optimizer state bytes per parameter and step time against torch AdamW",
        description="Optimizer state bytes per parameter and median optimizer.step() time of\n"
        "kaon configurations against torch.optim.AdamW (foreach and fused), all measured in\n"
        "the same run on the same parameters and fixed random gradients (only the step is\n"
        "timed: no forward or backward pass).",
        epilog=_BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--suite", metavar="SUITES",
                   help="comma-separated suites: llm (~56M params), sdxl (~53M), lora (1,434 "
                   "rank-8 tensors), safetensors:PATH (default: llm,sdxl,lora; with "
                   "--safetensors: only that file)")
    b.add_argument("--safetensors", metavar="PATH",
                   help="add a suite of the tensor shapes in a .safetensors file (its header "
                   "only; no weights are read)")
    b.add_argument("--filter", default="", metavar="PREFIX",
                   help="safetensors suites: only tensors whose name starts with PREFIX")
    b.add_argument("--lora-rank", type=_positive, metavar="R",
                   help="safetensors suites: benchmark rank-R LoRA pairs A (R, numel/out) and "
                   "B (out, R) for every weight of 2 or more dimensions instead of the weights")
    b.add_argument("--config", action="append", metavar="NAME[:k=v,...]",
                   help="a configuration to benchmark instead of the default set, e.g. "
                   "'Adakaon:momentum_dtype=int8,cautious=False' (repeatable)")
    b.add_argument("--steps", type=_positive,
                   help="timed steps per configuration (default 20; 3 with --quick)")
    b.add_argument("--warmup", type=_non_negative,
                   help="untimed steps before timing (default 5; 1 with --quick)")
    b.add_argument("--threads", type=_positive, metavar="N",
                   help="torch.set_num_threads(N) (default: torch's choice)")
    b.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: cuda when available, else cpu")
    b.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="parameter and gradient dtype (default float32)")
    b.add_argument("--seed", type=int, default=0, help="seed of parameters and gradients")
    b.add_argument("--kernels", action="store_true",
                   help="add kaon's Triton kernels (fused='triton') and the 8/4-bit AdamWs of "
                   "bitsandbytes and torchao (the default on cuda); rows that cannot run on the "
                   "device are skipped with a note")
    b.add_argument("--peak-gbps", type=float, metavar="GBPS",
                   help="the device's peak memory bandwidth in GB/s (default: from the device)")
    b.add_argument("--quick", action="store_true",
                   help="smaller suites (llm 4.2M and sdxl 5.0M parameters, lora 256 "
                   "tensors), 1 warmup and 3 timed steps: about a minute on 2 shared CPU "
                   "cores; it prints its wall and CPU time")
    b.add_argument("--json", metavar="PATH", help="also write every row as JSON to PATH")
    b.add_argument("--dry-run", action="store_true",
                   help="check the suites and --config rows, print them and exit without "
                   "measuring")

    t = commands.add_parser(
        "battery",
        help="train small real tasks with every optimizer and rank them",
        description="The control battery: trains a small-data diffusion model (procedural\n"
        "images and real face photographs), a small transformer language model and the LoRA\n"
        "bag with every optimizer, then ranks them on held-out loss, generalization gap,\n"
        "convergence, step time, LoRA-bag step time, state bytes per parameter and\n"
        "constant-LR behaviour. Writes OUT/report.md, OUT/results.json and PNG plots; runs\n"
        "are cached in OUT/cache.json, so only what is missing is measured.",
        epilog=_BATTERY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--profile", choices=["quick", "full", "tiny"], default="quick",
                   help="quick (default): 100-120 s of CPU time in 2 worker processes; full: "
                   "the upstream protocol sizes (hours on a CPU); tiny: seconds, for tests")
    t.add_argument("--only", metavar="NAME,...",
                   help="measure only these entries (see --list; 'peers' adds every peer)")
    t.add_argument("--optimizer", nargs="+", action="append", metavar=("MODULE:CLASS", "ARGS"),
                   help="add your own optimizer, e.g. --optimizer torch.optim:SGD "
                   "'lr=0.05,momentum=0.9' (lr and lr_const set its learning rates; repeatable)")
    t.add_argument("--seeds", metavar="S,...", help="seeds instead of the profile's (e.g. 0,1)")
    t.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu (default) or cuda / cuda:N; the full profile is meant for a GPU")
    t.add_argument("--threads", type=_positive, metavar="N",
                   help="torch.set_num_threads(N) (default 1: tiny models run fastest on one "
                   "thread, and results depend on the thread count)")
    t.add_argument("--jobs", type=_positive, metavar="N",
                   help="worker processes for the training runs (default: the usable CPUs, at "
                   "most 4); results do not depend on it, and step times are always timed "
                   "afterwards in one process")
    t.add_argument("--out", default="battery-out", metavar="DIR",
                   help="output folder (default battery-out)")
    t.add_argument("--render-only", action="store_true",
                   help="rebuild the tables and plots from the cache without measuring")
    t.add_argument("--list", action="store_true", help="list the battery entries and exit")
    t.add_argument("--dry-run", action="store_true",
                   help="check the selection, --optimizer, --seeds and --out, print the entries "
                   "and exit without training")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    commands.add_parser("list", help="list the registered optimizers",
                        description="The optimizers kaon bench and kaon.registry.create know.")
    return parser


def _check_out(out: str) -> None:
    """Raise ``ValueError`` naming ``--out`` when ``out`` cannot be a writable output folder
    (it or a parent is a regular file, or the nearest existing folder is not writable)."""
    import os
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out!r}: {str(path)!r} exists and is not a folder")
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"--out {out!r}: {str(parent)!r} is a regular file, not a folder")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out!r}: the folder {str(parent)!r} is not writable")


def _check_render_only(out: str) -> None:
    """Raise ``ValueError`` when ``OUT/cache.json`` is missing or holds no runs, so that
    ``--render-only`` never writes an empty report."""
    import json
    from pathlib import Path

    cache = Path(out) / "cache.json"
    try:
        data = json.loads(cache.read_text())
    except FileNotFoundError:
        raise ValueError(f"--render-only: no cache at {str(cache)!r}; run kaon battery "
                         f"--out {out!r} without --render-only first") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--render-only: cannot read {str(cache)!r}: {error}") from None
    if not data:
        raise ValueError(f"--render-only: {str(cache)!r} holds no runs; run kaon battery "
                         f"--out {out!r} without --render-only first")


def _battery(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import dataclasses

    from kaon import battery

    if args.list:
        for entry in battery.ENTRIES:
            ok, why = entry.available()
            mark = "default" if entry.default else ("optional" if ok else f"not here: {why}")
            print(f"{entry.name:22s} {entry.family:9s} {mark:9s} {entry.blurb}")
        return 0
    try:
        _check_out(args.out)
        if args.render_only:
            _check_render_only(args.out)
        entries = battery.select(args.only)
        for spec in args.optimizer or []:
            if len(spec) > 2:
                parser.error("--optimizer takes MODULE:CLASS and at most one argument string")
            entries.append(battery.entry_from_spec(spec[0], spec[1] if len(spec) > 1 else ""))
        profile = battery.PROFILES[args.profile]
        if args.seeds:
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
            if not seeds:
                parser.error("--seeds needs at least one seed")
            profile = dataclasses.replace(profile, seeds=seeds, name=f"{profile.name}-s"
                                          + "-".join(map(str, seeds)))
        if args.dry_run:
            print(f"profile {profile.name}; entries: " + ", ".join(e.name for e in entries))
            return 0
        battery.run_battery(entries, profile=profile, out=args.out, device=args.device,
                            threads=args.threads or 1, render_only=args.render_only,
                            jobs=args.jobs or battery.default_jobs(),
                            progress=not args.no_progress)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"kaon battery: error: {error}", file=sys.stderr)
        return 2
    return 0


def _list() -> int:
    import shutil
    import textwrap

    from kaon import registry

    rows = []
    for name, cls in registry.OPTIMIZERS.items():
        paragraph = (cls.__doc__ or "").strip().split("\n\n", 1)[0]
        rows.append((name, f"{cls.__module__}.{cls.__qualname__}", " ".join(paragraph.split())))
    name_width = max(len(r[0]) for r in rows)
    width = shutil.get_terminal_size((100, 24)).columns
    for name, path, summary in rows:  # name and class path aligned, the summary wrapped below
        print(f"{name:<{name_width}s}  {path}")
        for line in textwrap.wrap(summary, max(width - 4, 40)):
            print("    " + line)
    return 0


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import torch

    from kaon import bench

    suites = [s.strip() for s in args.suite.split(",") if s.strip()] if args.suite else []
    if args.safetensors:
        suites.append(f"safetensors:{args.safetensors}")
    if not suites:
        suites = list(bench.SUITES)
    if (args.filter or args.lora_rank) and not any(s.startswith("safetensors:") for s in suites):
        parser.error("--filter and --lora-rank apply to safetensors suites only")
    steps = args.steps or (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        configs = [bench.parse_config(c) for c in args.config] if args.config else None
        if args.dry_run:
            import os

            for suite in suites:
                name, _, path = suite.partition(":")
                if name == "safetensors" and not os.path.isfile(path):
                    raise ValueError(f"--suite {suite!r}: no such file {path!r}")
                if name != "safetensors" and name not in bench.SUITES:
                    raise ValueError(f"--suite: unknown suite {name!r}; known: "
                                     + ", ".join(bench.SUITES) + ", safetensors:PATH")
            labels = [c.label for c in configs] if configs else ["the default rows"]
            print("suites: " + ", ".join(suites) + "; rows: " + ", ".join(labels))
            return 0
        rows = bench.run(suites, configs=configs, quick=args.quick, steps=steps, warmup=warmup,
                         device=args.device, dtype=args.dtype, prefix=args.filter,
                         lora_rank=args.lora_rank, seed=args.seed, kernels=args.kernels,
                         peak_gbps=args.peak_gbps)
        if args.json:
            bench.write_json(rows, args.json)
    except (ValueError, TypeError, OSError) as error:
        print(f"kaon bench: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kaon`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    ``--version`` and ``--help`` print and return 0; usage errors return 2.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "list":
            return _list()
        if args.command == "bench":
            return _bench(parser, args)
        if args.command == "battery":
            return _battery(parser, args)
    except SystemExit as stop:  # argparse: --help, --version and usage errors
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
