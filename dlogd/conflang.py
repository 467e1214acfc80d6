"""The configuration language: text -> statements, and statements -> text.

First step of config loading (``conflang`` -> ``schema`` -> ``config``). The
language is the brace-and-semicolon style of the original design::

    # comment            // comment            /* comment */
    spool "/var/spool/dlogd";
    keyword "audit" { group "wheel"; uid "1001"; host "logs1"; }
    host "logs1" { address "192.0.2.10"; port 7878; }
    include "/etc/dlogd/client.d";

Grammar (docs/config.md has the full reference)::

    file      = { statement } EOF
    statement = WORD { value } ( ";" | "{" { statement } "}" [ ";" ] )
    value     = STRING | WORD | NUMBER

This module knows nothing of what the directives mean; it only reports where
the text stops making sense, with file, line and column. ``include`` is
resolved here because it is textual: a file is spliced in, a directory
contributes its ``*.conf`` files in name order.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 8  # block nesting; the real grammar needs 2
MAX_INCLUDE_DEPTH = 8
MAX_STRING = 4096

WORD_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
WORD_CHARS = WORD_START | frozenset("0123456789-.:/")
ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


@dataclass(frozen=True)
class Location:
    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or, with ``warning``, doubtful) in a config."""

    location: Location
    message: str
    warning: bool = False

    def __str__(self) -> str:
        kind = "warning" if self.warning else "error"
        return f"{self.location}: {kind}: {self.message}"


class ConfigSyntaxError(Exception):
    """The text is not in the language; carries where and what was expected."""

    def __init__(self, location: Location, message: str) -> None:
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message


@dataclass(frozen=True)
class Token:
    kind: str  # "word", "string", "number", "punct", "eof"
    text: str
    location: Location


@dataclass(frozen=True)
class Value:
    kind: str  # "word", "string" or "number"
    text: str
    location: Location


@dataclass(frozen=True)
class Statement:
    name: str
    values: tuple[Value, ...]
    block: tuple[Statement, ...] | None
    location: Location


MAX_SHOWN = 24  # characters of an offending token an error message repeats


def _shown(text: str) -> str:
    """The offending token as an error shows it: never more than MAX_SHOWN characters,
    so a file that is not config (a secret read by mistake) is not echoed."""
    return repr(text) if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]!r}..."


def _describe(token: Token) -> str:
    if token.kind == "eof":
        return "end of file"
    return f"{token.kind} {_shown(token.text)}"


class _Lexer:
    def __init__(self, text: str, filename: str) -> None:
        self.text = text
        self.filename = filename
        self.pos = 0
        self.line = 1
        self.column = 1

    def location(self) -> Location:
        return Location(self.filename, self.line, self.column)

    def _advance(self, count: int = 1) -> None:
        for ch in self.text[self.pos : self.pos + count]:
            if ch == "\n":
                self.line += 1
                self.column = 1
            else:
                self.column += 1
        self.pos += count

    def _skip_space_and_comments(self) -> None:
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch in " \t\r\n":
                self._advance()
            elif ch == "#" or text.startswith("//", self.pos):
                end = text.find("\n", self.pos)
                self._advance((len(text) if end < 0 else end) - self.pos)
            elif text.startswith("/*", self.pos):
                start = self.location()
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise ConfigSyntaxError(start, "unterminated comment: expected '*/'")
                self._advance(end + 2 - self.pos)
            else:
                return

    def tokens(self) -> Iterator[Token]:
        while True:
            self._skip_space_and_comments()
            loc = self.location()
            if self.pos >= len(self.text):
                yield Token("eof", "", loc)
                return
            ch = self.text[self.pos]
            if ch in "{};":
                self._advance()
                yield Token("punct", ch, loc)
            elif ch == '"':
                yield Token("string", self._string(loc), loc)
            elif ch.isascii() and ch.isdigit():
                yield Token("number", self._run(WORD_CHARS), loc)
            elif ch in WORD_START:
                yield Token("word", self._run(WORD_CHARS), loc)
            else:
                raise ConfigSyntaxError(loc, f"unexpected character {ch!r}")

    def _run(self, allowed: frozenset[str]) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in allowed:
            self._advance()
        return self.text[start : self.pos]

    def _string(self, start: Location) -> str:
        self._advance()  # opening quote
        out: list[str] = []
        text = self.text
        while True:
            if self.pos >= len(text):
                raise ConfigSyntaxError(start, "unterminated string: expected '\"'")
            ch = text[self.pos]
            if ch == '"':
                self._advance()
                return "".join(out)
            if ch == "\n":
                raise ConfigSyntaxError(start, "unterminated string: newline before closing '\"'")
            if ch == "\\":
                out.append(self._escape())
            elif ch < " " or ch == "\x7f":
                raise ConfigSyntaxError(
                    self.location(), f"control character {ch!r} in string: use an escape"
                )
            else:
                out.append(ch)
                self._advance()
            if len(out) > MAX_STRING:
                raise ConfigSyntaxError(start, f"string longer than {MAX_STRING} characters")

    def _escape(self) -> str:
        loc = self.location()
        nxt = self.text[self.pos + 1 : self.pos + 2]
        if nxt in ESCAPES:
            self._advance(2)
            return ESCAPES[nxt]
        if nxt == "x":
            digits = self.text[self.pos + 2 : self.pos + 4]
            if len(digits) == 2 and all(c in "0123456789abcdefABCDEF" for c in digits):
                self._advance(4)
                return chr(int(digits, 16))
        raise ConfigSyntaxError(loc, 'unknown escape: expected \\" \\\\ \\n \\t \\r or \\xHH')


class _Parser:
    def __init__(self, tokens: Iterator[Token]) -> None:
        self.tokens = tokens
        self.current = next(tokens)

    def _next(self) -> Token:
        token = self.current
        if token.kind != "eof":
            self.current = next(self.tokens)
        return token

    def statements(self, depth: int, opener: Token | None) -> tuple[Statement, ...]:
        if depth > MAX_DEPTH:
            assert opener is not None
            raise ConfigSyntaxError(opener.location, f"blocks nested deeper than {MAX_DEPTH}")
        result: list[Statement] = []
        while True:
            token = self.current
            if token.kind == "eof":
                if opener is not None:
                    raise ConfigSyntaxError(
                        opener.location, "unterminated block: expected '}' before end of file"
                    )
                return tuple(result)
            if token.kind == "punct" and token.text == "}":
                if opener is None:
                    raise ConfigSyntaxError(token.location, "'}' without a matching '{'")
                self._next()
                return tuple(result)
            result.append(self.statement(depth))

    def statement(self, depth: int) -> Statement:
        name = self._next()
        if name.kind != "word":
            raise ConfigSyntaxError(
                name.location, f"expected a directive name, found {_describe(name)}"
            )
        values: list[Value] = []
        while self.current.kind in ("word", "string", "number"):
            token = self._next()
            values.append(Value(token.kind, token.text, token.location))
        end = self._next()
        if end.kind == "punct" and end.text == ";":
            return Statement(name.text, tuple(values), None, name.location)
        if end.kind == "punct" and end.text == "{":
            block = self.statements(depth + 1, end)
            if self.current.kind == "punct" and self.current.text == ";":
                self._next()
            return Statement(name.text, tuple(values), block, name.location)
        raise ConfigSyntaxError(
            end.location,
            f"expected ';' or '{{' after {_shown(name.text)}, found {_describe(end)}",
        )


def parse_text(text: str, filename: str = "<string>") -> tuple[Statement, ...]:
    """Parse one file's text; ``include`` is left as a statement."""
    return _Parser(_Lexer(text, filename).tokens()).statements(0, None)


def untrusted(st: os.stat_result, *, container: bool = False) -> str | None:
    """Why someone other than root or this process's user could change it (None: nobody).

    The one trust rule for config files, include directories and the directories
    above them. ``container``: a directory above a file, where the sticky bit
    (as on /tmp) keeps others from replacing what root or we put there.
    """
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}, not root or the service user"
    if container and st.st_mode & stat.S_ISVTX:
        return None
    mode = f"mode {stat.S_IMODE(st.st_mode):04o}"
    if st.st_mode & stat.S_IWOTH:
        return f"writable by every user ({mode})"
    if st.st_mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()):
        return f"writable by group {st.st_gid} ({mode})"
    return None


def _check_directories(path: str) -> None:
    """Every directory above ``path``, as named and as resolved, must be trusted:
    whoever can write one of them can replace the file."""
    seen: set[str] = set()
    for start in (os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))):
        d = start
        while d not in seen:
            seen.add(d)
            try:
                why = untrusted(os.stat(d), container=True)
            except OSError as exc:
                where = Location(path, 0, 0)
                raise ConfigSyntaxError(where, f"cannot check {d}: {exc.strerror}") from None
            if why is not None:
                raise ConfigSyntaxError(Location(path, 0, 0), f"refused: directory {d} is {why}")
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent


def read_source(path: str) -> str:
    """Read a config file, refusing what cannot be config text or could have been
    changed by someone other than root or the service user."""
    where = Location(path, 0, 0)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigSyntaxError(where, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigSyntaxError(where, "not a regular file")
        why = untrusted(st)
        if why is not None:
            raise ConfigSyntaxError(where, f"refused: {why}")
        _check_directories(path)
        data = os.read(fd, MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigSyntaxError(where, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigSyntaxError(where, f"file larger than {MAX_FILE_BYTES} bytes")
    return decode_source(data, path)


def decode_source(data: bytes, path: str) -> str:
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigSyntaxError(_byte_location(data, nul, path), "NUL byte: not a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigSyntaxError(
            _byte_location(data, exc.start, path), "invalid UTF-8: not a text file"
        ) from None


def _byte_location(data: bytes, offset: int, path: str) -> Location:
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return Location(path, line, column)


@dataclass
class Sources:
    """Every file and include directory read, for error messages and the cache."""

    files: list[str] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)


def parse_file(path: str, sources: Sources | None = None) -> tuple[Statement, ...]:
    """Parse a file and splice in its includes (top level only)."""
    return _parse_with_includes(os.path.abspath(path), sources or Sources(), ())


def _parse_with_includes(
    path: str, sources: Sources, stack: tuple[str, ...]
) -> tuple[Statement, ...]:
    sources.files.append(path)
    result: list[Statement] = []
    for statement in parse_text(read_source(path), path):
        if statement.name != "include":
            result.append(statement)
            continue
        for target in _include_targets(statement, path, sources):
            real = os.path.realpath(target)
            if real in stack or real == os.path.realpath(path):
                raise ConfigSyntaxError(
                    statement.location, f"include loop: {target} is already being read"
                )
            if len(stack) >= MAX_INCLUDE_DEPTH:
                raise ConfigSyntaxError(
                    statement.location, f"includes nested deeper than {MAX_INCLUDE_DEPTH}"
                )
            try:
                included = _parse_with_includes(target, sources, (*stack, os.path.realpath(path)))
            except ConfigSyntaxError as exc:
                if exc.location.line:
                    raise
                # The target itself is unusable: say so where the include was written.
                raise ConfigSyntaxError(
                    statement.location, f"include {target}: {exc.message}"
                ) from None
            result.extend(included)
    return tuple(result)


def _include_targets(statement: Statement, path: str, sources: Sources) -> list[str]:
    if statement.block is not None or len(statement.values) != 1:
        raise ConfigSyntaxError(statement.location, 'include takes one value: include "PATH";')
    if statement.values[0].kind != "string":
        raise ConfigSyntaxError(statement.values[0].location, "include path must be a string")
    if "\0" in statement.values[0].text:
        raise ConfigSyntaxError(statement.values[0].location, "NUL byte in include path")
    target = os.path.join(os.path.dirname(path), statement.values[0].text)
    if not os.path.isdir(target):
        return [target]
    sources.directories.append(target)
    try:
        # Anyone who can add a file here can configure us: no sticky-bit exemption.
        why = untrusted(os.stat(target))
        names = sorted(os.listdir(target))
    except OSError as exc:
        raise ConfigSyntaxError(
            statement.location, f"cannot list include directory {target}: {exc.strerror}"
        ) from None
    if why is not None:
        raise ConfigSyntaxError(statement.location, f"refused: include directory {target} is {why}")
    # Drop-in convention: only *.conf, so editors' backups and dotfiles stay inert.
    entries = [
        os.path.join(target, name)
        for name in names
        if name.endswith(".conf") and not name.startswith(".")
    ]
    for entry in entries:
        _check_drop_in_link(statement, entry)
    return entries


def _check_drop_in_link(statement: Statement, entry: str) -> None:
    """A symlink among the drop-ins is followed only to a ``*.conf`` file.

    Its target's owner, mode and directories are then checked like any config
    file's (``read_source``). Ownership alone would let ``x.conf -> /etc/shadow``
    through (root's file), and its parse error would quote it.
    """
    try:
        if not stat.S_ISLNK(os.lstat(entry).st_mode):
            return
    except FileNotFoundError:
        return  # gone meanwhile: read_source says so
    real = os.path.realpath(entry)
    if not real.endswith(".conf"):
        raise ConfigSyntaxError(
            statement.location,
            f"include {entry}: a symlink to {real}, which is not a *.conf file: not followed",
        )


def quote(text: str) -> str:
    """A string literal that ``parse_text`` reads back as ``text``."""
    out = ['"']
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch < " " or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
