"""Summaries of py-spy raw profiles: where labelproxy's time goes during a measurement.

`python -m bench --profile` records labelproxy with `py-spy record --format raw --threads`
while each data-plane measurement runs. A raw profile has one line per distinct stack:

    thread (TID): NAME;func (path:line);...;leaf (path:line) COUNT

(root frame first, leaf last; NAME may be missing). `summarise` turns the samples of one
section into Markdown: for the data-plane thread (`labelproxy-tcp`, or any stack through
`DataLoop._run`) and for the whole process, the total, the share of samples spent in system
call wrappers, the top leaf lines by self samples with their source text, and the top
functions by inclusive samples.

Everything here is a pure function of its arguments except `file_lines`, which reads source
files from disk (the summariser takes any `SourceLookup`, so tests need no files).
"""

from __future__ import annotations

import functools
import linecache
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

DATA_THREAD = "labelproxy-tcp"
DATA_LOOP_FUNCTION = "DataLoop._run"
TOP = 25

# A heuristic: a sample whose leaf line's source contains one of these (case-insensitive) is
# counted as time in a system call wrapper (the C call and the kernel behind it; py-spy shows
# the Python line that made the call); every other resolved sample is interpreter work.
SYSCALL_MARKERS = (
    "os.readv",
    "os.read(",
    "os.write",
    "os.close",
    "os.splice",
    "os.pipe",
    ".connect",
    "._accept",
    "accept(",
    "poll(",
    "shutdown",
    "socket(",
    "setsockopt",
    "setblocking",
    "register(",
    "ioctl",
    "eventfd",
)

SourceLookup = Callable[[str, int], str | None]


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as py-spy names it; `line` is 0 when it gave none."""

    function: str
    path: str
    line: int


@dataclass(frozen=True, slots=True)
class Stack:
    """One raw line: a thread's stack (root first, leaf last) seen `count` times."""

    thread: str
    frames: tuple[Frame, ...]
    count: int


def parse_frame(text: str) -> Frame:
    """`func (path:line)` -> Frame; anything else is kept whole as the function name."""
    function, sep, rest = text.rpartition(" (")
    if not sep or not rest.endswith(")"):
        return Frame(function=text, path="", line=0)
    path, colon, line = rest[:-1].rpartition(":")
    if colon and line.isdigit():
        return Frame(function=function, path=path, line=int(line))
    return Frame(function=function, path=rest[:-1], line=0)


def parse_line(line: str) -> Stack | None:
    """One raw-format line -> Stack; None for a blank or malformed line."""
    stack_text, _, count = line.strip().rpartition(" ")
    if not stack_text or not count.isdigit():
        return None
    parts = stack_text.split(";")
    thread = ""
    while parts and parts[0].startswith(("thread (", "process (")):
        head = parts.pop(0)
        if head.startswith("thread ("):
            thread = head.partition("): ")[2].strip('"')
    return Stack(thread=thread, frames=tuple(parse_frame(p) for p in parts), count=int(count))


def parse_raw(text: str) -> list[Stack]:
    """Every stack of a raw profile (several concatenated profiles simply add up)."""
    return [stack for stack in map(parse_line, text.splitlines()) if stack is not None]


def is_data_plane(stack: Stack) -> bool:
    """Whether a stack belongs to labelproxy's TCP data-plane thread."""
    if stack.thread:
        return stack.thread == DATA_THREAD
    return any(frame.function == DATA_LOOP_FUNCTION for frame in stack.frames)


def total(stacks: Iterable[Stack]) -> int:
    return sum(stack.count for stack in stacks)


def self_samples(stacks: Iterable[Stack]) -> Counter[Frame]:
    """Samples per leaf frame (the line that was running)."""
    counts: Counter[Frame] = Counter()
    for stack in stacks:
        if stack.frames:
            counts[stack.frames[-1]] += stack.count
    return counts


def inclusive_samples(stacks: Iterable[Stack]) -> Counter[tuple[str, str]]:
    """Samples per (function, path) anywhere on the stack, counted once per stack."""
    counts: Counter[tuple[str, str]] = Counter()
    for stack in stacks:
        for key in {(frame.function, frame.path) for frame in stack.frames}:
            counts[key] += stack.count
    return counts


def is_syscall_line(source: str) -> bool:
    """Whether a source line calls a system call wrapper (see `SYSCALL_MARKERS`)."""
    lowered = source.lower()
    return any(marker.lower() in lowered for marker in SYSCALL_MARKERS)


def syscall_split(leaves: Counter[Frame], lookup: SourceLookup) -> tuple[int, int, int]:
    """(system call wrapper, interpreter, source not found) samples over the leaf lines."""
    syscall = interpreter = unknown = 0
    for frame, count in leaves.items():
        source = lookup(frame.path, frame.line)
        if source is None:
            unknown += count
        elif is_syscall_line(source):
            syscall += count
        else:
            interpreter += count
    return syscall, interpreter, unknown


def short_path(path: str, roots: Iterable[Path]) -> str:
    """`path` relative to the first root that holds it (a readable name), else unchanged."""
    for root in roots:
        prefix = f"{str(root).rstrip('/')}/"
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_group(
    title: str, stacks: list[Stack], lookup: SourceLookup, roots: Iterable[Path]
) -> list[str]:
    """Markdown lines for one group of stacks (a thread, or the whole process)."""
    roots = list(roots)
    samples = total(stacks)
    leaves = self_samples(stacks)
    syscall, interpreter, unknown = syscall_split(leaves, lookup)
    lines = [
        f"## {title}",
        "",
        f"- samples: {samples}",
        f"- system call wrappers: {syscall} samples ({_pct(syscall, samples)}); interpreter "
        f"work: {interpreter} ({_pct(interpreter, samples)}); source not found: {unknown} "
        f"({_pct(unknown, samples)})",
        "",
        f"### Top {TOP} leaf lines (self samples)",
        "",
        "| samples | % | function | line | source |",
        "|---:|---:|---|---|---|",
    ]
    for frame, count in leaves.most_common(TOP):
        source = lookup(frame.path, frame.line)
        code = f"`{_cell(source)}`" if source else "?"
        where = f"{short_path(frame.path, roots)}:{frame.line}"
        lines.append(
            f"| {count} | {_pct(count, samples)} | {_cell(frame.function)} | {_cell(where)} "
            f"| {code} |"
        )
    lines += [
        "",
        f"### Top {TOP} functions (inclusive samples)",
        "",
        "| samples | % | function | file |",
        "|---:|---:|---|---|",
    ]
    for (function, path), count in inclusive_samples(stacks).most_common(TOP):
        lines.append(
            f"| {count} | {_pct(count, samples)} | {_cell(function)} "
            f"| {_cell(short_path(path, roots))} |"
        )
    return [*lines, ""]


def summarise(section: str, raw: str, lookup: SourceLookup, *, roots: Iterable[Path] = ()) -> str:
    """The Markdown summary of one section's raw profile(s); `roots` shorten file names."""
    roots = list(roots)
    stacks = parse_raw(raw)
    data_plane = [stack for stack in stacks if is_data_plane(stack)]
    header = [
        f"# labelproxy profile: {section}",
        "",
        "py-spy samples of labelproxy taken while the section's load ran (threads that were "
        "idle, e.g. waiting in epoll, are not sampled). System call share: samples whose "
        "leaf source line calls a system call wrapper (a heuristic: the line contains one of "
        + ", ".join(f"`{marker}`" for marker in SYSCALL_MARKERS)
        + "); interpreter work: every other line.",
        "",
    ]
    return "\n".join(
        header
        + render_group(f"Data-plane thread ({DATA_THREAD})", data_plane, lookup, roots)
        + render_group("Whole process", stacks, lookup, roots)
    )


def file_lines(roots: Iterable[Path]) -> SourceLookup:
    """A `SourceLookup` reading the line from disk: `path` as given, else under each root
    (py-spy may print paths relative to the repository or site-packages). None when no file
    or no such line is found."""
    bases = list(roots)

    @functools.cache
    def lookup(path: str, line: int) -> str | None:
        if not path or line <= 0:
            return None
        given = Path(path)
        for candidate in [given] if given.is_absolute() else [b / given for b in bases]:
            if candidate.is_file():
                return linecache.getline(str(candidate), line).strip() or None
        return None

    return lookup
