"""Helpers shared by the benchmark scripts: timing, peak memory, one subprocess per case, the machine and its load,
markdown tables, reports written whole.

Peak memory on CPU is the growth of the process's resident set (RSS) over a call: the kernel's high-water mark
(`VmHWM`) is reset just before the call by writing 5 to `/proc/self/clear_refs`, and read back after it. Each case
runs in a fresh worker process, so nothing freed by earlier work can hide a peak. Memory workers start with
`MALLOC_MMAP_THRESHOLD_=65536`: every block of 64 KiB or more is its own mapping, returned to the system when freed,
so the high-water mark is the peak of live tensors (what `torch.cuda.max_memory_allocated` reports on GPU) rather
than the allocator's retained, fragmented heap (which, with glibc's defaults, made the training-mode `cdb` peak look
1.7x larger at small chunk sizes). Timing workers keep the default allocator. On CUDA,
`torch.cuda.max_memory_allocated` is used instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cdb_tokenizer.tools.files import write_text
from cdb_tokenizer.tools.messages import counted

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_FLAG = "--worker"
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}
# Every allocation of 64 KiB or more gets its own mapping, unmapped when freed: RSS then tracks live tensors.
EXACT_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
RESULT_PREFIX = "BENCHMARK_RESULT "


# ----------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the extra memory a block of code needed at its peak, in bytes (`.extra`).

    CUDA: growth of `max_memory_allocated`. CPU (Linux): growth of the resident set's high-water mark, which is
    reset on entry when the kernel allows it (otherwise the lifetime peak is used, which can only under-report).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.extra: int | None = None
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            exact = _reset_rss_peak()
            self._start = (_status_kib("VmRSS") or 0) * 1024
            self.method = "RSS high-water mark" + ("" if exact else " (lifetime peak; clear_refs unavailable)")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.extra = max(0, (_status_kib("VmHWM") or 0) * 1024 - self._start)


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall-clock seconds of one call (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def positive_int(text: str) -> int:
    """An argparse type for counts (steps, rounds, batch sizes): 0 ended in a traceback deep in torch or statistics."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def distinct(parser: argparse.ArgumentParser, flag: str, values: list[str]) -> None:
    """Refuse a repeated --rules / --runs entry (it ran twice and showed one row)."""
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        parser.error(f"{flag} names {', '.join(repeated)} more than once.")


def median(values: list[float]) -> float:
    return statistics.median(values)


def with_range(values: list[float], digits: int = 2, unit: str = "") -> str:
    """A report cell for per-round values: their median, then their lowest and highest in brackets ("1.08x
    [1.01-1.19]"), so a table gives the spread of a claim and not its median alone."""
    return f"{median(values):.{digits}f}{unit} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


# ----------------------------------------------------------------------------------------------------------------
# One subprocess per case
# ----------------------------------------------------------------------------------------------------------------


def run_worker(script: str | Path, case: dict, timeout: float | None = None, exact_memory: bool = False) -> dict:
    """Run `script --worker '<case json>'` in a fresh process and return the dict it reported.

    `exact_memory` starts it with `EXACT_MEMORY_ENV` (for processes that measure memory). On failure or timeout the
    dict has an `error` entry instead of measurements.
    """
    command = [sys.executable, str(script), WORKER_FLAG, json.dumps(case)]
    environment = {**os.environ, **WORKER_ENV, **(EXACT_MEMORY_ENV if exact_memory else {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    try:
        completed = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=timeout, env=environment
        )
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
    return {**case, "error": " | ".join(tail) or f"exit status {completed.returncode}"}


def report_from_worker(result: dict) -> None:
    """Print a worker's result where `run_worker` finds it."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def environment_summary(device: torch.device | str = "cpu") -> str:
    """One markdown line saying what the numbers were measured on (the machine's load: `load_summary`)."""
    device = torch.device(device)
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{_cpu_name()}, {os.cpu_count()} logical cores, {counted(torch.get_num_threads(), 'torch thread')}"
    return f"{hardware}; torch {torch.__version__}, Python {platform.python_version()}, {timestamp()}"


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")


def load_line() -> str:
    """`uptime`'s line: the clock, and the load averages over 1, 5 and 15 min."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime unavailable"


def load_summary(before: str) -> str:
    """The report line of the machine's load at the run's start (`before`, a `load_line` taken then) and now: the
    averages at the end include the run itself, those at the start show what else the machine was doing."""
    return f"Load: before `{before}`; after `{load_line()}`."


def require(package: str, needed_for: str, skip: str) -> None:
    """Exit with one line before anything runs or is written when an optional `package` is missing."""
    if importlib.util.find_spec(package) is None:
        raise SystemExit(
            f"{Path(sys.argv[0]).name}: {needed_for} needs `{package}`, which is not installed: "
            f"pip install {package}, or {skip}."
        )


def _cpu_name() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or "CPU")


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table; numbers are expected to be formatted already."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_bytes(count: int | None) -> str:
    if count is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}" if unit == "GiB" else f"{count / size:.0f} {unit}"
    return f"{count} B"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def write_report(name: str, text: str) -> Path:
    """Write `benchmarks/results/<name>` whole (never half a report) and return its path."""
    return write_text(RESULTS_DIR / name, text)


def command_line(argv: list[str] | None = None, script: str | Path | None = None, interpreter: str = "python") -> str:
    """The command that produced a report (default: this process's), as a user would type it from the repository
    root (quoted: it pastes back into a shell as it ran), with local paths outside the repository cut to their last
    part (reports are committed and published)."""
    from cdb_tokenizer.tools.redaction import scrub_local_paths

    argv = sys.argv[1:] if argv is None else argv
    script = Path(sys.argv[0] if script is None else script).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        script = Path(script.name)
    return shlex.join([interpreter, str(script), *scrub_local_paths([_in_repository(argument) for argument in argv])])


def _in_repository(argument: str) -> str:
    """An absolute path inside the repository as the path from its root (`/home/me/cdb-vq/configs/a.yaml` ->
    `configs/a.yaml`, which says more than `a.yaml` and is no private path); anything else as it is."""
    path = Path(argument)
    if not path.is_absolute():
        return argument
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return argument
