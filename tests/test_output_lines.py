"""The children's output as lines (lines.py) and as the supervisor keeps and logs them (output_log.py): cut,
decoded, partial lines, the ring's bounds, the text and JSON shapes, the query behind `ctl logs`. Fast layer."""

from __future__ import annotations

import io
import json

from supervisor.events import Events
from supervisor.lines import CUT_MARK, LineSplitter
from supervisor.output_log import RING_LINES, OutputLog, Ring, quoted


def test_lines_come_out_whole_whatever_the_pieces() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"hel") == []
    assert splitter.feed(b"lo\nwor") == ["hello"]
    assert splitter.pending() == "wor"
    assert splitter.feed(b"ld\n\nlast") == ["world", ""]
    assert splitter.finish() == ["last"]  # the end of the stream: a partial last line is a line too
    assert splitter.finish() == []


def test_a_long_line_is_cut_at_the_bound_and_its_rest_skipped() -> None:
    splitter = LineSplitter(limit=10)
    assert splitter.feed(b"0123456789abcdef\nnext\n") == ["0123456789" + CUT_MARK, "next"]
    assert splitter.feed(b"x" * 25) == ["x" * 10 + CUT_MARK]  # cut before its end arrives: memory stays bounded
    assert splitter.feed(b"yyy") == []  # still the same line: skipped
    assert splitter.feed(b"zz\nafter\n") == ["after"]


def test_bytes_that_are_not_utf8_are_escaped_and_a_split_character_is_whole() -> None:
    splitter = LineSplitter()
    snowman = "☃".encode()
    assert splitter.feed(b"\xff\xfebin " + snowman[:1]) == []
    assert splitter.feed(snowman[1:] + b"\n") == ["\\xff\\xfebin ☃"]


def test_the_ring_keeps_the_last_lines_and_the_tail_skips_blank_ones() -> None:
    ring = Ring(2, 0)
    ring.add(1, 0.0, "stdout", [f"line {number}" for number in range(RING_LINES + 50)])
    assert len(ring.lines) == RING_LINES and ring.lines[-1].text == f"line {RING_LINES + 49}"
    assert ring.lines[-1].seq == RING_LINES + 50 and ring.lines[0].seq == 51
    ring.add(RING_LINES + 51, 0.0, "stderr",
             ["Traceback (most recent call last):", "ModuleNotFoundError: foo", "  ", ""])
    assert ring.tail(2) == ("Traceback (most recent call last):", "ModuleNotFoundError: foo")


def test_a_reason_quotes_the_last_line_bounded() -> None:
    assert quoted("exited with status 1", ()) == "exited with status 1"
    assert quoted("exited with status 1", ("a", "ModuleNotFoundError: x")) == \
        "exited with status 1; last output: ModuleNotFoundError: x"
    assert len(quoted("r", ("x" * 10000,))) < 600


def _log(log_format: str) -> tuple[OutputLog, io.StringIO]:
    stream = io.StringIO()
    return OutputLog(Events(log_format, stream=stream)), stream


def test_text_lines_carry_generation_instance_and_pid() -> None:
    log, stream = _log("text")
    ring = log.open(3, 1)
    ring.pid = 4242
    log.relay(ring, "stderr", ["GET / 200", "second"])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith(" [gen 3 #1 pid 4242] GET / 200"), lines
    assert log.seq == 2


def test_json_lines_are_objects_with_the_same_fields() -> None:
    log, stream = _log("json")
    ring = log.open(2, 0)
    ring.pid = 7
    log.relay(ring, "stdout", ['say "hi" \\ \x1b[0m', "ünïcode"])
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "output" and first["level"] == "info" and first["ts"].endswith("Z")
    assert (first["gen"], first["instance"], first["pid"], first["stream"]) == (2, 0, 7, "stdout")
    assert first["msg"] == 'say "hi" \\ \x1b[0m' and second["msg"] == "ünïcode"


def test_the_query_filters_orders_and_keeps_failed_instances_a_while() -> None:
    log, _ = _log("text")
    rings = {(gen, index): log.open(gen, index) for gen in (1, 2) for index in (0, 1)}
    for number in range(3):
        for (gen, index), ring in rings.items():
            log.relay(ring, "stdout", [f"g{gen}i{index} #{number}"])
    assert [line["msg"] for line in log.query(gen=2, instance=1)] == ["g2i1 #0", "g2i1 #1", "g2i1 #2"]
    assert [line["msg"] for line in log.query(count=2)] == ["g2i0 #2", "g2i1 #2"]
    assert all(line["seq"] > 10 for line in log.query(after=10)) and len(log.query(after=10)) == 2
    log.close(rings[(2, 0)], failed=True)
    log.close(rings[(2, 1)], failed=False)
    assert [line["msg"] for line in log.query(gen=2)] == ["g2i0 #0", "g2i0 #1", "g2i0 #2"]
    assert log.query(count=0) == []
