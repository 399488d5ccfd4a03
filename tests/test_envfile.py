"""Fast layer: --env-file's parser (systemd EnvironmentFile= syntax), its faults with line numbers, the order in
which files and --env are merged, and the file read as hostile input. Plain data and small temp files only."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor import config
from supervisor.envfile import MAX_VARIABLES, EnvFile, Malformed, environment, load, parse, reference
from supervisor.errors import UserError


@pytest.mark.parametrize(("text", "pairs"), [
    ("A=1\nB=2\n", [("A", "1"), ("B", "2")]),
    ("A=1", [("A", "1")]),  # no newline at the end
    ("# a comment\n; another\n\n   \nA=1\n", [("A", "1")]),
    ("  KEY  =   spaced value   \n", [("KEY", "spaced value")]),  # around key and unquoted value dropped
    ("A=\n", [("A", "")]),
    ("A='  kept  # not a comment $HOME \\n'\n", [("A", "  kept  # not a comment $HOME \\n")]),
    ('A="say \\"hi\\" \\\\ \\$x \\`y\\` \\n"\n', [("A", 'say "hi" \\ $x `y` \\n')]),  # other escapes stay
    ("A=a\\ b\\#c\\\\\n", [("A", "a b#c\\")]),  # outside quotes a backslash takes the next character
    ("A=x\\ \n", [("A", "x ")]),  # an escaped trailing space is kept
    ("A=first \\\n  second\nB=2\n", [("A", "first   second"), ("B", "2")]),  # continuation
    ('A="one\ntwo"\n', [("A", "one\ntwo")]),  # quotes span lines
    ('A="x\\\ny"\n', [("A", "xy")]),  # an escaped newline in double quotes is dropped
    ('A="a" \'b\' c\n', [("A", "abc")]),
    ("A=a#b\n", [("A", "a#b")]),  # no comments after a value
    ("# a comment \\\nB=1\n", [("B", "1")]),  # a comment never continues (systemd ≥ 254)
    ("A=1\r\nB=2\r\n", [("A", "1"), ("B", "2")]),
    ("A=1\nA=2\n", [("A", "1"), ("A", "2")]),  # both kept in order: the later wins when merged
    ("_x9=é ü\n", [("_x9", "é ü")]),
])
def test_systemd_syntax(text: str, pairs: list[tuple[str, str]]) -> None:
    assert parse(text) == pairs


@pytest.mark.parametrize(("text", "line", "reason"), [
    ("A=1\nNOVALUE\nB=2\n", 2, "expected KEY=VALUE, got a line without '='"),
    ("A=1\n\nexport B=2\n", 3, "'export B' is not a variable name"),
    ("1A=x\n", 1, "'1A' is not a variable name"),
    ("A-B=x\n", 1, "'A-B' is not a variable name"),
    ("A=1\n  =x\n", 2, "an assignment without a name"),
    ("A=1\nB=\"open\nC=3\n", 2, "a quote opened on this line is never closed"),
    ("A='open", 1, "never closed"),
    ("A=1\nB=2\0\n", 2, "NUL byte"),
    ("A=x\\\ny\\\nz\nB\n", 4, "expected KEY=VALUE"),  # lines count through continuations
    ("A=" + "x" * 131073 + "\n", 1, "longer than 131072 characters"),
    ("".join(f"V{index}=1\n" for index in range(MAX_VARIABLES + 1)), MAX_VARIABLES + 1, "more than 1024 variables"),
])
def test_a_malformed_file_names_the_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(Malformed) as caught:
        parse(text)
    assert caught.value.line == line and reason in caught.value.reason, str(caught.value)


def test_files_in_order_then_explicit_variables_win(tmp_path: Path) -> None:
    first, second = tmp_path / "first.env", tmp_path / "second.env"
    first.write_text("A=first\nB=first\nC=first\n")
    second.write_text("B=second\nC=second\n")
    merged = dict(environment([EnvFile(str(first)), EnvFile(str(second))], [("C", "flag")]))
    assert merged == {"A": "first", "B": "second", "C": "flag"}
    assert environment([], [("A", "1"), ("A", "2")]) == (("A", "1"), ("A", "2")), "no file: --env as it was"


def test_a_leading_dash_allows_a_missing_file(tmp_path: Path) -> None:
    assert reference(f"-{tmp_path}/none.env") == EnvFile(f"{tmp_path}/none.env", optional=True)
    assert load(reference(f"-{tmp_path}/none.env")) == {}
    with pytest.raises(UserError, match="cannot read env file .*none.env: No such file"):
        load(reference(f"{tmp_path}/none.env"))
    assert reference("relative.env").path == str(Path.cwd() / "relative.env")
    with pytest.raises(UserError, match="names no file"):
        reference("-")


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe\x00\x01junk", "not UTF-8 text (byte 0xff at offset 0, line 1)"),
    (b"A=1\nB=caf\xe9\n", "line 2"),
    (b"A=1\n\x00\x00", "line 2: contains a NUL byte"),
    (b"A=" + b"x" * (2 << 20), "larger than 1024 KiB"),
    (b"A=1\nexport B=2\n", "line 2: 'export B' is not a variable name"),
])
def test_a_hostile_file_is_one_line_naming_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "app.env"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        load(EnvFile(str(path)))
    text = str(caught.value)
    assert "\n" not in text and str(path) in text and message in text, text


def test_a_directory_or_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "fifo")
    for path in (tmp_path, tmp_path / "fifo"):
        with pytest.raises(UserError, match="not a regular file|Is a directory"):
            load(EnvFile(str(path)))


def test_settings_merge_env_files_under_env_and_reread_them(tmp_path: Path) -> None:
    path = tmp_path / "app.env"
    path.write_text("A=file\nB=file\n")
    options = {"command": ("/bin/true",), "env": ("B=flag",), "env_file": (str(path),)}
    settings = config.from_command_line({**_defaults(), **options}, frozenset(options), None)
    assert dict(settings.env) == {"A": "file", "B": "flag"} and settings.env_file == (EnvFile(str(path)),)
    path.write_text("A=changed\n")
    assert dict(config.reread(settings).env) == {"A": "changed", "B": "flag"}
    path.write_text("A=1\nA B\n")
    with pytest.raises(UserError) as caught:
        config.reread(settings)
    assert config.invalid(caught.value) == f"invalid env file {path} line 2: expected KEY=VALUE, got a line without '='"


def _defaults() -> dict[str, object]:
    """The run command's defaults, as click gives them to config."""
    from supervisor.cli import run_command

    return run_command.make_context("supervise", ["--", "/bin/true"]).params
