"""One-line error messages: what the CLI, the training scripts and the loaders print instead of a traceback."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import NoReturn


# How to install what training, evaluation and data sets need (the `train` extra), from the package or a checkout.
TRAIN_EXTRAS = "the training extras: pip install 'cdb-tokenizer[train]' (from a checkout: pip install -e '.[train]')"


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (`prog: error: message`, exit status 2), without argparse's usage
    block: the message names the flag, and the usage of some hundred flags would bury it (`--help` lists them)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self._suggestions(message)} (see {self.prog} --help)\n")

    def _suggestions(self, message: str) -> str:
        """For unrecognised flags, the closest known ones (`--max_steps`: did you mean --max_train_steps?), from
        this parser and its sub-commands' (the top-level parser reports a sub-command's unknown flags)."""
        import difflib

        if not message.startswith("unrecognized arguments: "):
            return ""
        known = set(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for parser in action.choices.values():
                    known.update(parser._option_string_actions)
        guesses = []
        for given in message.removeprefix("unrecognized arguments: ").split():
            flag = given.split("=", 1)[0]
            if flag.startswith("--"):
                guesses += [match for match in difflib.get_close_matches(flag, sorted(known), n=1, cutoff=0.75)
                            if match not in guesses]  # fmt: skip
        return f" (did you mean {' or '.join(guesses)}?)" if guesses else ""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def listed(items: list[str], most: int) -> str:
    """The first `most` of `items`, comma separated, and ", ..." when there are more: "a, b, c, ..."."""
    return ", ".join(items[:most]) + (", ..." if len(items) > most else "")


def counted(number: int, noun: str) -> str:
    """`number` and `noun`, plural unless there is one: "1 image", "3 images"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


class Terminated(KeyboardInterrupt):
    """A SIGTERM (`kill`, a scheduler's shutdown), raised where the process was, as Ctrl-C raises KeyboardInterrupt:
    the default action ends the process at once, leaving the temporary files and empty output folders that the
    clean-up after an interruption removes."""


@contextlib.contextmanager
def sigterm_as_interruption() -> Iterator[None]:
    """While active, a SIGTERM raises `Terminated` (only the main thread may set a handler; elsewhere this does
    nothing). A training loop's own handler (`runs.TerminationRequest`) takes over inside it, and gives it back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame) -> NoReturn:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interruption_status(interruption: KeyboardInterrupt) -> tuple[str, int]:
    """What to print and the exit status a shell gives for it: "interrupted", 130 (Ctrl-C) or "terminated", 143."""
    return ("terminated", 143) if isinstance(interruption, Terminated) else ("interrupted", 130)


# How gloo reports a collective whose other process has ended (a SIGTERM outside the training loop, an error that
# process printed): the collective fails at once here with a RuntimeError.
PEER_ENDED_MARKS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_process_ended(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process of the run has ended."""
    return isinstance(error, RuntimeError) and any(mark in str(error) for mark in PEER_ENDED_MARKS)


def peer_process_message(error: BaseException) -> str:
    """One line for `peer_process_ended`: that process's own message (printed above) says why."""
    mark = next(mark for mark in PEER_ENDED_MARKS if mark in str(error))
    return (f"another process of this run stopped ({mark.lower()} in a collective), so this one stops too; that "
            f"process's own message, above, says why.")


def _say(line: str) -> None:
    """One line on stderr in one write: the processes of a run print theirs at once, and `print` writes the text and
    the newline apart, so two processes' lines ran together."""
    import sys

    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_script(main, *errors: type[BaseException]) -> None:
    """Run a training script's `main()`: an error of the kinds given (mistakes in the inputs, clean stops) is one
    line on stderr and exit status 1, since its message names the problem and a stack trace would not help; Ctrl-C
    and SIGTERM are one line and status 130 or 143, after the clean-up an exception gets.
    `CDB_VQ_DEBUG=1` in the environment shows the full traceback instead (an error of those kinds may be a bug)."""
    import os
    import sys

    if os.environ.get("CDB_VQ_DEBUG", "").strip() not in ("", "0"):
        with sigterm_as_interruption():
            main()
        return
    script = os.path.basename(sys.argv[0])  # each line starts with it, as argparse's errors do
    try:
        with sigterm_as_interruption():
            main()
    except KeyboardInterrupt as interruption:  # one line and the shell's status for it, as the CLI's
        what, status = interruption_status(interruption)
        _say(f"{script}: {what}")
        sys.exit(status)
    except errors as error:
        text = first_line(error) if isinstance(error, OSError) else str(error)
        if "Original Traceback" in text:  # raised in a DataLoader worker: its own message is the last line
            text = text.strip().splitlines()[-1]
        _say(f"{script}: error: {text}")
        sys.exit(1)
    except RuntimeError as error:  # a collective whose other process ended: that process said why
        if not peer_process_ended(error):
            raise
        _say(f"{script}: error: {peer_process_message(error)}")
        sys.exit(1)


__all__ = [
    "OneLineErrorParser",
    "Terminated",
    "counted",
    "first_line",
    "interruption_status",
    "peer_process_ended",
    "run_script",
    "sigterm_as_interruption",
]
