"""The exit-code contract for bad input, shared by the corpus runner and the tests that need a
process of their own: exit 2, exactly the expected lines on stderr, each `benchkit: error: ...`,
and no traceback anywhere."""
from __future__ import annotations

import re

PREFIX = "benchkit: error: "


def error_lines(stderr: str) -> list[str]:
    """The problem lines of stderr (argparse's usage line, which precedes a usage error, is not one)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("usage: ")]


def assert_one_line_errors(status: int, stderr: str, expected: list[str], *, exit: int = 2,
                           stdout: str = "") -> None:
    """`expected`: one regex per line, in order (re.search on the line after the prefix)."""
    assert "Traceback" not in stderr + stdout, f"a traceback reached the user:\n{stderr}"
    assert status == exit, f"exit {status}, expected {exit}; stderr:\n{stderr}"
    lines = error_lines(stderr)
    assert len(lines) == len(expected), f"expected {len(expected)} line(s), got {len(lines)}:\n{stderr}"
    for line, pattern in zip(lines, expected):
        assert line.startswith(PREFIX) or line.startswith("benchkit: "), f"not a benchkit line: {line!r}"
        text = line.removeprefix(PREFIX)
        assert re.search(pattern, text), f"{text!r} does not match {pattern!r}"
        assert not any(ord(c) < 32 and c != "\t" for c in line), f"control character in {line!r}"
