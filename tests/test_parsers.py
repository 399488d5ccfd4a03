"""Fast layer: the pure pieces an upgrade is computed from — strategy, drain counts, strikes and the parsers of
what an operator types. No processes, no sockets: each test takes microseconds."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

import anyio
import pytest

from supervisor.concurrency import gather, leaves
from supervisor.counted import counted, inflected
from supervisor.errors import UserError
from supervisor.health import Strikes
from supervisor.listeners import parse_listen
from supervisor.probe_spec import parse_probe
from supervisor.probes import Result, Verdict
from supervisor.schema import SETTINGS, Invalid
from supervisor.split_units import refuse_split_units
from supervisor.strategy import Amount, build_strategy, drain_count, parse_amount
from supervisor.units import mib, parse_duration, parse_signal, parse_size


@pytest.mark.parametrize(("text", "amount", "of_ten"), [("2", Amount(2), 2), ("25%", Amount(25, True), 3),
                                                        ("1%", Amount(1, True), 1), ("100%", Amount(100, True), 10)])
def test_amounts_are_counts_or_percentages_rounded_up(text: str, amount: Amount, of_ten: int) -> None:
    assert parse_amount(text, "--batch") == amount
    assert amount.of(10) == of_ten


@pytest.mark.parametrize("text", ["0", "-1", "0%", "101%", "x", "2.5", ""])
def test_bad_amounts_are_refused(text: str) -> None:
    with pytest.raises(UserError, match="invalid --batch"):
        parse_amount(text, "--batch")


def test_surge_starts_everything_in_one_batch() -> None:
    strategy = build_strategy(None, None, None, 100)
    assert strategy.batches(5) == [5]
    assert strategy.required(5) == 5


def test_rolling_batches_respect_max_surge_and_success_percent() -> None:
    strategy = build_strategy("rolling", "50%", "2", "60%")
    assert strategy.step(10) == 2
    assert strategy.batches(5) == [2, 2, 1]
    assert strategy.required(2) == 2
    assert strategy.required(5) == 3
    assert build_strategy("rolling", None, None, 100).batches(3) == [1, 1, 1]


@pytest.mark.parametrize(("args", "message"), [
    (("blue-green", None, None, 100), "--strategy"),
    (("surge", "2", None, 100), "apply to --strategy rolling"),
    (("rolling", None, None, 0), "--success-percent"),
    (("rolling", None, None, "lots"), "--success-percent"),
    (("rolling", None, "0", 100), "room above --processes"),
])
def test_strategy_errors_name_the_option(args: tuple, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_strategy(*args)


@pytest.mark.parametrize(("batch", "new_ready", "old_current", "processes", "drained"), [
    (2, 2, 4, 4, 2),  # a full old generation: one old per new
    (2, 2, 3, 4, 1),  # an old one short: fill first, drain only what is above N
    (2, 2, 2, 4, 0),  # old generation two short: nothing drained
    (2, 4, 4, 4, 2),  # never more than the batch
])
def test_drain_count_never_leaves_fewer_than_processes_ready(batch: int, new_ready: int, old_current: int,
                                                             processes: int, drained: int) -> None:
    assert drain_count(batch, new_ready, old_current, processes) == drained
    assert new_ready + old_current - drained >= min(processes, new_ready + old_current)


@dataclass
class _Owner:
    index: int


@dataclass
class _Generation:
    """What Strikes reads of a generation: who owns a pid, and how many instances there are."""

    pids: dict[int, int]
    instances: list[int] = field(default_factory=lambda: [0, 1])

    def owner(self, pid: int | None) -> _Owner | None:
        return _Owner(self.pids[pid]) if pid in self.pids else None


def _result(verdict: Verdict, pid: int | None) -> Result:
    return Result(verdict, "503" if verdict is Verdict.NOT_READY else "ok", pid=pid)


@pytest.mark.parametrize(("args", "message"), [
    (["--watch", "5", "sec", "--", "app"], "option --watch: '5 sec' is two words, and 'sec' would be run as the "
                                           "command; write 5s"),
    (["-l", ":80", "--drain-timeout=1.5", "minutes", "app"], "'1.5 minutes' is two words.*write 1.5m"),
    (["--max-rss", "512", "M", "--", "app"], "write 512M")])
def test_a_number_split_from_its_unit_is_refused(args: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        refuse_split_units(args)


@pytest.mark.parametrize("args", [["--watch", "5", "--", "sec"], ["--watch", "5s", "sec"], ["--", "app", "--watch", "5",
                                  "sec"], ["--name", "5", "s"], ["--watch", "5", "seconds-app"]])
def test_a_command_after_a_whole_value_is_not_a_split_unit(args: list[str]) -> None:
    refuse_split_units(args)


def test_counted_nouns_are_singular_for_one_only() -> None:
    assert [counted(count, "instance") for count in (0, 1, 2)] == ["0 instances", "1 instance", "2 instances"]
    assert [counted(2, noun) for noun in ("process", "entry", "day", "consecutive failure")] == [
        "2 processes", "2 entries", "2 days", "2 consecutive failures"]
    assert inflected("process", 1) == "process" and inflected("process", 3) == "processes"


def test_a_threshold_of_one_is_one_failure() -> None:
    strikes = Strikes(_Generation({100: 0}), threshold=1)  # type: ignore[arg-type]
    assert strikes.record(_result(Verdict.NOT_READY, 100)).endswith(": 1 consecutive failure (last: 503)")


def test_strikes_count_each_instance_apart() -> None:
    strikes = Strikes(_Generation({100: 0, 101: 1}), threshold=3)  # type: ignore[arg-type]
    verdicts = [(Verdict.NOT_READY, 100), (Verdict.READY, 101), (Verdict.NOT_READY, 100), (Verdict.READY, 101)]
    assert [strikes.record(_result(v, pid)) for v, pid in verdicts] == [None] * 4
    failure = strikes.record(_result(Verdict.NOT_READY, 100))
    assert failure == "instance 0: 3 consecutive failures (last: 503)"


def test_strikes_reset_on_success_and_ignore_inconclusive() -> None:
    strikes = Strikes(_Generation({100: 0}, instances=[0]), threshold=2)  # type: ignore[arg-type]
    assert strikes.record(_result(Verdict.NOT_READY, 100)) is None
    assert strikes.record(_result(Verdict.INCONCLUSIVE, None)) is None
    assert strikes.record(_result(Verdict.READY, 100)) is None
    assert strikes.record(_result(Verdict.NOT_READY, 100)) is None
    assert strikes.record(_result(Verdict.NOT_READY, 100)) == "2 consecutive failures (last: 503)"


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0),
                                               ("1.5", 1.5), (".5s", 0.5), (" 3 s ", 3.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5 sec", "-1s", "1e3", "inf", "nan", "s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(UserError, match="invalid --watch"):
        parse_duration(text, "--watch")


@pytest.mark.parametrize(("text", "size"), [("512M", 512 << 20), ("2G", 2 << 30), ("1500000K", 1500000 << 10),
                                            ("512MiB", 512 << 20), ("1.5g", 3 << 29), (" 64 mb ", 64 << 20),
                                            ("1048576", 1 << 20)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "512X", "-1M", "M", "1e9", "2 P", "9" * 400 + "T"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(UserError, match="invalid --max-rss"):
        parse_size(text, "--max-rss")


@pytest.mark.parametrize(("value", "size"), [("512M", 512 << 20), (600_000_000, 600_000_000), ("1M", 1 << 20)])
def test_max_rss_takes_a_size_or_bytes(value: object, size: int) -> None:
    assert SETTINGS["max_rss"].check(value) == SETTINGS["max_rss"].parse(value) == size


@pytest.mark.parametrize("value", ["1023K", "17T", True, 2.5, "lots", [512]])
def test_max_rss_out_of_range_or_not_a_size_is_refused(value: object) -> None:
    with pytest.raises(Invalid, match=r"^expected a size from 1 MiB to 16 TiB \(like 512M, 2G\), got "):
        SETTINGS["max_rss"].check(value)


def test_sizes_for_people() -> None:
    assert [mib(size) for size in (612 << 20, 3 << 29, 12 << 30, 16 << 40)] == ["612 MiB", "1.5 GiB", "12 GiB",
                                                                                "16 TiB"]


@pytest.mark.parametrize(("text", "expected"), [("TERM", signal.SIGTERM), ("sigusr1", signal.SIGUSR1),
                                                ("15", signal.SIGTERM), ("SIGQUIT", signal.SIGQUIT)])
def test_signals(text: str, expected: signal.Signals) -> None:
    assert parse_signal(text) is expected


@pytest.mark.parametrize("text", ["TERMINATE", "999", "", "SIG"])
def test_bad_signals_are_refused(text: str) -> None:
    with pytest.raises(UserError, match="unknown signal"):
        parse_signal(text)


@pytest.mark.parametrize(("text", "kind", "host", "port", "name", "shown"), [
    ("8080", "tcp", None, 8080, "listen0", ":8080"),
    (":8080", "tcp", None, 8080, "listen0", ":8080"),
    ("127.0.0.1:80", "tcp", "127.0.0.1", 80, "listen0", "127.0.0.1:80"),
    ("[::1]:9000", "tcp", "::1", 9000, "listen0", "[::1]:9000"),
    ("udp://:53", "udp", None, 53, "listen0", "udp://:53"),
    ("web=tcp://localhost:8000", "tcp", "localhost", 8000, "web", "localhost:8000"),
])
def test_listen_addresses(text: str, kind: str, host: str | None, port: int, name: str, shown: str) -> None:
    spec = parse_listen(text, 0)
    assert (spec.kind, spec.host, spec.port, spec.name, str(spec)) == (kind, host, port, name, shown)


def test_unix_listeners_keep_their_path() -> None:
    spec = parse_listen("api=unix:/run/app.sock", 1)
    assert (spec.kind, spec.path, spec.name, spec.explicit_name) == ("unix", "/run/app.sock", "api", True)


@pytest.mark.parametrize(("text", "message"), [("", "no address"), ("host:http", "is not a number"),
                                               ("1.2.3.4:70000", "out of range"), ("unix:", "needs a path"),
                                               ("a:b:c", "expected HOST:PORT")])
def test_bad_listen_addresses_say_why(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_listen(text, 0)


@pytest.mark.parametrize(("text", "kind", "host", "port", "path"), [
    ("http", "http", None, None, "/readyz"),
    ("http:/healthz", "http", None, None, "/healthz"),
    ("http://127.0.0.1:9000/up", "http", "127.0.0.1", 9000, "/up"),
    ("tcp://[::1]:81", "tcp", "::1", 81, "/readyz"),
    ("notify", "notify", None, None, "/readyz"),
])
def test_probes(text: str, kind: str, host: str | None, port: int | None, path: str) -> None:
    spec = parse_probe(text)
    assert (spec.kind, spec.host, spec.port, spec.path) == (kind, host, port, path)


def test_exec_and_delay_probes() -> None:
    assert parse_probe("exec: /bin/check --quick").command == "/bin/check --quick"
    assert parse_probe("delay:250ms").seconds == pytest.approx(0.25)


@pytest.mark.parametrize(("text", "message"), [("exec:", "needs a command"), ("https://x:1/", "https probes"),
                                               ("http://x:0/", "out of range"), ("tcp://x:1/p", "takes no path"),
                                               ("grpc", "unknown probe kind 'grpc'")])
def test_bad_probes_say_why(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_probe(text)


@pytest.mark.parametrize(("text", "meant"), [("http:healthz", "http/healthz"), ("HTTP/readyz", "http/readyz"),
                                             ("htp/readyz", "http/readyz"), ("/healthz", "http/healthz"),
                                             ("tcp:8080", "tcp://127.0.0.1:8080"),
                                             ("http:8080/healthz", "http://127.0.0.1:8080/healthz"),
                                             ("http:db.local:81/up", "http://db.local:81/up"),
                                             ("exec ./check", "exec:./check"), ("delay 5s", "delay:5s"),
                                             ("notify:1", "notify")])
def test_a_near_miss_probe_gets_its_right_spelling(text: str, meant: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_probe(text)
    assert str(caught.value).startswith(f"invalid --ready {text!r}: did you mean {meant!r}? (forms: http, http/PATH")
    assert parse_probe(meant).kind == meant.split(":")[0].split("/")[0]


def test_a_known_kind_in_no_known_form_is_not_called_unknown() -> None:
    with pytest.raises(UserError, match=r"'exec': not a form of the exec probe \(forms: .*exec:COMMAND"):
        parse_probe("exec")


# -- concurrency.gather ------------------------------------------------------------------------------------------


def test_gather_raises_a_sole_error_as_is_and_every_error_of_siblings_as_a_group() -> None:
    async def fails(error: Exception, after: float) -> None:
        await anyio.sleep(after)
        raise error

    async def cancelled_sibling() -> None:
        await anyio.sleep(10)

    async def main() -> None:
        with pytest.raises(KeyError):  # alone: as is, so callers catch what they expect
            await gather(lambda: fails(KeyError("a"), 0), cancelled_sibling)
        with pytest.raises(BaseExceptionGroup) as raised:  # two at once: neither is dropped
            await gather(lambda: fails(KeyError("a"), 0), lambda: fails(ValueError("b"), 0))
        assert sorted(type(error).__name__ for error in leaves(raised.value)) == ["KeyError", "ValueError"]

    anyio.run(main)
