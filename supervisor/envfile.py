"""Environment files (--env-file, `env_file` in the config): systemd's EnvironmentFile= syntax, read as hostile input.

The syntax is systemd's (src/basic/env-file.c), so one file serves a unit's EnvironmentFile= and supervise alike:
`KEY=VALUE` assignments; blank lines and lines starting with `#` or `;` ignored; whitespace around the key and
around an unquoted value dropped; 'single quotes' keep everything literally, "double quotes" unescape `\\"`,
`\\\\`, `\\``, `\\$` (another backslash stays, as in a shell); outside quotes a backslash takes the next character
literally; a backslash at the end of a line continues the value on the next one; quotes may span lines; no
variable expansion. A path starting with `-` names a file that may be missing.

Where systemd skips a line it cannot use with a log message, supervise refuses the whole file with the file and
line number: a line without `=`, a name that is not one (`export FOO=1` is shell, not systemd, syntax), a quote
never closed, a NUL byte. A file that works here therefore also works in a systemd unit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .textfile import read_text

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_VARIABLES = 1024  # in one file, as many as --env or [env] take
MAX_VALUE = 131072  # characters in one value, as --env
_WHITESPACE = " \t\n\r"
_NEWLINE = "\n\r"
_COMMENT = "#;"
_UNESCAPED_IN_DOUBLE_QUOTES = '"\\`$'
_NO_ASSIGNMENT = "expected KEY=VALUE, got a line without '='"  # not shown: it may be a secret pasted alone

# The states of systemd's parser, by the same names.
_PRE_KEY, _KEY, _PRE_VALUE, _VALUE, _VALUE_ESCAPE = range(5)
_SINGLE_QUOTE, _DOUBLE_QUOTE, _DOUBLE_QUOTE_ESCAPE, _COMMENT_LINE, _COMMENT_ESCAPE = range(5, 10)


@dataclass(frozen=True)
class EnvFile:
    """One --env-file: an absolute path, and whether a missing file is skipped (systemd's leading `-`)."""

    path: str
    optional: bool = False

    def __str__(self) -> str:
        return ("-" if self.optional else "") + self.path


class Malformed(ValueError):
    """A file that is not an environment file: the line it starts on and why, in one line."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line, self.reason = line, reason


def reference(text: str) -> EnvFile:
    """`PATH` or `-PATH` (may be missing) as given to --env-file, made absolute now: a file named relative to the
    supervisor's working directory stays the same file when it is read again on an upgrade."""
    optional = text.startswith("-")
    path = text[1:] if optional else text
    if not path.strip():
        raise UserError(f"{text!r} names no file")
    return EnvFile(os.path.abspath(path), optional)


def environment(files: Sequence[EnvFile], explicit: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The children's extra variables: the files in order (a later file, and a later line, wins), then the
    explicit ones (--env, [env]) over all of them. Raises UserError naming the file (and line) at fault."""
    if not files:
        return tuple(explicit)
    merged: dict[str, str] = {}
    for env_file in files:
        merged.update(load(env_file))
    merged.update(explicit)
    return tuple(merged.items())


def load(env_file: EnvFile) -> dict[str, str]:
    """The variables of one file (none if it is optional and missing); one UserError line for any fault."""
    if env_file.optional and not os.path.exists(env_file.path):
        return {}
    text = read_text(Path(env_file.path), "env file")
    try:
        return dict(parse(text))
    except Malformed as exc:
        raise UserError(f"env file {env_file.path} {exc}") from None


def parse(text: str) -> list[tuple[str, str]]:
    """The assignments of an environment file's text, in order (a name may repeat: the last one wins when they
    are merged); raises Malformed with the line number of the first fault."""
    if "\0" in text:
        raise Malformed(text.count("\n", 0, text.index("\0")) + 1, "contains a NUL byte (a binary file?)")
    parser = _Parser()
    state = _PRE_KEY
    for char in text.replace("\r\n", "\n"):
        state = parser.step(state, char)
        if char == "\n":
            parser.line += 1
    parser.finish(state)
    return parser.pairs


@dataclass
class _Parser:
    """systemd's state machine, one character at a time; `line` is the current line, `start` the line the
    current assignment began on (the one an error names)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    value: list[str] = field(default_factory=list)
    key_blank: int | None = None  # where trailing whitespace of the key starts
    value_blank: int | None = None  # where trailing whitespace of an unquoted value starts
    line: int = 1
    start: int = 1
    quote: int = 1  # the line a quote was opened on
    names: set[str] = field(default_factory=set)

    def step(self, state: int, char: str) -> int:
        """The state after `char`; completes an assignment at the end of its line."""
        if state == _PRE_KEY:
            if char in _COMMENT:
                return _COMMENT_LINE
            if char in _WHITESPACE:
                return _PRE_KEY
            if char == "=":
                raise Malformed(self.line, "an assignment without a name")
            self.key, self.value, self.key_blank, self.value_blank, self.start = [char], [], None, None, self.line
            return _KEY
        if state == _KEY:
            if char in _NEWLINE:
                raise Malformed(self.start, _NO_ASSIGNMENT)
            if char == "=":
                return _PRE_VALUE
            self.key_blank = _blank_from(self.key_blank, len(self.key), char)
            self.key.append(char)
            return _KEY
        if state == _PRE_VALUE:
            return self._pre_value(char)
        if state == _VALUE:
            if char in _NEWLINE:
                self._push(trim=True)
                return _PRE_KEY
            if char == "\\":
                self.value_blank = None
                return _VALUE_ESCAPE
            self.value_blank = _blank_from(self.value_blank, len(self.value), char)
            self.value.append(char)
            return _VALUE
        if state == _VALUE_ESCAPE:
            if char not in _NEWLINE:  # an escaped line end continues the value on the next line
                self.value.append(char)
            return _VALUE
        return self._quoted_or_comment(state, char)

    def _pre_value(self, char: str) -> int:
        if char in _NEWLINE:
            self._push(trim=False)
            return _PRE_KEY
        if char in "'\"":
            self.quote = self.line
            return _SINGLE_QUOTE if char == "'" else _DOUBLE_QUOTE
        if char == "\\":
            return _VALUE_ESCAPE
        if char in _WHITESPACE:
            return _PRE_VALUE
        self.value.append(char)
        return _VALUE

    def _quoted_or_comment(self, state: int, char: str) -> int:
        if state == _SINGLE_QUOTE:
            if char == "'":
                return _PRE_VALUE
            self.value.append(char)
            return _SINGLE_QUOTE
        if state == _DOUBLE_QUOTE:
            if char == '"':
                return _PRE_VALUE
            if char == "\\":
                return _DOUBLE_QUOTE_ESCAPE
            self.value.append(char)
            return _DOUBLE_QUOTE
        if state == _DOUBLE_QUOTE_ESCAPE:
            if char in _UNESCAPED_IN_DOUBLE_QUOTES:
                self.value.append(char)
            elif char != "\n":
                self.value.extend(("\\", char))
            return _DOUBLE_QUOTE
        if state == _COMMENT_LINE:
            return _COMMENT_ESCAPE if char == "\\" else _PRE_KEY if char in _NEWLINE else _COMMENT_LINE
        return _PRE_KEY if char in _NEWLINE else _COMMENT_LINE  # a comment never continues on the next line

    def finish(self, state: int) -> None:
        """The end of the text: complete the last assignment (no newline needed), refuse an unfinished one."""
        if state == _KEY:
            raise Malformed(self.start, _NO_ASSIGNMENT)
        if state in (_SINGLE_QUOTE, _DOUBLE_QUOTE, _DOUBLE_QUOTE_ESCAPE):
            raise Malformed(self.quote, "a quote opened on this line is never closed")
        if state in (_PRE_VALUE, _VALUE, _VALUE_ESCAPE):
            self._push(trim=state == _VALUE)

    def _push(self, trim: bool) -> None:
        key = "".join(self.key[:self.key_blank])
        value = "".join(self.value[:self.value_blank] if trim else self.value)
        if not _NAME.fullmatch(key):
            hint = " ('export' is shell syntax: write KEY=VALUE)" if key.startswith("export ") else ""
            raise Malformed(self.start, f"{_shown(key)} is not a variable name (letters, digits and _, not starting "
                                        f"with a digit){hint}")
        if len(value) > MAX_VALUE:
            raise Malformed(self.start, f"the value of {key} is longer than {MAX_VALUE} characters")
        self.names.add(key)
        if len(self.names) > MAX_VARIABLES:
            raise Malformed(self.start, f"more than {MAX_VARIABLES} variables")
        self.pairs.append((key, value))


def _blank_from(blank: int | None, length: int, char: str) -> int | None:
    """Where trailing whitespace starts after appending `char` at `length` (None: it ends in a non-blank)."""
    if char not in _WHITESPACE:
        return None
    return length if blank is None else blank


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "…")
