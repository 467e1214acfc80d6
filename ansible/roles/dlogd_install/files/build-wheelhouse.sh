#!/bin/sh
# Build dlogd and every dependency as wheels into a wheelhouse on the control
# node, for hosts that install with "pip install --no-index".
#
# Usage: build-wheelhouse.sh SOURCE WHEELHOUSE PYTHON
# Prints one JSON line: {"changed": BOOL, "digest": "SHA256 of the wheelhouse"}.
#
# dlogd's wheel is built from a clean copy of SOURCE (no stale build/ or
# egg-info can slip old modules in) with a fixed SOURCE_DATE_EPOCH, so the
# same code gives the same bytes and an unchanged checkout changes nothing on
# the hosts. Dependencies already in the wheelhouse are reused offline; only
# missing ones are fetched (or built: systemd-python, for this platform).
set -eu
source=$1 wheelhouse=$2 python=$3
tmp=$(mktemp -d "${TMPDIR:-/tmp}/dlogd-wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$wheelhouse" "$tmp/src" "$tmp/new"
for item in pyproject.toml README.md dlogd; do
    cp -R "$source/$item" "$tmp/src/"
done
find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
export SOURCE_DATE_EPOCH=315532800 PIP_DISABLE_PIP_VERSION_CHECK=1
# Building the wheel takes seconds: skip it when the sources are those of the
# wheel already there (the stamp names their digest).
sources=$(cd "$tmp/src" && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
stamp=$wheelhouse/.dlogd-sources
changed=false
if [ "$(cat "$stamp" 2>/dev/null)" != "$sources" ] || ! ls "$wheelhouse"/dlogd-*.whl >/dev/null 2>&1; then
    "$python" -m pip wheel -q --no-deps --wheel-dir "$tmp/new" "$tmp/src" >&2
else
    cp "$wheelhouse"/dlogd-*.whl "$tmp/new/"
fi
for wheel in "$tmp/new"/*.whl; do
    name=${wheel##*/}
    if ! cmp -s "$wheel" "$wheelhouse/$name"; then
        # Older builds of dlogd go: pip would pick the highest version.
        rm -f "$wheelhouse/${name%%-*}"-*.whl
        mv "$wheel" "$wheelhouse/$name"
        changed=true
    fi
    dlogd_wheel=$wheelhouse/$name
done
printf '%s\n' "$sources" >"$stamp"
count() { find "$wheelhouse" -name '*.whl' | wc -l; }
before=$(count)
"$python" -m pip wheel -q --no-index --find-links "$wheelhouse" --wheel-dir "$wheelhouse" "$dlogd_wheel" >&2 2>/dev/null ||
    "$python" -m pip wheel -q --find-links "$wheelhouse" --wheel-dir "$wheelhouse" "$dlogd_wheel" >&2
[ "$(count)" = "$before" ] || changed=true
digest=$(cd "$wheelhouse" && sha256sum -- *.whl | sha256sum | cut -d' ' -f1)
printf '{"changed": %s, "digest": "%s", "wheel": "%s"}\n' "$changed" "$digest" "${dlogd_wheel##*/}"
