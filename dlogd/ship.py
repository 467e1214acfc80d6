"""The spool drain, ``dlogd-ship``: a oneshot that sends what the spool owes.

Started by ``dlogd-ship.path`` (something was submitted) and
``dlogd-ship.timer`` (retries). Flow:

    spool.pending(), read lazily (``Backlog``): each entry goes to the queue
       of every collector it is owed to as that collector's connection asks
       for more, so the first offer does not wait for a scan of the backlog
       and memory does not grow with it
    -> per collector that is due (retry state on disk), in its own thread:
       TCP + mutual TLS -> check it is the collector we meant (name, pin)
       -> protocol.Connection(SENDER): offer up to a window of files, send each
          accepted file's bytes from the offset the collector asked for
       -> on STORED / ALREADY_STORED: spool.acknowledge(entry, host)
    -> a collector that fails gets an exponential, jittered, capped backoff
       written to <spool>/.retry/<host>.json (``backoff``), so neither the path unit nor the
       timer makes us hammer a collector that is down.

A spool entry disappears only when every host it is owed to has acknowledged
it (``Spool.acknowledge`` drops the entry with its last marker). Memory is
constant whatever the file size: one frame buffer per connection.

Exit status: 0 everything owed was delivered; 75 (EX_TEMPFAIL) some delivery
is left for a retry (the unit lists 75 in SuccessExitStatus=, so systemd does
not call that a failure); 1 the drain could not run at all (config, spool).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dlogd import journal
from dlogd.backoff import RetryState, delay, record_run
from dlogd.config import DEFAULT_CLIENT_CONFIG, ClientConfig, Host, load_client, load_logged
from dlogd.crash import crash_point
from dlogd.driver import Driver
from dlogd.fsutil import hash_fd
from dlogd.shipwire import (
    DATA_HEADER,
    Accept,
    AlreadyStored,
    Code,
    Connection,
    ConnectionClosed,
    EndOfData,
    Error,
    Event,
    Failed,
    Goodbye,
    HelloReply,
    Offer,
    Ping,
    Pong,
    ProtocolError,
    Refuse,
    Role,
    Stored,
)
from dlogd.spool import AcknowledgementFailed, DrainBusy, Entry, SharedSpool, Spool
from dlogd.tls import TLSError, TLSStream, check_collector, client_context

EXIT_DELIVERED = 0
EXIT_FAILED = 1
EXIT_RETRY_LATER = 75
MAX_PARALLEL_HOSTS = 8
MAX_RESCANS = 3


class ShipError(Exception):
    """This collector cannot be served now; everything owed to it waits for a retry."""


@dataclass
class CollectorResult:
    """What happened with one collector in this run."""

    host: str
    owed: int = 0
    delivered: int = 0
    duplicates: int = 0
    held: int = 0  # refused for good: kept, not offered again until the hold ends
    deferred: int = 0  # refused for now (TEMPORARY_FAILURE): that file held, not the collector
    failed: int = 0  # failed for now otherwise: the collector is retried later
    error: str | None = None
    next_attempt: float | None = None  # set when deferred or failed

    @property
    def complete(self) -> bool:
        """Nothing left that a retry of this collector could send."""
        return (
            self.error is None
            and not self.failed
            and self.delivered + self.duplicates + self.held + self.deferred >= self.owed
        )

    @property
    def pending(self) -> bool:
        return self.delivered + self.duplicates < self.owed

    def summary(self) -> str:
        text = f"{self.host}: {self.delivered + self.duplicates}/{self.owed} delivered"
        if self.held or self.failed:
            text += f", {self.held} held after a refusal, {self.failed} failed"
        if self.deferred:
            text += f", {self.deferred} refused for now (held, retried later)"
        if self.error:
            text += f" ({self.error})"
        if self.next_attempt is not None:
            text += f", next try {time.strftime('%H:%M:%S', time.localtime(self.next_attempt))}"
        return text


@dataclass
class _Outgoing:
    entry: Entry
    fd: int
    size: int
    sha256: bytes


class Backlog:
    """The spool's entries, read once, as the collectors' connections ask for them.

    One pass of ``spool.pending()`` serves every collector: an entry read for
    one goes to the queue of each other collector it is owed to that is being
    delivered to now, and is counted for the others (not due, on hold, no
    longer configured). Only what a connection has not yet taken is in
    memory; a collector whose connection ended takes nothing more, it is only
    counted. The reading holds the shared spool's lock, so no acknowledgement
    changes an entry's markers halfway through their reading.
    """

    def __init__(
        self,
        spool: SharedSpool,
        entries: Iterator[Entry],
        delivering: Iterable[str],
        now: float,
    ) -> None:
        self.spool = spool
        self.entries = entries
        self.now = now
        self.queues: dict[str, deque[Entry]] = {name: deque() for name in delivering}
        self.owed: Counter[str] = Counter()  # every entry owed, on hold or not
        self.held: Counter[str] = Counter()  # of which on hold
        self.done = False

    def take(self, host: str) -> Entry | None:
        """The next entry owed to ``host`` and not on hold; None once there is none."""
        with self.spool.lock:
            queue = self.queues[host]
            while not queue and not self.done:
                self._read_one()
            return queue.popleft() if queue else None

    def close(self, host: str) -> None:
        """``host``'s connection has ended: count what it would have been given."""
        with self.spool.lock:
            self.queues.pop(host, None)

    def finish(self) -> None:
        """Read the rest, for the counts."""
        with self.spool.lock:
            while not self.done:
                self._read_one()

    def _read_one(self) -> None:
        entry = next(self.entries, None)
        if entry is None:
            self.done = True
            return
        for host in sorted(entry.owed):
            self.owed[host] += 1
            if host in entry.held and self.spool.spool.held_until(entry, host)[0] > self.now:
                self.held[host] += 1
            elif (queue := self.queues.get(host)) is not None:
                queue.append(entry)


class Delivery:
    """One connection to one collector, carrying every entry owed to it.

    ``entries`` is read as the connection's window has room: the delivery
    does not know how many there are until it has them all.
    """

    def __init__(
        self, config: ClientConfig, host: Host, entries: Iterable[Entry], spool: SharedSpool
    ) -> None:
        self.config = config
        self.host = host
        self.entries = iter(entries)
        self.next_entry: Entry | None = None
        self.spool = spool
        self.outcome = CollectorResult(host.name)
        self.taken = 0
        self.outgoing: dict[int, _Outgoing] = {}
        self.next_id = 1
        self.conn = Connection(
            Role.SENDER, max_frame=config.limits.frame_size, window=config.limits.window
        )
        # One buffer, header room first, so a frame goes out without being copied;
        # sized in _exchange, once the collector has agreed on the frame size.
        self.frame = bytearray()
        self.link: Driver  # once connected

    def _more(self) -> bool:
        """Whether an entry is waiting to be offered (reading one if need be)."""
        if self.next_entry is None:
            self.next_entry = next(self.entries, None)
            if self.next_entry is not None:
                self.outcome.owed += 1
                self.taken += 1
        return self.next_entry is not None

    def _take(self) -> Entry:
        entry, self.next_entry = self.next_entry, None
        assert entry is not None
        return entry

    def counted(self, backlog: Backlog) -> CollectorResult:
        """The outcome with what the pass counted for this collector: the entries
        this connection never took (it ended first) and those on hold."""
        name = self.host.name
        self.outcome.owed += backlog.owed[name] - self.taken
        self.outcome.held += backlog.held[name]
        return self.outcome

    def run(self, connect: Callable[[Host, ClientConfig], TLSStream]) -> CollectorResult:
        if not self._more():
            return self.outcome  # nothing owed here that is not on hold: no connection
        try:
            stream = connect(self.host, self.config)
            try:
                self.link = Driver(self.conn, stream, timeout=self.config.limits.timeout)
                with self.link.telling_why("collector"):
                    self._exchange()
            finally:
                stream.close()
        except (ShipError, TLSError) as exc:
            self.outcome.error = str(exc)
        except ProtocolError as exc:
            self.outcome.error = f"protocol error: {exc}"
        except OSError as exc:
            self.outcome.error = f"{self.host.address}:{self.host.port}: {exc.strerror or exc}"
        finally:
            for out in self.outgoing.values():
                os.close(out.fd)
            self.spool.commit()
        return self.outcome

    def _exchange(self) -> None:
        self.link.send(self.conn.hello())
        reply = self._next_event()
        if not isinstance(reply, HelloReply):
            self._handle(reply)  # an Error: raises with the collector's reason
            raise ShipError(f"collector answered HELLO with {type(reply).__name__}")
        # The collector may have lowered the frame size; never send larger frames.
        self.frame = bytearray(DATA_HEADER.size + self.conn.max_frame)
        while True:
            while self.conn.can_offer and self._more():
                self._offer(self._take())
            due = self.conn.data_due
            if due is not None:
                self._send_file(*due)
            elif not self._more() and not self._unanswered():
                break
            else:
                self._handle(self._next_event())
        self.link.send(Goodbye())
        while not isinstance(event := self._next_event(), Goodbye):
            self._handle(event)
        self.link.close()

    def _unanswered(self) -> bool:
        return any(self.conn.file_state(i) is not None for i in self.outgoing)

    def _offer(self, entry: Entry) -> None:
        try:
            fd = self.spool.open_entry(entry)
        except FileNotFoundError:
            self.outcome.owed -= 1  # acknowledged meanwhile by an earlier run
            return
        except OSError as exc:
            self._unreadable(entry, exc)
            return
        try:
            size = os.fstat(fd).st_size
            digest = hash_fd(fd, size, self.link.keepalive).digest()
        except OSError as exc:
            os.close(fd)
            self._unreadable(entry, exc)
            return
        file_id, self.next_id = self.next_id, self.next_id + 1
        self.outgoing[file_id] = _Outgoing(entry, fd, size, digest)
        self.link.send(Offer(file_id, entry.keyword, entry.name, size, digest))

    def _unreadable(self, entry: Entry, exc: OSError) -> None:
        """A spool entry we cannot read is our problem, not the collector's: skip it."""
        self.outcome.failed += 1
        journal.send(
            f"{entry.keyword}/{entry.name}: cannot read the spool entry: {exc.strerror or exc}",
            message_id=journal.SHIP_FAILED,
            priority=3,
            keyword=entry.keyword,
            host=self.host.name,
            file=entry.name,
            reason="SPOOL_UNREADABLE",
        )

    def _send_file(self, file_id: int, remaining: int) -> None:
        out = self.outgoing[file_id]
        offset = out.size - remaining
        view = memoryview(self.frame)
        header = DATA_HEADER.size
        while offset < out.size:
            want = min(self.conn.max_frame, out.size - offset)
            got = os.preadv(out.fd, [view[header : header + want]], offset)
            if got == 0:
                raise ShipError(f"{out.entry.keyword}/{out.entry.name} shrank while being sent")
            view[:header] = self.conn.send_data_header(file_id, got)
            self.link.send_frame(view[: header + got])
            offset += got
            self._drain_incoming()
        self.link.send(EndOfData(file_id))

    def _handle(self, event: Event) -> None:
        if isinstance(event, Accept):
            out = self.outgoing[event.file_id]
            if event.offset:
                self._record(journal.SHIP_RESUMED, f"resuming at byte {event.offset}", out)
        elif isinstance(event, Stored | AlreadyStored):
            out = self.outgoing.pop(event.file_id)
            os.close(out.fd)
            crash_point("ship-after-stored")
            self.spool.acknowledge(out.entry, self.host.name)
            if isinstance(event, Stored):
                self.outcome.delivered += 1
                self._record(journal.SHIP_SENT, "delivered", out)
            else:
                self.outcome.duplicates += 1
                self._record(journal.SHIP_SENT, "already stored there", out)
        elif isinstance(event, Refuse | Failed):
            out = self.outgoing.pop(event.file_id)
            os.close(out.fd)
            what = f"{type(event).__name__.lower()}: {event.code.name}: {event.message}"
            if event.code is Code.TEMPORARY_FAILURE:
                what += self._hold_for_now(out.entry, what)
            elif event.code.temporary:
                self.outcome.failed += 1
            else:
                # Refused for good: hold this one file, not the whole collector.
                self.outcome.held += 1
                until = time.time() + self.config.retry.max_delay
                self.spool.hold(out.entry, self.host.name, until, what)
                what += f"; held until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(until))}"
            self._record(journal.SHIP_FAILED, what, out, priority=4, reason=event.code.name)
        elif isinstance(event, Ping):
            self.link.send(Pong(event.nonce))
        elif isinstance(event, Error):
            raise ShipError(f"collector ended the connection: {event.code.name}: {event.message}")

    def _hold_for_now(self, entry: Entry, what: str) -> str:
        """The collector cannot take this one file now (its store below ``min_free``, a
        full disk, its partial busy): hold the file, with a backoff of its own, and
        go on with the rest; the collector is not backed off for it (issue 14)."""
        self.outcome.deferred += 1
        tries = self.spool.hold_tries(entry, self.host.name) + 1
        until = time.time() + delay(self.config.retry, tries)
        self.spool.hold(entry, self.host.name, until, what, tries=tries)
        return f"; held for now, offered again after {time.strftime('%H:%M:%S', time.localtime(until))}"

    def _record(
        self, message_id: str, what: str, out: _Outgoing, *, priority: int = 6, **fields: str | int
    ) -> None:
        journal.send(
            f"{out.entry.keyword}/{out.entry.name} to {self.host.name}: {what}",
            message_id=message_id,
            priority=priority,
            keyword=out.entry.keyword,
            host=self.host.name,
            file=out.entry.name,
            size=out.size,
            sha256=out.sha256.hex(),
            **fields,
        )

    # --- what the collector says ---

    def _next_event(self) -> Event:
        """Wait until the collector says something."""
        return _not_closed(self.link.next_event())

    def _drain_incoming(self) -> None:
        """Handle whatever the collector has already said, without waiting."""
        while (event := self.link.event_if_any()) is not None:
            self._handle(_not_closed(event))


def _not_closed(event: Event) -> Event:
    if isinstance(event, ConnectionClosed):
        raise ShipError("collector closed the connection")
    return event


def connect(host: Host, config: ClientConfig) -> TLSStream:
    """TCP, then mutual TLS, then: is this the collector we meant?"""
    sock = socket.create_connection((host.address, host.port), timeout=config.limits.timeout)
    try:
        stream = TLSStream(
            sock,
            client_context(config.tls),
            server_side=False,
            timeout=config.limits.timeout,
            server_name=None if _is_ip(host.address) else host.address,
        )
        check_collector(stream.handshake(), host)
    except BaseException:
        sock.close()
        raise
    return stream


def _is_ip(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except OSError:
        return False
    return True


def drain(config: ClientConfig, *, now: float | None = None) -> list[CollectorResult]:
    """One pass over the spool: deliver what is due, schedule what is not."""
    now = time.time() if now is None else now
    spool = Spool(config.spool)
    try:
        lock_fd = spool.lock_drain()
    except BaseException:
        spool.close()
        raise
    try:
        spool.take_announcement()
        spool.cleanup(markers=False)  # the pass reads every entry's markers itself
        retry = RetryState(config.spool, config.retry)
        shared = SharedSpool(spool)
        try:
            fallback = {name: kw.hosts for name, kw in config.keywords.items()}
            due = sorted(h for h in config.hosts if retry.due(h, now) is None)
            backlog = Backlog(shared, spool.pending(fallback), due, now)
            work = [Delivery(config, config.hosts[h], _entries_for(backlog, h), shared)
                    for h in due]  # fmt: skip
            if due:
                _status(f"sending to {', '.join(due)}")
            else:
                backlog.finish()
                waiting = _waiting(config, backlog, due, retry, now)
                _status("; ".join(["nothing due", *(o.summary() for o in waiting)]))
            _deliver(work, backlog)
            backlog.finish()
            retry.tidy(set(backlog.owed))
            waiting = _waiting(config, backlog, due, retry, now)
            done: list[CollectorResult] = []
            for delivery in work:
                outcome = delivery.counted(backlog)
                if delivery.taken:
                    done.append(outcome)
                elif outcome.owed:
                    waiting.append(outcome)  # only entries on hold: nothing was tried
        finally:
            shared.close()
        if shared.failure is not None:
            journal.send(
                f"could not remove acknowledged entries: {shared.failure}; they will be "
                "sent again and recognised",
                message_id=journal.SHIP_FAILED,
                priority=4,
                reason=str(shared.failure),
            )
        for outcome in done:
            _schedule(outcome, retry)
            # A file refused for now does not back the collector off, but is its last error.
            record_run(config.spool, outcome.host, time.time(), _failure(outcome) or _held(outcome))
        if spool.unowed_seen:
            spool.cleanup(markers=False)  # ends the entries the pass found acknowledged by all
        return waiting + done
    finally:
        os.close(lock_fd)
        spool.close()


def _entries_for(backlog: Backlog, host: str) -> Iterator[Entry]:
    while (entry := backlog.take(host)) is not None:
        yield entry


def _waiting(
    config: ClientConfig, backlog: Backlog, due: Sequence[str], retry: RetryState, now: float
) -> list[CollectorResult]:
    """An outcome for each collector owed something that this run does not deliver to."""
    waiting: list[CollectorResult] = []
    for name in sorted(backlog.owed):
        if name in due:
            continue  # its Delivery says
        outcome = CollectorResult(name, owed=backlog.owed[name], held=backlog.held[name])
        if name not in config.hosts:
            outcome.error = "no longer in the config; kept"
        else:
            outcome.next_attempt = retry.due(name, now)
        waiting.append(outcome)
    return waiting


def _deliver(work: list[Delivery], backlog: Backlog) -> None:
    def run(delivery: Delivery) -> None:
        try:
            delivery.run(connect)
        finally:
            backlog.close(delivery.host.name)  # what it did not take is only counted now

    if len(work) == 1:
        run(work[0])  # the common case needs no thread
        return
    with ThreadPoolExecutor(max_workers=MAX_PARALLEL_HOSTS) as pool:
        list(pool.map(run, work))


def _schedule(outcome: CollectorResult, retry: RetryState) -> None:
    """Forget a collector's backoff when all went, else set its next attempt."""
    reason = _failure(outcome)
    if reason is None:
        retry.succeeded(outcome.host)
        return
    outcome.next_attempt = retry.failed(outcome.host, reason, time.time())
    journal.send(
        f"delivery to {outcome.host} incomplete: {reason}; retry at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(outcome.next_attempt))}",
        message_id=journal.SHIP_RETRY,
        priority=4,
        host=outcome.host,
        reason=reason,
    )


def _failure(outcome: CollectorResult) -> str | None:
    """Why a collector is left for a retry; None when this run sent it everything."""
    if outcome.complete:
        return None
    return outcome.error or f"{outcome.failed} failed for now"


def _held(outcome: CollectorResult) -> str | None:
    if not outcome.deferred:
        return None
    return f"{outcome.deferred} refused for now (TEMPORARY_FAILURE), held and retried later"


def _raise_fd_limit() -> None:
    """Each collector holds up to a window of open files: take the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _status(text: str) -> None:
    """STATUS= for `systemctl status dlogd-ship`; silently nothing outside systemd."""
    if "NOTIFY_SOCKET" not in os.environ:
        return
    import sdnotify

    sdnotify.SystemdNotifier().notify(f"STATUS={text}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dlogd-ship",
        description="Send everything the spool owes to its collectors (run by dlogd-ship.service).",
        epilog="exit status: 0 all delivered, 75 some left for a retry, 1 could not run",
    )
    parser.add_argument("--config", default=DEFAULT_CLIENT_CONFIG, help="client config file")
    parser.add_argument(
        "--prometheus",
        metavar="FILE",
        help="after the run, write what `dlogctl status --prometheus` writes here",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config, error = load_logged(load_client, args.config)
    if config is None:
        _status(f"config error: {error}")
        return EXIT_FAILED
    _raise_fd_limit()
    try:
        return _run(config)
    finally:
        if args.prometheus:
            _refresh_metrics(args.prometheus, config)


def _run(config: ClientConfig) -> int:
    try:
        outcomes = drain(config)
        run = outcomes
        # dlogd-ship.path does not watch while we run: a submit made during the
        # drain would wait for the timer. Look again while the last pass did work.
        for _ in range(MAX_RESCANS):
            if not any(o.delivered or o.duplicates for o in outcomes):
                break
            again = drain(config)
            run = whole_run(run, again)
            if not any(o.owed for o in again):
                break
            outcomes = again
    except DrainBusy as exc:
        # Not a failure: the running drain sends what we would have sent.
        print(f"dlogd-ship: {exc}; leaving the spool to it", file=sys.stderr)
        _status(str(exc))
        return EXIT_DELIVERED
    except (OSError, AcknowledgementFailed) as exc:
        journal.send(
            f"cannot drain spool {config.spool}: {exc}",
            message_id=journal.SHIP_FAILED,
            priority=3,
            reason=str(exc),
        )
        _status(f"spool error: {exc}")
        return EXIT_FAILED
    # The exit status is what is still owed (the last pass); the summary is the run.
    pending = [o for o in outcomes if o.pending]
    _status("; ".join(o.summary() for o in run) or "spool empty")
    for outcome in run:
        print(outcome.summary(), file=sys.stderr)
    return EXIT_RETRY_LATER if pending else EXIT_DELIVERED


def _refresh_metrics(path: str, config: ClientConfig) -> None:
    """node_exporter's textfile for this spool, as of the end of the run.

    The spool may be half-drained or broken: the figures say so. A file that
    cannot be written is reported and does not change the run's exit status.
    """
    from dlogd import status  # only runs that write metrics pay for the import

    try:
        figures = status.gather_client(config.spool, config.hosts)
        status.write_atomically(path, status.prometheus(figures))
    except OSError as exc:
        print(f"dlogd-ship: cannot write metrics to {path}: {exc}", file=sys.stderr)


def whole_run(
    earlier: Sequence[CollectorResult], later: Sequence[CollectorResult]
) -> list[CollectorResult]:
    """Two passes as one: what was sent adds up; what is still owed, held, failing,
    the error and the next try are the later pass's (a collector the later pass
    did not meet keeps its earlier result)."""
    merged = {o.host: o for o in earlier}
    for result in later:
        before = merged.get(result.host)
        if before is None:
            merged[result.host] = result
            continue
        sent = before.delivered + before.duplicates
        merged[result.host] = dataclasses.replace(
            result,
            owed=result.owed + sent,
            delivered=result.delivered + before.delivered,
            duplicates=result.duplicates + before.duplicates,
        )
    return [merged[h] for h in sorted(merged)]


if __name__ == "__main__":
    sys.exit(main())
