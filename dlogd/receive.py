"""The collector service: one shipper's TLS connection in, durable files out.

Runs as the ``dlogd-receive@`` instance of an ``Accept=yes`` TCP socket (the
connection is fd 3), or standalone on a port for development
(``--listen ADDRESS:PORT``). Flow per connection:

    TLS handshake (mutual) -> which configured host is this? (tls.identify_sender)
    -> protocol.Connection(RECEIVER) -> per offer: keyword allowed for this host?
    -> store.Store for (keyword, host) decides accept / resume / already stored
    -> data written and hashed as it arrives -> group commit -> STORED

The group commit: finished files are made durable together when the
shipper has nothing more waiting on the socket (or a batch is full), so a
stream of small files costs one flush per batch instead of one per file,
and no acknowledgement is ever sent before its file is durable.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

from dlogd import activation, journal, trigger
from dlogd.config import DEFAULT_SERVER_CONFIG, ServerConfig, load_logged, load_server
from dlogd.driver import Driver
from dlogd.shipwire import (
    Accept,
    AlreadyStored,
    Code,
    Connection,
    ConnectionClosed,
    Data,
    EndOfData,
    Error,
    Event,
    Failed,
    Goodbye,
    Hello,
    Offer,
    Ping,
    Pong,
    ProtocolError,
    Refuse,
    Role,
    Stored,
)
from dlogd.store import (
    DigestMismatch,
    NameConflict,
    NoRoom,
    PartialUsage,
    SizeMismatch,
    Store,
    StoreError,
    UnsafeName,
    Upload,
    tidy_partials,
)
from dlogd.tls import (
    PeerRefused,
    TLSError,
    TLSStream,
    TLSTimeout,
    identify_sender,
    server_context,
)

MAX_BATCH_BYTES = 256 * 1024 * 1024
# Partial usage of a sending host, as an instance starts (docs/journal.md). Kept
# here until dlogd/journal.py, which holds the other ids, takes it.
RECEIVE_PARTIALS = "5b0f3c7e9a2d4e61b8c4f1d2a7e9c305"
STANDALONE_BACKLOG = 64  # development mode only: under systemd the socket unit listens


class HelloRefused(Exception):
    """We told the shipper why the connection ends; nothing more to say."""


@dataclass
class _Incoming:
    """A file whose data is arriving: where it goes, or why it will fail."""

    offer: Offer
    store: Store
    upload: Upload | None
    failure: StoreError | None = None


class Session:
    """One shipper connection after the handshake: the protocol loop over a TLS stream."""

    def __init__(
        self, config: ServerConfig, link: Driver, host: str, peer: str, serial: str = ""
    ) -> None:
        self.config = config
        self.link = link
        self.conn = link.conn
        self.host = host
        self.peer = peer
        # The sender certificate's serial on every file record: after a renewal
        # the journal shows from which delivery on the new certificate is used.
        self.serial = serial
        self.stores: dict[str, Store] = {}  # keyword -> this host's directory for it
        self.incoming: dict[int, _Incoming] = {}
        self.batch: dict[Upload, Offer] = {}  # finished, not yet durable
        self.batch_bytes = 0
        self.stored = 0
        self.deferred: deque[Offer] = deque()  # offers not answered yet, in order

    def run(self) -> None:
        self._tidy_partials()
        try:
            while True:
                # Nothing more waiting from the shipper: make the batch durable now.
                event = self.link.next_event(before_wait=self._commit)
                if isinstance(event, ConnectionClosed | Error):
                    self._ended(event)
                    return
                if isinstance(event, Goodbye):
                    self._commit()
                    self.link.send(Goodbye())
                    self.link.close()
                    return
                self._handle(event)
        finally:
            self._close()

    def _handle(self, event: Event) -> None:
        if isinstance(event, Hello):
            reply = self.conn.answer_hello(event)
            self.link.send(reply)
            if isinstance(reply, Error):
                self.link.flush()
                raise HelloRefused(f"{reply.code.name}: {reply.message}")
        elif isinstance(event, Offer):
            self.deferred.append(event)
            self._answer_deferred()
        elif isinstance(event, Data):
            self._write(event)
        elif isinstance(event, EndOfData):
            self._end_of_data(event.file_id)
            self._answer_deferred()  # a copy that failed here no longer holds its twin
        elif isinstance(event, Ping):
            self.link.send(Pong(event.nonce))

    # --- partials ---

    def _host_dirs(self) -> list[str]:
        return [d for kw in self.config.keywords.values() if (d := kw.dirs.get(self.host))]

    def _tidy_partials(self) -> None:
        """As the instance starts: drop this host's partials nobody can resume, and
        journal what is left (issue 9: they used to pile up for ever)."""
        limit = self.config.partials
        usage = PartialUsage()
        for directory in self._host_dirs():
            usage += tidy_partials(directory, limit.max_age, time.time())
        if usage.files or usage.removed:
            journal.send(
                f"partials from {self.host}: {usage.files} held ({usage.bytes} bytes),"
                f" {usage.removed} removed ({usage.removed_bytes} bytes)",
                message_id=RECEIVE_PARTIALS,
                host=self.host,
                peer=self.peer,
                partial_files=usage.files,
                partial_bytes=usage.bytes,
                removed_files=usage.removed,
                removed_bytes=usage.removed_bytes,
            )

    def _host_partials(self) -> PartialUsage:
        usage = PartialUsage()
        opened = {s.directory: s for s in self.stores.values()}
        for directory in self._host_dirs():
            held = opened.get(directory)
            try:
                usage += held.partial_usage() if held else tidy_partials(directory, 0.0, None)
            except (StoreError, OSError):
                continue
        return usage

    def _over_partial_cap(self) -> bool:
        usage, limit = self._host_partials(), self.config.partials
        return usage.files > limit.max_files or usage.bytes > limit.max_bytes

    def _partials_full(self, store: Store, offer: Offer) -> str | None:
        """Why a new partial may not be started for this host now, if it may not."""
        if store.holds_partial(offer.name, offer.size, offer.sha256):
            return None  # a resume adds nothing
        usage = self._host_partials()
        limit = self.config.partials
        if usage.files < limit.max_files and usage.bytes < limit.max_bytes:
            return None
        return (
            f"partial uploads from {self.host} hold {usage.files} files, {usage.bytes} bytes"
            f" (limits {limit.max_files} files, {limit.max_bytes} bytes): try again later"
        )

    # --- offers ---

    def _answer_deferred(self) -> None:
        """Answer waiting offers in order, up to one whose file is in flight here.

        A file offered again while this connection still carries it (same
        keyword, name, size and SHA-256) waits for that copy: answered once
        it is stored (ALREADY_STORED) or failed (then offered anew), never
        refused because its own first copy holds the partial. Answers go in
        offer order, so the offers behind it wait too; the first copy's data
        is due regardless, so the wait always ends.
        """
        while self.deferred and not self._in_flight(self.deferred[0]):
            self.link.send(self._answer(self.deferred.popleft()))

    def _in_flight(self, offer: Offer) -> bool:
        key = _file_key(offer)
        return any(_file_key(i.offer) == key for i in self.incoming.values()) or any(
            _file_key(o) == key for o in self.batch.values()
        )

    def _answer(self, offer: Offer) -> Accept | AlreadyStored | Refuse:
        keyword = self.config.keywords.get(offer.keyword)
        directory = keyword.dirs.get(self.host) if keyword else None
        if directory is None:
            return self._refuse(
                offer, Code.KEYWORD_NOT_ALLOWED, f"host {self.host} may not send {offer.keyword!r}"
            )
        if offer.size > self.config.limits.max_file_size:
            return self._refuse(
                offer,
                Code.TOO_LARGE,
                f"{offer.size} bytes is over the limit of {self.config.limits.max_file_size}",
            )
        try:
            store = self._store(offer.keyword, directory)
            offered = store.offer(offer.name, offer.size, offer.sha256)
            if offered.already_stored is not None:
                self._record(
                    journal.RECEIVE_DUPLICATE,
                    "already stored",
                    offer,
                    stored_as=offered.already_stored,
                )
                return AlreadyStored(offer.file_id)
            full = self._partials_full(store, offer)
            if full is not None:
                return self._refuse(offer, Code.TEMPORARY_FAILURE, full)
            store.check_space(offer.name, offer.size, offer.sha256, self.config.min_free)
            upload = store.begin(offer.name, offer.size, offer.sha256)
        except NoRoom as exc:
            # Journalled with the figures: free, and the min_free it would go below.
            return self._refuse(offer, Code.TEMPORARY_FAILURE, str(exc), **exc.refusal.fields())
        except StoreError as exc:
            code = _store_code(exc)
            return self._refuse(offer, code, str(exc))
        self.incoming[offer.file_id] = _Incoming(offer, store, upload)
        if upload.received:
            self._record(journal.RECEIVE_RESUMED, f"resuming at byte {upload.received}", offer)
        return Accept(offer.file_id, upload.received)

    def _refuse(self, offer: Offer, code: Code, why: str, **figures: int) -> Refuse:
        self._record(
            journal.RECEIVE_REFUSED,
            f"refused: {why}",
            offer,
            reason=code.name,
            priority=4,
            **figures,
        )
        return Refuse(offer.file_id, code, why[:1000])

    def _store(self, keyword: str, directory: str) -> Store:
        store = self.stores.get(keyword)
        if store is None:
            store = self.stores[keyword] = Store(directory, progress=self.link.keepalive)
        return store

    # --- data ---

    def _write(self, event: Data) -> None:
        incoming = self.incoming[event.file_id]
        if incoming.upload is None:
            return  # failed earlier in this file: its data is read and dropped
        try:
            incoming.upload.write(event.data)
        except StoreError as exc:
            # Disk full: keep what is written for a later resume (within the
            # host's partial limits), drop the rest.
            self._set_aside(incoming.upload)
            incoming.upload, incoming.failure = None, exc

    def _end_of_data(self, file_id: int) -> None:
        incoming = self.incoming.pop(file_id)
        if incoming.upload is None:
            assert incoming.failure is not None
            self._fail(incoming.offer, _store_code(incoming.failure), str(incoming.failure))
            return
        try:
            incoming.store.finish(incoming.upload)
        except StoreError as exc:
            self._fail(incoming.offer, _store_code(exc), str(exc))
            return
        self.batch[incoming.upload] = incoming.offer
        self.batch_bytes += incoming.offer.size
        if len(self.batch) >= self.config.limits.max_batch or self.batch_bytes >= MAX_BATCH_BYTES:
            self._commit()

    def _fail(self, offer: Offer, code: Code, why: str) -> None:
        self._record(journal.RECEIVE_REFUSED, f"failed: {why}", offer, reason=code.name, priority=4)
        self.link.send(Failed(offer.file_id, code, why[:1000]))

    def _commit(self) -> None:
        """Make the batch durable, then (only then) acknowledge each file in it."""
        if not self.batch:
            return
        batch, self.batch, self.batch_bytes = self.batch, {}, 0
        stored_now = False
        for store in {upload.store for upload in batch}:
            try:
                done = store.commit()
            except StoreError as exc:
                for upload, offer in batch.items():
                    if upload.store is store:
                        self._fail(offer, _store_code(exc), str(exc))
                continue
            for upload in done:
                offer = batch[upload]
                if upload.failure is not None:
                    self._fail(offer, _store_code(upload.failure), str(upload.failure))
                    continue
                self.stored += 1
                stored_now = True
                self._record(
                    journal.RECEIVE_STORED, "stored", offer, stored_as=upload.stored_as or ""
                )
                self.link.send(Stored(offer.file_id))
        if stored_now:
            self._announce_stored()
        self._answer_deferred()

    def _announce_stored(self) -> None:
        """Wake dlogd-archive.path, where this collector archives (``dlogd.trigger``)."""
        path = trigger.stored_trigger()
        if self.config.archive is None or path is None:
            return
        try:
            trigger.announce(path)
        except OSError as exc:
            # The files are stored; the archive's timer finds them a little later.
            journal.send(
                f"cannot touch the archive's trigger file {path}: {exc.strerror or exc}",
                message_id=journal.ARCHIVE_FAILED,
                priority=5,
                path=path,
            )

    # --- endings ---

    def _ended(self, event: ConnectionClosed | Error) -> None:
        if isinstance(event, Error):
            journal.send(
                f"shipper {self.host} ended the connection: {event.code.name}: {event.message}",
                message_id=journal.RECEIVE_REFUSED,
                priority=4,
                host=self.host,
                peer=self.peer,
                reason=event.code.name,
            )

    def _close(self) -> None:
        for incoming in self.incoming.values():
            if incoming.upload is not None:
                self._set_aside(incoming.upload)
        # Finished but not committed (the connection ended before the batch was):
        # partials like the rest, within the same cap (the fuzz test found 65 of 64).
        for upload in self.batch:
            self._set_aside(upload)
        self.batch = {}
        for store in self.stores.values():
            store.close()

    def _set_aside(self, upload: Upload) -> None:
        """An upload this connection will not finish: its partial stays for a resume,
        unless it holds nothing or the host keeps more partials than it may.

        Every partial kept goes through here, decided with its own bytes still
        on disk: connections starting together may each have begun one under
        the cap, and the last to decide sees them all (a partial kept on a
        write error without this check left 65 of 64 in the fuzz test).
        """
        if upload.received == 0 or self._over_partial_cap():
            upload.discard()
        else:
            upload.close()

    def _record(
        self, message_id: str, what: str, offer: Offer, *, priority: int = 6, **fields: str | int
    ) -> None:
        journal.send(
            f"{offer.keyword}/{offer.name} from {self.host}: {what}",
            message_id=message_id,
            priority=priority,
            keyword=offer.keyword,
            host=self.host,
            peer=self.peer,
            file=offer.name,
            size=offer.size,
            sha256=offer.sha256.hex(),
            peer_serial=self.serial,
            **fields,
        )


def _file_key(offer: Offer) -> tuple[str, str, int, bytes]:
    return (offer.keyword, offer.name, offer.size, offer.sha256)


def _store_code(exc: StoreError) -> Code:
    if isinstance(exc, DigestMismatch):
        return Code.DIGEST_MISMATCH
    if isinstance(exc, SizeMismatch):
        return Code.SIZE_MISMATCH
    if isinstance(exc, UnsafeName):
        return Code.BAD_NAME
    if isinstance(exc, NameConflict):
        return Code.NAME_CONFLICT
    # Permanent: only an operator cures it (a directory behind a symlink, say).
    return Code.TEMPORARY_FAILURE if exc.temporary else Code.INTERNAL


def serve(sock: socket.socket, config: ServerConfig) -> int:
    """Serve one accepted connection; 0 if it ended cleanly."""
    # Read the address now: once a peer hangs up, getpeername() fails.
    peer_ip, peer = _peer_address(sock)
    limits = config.limits
    try:
        stream = TLSStream(
            sock, server_context(config.tls), server_side=True, timeout=limits.timeout
        )
    except (TLSError, OSError) as exc:
        _peer_refused(peer, "", f"cannot set up TLS: {exc}")
        return 1
    with stream:
        try:
            identity = stream.handshake()
        except (TLSError, OSError) as exc:
            _peer_refused(peer, _unverified_identity(stream), f"TLS handshake failed: {exc}")
            return 1
        conn = Connection(Role.RECEIVER, max_frame=limits.frame_size, window=limits.window)
        # Room for a whole frame and the small messages around it, read at once.
        link = Driver(conn, stream, timeout=limits.timeout, inbox_size=limits.frame_size + 65536)
        try:
            host = identify_sender(identity, peer_ip, config.hosts)
        except PeerRefused as exc:
            _peer_refused(peer, str(identity), str(exc))
            link.tell(Error(Code.PEER_NOT_ALLOWED, f"{exc.code}: not accepted here"))
            return 1
        try:
            with link.telling_why("shipper"):
                Session(config, link, host.name, peer, identity.serial).run()
        except HelloRefused as exc:
            _peer_refused(peer, str(identity), str(exc), host=host.name)
            link.tell()  # the reason is sent: close the session cleanly
            return 1
        except ProtocolError as exc:
            _peer_refused(peer, str(identity), f"protocol error: {exc}", host=host.name)
            return 1
        except (TLSError, OSError) as exc:
            timed_out = isinstance(exc, TLSTimeout)
            journal.send(
                f"connection from {host.name} ({peer}) {'timed out' if timed_out else 'lost'}: {exc}",
                message_id=journal.RECEIVE_REFUSED,
                priority=4,
                host=host.name,
                peer=peer,
                reason=Code.TIMEOUT.name if timed_out else "CONNECTION_LOST",
            )
            return 1
    return 0


def _unverified_identity(stream: TLSStream) -> str:
    """Who the refused peer claimed to be: its certificate, which did not verify."""
    return f"{stream.presented} (unverified)" if stream.presented else "(no certificate)"


def _peer_refused(peer: str, identity: str, why: str, *, host: str = "") -> None:
    journal.send(
        f"peer {peer} {identity} refused: {why}".replace("  ", " "),
        message_id=journal.PEER_REFUSED,
        priority=4,
        peer=peer,
        identity=identity,
        reason=why,
        host=host,
    )


def _peer_address(sock: socket.socket) -> tuple[str | None, str]:
    """(IP for identity checks, "ip:port" for logs)."""
    try:
        address = sock.getpeername()
    except OSError:
        return None, "?"
    if isinstance(address, tuple):
        return str(address[0]), f"{address[0]}:{address[1]}"
    return None, str(address)


DEFAULT_MAX_CONNECTIONS = 64  # as dlogd-receive.socket's MaxConnections=
ACCEPT_BACKOFF = (0.05, 2.0)  # seconds: first and longest pause after accept() fails


def serve_standalone(
    address: str, port: int, config: ServerConfig, max_connections: int = DEFAULT_MAX_CONNECTIONS
) -> None:
    """Development mode: our own listening socket, a thread per connection.

    At most ``max_connections`` run at once (systemd's ``MaxConnections=`` does
    this for the socket-activated collector): at the limit we stop accepting,
    and the kernel's backlog holds the next peers until a connection ends. An
    ``accept()`` that fails for want of descriptors or memory (EMFILE, ENFILE,
    ENOBUFS, ENOMEM) is journalled and retried after a growing pause, so
    idle peers can never end the listener.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    slots = threading.BoundedSemaphore(max_connections)
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((address, port))
        server.listen(STANDALONE_BACKLOG)
        print(f"dlogd-receive: listening on {address}:{server.getsockname()[1]}", flush=True)
        pause = 0.0
        while True:
            if not slots.acquire(blocking=False):
                _listener_note(f"at the limit of {max_connections} connections: waiting", "LIMIT")
                slots.acquire()
            try:
                conn, _ = server.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in _ACCEPT_EXHAUSTED:
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                        continue  # that peer is gone; the next one may be fine
                    raise
                pause = min(max(pause * 2, ACCEPT_BACKOFF[0]), ACCEPT_BACKOFF[1])
                _listener_note(
                    f"accept failed: {exc.strerror}; retrying in {pause:g}s",
                    errno.errorcode.get(exc.errno or 0, "OSError"),
                )
                time.sleep(pause)
                continue
            pause = 0.0
            try:
                threading.Thread(
                    target=_serve_closing, args=(conn, config, slots), daemon=True
                ).start()
            except RuntimeError as exc:  # no thread to be had: drop this one, keep listening
                conn.close()
                slots.release()
                _listener_note(f"cannot serve a connection: {exc}", "THREAD")


_ACCEPT_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _listener_note(what: str, reason: str) -> None:
    journal.send(
        f"dlogd-receive listener: {what}",
        message_id=journal.RECEIVE_REFUSED,
        priority=4,
        reason=reason,
    )


def _serve_closing(conn: socket.socket, config: ServerConfig, slots: threading.Semaphore) -> None:
    try:
        with conn:
            serve(conn, config)
    finally:
        slots.release()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dlogd-receive",
        description="Receive files from shippers over mutual TLS (run by dlogd-receive@.service).",
    )
    parser.add_argument("--config", default=DEFAULT_SERVER_CONFIG, help="collector config file")
    parser.add_argument(
        "--listen",
        metavar="ADDRESS:PORT",
        help="without socket activation: listen here (development); port 0 picks one",
    )
    parser.add_argument(
        "--max-connections",
        metavar="N",
        type=_positive,
        default=DEFAULT_MAX_CONNECTIONS,
        help="with --listen: connections served at once, more wait (default %(default)s;"
        " under systemd, MaxConnections= of dlogd-receive.socket decides)",
    )
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config, _ = load_logged(load_server, args.config)
    if config is None:
        return 1
    loaded = config  # for the closures: mypy does not carry the narrowing into them

    def standalone() -> int:
        address, _, port = args.listen.rpartition(":")
        host = address.strip("[]") or "127.0.0.1"
        serve_standalone(host, int(port), loaded, args.max_connections)
        return 0

    return activation.run(
        "dlogd-receive",
        (socket.AF_INET, socket.AF_INET6),
        lambda sock: serve(sock, loaded),
        standalone if args.listen else None,
        "--listen ADDRESS:PORT",
    )


if __name__ == "__main__":
    sys.exit(main())
