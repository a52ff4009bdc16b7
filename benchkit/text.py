"""Text made safe for a terminal line or a CSV field (standard library only: cli imports it).

Suite names, descriptions, reference labels, failure messages from plugins' exceptions, check
reasons and anything read back from a results.sqlite someone else wrote can hold escape sequences
(ESC [ ... rewrites the terminal, clears it, sets its title), bidirectional overrides (text that
reads in another order than it is stored) or line breaks (one problem printed as several lines).
"""
from __future__ import annotations

# Whitespace that would break a one-line field: a space, as the text meant a gap there.
_SPACES = {ord(c): " " for c in "\t\n\r"}
# C0, DEL and C1 controls: \x1b, \x7f, \x9b (C1 CSI is ESC [ on many terminals).
_CONTROLS = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
# Bidirectional controls and invisible marks (Trojan Source), and the line / paragraph separators
# that str.splitlines and some terminals treat as a line break.
_FORMAT = {cp: f"\\u{cp:04x}" for cp in [0x061C, *range(0x200B, 0x2010), 0x2028, 0x2029, *range(0x202A, 0x202F),
                                         *range(0x2066, 0x206A), 0xFEFF]}
_TABLE = _CONTROLS | _SPACES | _FORMAT


def printable(text: str) -> str:
    """`text` as one visible line: tabs and line breaks become spaces; every other control
    character, DEL and bidi control becomes a visible escape ('\\x1b', '\\u202e')."""
    return str(text).translate(_TABLE)
