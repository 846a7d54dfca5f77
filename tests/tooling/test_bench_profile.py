"""The py-spy raw-profile summariser of `python -m bench --profile` (bench/profile.py).

A small literal raw profile stands in for py-spy: no process is recorded here.
"""

from __future__ import annotations

from pathlib import Path

from bench import profile
from bench.profile import Frame, Stack

LOOP = "DataLoop._run (/repo/labelproxy/streams/dataloop.py:210)"
BOOT = "Thread._bootstrap (/usr/lib/python3.11/threading.py:1002)"
RAW = f"""\
thread (0x7F01): labelproxy-tcp;{BOOT};{LOOP};Transfer._copy (/repo/t.py:59) 30
thread (0x7F01): labelproxy-tcp;{BOOT};{LOOP};Transfer._copy (/repo/t.py:76) 50
thread (0x7F01): labelproxy-tcp;{BOOT};{LOOP};Relay.on_event (/repo/r.py:12) 15
thread (0x7F01): labelproxy-tcp;{BOOT};{LOOP};f (/repo/r.py:3);f (/repo/r.py:4) 5
thread (0x7F00): MainThread;<module> (/repo/main.py:1);Runner.run (/lib/runners.py:118) 100

not a profile line
"""
SOURCES = {
    ("/repo/t.py", 59): "n = os.readv(half.src_fd, _BUFS)",
    ("/repo/t.py", 76): "sent = os.write(half.dst_fd, view)",
    ("/repo/r.py", 12): "if events & WRITABLE | READABLE:",
    ("/lib/runners.py", 118): "return self._loop.run_until_complete(task)",
}


def lookup(path: str, line: int) -> str | None:
    return SOURCES.get((path, line))


def test_parse_line_reads_thread_frames_and_count() -> None:
    stack = profile.parse_line(f"thread (0x7F01): labelproxy-tcp;{LOOP};leaf (/a/b.py:7) 12")
    assert stack == Stack(
        thread="labelproxy-tcp",
        frames=(
            Frame("DataLoop._run", "/repo/labelproxy/streams/dataloop.py", 210),
            Frame("leaf", "/a/b.py", 7),
        ),
        count=12,
    )
    quoted = profile.parse_line('thread (0x1): "labelproxy-tcp";leaf (b.py:7) 3')
    assert quoted is not None and quoted.thread == "labelproxy-tcp"
    unnamed = profile.parse_line("leaf (b.py:7) 3")
    assert unnamed is not None and unnamed.thread == "" and unnamed.count == 3
    assert profile.parse_line("") is None
    assert profile.parse_line("leaf (b.py:7) many") is None


def test_parse_frame_without_a_line_number() -> None:
    assert profile.parse_frame("<native> (libc.so)") == Frame("<native>", "libc.so", 0)
    assert profile.parse_frame("odd") == Frame("odd", "", 0)


def test_data_plane_by_thread_name_else_by_the_loop_frame() -> None:
    stacks = profile.parse_raw(RAW)
    assert [profile.is_data_plane(s) for s in stacks] == [True] * 4 + [False]
    assert profile.total(stacks) == 200
    unnamed = profile.parse_line(f"{BOOT};{LOOP};x (/repo/x.py:1) 2")
    assert unnamed is not None and profile.is_data_plane(unnamed)
    other = profile.parse_line(f"thread (0x2): worker;{LOOP} 2")
    assert other is not None and not profile.is_data_plane(other)


def test_self_and_inclusive_samples() -> None:
    stacks = profile.parse_raw(RAW)
    leaves = profile.self_samples(stacks)
    assert leaves[Frame("Transfer._copy", "/repo/t.py", 76)] == 50
    assert leaves[Frame("f", "/repo/r.py", 4)] == 5
    inclusive = profile.inclusive_samples(stacks)
    assert inclusive[("DataLoop._run", "/repo/labelproxy/streams/dataloop.py")] == 100
    assert inclusive[("Transfer._copy", "/repo/t.py")] == 80
    assert inclusive[("f", "/repo/r.py")] == 5  # a recursive function counts once per stack


def test_syscall_split_uses_the_leaf_source_line() -> None:
    leaves = profile.self_samples(profile.parse_raw(RAW))
    # readv + write: system calls; on_event and run_until_complete: interpreter; f: unknown
    assert profile.syscall_split(leaves, lookup) == (80, 115, 5)
    assert profile.is_syscall_line("if _SHUTDOWN(fd, socket.SHUT_WR) != 0:")
    assert not profile.is_syscall_line("self.pending = data")


def test_summarise_reports_the_thread_and_the_process() -> None:
    text = profile.summarise("short_conns", RAW, lookup, roots=[Path("/repo")])
    assert text.startswith("# labelproxy profile: short_conns")
    thread, process = text.split("## Whole process")
    assert "## Data-plane thread (labelproxy-tcp)" in thread
    assert "- samples: 100\n" in thread
    assert "- system call wrappers: 80 samples (80.0%); interpreter work: 15 (15.0%); " in thread
    assert "| 50 | 50.0% | Transfer._copy | t.py:76 | `sent = os.write(half.dst_fd, view)` |" in (
        thread
    )
    assert "| 15 | 15.0% | Relay.on_event | r.py:12 | `if events & WRITABLE \\| READABLE:` |" in (
        thread
    )
    assert "| 5 | 5.0% | f | r.py:4 | ? |" in thread
    assert "| 100 | 100.0% | DataLoop._run | labelproxy/streams/dataloop.py |" in thread
    assert "- samples: 200\n" in process
    assert "(40.0%); interpreter work: 115 (57.5%); source not found: 5 (2.5%)" in process
    assert "/lib/runners.py:118 | `return self._loop.run_until_complete(task)` |" in process


def test_summarise_an_empty_profile() -> None:
    text = profile.summarise("pingpong", "", lookup)
    assert "- samples: 0\n" in text and "(n/a)" in text


def test_file_lines_reads_absolute_and_root_relative_paths(tmp_path: Path) -> None:
    source = tmp_path / "pkg" / "mod.py"
    source.parent.mkdir()
    source.write_text("first = 1\n    os.write(fd, data)  \n")
    lines = profile.file_lines([tmp_path])
    assert lines(str(source), 2) == "os.write(fd, data)"
    assert lines("pkg/mod.py", 1) == "first = 1"
    assert lines("pkg/missing.py", 1) is None
    assert lines("pkg/mod.py", 0) is None
    assert profile.short_path(str(source), [Path("/elsewhere"), tmp_path]) == "pkg/mod.py"
