#!/bin/sh
# On the control node: build everything a dlogd host gets, for hosts that
# install without internet access.
#
# Usage: build-payload.sh SOURCE OUTDIR PYTHON [archive]
#   OUTDIR/*.whl            dlogd and every dependency (systemd-python built
#                           here, for this platform and Python version)
#   OUTDIR/wheelhouse.tar   those wheels, in one file to copy
#   OUTDIR/wheelhouse-archive.tar
#                           with "archive" only: the same plus dlogd's
#                           "archive" extra (the S3 client), for the
#                           collectors that archive; clients never get it
#   OUTDIR/etc.tar          sysusers.d and tmpfiles.d declarations (for /etc)
#   OUTDIR/units-ROLE.tar   the units of ROLE (client, server, both), for
#                           /etc/systemd/system
#   OUTDIR/usr-local.tar    libdlogd, its header and pkg-config file, the
#                           units' documentation and the man pages dlogctl(1)
#                           and dlogd.conf(5) (for /usr/local)
# Prints one JSON line: {"changed": BOOL, "digest": "SHA-256 of the wheels",
# "wheel": "dlogd's wheel file name", "archive_digest": the same for
# wheelhouse-archive.tar, or ""}.
#
# Everything is reproducible: dlogd's wheel is built from a clean copy of
# SOURCE (no stale build/ or egg-info can slip old modules in) with a fixed
# SOURCE_DATE_EPOCH, the archives with fixed times, owners and order, so an
# unchanged checkout gives the same bytes and changes nothing on the hosts.
# Dependencies already in OUTDIR are reused offline; only missing ones are
# fetched (or built).
set -eu
source=$1 out=$2 python=$3 extra=${4:-}
epoch=315532800
tmp=$(mktemp -d "${TMPDIR:-/tmp}/dlogd-payload.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out" "$tmp/src" "$tmp/new"
changed=false

# replace NEW DEST: move NEW to DEST unless DEST has the same bytes.
replace() {
    if ! cmp -s "$1" "$2"; then
        mv -f "$1" "$2"
        changed=true
    fi
}

# archive NAME DIR: a reproducible tar of DIR's files and links as
# OUTDIR/NAME. No directory entries: extracting must not touch the times or
# modes of /etc, /usr/local or their subdirectories.
archive() {
    (cd "$2" && find . ! -type d | LC_ALL=C sort | sed 's|^\./||') >"$tmp/$1.list"
    tar --no-recursion --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
        --format=gnu -C "$2" -cf "$tmp/$1" -T "$tmp/$1.list"
    replace "$tmp/$1" "$out/$1"
}

for item in pyproject.toml README.md dlogd; do
    cp -R "$source/$item" "$tmp/src/"
done
find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
export SOURCE_DATE_EPOCH=$epoch PIP_DISABLE_PIP_VERSION_CHECK=1
# Building the wheel takes seconds: skip it when the sources are those of the
# wheel already there (the stamp names their digest).
sources=$(cd "$tmp/src" && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
stamp=$out/.dlogd-sources
if [ "$(cat "$stamp" 2>/dev/null)" != "$sources" ] || ! ls "$out"/dlogd-*.whl >/dev/null 2>&1; then
    "$python" -m pip wheel -q --no-deps --wheel-dir "$tmp/new" "$tmp/src" >&2
else
    cp "$out"/dlogd-*.whl "$tmp/new/"
fi
for wheel in "$tmp/new"/*.whl; do
    name=${wheel##*/}
    if ! cmp -s "$wheel" "$out/$name"; then
        # Older builds of dlogd go: pip would pick the highest version.
        rm -f "$out/${name%%-*}"-*.whl
        mv "$wheel" "$out/$name"
        changed=true
    fi
    dlogd_wheel=$out/$name
done
printf '%s\n' "$sources" >"$stamp"
"$python" -m pip wheel -q --no-index --find-links "$out" --wheel-dir "$out" "$dlogd_wheel" >&2 2>/dev/null ||
    "$python" -m pip wheel -q --find-links "$out" --wheel-dir "$out" "$dlogd_wheel" >&2
mkdir "$tmp/wheels"
cp "$out"/*.whl "$tmp/wheels/"
archive wheelhouse.tar "$tmp/wheels"

archive_digest=
if [ "$extra" = archive ]; then
    # The extra's requirements come from dlogd's own metadata (pyproject.toml).
    mkdir -p "$out/archive"
    cp "$out"/*.whl "$out/archive/"
    "$python" -m pip wheel -q --no-index --find-links "$out/archive" --wheel-dir "$out/archive" \
        "$dlogd_wheel[archive]" >&2 2>/dev/null ||
        "$python" -m pip wheel -q --find-links "$out/archive" --wheel-dir "$out/archive" \
            "$dlogd_wheel[archive]" >&2
    # Older builds of dlogd go, as above.
    for old in "$out"/archive/dlogd-*.whl; do
        [ "${old##*/}" = "${dlogd_wheel##*/}" ] || rm -f "$old"
    done
    mkdir "$tmp/archive-wheels"
    cp "$out"/archive/*.whl "$tmp/archive-wheels/"
    archive wheelhouse-archive.tar "$tmp/archive-wheels"
    archive_digest=$(cd "$out/archive" && sha256sum -- *.whl | sha256sum | cut -d' ' -f1)
fi

units=$source/systemd
mkdir -p "$tmp/etc/sysusers.d" "$tmp/etc/tmpfiles.d"
cp "$units/sysusers.d/dlogd.conf" "$tmp/etc/sysusers.d/"
cp "$units/tmpfiles.d/dlogd.conf" "$tmp/etc/tmpfiles.d/"
chmod 0644 "$tmp"/etc/*/dlogd.conf
archive etc.tar "$tmp/etc"
# dlogd-watch.*: enabled by the client role only where watch { } blocks are configured.
client="dlogd-submit.socket dlogd-submit@.service dlogd-ship.service dlogd-ship.path dlogd-ship.timer \
    dlogd-watch.service dlogd-watch.path dlogd-watch.timer"
# dlogd-archive.*: enabled by the collector role only where an archive is configured.
server="dlogd-receive.socket dlogd-receive@.service \
    dlogd-archive.service dlogd-archive.path dlogd-archive.timer"
for role in client server both; do
    case $role in
        client) list=$client ;;
        server) list=$server ;;
        both) list="$client $server" ;;
    esac
    mkdir "$tmp/units-$role"
    for unit in $list; do
        install -m 0644 "$units/$unit" "$tmp/units-$role/$unit"
    done
    # No dlogd.socket alias link here: "systemctl enable" makes it from
    # Alias=. A link made in advance makes "is-enabled" answer "enabled", so
    # the roles' enable step did nothing and the socket had no
    # sockets.target.wants link: after a reboot nobody could submit.
    archive "units-$role.tar" "$tmp/units-$role"
done

make -s -C "$source/clib" all >&2
local=$tmp/usr-local
mkdir -p "$local/lib/pkgconfig" "$local/include" "$local/share/doc/dlogd" \
    "$local/share/man/man1" "$local/share/man/man5"
version=$(sed -n 's/^VERSION *:= *//p' "$source/clib/Makefile")
install -m 0755 "$source/clib/build/libdlogd.so.$version" "$local/lib/"
ln -s "libdlogd.so.$version" "$local/lib/libdlogd.so.${version%%.*}"
ln -s "libdlogd.so.${version%%.*}" "$local/lib/libdlogd.so"
install -m 0644 "$source/clib/dlogd.h" "$local/include/"
install -m 0644 "$source/clib/build/dlogd.pc" "$local/lib/pkgconfig/"
install -m 0644 "$source/docs/systemd.md" "$local/share/doc/dlogd/"
install -m 0644 "$source/docs/watch.md" "$local/share/doc/dlogd/"  # dlogd-watch.*'s Documentation=
install -m 0644 "$source/docs/archive.md" "$local/share/doc/dlogd/"  # dlogd-archive.*'s
# Generated from docs/*.md by scripts/manpages.sh; a test keeps them current.
install -m 0644 "$source/docs/man/dlogctl.1" "$local/share/man/man1/"
install -m 0644 "$source/docs/man/dlogd.conf.5" "$local/share/man/man5/"
find "$local" -type d -exec chmod 0755 {} +
archive usr-local.tar "$local"

digest=$(cd "$out" && sha256sum -- *.whl | sha256sum | cut -d' ' -f1)
printf '{"changed": %s, "digest": "%s", "wheel": "%s", "archive_digest": "%s"}\n' \
    "$changed" "$digest" "${dlogd_wheel##*/}" "$archive_digest"
