"""The config language itself: lexing, parsing, file reading and includes.

First step of config loading (``conflang``); these tests know nothing of what
directives mean. Every refusal is checked for its exact file:line:column and
for what the message says, because that is what an operator sees.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dlogd import conflang
from dlogd.conflang import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_INCLUDE_DEPTH,
    ConfigSyntaxError,
    Location,
    Sources,
    Statement,
    parse_file,
    parse_text,
    quote,
)


def syntax_error(text: str) -> ConfigSyntaxError:
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_text(text, "t.conf")
    return caught.value


def where(error: ConfigSyntaxError) -> tuple[str, int, int]:
    return error.location.file, error.location.line, error.location.column


def file_error(path: Path, sources: Sources | None = None) -> ConfigSyntaxError:
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_file(str(path), sources)
    return caught.value


def shape(statements: tuple[Statement, ...]) -> list[object]:
    """Statements as nested plain lists, for whole-tree comparisons."""
    return [
        [
            s.name,
            [(v.kind, v.text) for v in s.values],
            None if s.block is None else shape(s.block),
        ]
        for s in statements
    ]


# -- lexical rules ----------------------------------------------------------


def test_statements_values_and_blocks_with_locations() -> None:
    text = 'spool "/var/spool/dlogd";\nhost "logs1" {\n    port 7878;\n}\n'
    statements = parse_text(text, "t.conf")
    assert shape(statements) == [
        ["spool", [("string", "/var/spool/dlogd")], None],
        ["host", [("string", "logs1")], [["port", [("number", "7878")], None]]],
    ]
    port = statements[1].block
    assert port is not None
    assert port[0].location == Location("t.conf", 3, 5)
    assert port[0].values[0].location == Location("t.conf", 3, 10)
    assert statements[1].values[0].location == Location("t.conf", 2, 6)


def test_all_three_comment_styles_are_skipped() -> None:
    text = (
        "# hash comment ; { }\n"
        '// slash comment "\n'
        '/* block\n comment } */ spool /* inline */ "/a"; // tail\n'
    )
    statements = parse_text(text, "t.conf")
    assert shape(statements) == [["spool", [("string", "/a")], None]]
    assert statements[0].location == Location("t.conf", 4, 15)


def test_hash_and_slashes_inside_a_string_are_not_comments() -> None:
    (statement,) = parse_text('spool "/a#b//c/*d*/";')
    assert statement.values[0].text == "/a#b//c/*d*/"


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        (r'"a\"b"', 'a"b'),
        (r'"a\\b"', "a\\b"),
        (r'"a\nb"', "a\nb"),
        (r'"a\tb"', "a\tb"),
        (r'"a\rb"', "a\rb"),
        (r'"\x41\x7e\x00"', "A~\0"),
        (r'"\xfF"', "\xff"),
        ('"é ☃"', "é ☃"),
        ('""', ""),
    ],
)
def test_string_escapes(literal: str, expected: str) -> None:
    (statement,) = parse_text(f"x {literal};")
    assert statement.values[0].text == expected


def test_words_and_numbers_keep_their_kind_and_text() -> None:
    (statement,) = parse_text("copy yes 10M 1.3 sha256:AB:cd a/x-y_z.1 60min;")
    assert [(v.kind, v.text) for v in statement.values] == [
        ("word", "yes"),
        ("number", "10M"),
        ("number", "1.3"),
        ("word", "sha256:AB:cd"),
        ("word", "a/x-y_z.1"),
        ("number", "60min"),
    ]


def test_a_block_may_be_followed_by_an_optional_semicolon() -> None:
    statements = parse_text("a { b 1; }; c { }\nd;")
    assert shape(statements) == [
        ["a", [], [["b", [("number", "1")], None]]],
        ["c", [], []],
        ["d", [], None],
    ]


def test_empty_text_and_comment_only_text_have_no_statements() -> None:
    assert parse_text("") == ()
    assert parse_text("  # nothing\n/* here */\n") == ()


# -- lexical and syntax errors: exact location and message -------------------


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ('spool "/var/spool', 1, 7, "unterminated string: expected '\"'"),
        ('spool "/var\n/spool";', 1, 7, "unterminated string: newline before closing '\"'"),
        ('spool "/a";\n  /* never closed', 2, 3, "unterminated comment: expected '*/'"),
        ('tls {\n  ca "/x";\n', 1, 5, "unterminated block: expected '}' before end of file"),
        ("a { b { c 1; }\n", 1, 3, "unterminated block: expected '}' before end of file"),
        ('spool "/a";\n}\n', 2, 1, "'}' without a matching '{'"),
        ("spool\n", 2, 1, "expected ';' or '{' after 'spool', found end of file"),
        ('spool "/a" }', 1, 12, "expected ';' or '{' after 'spool', found punct '}'"),
        (";", 1, 1, "expected a directive name, found punct ';'"),
        ('"spool" "/a";', 1, 1, "expected a directive name, found string 'spool'"),
        ("7878;", 1, 1, "expected a directive name, found number '7878'"),
        ('spool "\\q";', 1, 8, 'unknown escape: expected \\" \\\\ \\n \\t \\r or \\xHH'),
        ('spool "\\x4";', 1, 8, "unknown escape"),
        ('spool "\\xZZ";', 1, 8, "unknown escape"),
        ('spool "a\tb";', 1, 9, "control character '\\t' in string: use an escape"),
        ('spool "a\x7fb";', 1, 9, "control character '\\x7f' in string"),
        ("spool = 1;", 1, 7, "unexpected character '='"),
        ("spool\f1;", 1, 6, "unexpected character '\\x0c'"),
        ("-1;", 1, 1, "unexpected character '-'"),
    ],
)
def test_syntax_errors_are_located(text: str, line: int, column: int, message: str) -> None:
    error = syntax_error(text)
    assert where(error) == ("t.conf", line, column)
    assert message in error.message
    assert str(error).startswith(f"t.conf:{line}:{column}: ")


def test_string_longer_than_the_limit_is_refused_at_its_start() -> None:
    limit = conflang.MAX_STRING
    assert parse_text(f'x "{"a" * limit}";')[0].values[0].text == "a" * limit
    error = syntax_error(f'x\n  "{"a" * (limit + 1)}";')
    assert where(error) == ("t.conf", 2, 3)
    assert f"longer than {limit}" in error.message


def test_nesting_up_to_the_limit_parses_and_one_more_is_refused() -> None:
    ok = "a { " * MAX_DEPTH + "}" * MAX_DEPTH
    deepest = parse_text(ok)
    for _ in range(MAX_DEPTH - 1):
        block = deepest[0].block
        assert block is not None
        deepest = block
    assert deepest[0].block == ()
    too_deep = "a { " * (MAX_DEPTH + 1) + "}" * (MAX_DEPTH + 1)
    error = syntax_error(too_deep)
    # Reported at the '{' that opens the block one level too deep.
    assert where(error) == ("t.conf", 1, 4 * (MAX_DEPTH + 1) - 1)
    assert f"nested deeper than {MAX_DEPTH}" in error.message


def test_very_deep_nesting_is_refused_without_recursion_error() -> None:
    error = syntax_error("a {" * 100_000)
    assert f"nested deeper than {MAX_DEPTH}" in error.message


# -- quote(): the inverse of string lexing -----------------------------------


@given(st.text().filter(lambda s: "\0" not in s))
@example('\r\n\t"\\\x01\x7f\x80\u2028')
@example("a" * conflang.MAX_STRING)
def test_quote_then_parse_gives_back_the_string(text: str) -> None:
    (statement,) = parse_text(f"x {quote(text)};")
    assert statement.values == (conflang.Value("string", text, Location("<string>", 1, 3)),)


def test_quote_output_is_one_line() -> None:
    assert quote('a\nb\r"c"') == '"a\\nb\\x0d\\"c\\""'


# -- reading files ------------------------------------------------------------


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_nul_byte_is_refused_at_its_location(conf_dir: Path) -> None:
    path = conf_dir / "c.conf"
    path.write_bytes(b'spool "/a";\n  x\0;\n')
    error = file_error(path)
    assert where(error) == (str(path), 2, 4)
    assert "NUL byte" in error.message


def test_invalid_utf8_is_refused_at_its_location(conf_dir: Path) -> None:
    path = conf_dir / "c.conf"
    path.write_bytes(b'spool "/a";\nspool "\xc3\x28";\n')
    error = file_error(path)
    assert where(error) == (str(path), 2, 8)
    assert "invalid UTF-8" in error.message


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_give_text_or_a_located_syntax_error(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".conf") as handle:
        handle.write(data)
        handle.flush()
        try:
            parse_file(handle.name)
        except ConfigSyntaxError as exc:
            assert exc.location.file == handle.name
            assert exc.location.line >= 1
            assert exc.location.column >= 1
            assert exc.message


def test_file_larger_than_the_limit_is_refused_unread(conf_dir: Path) -> None:
    path = conf_dir / "big.conf"
    path.write_bytes(b"#" * (10 * 1024 * 1024))
    error = file_error(path)
    assert where(error) == (str(path), 0, 0)
    assert f"larger than {MAX_FILE_BYTES} bytes" in error.message


def test_file_at_the_limit_is_read(conf_dir: Path) -> None:
    path = conf_dir / "big.conf"
    path.write_bytes(b'spool "/a";\n' + b"#" * (MAX_FILE_BYTES - 12))
    assert len(path.read_bytes()) == MAX_FILE_BYTES
    assert shape(parse_file(str(path))) == [["spool", [("string", "/a")], None]]


def test_missing_file(conf_dir: Path) -> None:
    error = file_error(conf_dir / "nope.conf")
    assert where(error) == (str(conf_dir / "nope.conf"), 0, 0)
    assert error.message == "cannot open: No such file or directory"


def test_directory_given_as_a_file_is_refused(conf_dir: Path) -> None:
    (conf_dir / "d.conf").mkdir()
    error = file_error(conf_dir / "d.conf")
    assert where(error) == (str(conf_dir / "d.conf"), 0, 0)
    assert error.message == "not a regular file"


def test_fifo_is_refused_without_hanging(conf_dir: Path) -> None:
    # No writer ever opens the FIFO: a blocking open or read would hang here.
    fifo = conf_dir / "fifo.conf"
    os.mkfifo(fifo)
    error = file_error(fifo)
    assert where(error) == (str(fifo), 0, 0)
    assert error.message == "not a regular file"


@pytest.fixture
def world_traversable_dir() -> Iterator[Path]:
    # pytest's tmp_path lives under a 0700 directory; an unprivileged reader
    # must get past the directories to reach the file's own permission check.
    with tempfile.TemporaryDirectory() as name:
        os.chmod(name, 0o755)
        yield Path(name)


def _read_as_nobody(path: Path) -> str:
    """parse_file in a forked child that dropped root, so mode bits really apply."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(reader)
            os.setgid(65534)
            os.setuid(65534)
            try:
                parse_file(str(path))
                answer = "read"
            except ConfigSyntaxError as exc:
                answer = str(exc)
            os.write(writer, answer.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        answer = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return answer


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_unreadable_file_is_refused(world_traversable_dir: Path) -> None:
    path = write(world_traversable_dir / "secret.conf", 'spool "/a";\n')
    os.chmod(path, 0o644)
    assert _read_as_nobody(path) == "read"  # the drop to nobody is not what refuses
    os.chmod(path, 0)
    assert _read_as_nobody(path) == f"{path}:0:0: cannot open: Permission denied"


# -- includes -----------------------------------------------------------------


def test_include_splices_a_file_relative_to_the_including_file(conf_dir: Path) -> None:
    write(conf_dir / "sub" / "hosts.conf", 'host "b" { }\n')
    main = write(conf_dir / "main.conf", 'spool "/a";\ninclude "sub/hosts.conf";\nsocket "/s";\n')
    sources = Sources()
    statements = parse_file(str(main), sources)
    assert [s.name for s in statements] == ["spool", "host", "socket"]
    assert statements[1].location == Location(str(conf_dir / "sub" / "hosts.conf"), 1, 1)
    assert sources.files == [str(main), str(conf_dir / "sub" / "hosts.conf")]
    assert sources.directories == []


def test_nested_include_is_relative_to_the_file_that_names_it(conf_dir: Path) -> None:
    write(conf_dir / "a" / "b" / "leaf.conf", "leaf;\n")
    write(conf_dir / "a" / "mid.conf", 'include "b/leaf.conf";\n')
    main = write(conf_dir / "main.conf", 'include "a/mid.conf";\n')
    assert [s.name for s in parse_file(str(main))] == ["leaf"]


def test_include_of_a_directory_takes_its_conf_files_in_name_order(conf_dir: Path) -> None:
    drop = conf_dir / "client.d"
    write(drop / "20-b.conf", "second;\n")
    write(drop / "10-a.conf", "first;\n")
    write(drop / "30-c.conf.bak", "backup;\n")
    write(drop / ".hidden.conf", "hidden;\n")
    write(drop / "notes.txt", "notes;\n")
    (drop / "sub.conf").mkdir()  # a directory named *.conf is not a drop-in file
    write(drop / "sub.conf" / "x.conf", "nested;\n")
    main = write(conf_dir / "main.conf", 'before;\ninclude "client.d";\nafter;\n')
    sources = Sources()
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_file(str(main), sources)
    # The sub.conf directory is offered as a file and refused as one, at the
    # include that offered it.
    assert where(caught.value) == (str(main), 2, 1)
    assert caught.value.message == f"include {drop / 'sub.conf'}: not a regular file"
    (drop / "sub.conf" / "x.conf").unlink()
    (drop / "sub.conf").rmdir()
    sources = Sources()
    assert [s.name for s in parse_file(str(main), sources)] == [
        "before",
        "first",
        "second",
        "after",
    ]
    assert sources.directories == [str(drop)]
    assert sources.files == [str(main), str(drop / "10-a.conf"), str(drop / "20-b.conf")]


def test_empty_include_directory_contributes_nothing(conf_dir: Path) -> None:
    (conf_dir / "empty.d").mkdir()
    main = write(conf_dir / "main.conf", 'include "empty.d";\nx;\n')
    assert [s.name for s in parse_file(str(main))] == ["x"]


def test_file_including_itself_is_a_loop(conf_dir: Path) -> None:
    main = write(conf_dir / "self.conf", '# me\n  include "self.conf";\n')
    error = file_error(main)
    assert where(error) == (str(main), 2, 3)
    assert error.message == f"include loop: {main} is already being read"


def test_two_files_including_each_other_is_a_loop(conf_dir: Path) -> None:
    a = write(conf_dir / "a.conf", 'include "b.conf";\n')
    b = write(conf_dir / "b.conf", 'x;\ninclude "a.conf";\n')
    error = file_error(a)
    assert where(error) == (str(b), 2, 1)
    assert error.message == f"include loop: {a} is already being read"


def test_loop_through_a_symlink_is_still_a_loop(conf_dir: Path) -> None:
    a = write(conf_dir / "a.conf", 'include "link.conf";\n')
    os.symlink(a, conf_dir / "link.conf")
    error = file_error(a)
    assert where(error) == (str(a), 1, 1)
    assert "include loop" in error.message


def test_the_same_file_included_twice_side_by_side_is_not_a_loop(conf_dir: Path) -> None:
    write(conf_dir / "x.conf", "x;\n")
    main = write(conf_dir / "main.conf", 'include "x.conf";\ninclude "x.conf";\n')
    assert [s.name for s in parse_file(str(main))] == ["x", "x"]


def test_includes_nested_deeper_than_the_limit(conf_dir: Path) -> None:
    for i in range(MAX_INCLUDE_DEPTH + 2):
        write(conf_dir / f"c{i}.conf", f'include "c{i + 1}.conf";\n')
    write(conf_dir / f"c{MAX_INCLUDE_DEPTH + 2}.conf", "end;\n")
    error = file_error(conf_dir / "c0.conf")
    assert where(error) == (str(conf_dir / f"c{MAX_INCLUDE_DEPTH}.conf"), 1, 1)
    assert error.message == f"includes nested deeper than {MAX_INCLUDE_DEPTH}"


def test_includes_at_the_depth_limit_are_read(conf_dir: Path) -> None:
    for i in range(MAX_INCLUDE_DEPTH):
        write(conf_dir / f"c{i}.conf", f'include "c{i + 1}.conf";\n')
    write(conf_dir / f"c{MAX_INCLUDE_DEPTH}.conf", "end;\n")
    assert [s.name for s in parse_file(str(conf_dir / "c0.conf"))] == ["end"]


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("include;", 1, 'include takes one value: include "PATH";'),
        ('include "a" "b";', 1, 'include takes one value: include "PATH";'),
        ('include "a" { }', 1, 'include takes one value: include "PATH";'),
        ("include a.conf;", 9, "include path must be a string"),
    ],
)
def test_malformed_include(conf_dir: Path, text: str, column: int, message: str) -> None:
    main = write(conf_dir / "main.conf", "x;\n" + text + "\n")
    error = file_error(main)
    assert where(error) == (str(main), 2, column)
    assert error.message == message


def test_syntax_error_in_an_included_file_names_that_file(conf_dir: Path) -> None:
    write(conf_dir / "inc.conf", "ok;\n\n   oops\n")
    main = write(conf_dir / "main.conf", 'include "inc.conf";\n')
    error = file_error(main)
    assert where(error) == (str(conf_dir / "inc.conf"), 4, 1)
    assert "after 'oops'" in error.message


def test_include_of_a_missing_file_is_reported_at_the_include_line(conf_dir: Path) -> None:
    main = write(conf_dir / "main.conf", 'x;\ninclude "missing.conf";\n')
    error = file_error(main)
    assert where(error) == (str(main), 2, 1)
    assert (
        error.message
        == f"include {conf_dir / 'missing.conf'}: cannot open: No such file or directory"
    )


def test_missing_file_included_from_an_included_file_is_reported_there(conf_dir: Path) -> None:
    mid = write(conf_dir / "mid.conf", 'y;\n\n  include "missing.conf";\n')
    main = write(conf_dir / "main.conf", 'include "mid.conf";\n')
    error = file_error(main)
    assert where(error) == (str(mid), 3, 3)
    assert (
        error.message
        == f"include {conf_dir / 'missing.conf'}: cannot open: No such file or directory"
    )


def test_include_path_with_a_nul_escape_is_a_syntax_error(conf_dir: Path) -> None:
    main = write(conf_dir / "main.conf", 'include "a\\x00b.conf";\n')
    error = file_error(main)
    # Located at the path value, as "include path must be a string" is.
    assert where(error) == (str(main), 1, 9)
    assert error.message == "NUL byte in include path"
