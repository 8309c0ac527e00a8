"""The `dist-train` command: train, check, export, prepare, sample, bench, sweep, report.

User errors print as one line on stderr and exit with status 2, before any worker starts
whenever they can be found in the parent. Sub-commands (one module each in this package) import
what they need when they run, so `dist-train --help` does not pay for torch.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

import dist_train
from dist_train.bench.registry import add_bench_parser
from dist_train.cli.check import add_check_parser
from dist_train.cli.export import add_export_parser
from dist_train.cli.prepare import add_prepare_parser
from dist_train.cli.sample import add_sample_parser
from dist_train.cli.sweep import add_sweep_report_parsers
from dist_train.cli.train import add_train_parser
from dist_train.config.versions import check_torch_version
from dist_train.errors import DistTrainError
from dist_train.launch.clock import command_start
from dist_train.launch.signals import (
    EXIT_PREEMPTED,
    EXIT_UNSAVED,
    PREEMPT_SIGNALS,
    Preempted,
    Terminated,
)


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other input error), status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dist-train", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {dist_train.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # The order here is the order `dist-train --help` lists the commands in.
    add_train_parser(sub)
    add_check_parser(sub)
    add_export_parser(sub)
    add_prepare_parser(sub)
    add_sample_parser(sub)
    add_bench_parser(sub)
    add_sweep_report_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    # The command's start, for goodput's start-up time: the process's own start when it was
    # started for this command (no argv: the script or `python -m`), else now.
    started = command_start(whole_process=argv is None)
    # First thing: a stop signal during start-up (torch's import takes seconds) ends the run
    # through the exit path below, with the documented status and a line saying so.
    for signum in PREEMPT_SIGNALS:
        signal.signal(signum, _raise_terminated)
    # Before torch loads (it reads this once), and inherited by the workers: torch's C++ log
    # (c10d's store retries with 20-line stack dumps, "hostname cannot be retrieved") stays
    # off; our one-line errors say what failed. TORCH_CPP_LOG_LEVEL=WARNING shows it again.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    # Likewise torchrun's agent (its Python loggers read LOGLEVEL): a W/E line with a traceback
    # per worker failure and forwarded signal; the launcher says what happened in one line.
    os.environ.setdefault("LOGLEVEL", "CRITICAL")
    parser = build_parser()
    # Overrides may come before or after options: collect stray key=value words too.
    args, extra = parser.parse_known_args(argv)
    unknown = [word for word in extra if "=" not in word or word.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    args.started = started
    try:
        try:
            check_torch_version()
            code = args.func(args)
            sys.stdout.flush()  # a reader gone shows here, in the handlers below, not at exit
        except Exception as e:
            stop = _stop_within(e)
            if stop is None:
                raise
            raise stop from None
    except BrokenPipeError:
        code = _stdout_closed()
    except DistTrainError as e:
        if _speaks(e):
            print(f"error: {e}", file=sys.stderr)
        code = e.exit_code  # 2 for the user's input, EXIT_INFRA for what a retry can fix
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except Terminated as e:
        print(_terminated_line(args, signal.Signals(e.args[0]).name), file=sys.stderr)
        code = EXIT_PREEMPTED
    except Preempted as e:
        if _speaks(e):
            print(e.message(), file=sys.stderr, flush=True)
        code = EXIT_PREEMPTED if e.saved else EXIT_UNSAVED
    sys.exit(code)


def _stdout_closed() -> int:
    """Whoever read stdout went away (`dist-train check CFG | head -3`): as Python's docs on
    SIGPIPE advise, stdout goes to devnull (the interpreter's last flush would fail again,
    with a traceback), and the status is a SIGPIPE death's, 141, as a shell pipeline expects."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _stop_within(error: BaseException) -> BaseException | None:
    """A stop signal's exception that Python wrapped on its way out: one raised while a class
    body was set up (a dataclass field's `__set_name__`, during a seconds-long torch import)
    comes back as a RuntimeError whose cause it is. None when the error is not a stop."""
    seen: set[int] = set()
    inner: BaseException | None = error
    while inner is not None and id(inner) not in seen:
        if isinstance(inner, (Terminated, Preempted, KeyboardInterrupt)):
            return inner
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__
    return None


def _terminated_line(args: argparse.Namespace, name: str) -> str:
    """A stop signal outside training's loop: what it stopped, and what it left."""
    if args.command == "prepare":  # it writes into a staging folder: nothing half-written
        return f"prepare stopped ({name}); {args.out} is as it was"
    return f"terminated ({name}) before training"


def _speaks(error: BaseException) -> bool:
    """Errors every rank raises alike are printed by rank 0 only; a `quiet` one by nobody."""
    if getattr(error, "quiet", False):
        return False
    if isinstance(error, Preempted) or getattr(error, "on_every_rank", False):
        # Imported here: a plain input error, found before torch loads, need not load it.
        from dist_train.launch.env import process_rank

        return process_rank() == 0
    return True
