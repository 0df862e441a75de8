"""``pyro-moe``'s entry point, the one place where errors become exit codes: parse, check ``--out`` and
``--device``, join the process group of a data-parallel run, lock ``--out`` and open its log, run the command;
bad input (exit 2), a failed collective (exit 1) and Ctrl-C (exit 130) end with one line on stderr and in
the log, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_moe.cli.errors import EXIT_BAD_INPUT, EXIT_DISTRIBUTED, EXIT_INTERRUPTED, BadInput
from pyro_moe.cli.fit import CHECKPOINT_NAME
from pyro_moe.cli.inputs import check_device, check_out
from pyro_moe.cli.parser import build_parser
from pyro_moe.errors import DistributedError, PyroMoEError

if TYPE_CHECKING:
    from pyro_moe.distributed import DataParallel

__all__ = ["DATA_PARALLEL_COMMANDS", "LOG_NAME", "join_process_group", "main"]

DATA_PARALLEL_COMMANDS = ("fit", "laplace")
"""The commands that run data-parallel when a launcher starts several processes."""
LOG_NAME = "pyro-moe.log"
"""Every command's log in ``--out``."""

logger = logging.getLogger("pyro_moe.cli")


def join_process_group(
    command: str, device: str | None, device_map: str | None, timeout: float | None
) -> tuple[DataParallel | None, str | None]:
    """Under a launcher (``WORLD_SIZE`` > 1) ``fit`` and ``laplace`` join the process group, where
    ``--device cuda`` means the process's own GPU (the device returned beside the group); other commands run
    in one process only."""
    world_size = os.environ.get("WORLD_SIZE", "1")
    if command not in DATA_PARALLEL_COMMANDS:
        if world_size not in ("", "0", "1"):
            raise BadInput(
                f"{command} runs in one process, but WORLD_SIZE is {world_size}; only "
                f"{' and '.join(DATA_PARALLEL_COMMANDS)} run data-parallel (launch {command} with plain python)."
            )
        return None, device
    if device_map is not None and world_size not in ("", "0", "1"):
        raise BadInput(
            "--device-map spreads one model over every GPU, but a launcher started several processes: run one "
            "process with --device-map, or data-parallel processes with --device cuda (one GPU each)."
        )
    import torch

    from pyro_moe.distributed import init_distributed

    parallel = init_distributed(**({} if timeout is None else {"timeout": timeout}))
    if parallel is not None and device == "cuda" and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    return parallel, device


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit code (0 ok, 2 bad input, 1 a failed data-parallel collective,
    130 Ctrl-C; a one-line reason on stderr)."""
    args = build_parser().parse_args(argv)
    command, out = args.command, args.out
    try:
        check_out(out)  # before any work, in every process
        check_device(getattr(args, "device", None))
        parallel, device = join_process_group(
            command, getattr(args, "device", None), getattr(args, "device_map", None), getattr(args, "timeout", None)
        )
    except (PyroMoEError, DistributedError) as error:
        return _failure(command, error)
    if hasattr(args, "device"):
        args.device = device  # data-parallel: the process's own GPU, before the command reads its settings
    try:
        writes = parallel is None or parallel.is_main
        return _run(args, writes, sys.argv[1:] if argv is None else argv)
    finally:
        if parallel is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _run(args: argparse.Namespace, writes: bool, argv: Sequence[str]) -> int:
    """Run the command; ``writes``: this process keeps the log (rank 0 of a data-parallel run)."""
    command, out = args.command, args.out
    if not writes:
        return _outcome(args, argv)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. no permission to write there
        return _failure(command, BadInput(f"--out {out}: cannot create the folder: {error.strerror or error}."))
    from pyro_moe.run_lock import describe_holder, lock_run_folder

    try:  # before the log: a refused second writer appends nothing to the first one's folder
        lock = lock_run_folder(out, shlex.join(["pyro-moe", *argv]))
    except PyroMoEError as error:
        return _failure(command, error)
    handler = logging.FileHandler(out / LOG_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    data_warnings = logging.StreamHandler(sys.stderr)  # skipped rows and their file lines, on the terminal too
    data_warnings.setLevel(logging.WARNING)
    data_warnings.setFormatter(logging.Formatter(f"pyro-moe {command}: warning: %(message)s"))
    logging.getLogger("pyro_moe.data").addHandler(data_warnings)
    logger.info("pyro-moe %s", " ".join(argv))
    if lock.stale_holder is not None:
        message = f"took over the lock on --out {out} from {describe_holder(lock.stale_holder)}, which was killed"
        logger.warning("%s before it released it.", message)
        print(f"pyro-moe {command}: warning: {message} before it released it.", file=sys.stderr)
    try:
        with warnings.catch_warnings():  # Python warnings (a transferred posterior, ...) as one line, logged too
            warnings.showwarning = _warning_line(command)
            return _outcome(args, argv)
    finally:
        logging.getLogger("pyro_moe.data").removeHandler(data_warnings)
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
        lock.release()


def _warning_line(command: str) -> Callable[..., None]:
    """A ``warnings.showwarning`` that writes ``pyro-moe COMMAND: warning: MESSAGE`` on stderr and into the log."""

    def show(message: Warning | str, *_: Any, **__: Any) -> None:
        text = " ".join(str(message).split())
        logger.warning(text)
        print(f"pyro-moe {command}: warning: {text}", file=sys.stderr)

    return show


def _outcome(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the command's entry (``args.run``: the parsed command line to its settings, then its runner); bad
    input and failed collectives end as :func:`_failure`, SIGINT as :func:`_interrupted`."""
    from pyro_moe.inference.resume import FitInterrupted

    try:
        args.run(args)
    except (PyroMoEError, DistributedError) as error:
        return _failure(args.command, error)
    except (FitInterrupted, KeyboardInterrupt) as stop:
        return _interrupted(args.command, args.out, argv, stop)
    return 0


def _interrupted(command: str, out: Path, argv: Sequence[str], stop: BaseException) -> int:
    """One line on stderr (and in the log) after SIGINT: where the checkpoint is and the command that resumes it."""
    resume = shlex.join(["pyro-moe", *argv, *([] if "--resume" in argv else ["--resume"])])
    folder = out / CHECKPOINT_NAME
    if not isinstance(stop, KeyboardInterrupt):
        message = f"interrupted after step {stop.step} of {stop.steps}; checkpoint: {stop.folder}; "
        message += f"resume with: {resume}"
    elif command in DATA_PARALLEL_COMMANDS and folder.exists():
        message = f"interrupted; the last checkpoint is in {folder}; resume with: {resume}"
    elif command in DATA_PARALLEL_COMMANDS:
        message = "interrupted before the first checkpoint; nothing to resume (run the command again)."
    else:
        message = "interrupted."
    if logger.hasHandlers():
        logger.error("%s", message)
    print(f"pyro-moe {command}: {message}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _failure(command: str, error: PyroMoEError | DistributedError) -> int:
    """One line on stderr (and in the log, where there is one); the exit code of ``error``'s kind."""
    message = " ".join(str(error).split())
    bad_input = isinstance(error, PyroMoEError)
    if logger.hasHandlers():  # not before the log exists: logging's last resort would print a second line
        logger.error("%s%s", "bad input: " if bad_input else "", message)
    print(f"pyro-moe {command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT if bad_input else EXIT_DISTRIBUTED
