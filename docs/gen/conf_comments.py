"""Read the comment that documents each key of a `conf/` YAML file.

YAML loaders drop comments, and the comments are where `conf/` says what each key means, so this
reads the files line by line. A key's comment is the block of `#` lines directly above it (no blank
line between) or the `# ...` after its value on the same line; the block that opens a file describes
the file, never its first key. `tests/test_docs.py` checks that the keys found here are exactly the
keys `yaml.safe_load` finds, so a construct this reader misreads fails a test instead of a page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# A mapping key at the start of a line: `name:` or `name: value`, plain or quoted; not a list item.
KEY = re.compile(r"""^(?P<indent> *)(?P<key>[A-Za-z0-9_<][\w.\-<@]*|'[^']*'|"[^"]*")\s*:(?:\s|$)(?P<rest>.*)$""")


@dataclass(frozen=True)
class KeyComment:
    """One key of a conf file: its dotted path, its own comment ('' when it has none), its line."""

    path: str
    comment: str
    line: int


def _trailing_comment(rest: str) -> str:
    """The `# ...` after a value, outside quotes ('' when there is none)."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[i + 1 :].strip()
    return ""


def file_header(text: str) -> str:
    """The comment block that opens a file (Hydra's `# @package` directive left out), as one paragraph string."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line[1:].strip())
    return "\n".join(lines).strip()


def key_comments(path: Path) -> list[KeyComment]:
    """Every mapping key of the YAML file `path` with the comment that documents it, in file order.

    Keys under `defaults:` (Hydra's list of options) are left out; keys under a YAML merge (`<<:`)
    count as keys of the mapping they are merged into.
    """
    lines = path.read_text().splitlines()
    found: list[KeyComment] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    pending: list[str] = []
    in_header = True
    skip_indent: int | None = None  # inside `defaults:`
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            if not in_header:
                pending.append(stripped[1:].strip())
            continue
        in_header = False
        if not stripped:
            pending = []
            continue
        match = KEY.match(line)
        if match is None:  # a list item or a continuation line
            pending = []
            continue
        indent, key = len(match["indent"]), match["key"].strip("'\"")
        if skip_indent is not None:
            if indent > skip_indent:
                pending = []
                continue
            skip_indent = None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if key == "defaults" and not stack:
            skip_indent, pending = indent, []
            continue
        parents = [k for _, k in stack if k != "<<"]
        stack.append((indent, key))
        if key != "<<":
            own = " ".join([*pending, _trailing_comment(match["rest"])]).strip()
            found.append(KeyComment(".".join([*parents, key]), own, number))
        pending = []
    return found
