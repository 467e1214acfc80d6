"""``dlogctl``: what a person does by hand — check a config, submit files, run the demo.

Each subcommand is a small function over the same modules the services use;
nothing here is a second implementation. Exit codes (also in ``--help``):

    0  success
    1  the thing checked or asked for failed (invalid config, a refused submit)
    2  usage error (bad arguments)
    3  the service could not be reached
    4  submit: the spool is full (SPOOL_FULL): nothing was lost, submit again later
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_SPOOL_FULL = 4

EPILOG = """exit status:
  0  success
  1  invalid config, or a file was refused
  2  usage error
  3  the submit service could not be reached
  4  submit: a file was refused because the spool is full (SPOOL_FULL), and no
     file for another reason; retry later
"""


def _check_config(args: argparse.Namespace) -> int:
    from dlogd import config

    targets = [(path, "client") for path in args.client or []]
    targets += [(path, "server") for path in args.server or []]
    if not targets:
        targets = [(p, r) for p, r in _default_configs() if os.path.exists(p)]
        if not targets:
            print("dlogctl: no config given and none installed", file=sys.stderr)
            return EXIT_USAGE
    status = EXIT_OK
    dumped = []
    for path, role in targets:
        try:
            checked = config.check(path, role)
        except config.ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            print(f"{path}: invalid {role} config ({len(exc.problems)} errors)", file=sys.stderr)
            status = EXIT_FAILED
            continue
        for warning in checked.warnings:
            print(warning, file=sys.stderr)
        if args.write_cache:
            config.refresh_cache(path, role, args.cache_dir)
        if args.dump:
            dumped.append(config.to_json(checked.config))
        else:
            print(f"{path}: valid {role} config")
    if dumped:
        json.dump(dumped[0] if len(dumped) == 1 else dumped, sys.stdout, indent=2)
        print()
    return status


def _default_configs() -> list[tuple[str, str]]:
    from dlogd.config import DEFAULT_CLIENT_CONFIG, DEFAULT_SERVER_CONFIG

    return [(DEFAULT_CLIENT_CONFIG, "client"), (DEFAULT_SERVER_CONFIG, "server")]


def _submit(args: argparse.Namespace) -> int:
    from dlogd import client

    status = EXIT_OK
    full = False
    socket_path = args.socket or client.default_socket_path()
    for path in args.files:
        try:
            done = client.submit(path, args.keyword, socket_path=socket_path)
        except client.SpoolFull as exc:
            # Its own status: a script (a logrotate postrotate) can tell "wait" from "fix".
            print(f"{path}: refused: {exc}", file=sys.stderr)
            full = True
        except client.SubmitError as exc:
            print(f"{path}: refused: {exc}", file=sys.stderr)
            status = EXIT_FAILED
        except OSError as exc:
            if exc.filename == socket_path:  # the client names the socket when it fails
                print(f"{path}: cannot reach the submit service: {exc}", file=sys.stderr)
                return EXIT_UNREACHABLE
            print(f"{path}: {exc}", file=sys.stderr)
            status = EXIT_FAILED
        else:
            print(f"{path}: spooled as {done.entry} ({done.size} bytes)")
    return EXIT_SPOOL_FULL if full and status == EXIT_OK else status


def _status(args: argparse.Namespace) -> int:
    from dlogd import config, status

    role = "server" if args.server is not None else "client"
    path = args.server or args.client or _default_config(role)
    try:
        if role == "server":
            server = config.load_server(path)
            dirs = {
                (host, name): directory
                for name, keyword in server.keywords.items()
                for host, directory in keyword.dirs.items()
            }
            figures: status.ClientStatus | status.ServerStatus = status.gather_server(dirs)
        else:
            client = config.load_client(path)
            figures = status.gather_client(client.spool, client.hosts)
    except config.ConfigError as exc:
        print(f"DLOGD UNKNOWN - {path}: invalid config ({len(exc.problems)} errors)")
        return status.UNKNOWN
    except OSError as exc:
        print(f"DLOGD UNKNOWN - {exc}")
        return status.UNKNOWN
    if args.prometheus:
        status.write_atomically(args.prometheus, status.prometheus(figures))
    if args.warn_age is not None or args.crit_age is not None:
        code, line = status.check(figures, args.warn_age, args.crit_age)
        print(line)
        return code
    print(status.to_json(figures) if args.json else status.render(figures), end="")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    """Local files, archive records and the archive compared (dlogd/verify.py)."""
    from dlogd import archive, config, s3, verify

    path = args.server or _default_config("server")
    try:
        server = config.load_server(path)
        if server.archive is None:
            print(f"DLOGD VERIFY UNKNOWN - {path} has no archive {{ }} block")
            return verify.UNKNOWN
        bucket = archive.open_bucket(server.archive)
        findings = list(
            verify.gather(
                server,
                args.state or archive.DEFAULT_STATE,
                bucket,
                keyword=args.keyword,
                host=args.host,
            )
        )
    except config.ConfigError as exc:
        print(f"DLOGD VERIFY UNKNOWN - {path}: invalid config ({len(exc.problems)} errors)")
        return verify.UNKNOWN
    except (OSError, s3.CredentialsRefused, s3.ArchiveDown, s3.ArchiveRefused) as exc:
        print(f"DLOGD VERIFY UNKNOWN - {exc}")
        return verify.UNKNOWN
    code, line = verify.check(findings)
    shown = [f for f in findings if args.all or f.state != "ok"]
    print(verify.to_json(findings) if args.json else verify.render(shown) + line)
    return code


def _default_config(role: str) -> str:
    return dict((r, p) for p, r in _default_configs())[role]


def _age(text: str) -> float:
    """An age as the config language writes durations: 90, 90s, 15min, 2h."""
    from dlogd import schema

    try:
        return schema.duration(text)
    except Exception as exc:  # voluptuous.Invalid; not imported on other paths
        raise argparse.ArgumentTypeError(str(exc)) from None


def _demo(args: argparse.Namespace) -> int:
    from dlogd import demo

    return demo.run(keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlogctl",
        description="Operate dlogd: check configs, submit files, run the demo.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser(
        "check-config",
        help="validate client and/or server configs",
        description="Parse and validate configs; report every error with file:line:column. "
        "With no file, check the installed /etc/dlogd/client.conf and server.conf.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--client", action="append", metavar="FILE", help="a client config")
    check.add_argument("--server", action="append", metavar="FILE", help="a collector config")
    check.add_argument("--dump", action="store_true", help="print the normalised config as JSON")
    check.add_argument(
        "--write-cache",
        action="store_true",
        help="record the validated config so that services skip re-validation",
    )
    check.add_argument("--cache-dir", metavar="DIR", help="where the cache lives")
    check.set_defaults(func=_check_config)

    submit = sub.add_parser(
        "submit",
        help="hand files to the local submit service",
        description="Submit finished files under a keyword; each is spooled or refused with a reason.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("--keyword", "-k", required=True, help="the keyword, e.g. audit")
    submit.add_argument(
        "--socket",
        metavar="PATH",
        help="submit socket (default: $DLOGD_SOCKET or /run/dlogd/submit.sock)",
    )
    submit.add_argument("files", nargs="+", metavar="FILE")
    submit.set_defaults(func=_submit)

    status = sub.add_parser(
        "status",
        help="what is pending, held or stored, without disturbing the services",
        description="On a client: per keyword and collector, what the spool still owes, what "
        "is held and when the next retry is. With --server, on a collector: per sending host "
        "and keyword, what is stored, partial uploads and free space.",
        epilog="exit status: 0 figures read; with --warn-age/--crit-age 0 OK, 1 WARNING, "
        "2 CRITICAL, 3 UNKNOWN (monitoring-plugin convention)",
    )
    which = status.add_mutually_exclusive_group()
    which.add_argument(
        "--client", nargs="?", const="", metavar="FILE", help="client config (the default role)"
    )
    which.add_argument(
        "--server", nargs="?", const="", metavar="FILE", help="a collector: its config"
    )
    status.add_argument("--json", action="store_true", help="the figures as JSON")
    status.add_argument("--warn-age", type=_age, metavar="DURATION", help="check: WARNING age")
    status.add_argument("--crit-age", type=_age, metavar="DURATION", help="check: CRITICAL age")
    status.add_argument(
        "--prometheus", metavar="FILE", help="also write node_exporter textfile metrics here"
    )
    status.set_defaults(func=_status)

    check_archive = sub.add_parser(
        "verify",
        help="on a collector: compare local files, archive records and the S3 archive",
        description="For each archived (keyword, host) directory: every local file and every "
        "archive record, checked against the archived version (present, size, SHA-256 "
        "metadata, retention in force). Reports unarchived, altered and missing files.",
        epilog="exit status: 0 OK, 1 WARNING (unarchived files), 2 CRITICAL (altered or "
        "missing), 3 UNKNOWN (no usable config or archive) (as status --warn-age)",
    )
    check_archive.add_argument("--server", metavar="FILE", help="the collector config")
    check_archive.add_argument("--keyword", "-k", help="only this keyword")
    check_archive.add_argument("--host", help="only files from this sending host")
    check_archive.add_argument(
        "--state", metavar="DIR", help="archive records (default /var/lib/dlogd/archive)"
    )
    check_archive.add_argument("--all", action="store_true", help="list ok files too")
    check_archive.add_argument("--json", action="store_true", help="every finding as JSON")
    check_archive.set_defaults(func=_verify)

    demo = sub.add_parser(
        "demo",
        help="run the whole flow on this machine, no systemd needed",
        description="Throwaway CA and certificates, a collector on loopback, the submit "
        "service on a temporary socket: submit a file, ship it, show it arrive.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo directory")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
