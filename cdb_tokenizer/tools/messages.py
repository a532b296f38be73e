"""One-line error messages: what the CLI, the training scripts and the loaders print instead of a traceback."""

from __future__ import annotations

import argparse
from typing import NoReturn


# How to install what training, evaluation and data sets need (the `train` extra), from the package or a checkout.
TRAIN_EXTRAS = "the training extras: pip install 'cdb-tokenizer[train]' (from a checkout: pip install -e '.[train]')"


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (`prog: error: message`, exit status 2), without argparse's usage
    block: the message names the flag, and the usage of some hundred flags would bury it (`--help` lists them)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def counted(number: int, noun: str) -> str:
    """`number` and `noun`, plural unless there is one: "1 image", "3 images"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def run_script(main, *errors: type[BaseException]) -> None:
    """Run a training script's `main()`: an error of the kinds given (mistakes in the inputs, clean stops) is one
    line on stderr and exit status 1, since its message names the problem and a stack trace would not help; Ctrl-C
    is one line and status 130.
    `CDB_VQ_DEBUG=1` in the environment shows the full traceback instead (an error of those kinds may be a bug)."""
    import os
    import sys

    if os.environ.get("CDB_VQ_DEBUG", "").strip() not in ("", "0"):
        main()
        return
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for it, as the CLI's
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr)
        sys.exit(130)
    except errors as error:
        text = first_line(error) if isinstance(error, OSError) else str(error)
        if "Original Traceback" in text:  # raised in a DataLoader worker: its own message is the last line
            text = text.strip().splitlines()[-1]
        print(f"error: {text}", file=sys.stderr)
        sys.exit(1)


__all__ = ["OneLineErrorParser", "counted", "first_line", "run_script"]
