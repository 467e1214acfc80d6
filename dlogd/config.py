"""Typed, validated configuration: what every other module reads.

Flow: ``conflang`` turns text into statements -> ``schema`` shapes them into plain
data and validates it with voluptuous -> this module builds the frozen objects
below. Services load through :func:`load_client` / :func:`load_server`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

from dlogd.names import DEFAULT_FRAME, DEFAULT_WINDOW
from dlogd.quota import Amount, from_plain

if TYPE_CHECKING:
    # The parser is only needed when the cache is stale: keep it off the hot path.
    from dlogd.conflang import Problem, Sources

DEFAULT_PORT = 7878
DEFAULT_SPOOL = "/var/spool/dlogd"
DEFAULT_STATE = "/var/lib/dlogd"
DEFAULT_CLIENT_CONFIG = "/etc/dlogd/client.conf"
DEFAULT_SERVER_CONFIG = "/etc/dlogd/server.conf"
DEFAULT_CACHE = "/var/cache/dlogd"
CACHE_VERSION = 1


@dataclass(frozen=True)
class TLSFiles:
    certificate: str = "/etc/dlogd/tls/host.crt"
    key: str = "/etc/dlogd/tls/host.key"
    ca: str = "/etc/dlogd/tls/ca.crt"
    min_version: str = "1.3"  # "1.3" or "1.2"


@dataclass(frozen=True)
class Limits:
    max_file_size: int = 64 * 1024**3
    timeout: float = 60.0  # seconds without progress before a peer is dropped
    window: int = DEFAULT_WINDOW  # files offered before their acknowledgements arrive
    frame_size: int = DEFAULT_FRAME
    max_batch: int = 256  # submits (client) or received files (collector) fsynced together


@dataclass(frozen=True)
class PartialLimits:
    """The collector's bound on held partial uploads (``partials { }``), per sending host."""

    max_age: float = 7 * 24 * 3600.0  # not resumed for this long: removed
    max_bytes: int = 16 * 1024**3  # beyond this, or max_files, new uploads are refused for now
    max_files: int = 64  # a window's worth


@dataclass(frozen=True)
class SpoolQuota:
    """A client's ``limits { spool_max_size; spool_min_free; }`` (None: no limit)."""

    max_size: Amount | None = None  # bytes of entries waiting in the spool, linked or copied
    min_free: Amount | None = None  # left free on the spool's file system


@dataclass(frozen=True)
class Retry:
    min_delay: float = 30.0
    max_delay: float = 3600.0


@dataclass(frozen=True)
class Host:
    name: str
    address: str  # defaults to the name, as in the original design
    port: int = DEFAULT_PORT
    fingerprint: str | None = None  # lowercase hex SHA-256 of the DER certificate


@dataclass(frozen=True)
class ClientKeyword:
    name: str
    uids: frozenset[int]
    groups: frozenset[str]
    hosts: tuple[str, ...]
    copy: bool = False  # copy into the spool instead of hard-linking


@dataclass(frozen=True)
class Watch:
    """A ``watch "DIR" { }`` block: finished files there are submitted by dlogd-watch."""

    directory: str
    pattern: str  # fnmatch, on file names only
    keyword: str
    user: int | str  # the account dlogd-watch runs as for it: a uid or a user name, never root
    # A file matching the pattern is finished (the pattern names what rotation
    # renamed into place) once unchanged for this many seconds; None: at once.
    quiet: float | None = None


@dataclass(frozen=True)
class ServerKeyword:
    name: str
    dirs: Mapping[str, str]  # sending host name -> absolute directory


@dataclass(frozen=True)
class ClientConfig:
    keywords: Mapping[str, ClientKeyword]
    hosts: Mapping[str, Host]
    spool: str = DEFAULT_SPOOL
    tls: TLSFiles = field(default_factory=TLSFiles)
    limits: Limits = field(default_factory=Limits)
    retry: Retry = field(default_factory=Retry)
    sources: tuple[str, ...] = ()  # every file read, includes too
    quota: SpoolQuota = field(default_factory=SpoolQuota)
    watches: Mapping[str, Watch] = field(default_factory=dict)  # by directory


DEFAULT_ARCHIVE_KEY = "<keyword>/<host>/<yyyy>/<mm>/<name>"


@dataclass(frozen=True)
class Archive:
    """A collector's ``archive { }``: where stored files are copied for good (dlogd/archive.py)."""

    endpoint: str  # http(s)://host:port of the S3 gateway
    bucket: str  # made by the store's operator, with Object Lock enabled
    credentials: str  # an AWS-style credentials file readable by the archiving user only
    retention_days: int  # Object Lock retention of each archived version
    region: str = "us-east-1"
    mode: str = "governance"  # or "compliance": not even the bucket owner may shorten it
    key: str = DEFAULT_ARCHIVE_KEY
    keep_local_days: int | None = None  # None: keep the local copy for ever
    keywords: tuple[str, ...] = ()  # archived keywords; empty: every keyword


@dataclass(frozen=True)
class ServerConfig:
    keywords: Mapping[str, ServerKeyword]
    hosts: Mapping[str, Host]
    tls: TLSFiles = field(default_factory=TLSFiles)
    limits: Limits = field(default_factory=Limits)
    partials: PartialLimits = field(default_factory=PartialLimits)
    sources: tuple[str, ...] = ()
    min_free: Amount | None = None  # ``limits { min_free }``: kept free on each store's file system
    archive: Archive | None = None


_Config = TypeVar("_Config", "ClientConfig", "ServerConfig")


class ConfigError(Exception):
    """The config cannot be used; ``problems`` lists every error found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = tuple(problems)


@dataclass(frozen=True)
class Checked:
    """A full validation's result: the config and its warnings."""

    config: ClientConfig | ServerConfig
    warnings: tuple[Problem, ...]


def check(path: str, role: str) -> Checked:
    """Parse and validate ``path`` in full (imports the schema: the slow path)."""
    data, sources, warnings = _validate(path, role)
    return Checked(build(data, role, tuple(sources.files)), warnings)


def refresh_cache(path: str, role: str, cache_dir: str | None = None) -> bool:
    """Validate and record the result for services; False if the cache is not writable."""
    data, sources, _ = _validate(path, role)
    return write_cache(_cache_path(path, role, cache_dir), data, sources)


def _validate(path: str, role: str) -> tuple[dict[str, Any], Sources, tuple[Problem, ...]]:
    from dlogd import schema
    from dlogd.conflang import ConfigSyntaxError, Location, Problem, Sources, parse_file

    sources = Sources()
    try:
        statements = parse_file(path, sources)
    except ConfigSyntaxError as exc:
        raise ConfigError([Problem(exc.location, exc.message)]) from None
    data, problems = schema.validate(statements, role, Location(os.path.abspath(path), 0, 0))
    errors = [p for p in problems if not p.warning]
    if errors:
        raise ConfigError(errors)
    return data, sources, tuple(p for p in problems if p.warning)


def load_client(path: str = DEFAULT_CLIENT_CONFIG, cache_dir: str | None = None) -> ClientConfig:
    config = _load(path, "client", cache_dir)
    assert isinstance(config, ClientConfig)
    return config


def load_server(path: str = DEFAULT_SERVER_CONFIG, cache_dir: str | None = None) -> ServerConfig:
    config = _load(path, "server", cache_dir)
    assert isinstance(config, ServerConfig)
    return config


def load_logged(loader: Callable[[str], _Config], path: str) -> tuple[_Config | None, str]:
    """Load for a service: on failure, a CONFIG_ERROR journal record and a one-line reason."""
    try:
        return loader(path), ""
    except (ConfigError, OSError) as exc:
        from dlogd import journal

        journal.send(
            f"cannot load {path}: {exc}", message_id=journal.CONFIG_ERROR, priority=3, path=path
        )
        return None, (str(exc).splitlines() or [type(exc).__name__])[0]


def _load(path: str, role: str, cache_dir: str | None) -> ClientConfig | ServerConfig:
    """Use the cache when it is still true to every source, else validate and refresh it.

    Services start once per connection; validating with voluptuous each time
    would cost more than the rest of a submit. The cache holds validated plain
    data, so building objects from it repeats no check that could have changed.
    """
    cache = _cache_path(path, role, cache_dir)
    cached = _read_cache(cache)
    if cached is not None:
        return build(cached["data"], role, tuple(cached["files"]))
    data, sources, _ = _validate(path, role)
    write_cache(cache, data, sources)
    return build(data, role, tuple(sources.files))


def cache_dir_default() -> str:
    return os.environ.get("DLOGD_CACHE_DIR", DEFAULT_CACHE)


def _cache_path(path: str, role: str, cache_dir: str | None) -> str:
    key = hashlib.sha256(f"{role}\0{os.path.abspath(path)}".encode()).hexdigest()[:32]
    return os.path.join(cache_dir or cache_dir_default(), f"{role}-{key}.json")


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def write_cache(cache: str, data: Mapping[str, Any], sources: Sources) -> bool:
    """Record validated data with a stamp of every source; False if it cannot be written."""
    try:
        stamps = {p: _stamp(p) for p in (*sources.files, *sources.directories)}
        record = {"version": CACHE_VERSION, "files": sources.files, "stamps": stamps, "data": data}
        os.makedirs(os.path.dirname(cache), mode=0o755, exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
        os.replace(tmp, cache)
    except OSError:
        return False  # a read-only sandbox: the service still works, only slower
    return True


def _read_cache(cache: str) -> dict[str, Any] | None:
    try:
        fd = os.open(cache, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd) as handle:
        st = os.fstat(fd)
        # Trust only what root or we ourselves wrote and nobody else can change.
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return None
        try:
            record = json.load(handle)
        except ValueError:
            return None
    if not isinstance(record, dict) or record.get("version") != CACHE_VERSION:
        return None
    try:
        if any(_stamp(p) != s for p, s in record["stamps"].items()):
            return None
        if not isinstance(record["data"], dict) or not isinstance(record["files"], list):
            return None
        if not record["files"] or not set(record["files"]) <= set(record["stamps"]):
            return None  # every source must be stamped, or a change could go unseen
    except (OSError, KeyError, TypeError, AttributeError):
        return None  # unreadable source, or a cache of the wrong shape: validate afresh
    return record


def build(
    data: Mapping[str, Any], role: str, files: tuple[str, ...]
) -> ClientConfig | ServerConfig:
    """Typed objects from validated plain data (fresh or from the cache)."""
    limits = _limits(data.get("limits", {}))
    tls = _tls(data.get("tls", {}))
    if role == "client":
        hosts = {
            name: Host(
                name,
                _get(block, "address", name),
                _get(block, "port", DEFAULT_PORT),
                _get(block, "fingerprint", None),
            )
            for name, block in data.get("host", {}).items()
        }
        keywords = {
            name: ClientKeyword(
                name,
                uids=frozenset(_resolve_uids(_all(block, "uid"))),
                groups=frozenset(_all(block, "group")),
                hosts=tuple(_all(block, "host")),
                copy=_get(block, "copy", False),
            )
            for name, block in data.get("keyword", {}).items()
        }
        retry = data.get("retry", {})
        return ClientConfig(
            keywords=keywords,
            hosts=hosts,
            spool=_get(data, "spool", DEFAULT_SPOOL),
            tls=tls,
            limits=limits,
            retry=Retry(_get(retry, "min", Retry.min_delay), _get(retry, "max", Retry.max_delay)),
            sources=files,
            quota=SpoolQuota(
                from_plain(data.get("limits", {}).get("spool_max_size")),
                from_plain(data.get("limits", {}).get("spool_min_free")),
            ),
            watches={d: _watch(d, block) for d, block in data.get("watch", {}).items()},
        )
    return ServerConfig(
        keywords={
            name: ServerKeyword(name, {host: d for host, d in block["host"]})
            for name, block in data.get("keyword", {}).items()
        },
        hosts={
            name: Host(
                name, _get(block, "address", name), DEFAULT_PORT, _get(block, "fingerprint", None)
            )
            for name, block in data.get("host", {}).items()
        },
        tls=tls,
        limits=limits,
        partials=_partials(data.get("partials", {})),
        sources=files,
        min_free=from_plain(data.get("limits", {}).get("min_free")),
        archive=_archive(data["archive"]) if "archive" in data else None,
    )


def _archive(block: Mapping[str, Any]) -> Archive:
    return Archive(
        endpoint=block["endpoint"],
        bucket=block["bucket"],
        credentials=block["credentials"],
        retention_days=block["retention"],
        region=_get(block, "region", Archive.region),
        mode=_get(block, "mode", Archive.mode),
        key=_get(block, "key", Archive.key),
        keep_local_days=_get(block, "keep_local", None),
        keywords=tuple(_all(block, "keyword")),
    )


def _get(block: Mapping[str, Any], key: str, default: Any) -> Any:
    """A directive that appears once: after validation it is its plain value."""
    return block.get(key, default)


def _all(block: Mapping[str, Any], key: str) -> list[Any]:
    return list(block.get(key, []))


def _resolve_uids(values: list[int | str]) -> list[int]:
    uids = []
    for value in values:
        if isinstance(value, int):
            uids.append(value)
            continue
        # Warned about at check time; a missing user matches nobody.
        with contextlib.suppress(KeyError):
            uids.append(pwd.getpwnam(value).pw_uid)
    return uids


def _watch(directory: str, block: Mapping[str, Any]) -> Watch:
    return Watch(
        directory, block["pattern"], block["keyword"], block["user"], _get(block, "quiet", None)
    )


def _partials(block: Mapping[str, Any]) -> PartialLimits:
    defaults = PartialLimits()
    return PartialLimits(
        **{f.name: block.get(f.name, getattr(defaults, f.name)) for f in fields(PartialLimits)}
    )


def _limits(block: Mapping[str, Any]) -> Limits:
    defaults = Limits()
    return Limits(**{f.name: block.get(f.name, getattr(defaults, f.name)) for f in fields(Limits)})


def _tls(block: Mapping[str, Any]) -> TLSFiles:
    defaults = TLSFiles()
    return TLSFiles(
        **{f.name: block.get(f.name, getattr(defaults, f.name)) for f in fields(TLSFiles)}
    )


def to_json(config: ClientConfig | ServerConfig) -> dict[str, Any]:
    """The normalised config as JSON-ready data (``dlogctl check-config --dump``)."""

    def plain(value: Any) -> Any:
        if isinstance(value, frozenset):
            return sorted(value)
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if hasattr(value, "__dataclass_fields__"):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        return value

    return {"role": "client" if isinstance(config, ClientConfig) else "server", **plain(config)}


def to_text(config: ClientConfig | ServerConfig) -> str:
    """Config text that parses back to an equal object (sources aside)."""
    from dlogd.conflang import quote

    lines = [
        "tls {",
        f"    certificate {quote(config.tls.certificate)};",
        f"    key {quote(config.tls.key)};",
        f"    ca {quote(config.tls.ca)};",
        f"    min_version {quote(config.tls.min_version)};",
        "}",
        "limits {",
        *(_limit_line(f.name, getattr(config.limits, f.name)) for f in fields(Limits)),
        *_quota_lines(config),
        "}",
    ]
    if isinstance(config, ClientConfig):
        lines += [
            f"spool {quote(config.spool)};",
            f"retry {{ min {_seconds(config.retry.min_delay)}; max {_seconds(config.retry.max_delay)}; }}",
        ]
        for kw in config.keywords.values():
            lines.append(f"keyword {quote(kw.name)} {{")
            lines += [f"    uid {quote(str(u))};" for u in sorted(kw.uids)]
            lines += [f"    group {quote(g)};" for g in sorted(kw.groups)]
            lines += [f"    host {quote(h)};" for h in kw.hosts]
            lines += [f"    copy {'yes' if kw.copy else 'no'};", "}"]
        lines += [line for w in config.watches.values() for line in _watch_lines(w)]
    else:
        p = config.partials
        lines.append(
            f"partials {{ max_age {_seconds(p.max_age)}; max_bytes {p.max_bytes};"
            f" max_files {p.max_files}; }}"
        )
        for skw in config.keywords.values():
            lines.append(f"keyword {quote(skw.name)} {{")
            lines += [f"    host {quote(h)} dir {quote(d)};" for h, d in skw.dirs.items()]
            lines.append("}")
        if config.archive is not None:
            lines += _archive_lines(config.archive)
    for host in config.hosts.values():
        lines.append(f"host {quote(host.name)} {{")
        lines.append(f"    address {quote(host.address)};")
        if isinstance(config, ClientConfig):
            lines.append(f"    port {host.port};")
        if host.fingerprint:
            lines.append(f'    fingerprint "sha256:{host.fingerprint}";')
        lines.append("}")
    return "\n".join(lines) + "\n"


def _quota_lines(config: ClientConfig | ServerConfig) -> list[str]:
    if isinstance(config, ClientConfig):
        named = {"spool_max_size": config.quota.max_size, "spool_min_free": config.quota.min_free}
    else:
        named = {"min_free": config.min_free}
    return [f"    {name} {value.text()};" for name, value in named.items() if value is not None]


def _archive_lines(archive: Archive) -> list[str]:
    from dlogd.conflang import quote

    keep = "forever" if archive.keep_local_days is None else f"{archive.keep_local_days}d"
    return [
        "archive {",
        f"    endpoint {quote(archive.endpoint)};",
        f"    bucket {quote(archive.bucket)};",
        f"    region {quote(archive.region)};",
        f"    credentials {quote(archive.credentials)};",
        f"    retention {archive.retention_days}d;",
        f"    mode {archive.mode};",
        f"    key {quote(archive.key)};",
        f"    keep_local {keep};",
        *(f"    keyword {quote(k)};" for k in archive.keywords),
        "}",
    ]


def _watch_lines(watch: Watch) -> list[str]:
    from dlogd.conflang import quote

    lines = [
        f"watch {quote(watch.directory)} {{",
        f"    pattern {quote(watch.pattern)};",
        f"    keyword {quote(watch.keyword)};",
        f"    user {quote(str(watch.user))};",
    ]
    if watch.quiet is not None:
        lines.append(f"    quiet {_seconds(watch.quiet)};")
    return [*lines, "}"]


def _limit_line(name: str, value: float) -> str:
    return f"    {name} {_seconds(value) if name == 'timeout' else int(value)};"


def _seconds(value: float) -> str:
    if value == int(value):
        return str(int(value))
    return f"{round(value * 1000)}ms"
