"""Derive each host's side of the dlogd fleet from the one fleet description.

Place in the flow: the operator writes ``dlogd_keywords`` (which keywords
exist and which collectors receive each) and ``dlogd_submitters`` (who may
submit a keyword on which client hosts or groups) once, in group_vars. The
roles call these filters to turn that into what one host needs: the keyword
blocks of a client's ``client.conf``, the (keyword, sending host) lines of a
collector's ``server.conf``, and, before any host is touched, the list of
cross-reference problems (an undefined keyword, collector or group). Values
themselves (a keyword name, a uid) are checked by the config language's own
checker, ``dlogctl check-config``, on the fleet-wide union that
:func:`union_view` renders: one rule in one place.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CLIENTS = "dlogd_clients"
COLLECTORS = "dlogd_collectors"
PLACEHOLDERS = frozenset({"host", "keyword"})
# The escapes of the config language (docs/config.md, "Strings").
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}

Groups = Mapping[str, Sequence[str]]
Item = Mapping[str, Any]


def quote(value: object) -> str:
    """``value`` as a double-quoted string of the config language."""
    out = []
    for ch in str(value):
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def expand(names: Iterable[str], groups: Groups) -> list[str]:
    """Host names for a list of host and group names, in first-seen order."""
    hosts: list[str] = []
    for name in names:
        for host in groups.get(name, [name]):
            if host not in hosts:
                hosts.append(host)
    return hosts


def _known_hosts(groups: Groups) -> set[str]:
    return set(groups.get("all", ())) | {h for members in groups.values() for h in members}


def problems(
    keywords: Sequence[Item], submitters: Sequence[Item], groups: Groups, dir_pattern: str
) -> list[str]:
    """Every cross-reference error in the fleet description, each naming what is wrong."""
    found: list[str] = []
    hosts = _known_hosts(groups)
    clients, collectors = set(groups.get(CLIENTS, ())), set(groups.get(COLLECTORS, ()))
    for both in sorted(clients & collectors):
        found.append(
            f"host {both!r} is in both {CLIENTS} and {COLLECTORS}: a host is one or the other "
            "(its TLS key is owned by the one service user that reads it)"
        )

    def check_names(where: str, names: Sequence[str], group: str, members: set[str]) -> None:
        if not names:
            found.append(f"{where}: names no host or group")
        for name in names:
            if name not in groups and name not in hosts:
                found.append(f"{where}: {name!r} is neither a host nor a group of the inventory")
            elif name in groups and not groups[name]:
                found.append(f"{where}: group {name!r} has no hosts")
            else:
                for host in expand([name], groups):
                    if host not in members:
                        found.append(f"{where}: host {host!r} is not in group {group}")

    seen: set[str] = set()
    for n, keyword in enumerate(keywords):
        name = str(keyword["name"])
        where = f"dlogd_keywords[{n}] ({name})"
        if name in seen:
            found.append(f"{where}: keyword {name!r} is defined twice")
        seen.add(name)
        check_names(f"{where} collectors", keyword.get("collectors") or [], COLLECTORS, collectors)
        found += _pattern_problems(where, keyword.get("dir") or dir_pattern)
    for n, entry in enumerate(submitters):
        where = f"dlogd_submitters[{n}]"
        if entry["keyword"] not in seen:
            found.append(f"{where}: keyword {entry['keyword']!r} is not defined in dlogd_keywords")
        check_names(f"{where} hosts", entry.get("hosts") or [], CLIENTS, clients)
        if not (entry.get("uids") or entry.get("users") or entry.get("groups")):
            found.append(f"{where}: names no uid, user or group: it would admit nobody")
    return found


def _pattern_problems(where: str, pattern: str) -> list[str]:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as exc:
        return [f"{where}: directory pattern {pattern!r}: {exc}"]
    unknown = sorted(set(fields) - PLACEHOLDERS)
    if unknown:
        return [
            f"{where}: directory pattern {pattern!r} uses {unknown}; only {{host}} and {{keyword}}"
        ]
    return []


def client_view(
    keywords: Sequence[Item], submitters: Sequence[Item], groups: Groups, host: str | None
) -> list[dict[str, Any]]:
    """The keyword blocks of ``host``'s client.conf (``None``: every client at once).

    Sorted by keyword; uids, users and groups merged over every submitter
    entry that names the host, each listed once.
    """
    by_name = {str(k["name"]): k for k in keywords}
    view: dict[str, dict[str, Any]] = {}
    for entry in submitters:
        keyword = by_name.get(entry["keyword"])
        if keyword is None or (host is not None and host not in expand(entry["hosts"], groups)):
            continue
        block = view.setdefault(
            str(keyword["name"]),
            {"name": str(keyword["name"]), "uids": [], "users": [], "groups": [],
             "collectors": expand(keyword["collectors"], groups)},
        )  # fmt: skip
        for field in ("uids", "users", "groups"):
            for value in entry.get(field) or []:
                if value not in block[field]:
                    block[field].append(value)
    return [view[name] for name in sorted(view)]


def collector_view(
    keywords: Sequence[Item],
    submitters: Sequence[Item],
    groups: Groups,
    host: str | None,
    dir_pattern: str,
) -> list[dict[str, Any]]:
    """The keyword blocks of ``host``'s server.conf (``None``: every collector at once).

    Each lists exactly the client hosts that some submitter entry lets send
    the keyword, with the directory the pattern gives for them.
    """
    view = []
    for keyword in sorted(keywords, key=lambda k: str(k["name"])):
        name = str(keyword["name"])
        if host is not None and host not in expand(keyword["collectors"], groups):
            continue
        senders = expand(
            [h for e in submitters if e["keyword"] == name for h in e["hosts"]], groups
        )
        if not senders:
            continue
        pattern = keyword.get("dir") or dir_pattern
        lines = [{"host": s, "dir": pattern.format(host=s, keyword=name)} for s in sorted(senders)]
        view.append({"name": name, "senders": lines})
    return view


def peers(view: Sequence[Item], field: str) -> list[str]:
    """Hosts a view refers to: ``collectors`` of a client view, ``senders`` of a collector's."""
    names: set[str] = set()
    for block in view:
        for item in block[field]:
            names.add(item["host"] if isinstance(item, Mapping) else item)
    return sorted(names)


def address(hostvars: Mapping[str, Any], host: str) -> str:
    """Where ``host`` is reached: ``dlogd_address``, else ``ansible_host``, else its name."""
    facts = hostvars.get(host) or {}
    return str(facts.get("dlogd_address") or facts.get("ansible_host") or host)


def peer_blocks(
    names: Sequence[str], hostvars: Mapping[str, Any], pki_dir: str, pin: bool
) -> list[dict[str, str]]:
    """``host`` blocks for peers: name, address and, when pinning, the fingerprint."""
    return [
        {
            "name": name,
            "address": address(hostvars, name),
            "fingerprint": fingerprint(f"{pki_dir}/issued/{name}.crt") if pin else "",
        }
        for name in names
    ]


def fingerprint(pem_path: str) -> str:
    """``sha256:HEX`` of the certificate the fleet CA issued (its record on the control node).

    Empty if there is no record yet (a check run on a fresh fleet).
    """
    path = Path(pem_path)
    if not path.is_file():
        return ""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


class FilterModule:
    """The dlogd fleet filters, named ``dlogd_*`` in templates and tasks."""

    def filters(self) -> dict[str, Any]:
        return {
            "dlogd_quote": quote,
            "dlogd_expand": expand,
            "dlogd_fleet_problems": problems,
            "dlogd_client_view": client_view,
            "dlogd_collector_view": collector_view,
            "dlogd_peers": peers,
            "dlogd_address": address,
            "dlogd_peer_blocks": peer_blocks,
            "dlogd_fingerprint": fingerprint,
        }
