#!/bin/sh
# Install dlogd's systemd units, users, directories and entry points on a host.
#
# Place in the flow: this is how a checkout (and its venv) becomes a running
# dlogd host: by hand, from the lab tests (tests/lab) and from Ansible. The
# units in systemd/ call /usr/local/bin/dlogd-*; this script writes those as
# small Python launchers bound to one venv, so the unit files never name a
# checkout path.
#
# Usage: scripts/install.sh [--client|--server|--both] [--venv PATH]
#                           [--source PATH] [--prefix DIR] [--hardlink] [--enable]
#   --client   submit socket and service, ship service, path and timer
#   --server   receive socket and service
#   --both     both roles (default)
#   --venv     virtualenv whose python runs dlogd (default: SOURCE/.venv)
#   --source   checkout whose dlogd/ the launchers import first (default: the
#              one this script is in); "none": use dlogd as installed in the venv
#   --prefix   staging root (default /); anything but / only copies files
#   --hardlink submit hard-links instead of copying: adds the drop-ins from
#              systemd/hardlink/ (less sandbox, two capabilities; see docs)
#   --enable   also "systemctl enable --now" the role's socket/path/timer
# Running it again gives the same result (idempotent).
set -eu

usage() {
    sed -n '10,22s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

here=$(cd "$(dirname "$0")/.." && pwd)
role=both
source_dir=$here
venv=
prefix=/
enable=no
hardlink=no

while [ $# -gt 0 ]; do
    case $1 in
        --client) role=client ;;
        --server) role=server ;;
        --both) role=both ;;
        --venv) [ $# -ge 2 ] || usage; venv=$2; shift ;;
        --source) [ $# -ge 2 ] || usage; source_dir=$2; shift ;;
        --prefix) [ $# -ge 2 ] || usage; prefix=$2; shift ;;
        --hardlink) hardlink=yes ;;
        --enable) enable=yes ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage ;;
    esac
    shift
done

if [ -z "$venv" ]; then
    if [ "$source_dir" = none ]; then venv=$here/.venv; else venv=$source_dir/.venv; fi
fi
python=$venv/bin/python
units=$here/systemd
prefix=${prefix%/}
# Files are staged under $prefix but name the final paths inside.
etc=$prefix/etc

# A shebang cannot quote: a path with blanks would split into arguments.
case $python in
    *[[:space:]]*) die "venv path must not contain whitespace: $venv" ;;
esac
[ -x "$python" ] || die "no python in venv: $python"

# Launchers import the checkout's dlogd/ ahead of anything installed in the
# venv (an editable install may point at another checkout), so installing from
# a checkout runs that checkout's code.
if [ "$source_dir" = none ]; then
    (cd / && "$python" -I -c 'import dlogd' 2>/dev/null) || die "dlogd is not installed in $venv"
    path_line=
else
    source_dir=$(cd "$source_dir" && pwd)
    [ -f "$source_dir/dlogd/__init__.py" ] || die "no dlogd/ package in $source_dir"
    case $source_dir in
        *\"*|*\\*) die "source path must not contain quotes or backslashes: $source_dir" ;;
    esac
    path_line="sys.path.insert(0, \"$source_dir\")"
fi

# The units hide /home, /root and /run/user (ProtectHome=yes). A venv or an
# interpreter that lives there (pyenv under /root, say) must stay visible:
# the drop-in below shows exactly those trees, read-only, over an empty /home.
home_paths() {
    base=$(cd / && "$python" -I -c 'import sys; print(sys.base_prefix)')
    for p in "$base" "$(readlink -f "$python")" "$venv" "$source_dir"; do
        case $p in
            /home/*|/root/*|/run/user/*) printf '%s\n' "$p" ;;
        esac
    done | sort -u | awk 'kept == "" || index($0, kept "/") != 1 { print; kept = $0 }'
}

systemd_running() {
    [ -z "$prefix" ] && [ -d /run/systemd/system ]
}

# write_launcher NAME MODULE: /usr/local/bin/NAME runs MODULE.main().
# -I (isolated): neither PYTHON* variables nor the caller's working
# directory can change what gets imported.
write_launcher() {
    target=$prefix/usr/local/bin/$1
    tmp=$target.tmp.$$
    cat >"$tmp" <<EOF
#!$python -I
# Written by dlogd scripts/install.sh; runs $2.main() from $venv.
import sys
$path_line
from $2 import main
sys.exit(main())
EOF
    chmod 0755 "$tmp"
    mv -f "$tmp" "$target"
}

install_units() {
    for unit in "$@"; do
        install -m 0644 "$units/$unit" "$etc/systemd/system/$unit"
        case $unit in
            *.service) write_paths_dropin "$unit" ;;
        esac
    done
}

# write_paths_dropin UNIT: add (or remove, when nothing needs it) the drop-in
# that makes interpreter and code under a home directory visible.
write_paths_dropin() {
    dir=$etc/systemd/system/$1.d
    # Hard-link mode runs submit in the host's mount namespace: no home to show.
    if [ -z "$visible" ] || { [ "$hardlink" = yes ] && [ "$1" = dlogd-submit@.service ]; }; then
        rm -f "$dir/10-dlogd-paths.conf"
        rmdir "$dir" 2>/dev/null || true
        return
    fi
    install -d -m 0755 "$dir"
    {
        echo "# Written by dlogd scripts/install.sh: the venv or interpreter lives under a home directory."
        echo "[Service]"
        echo "ProtectHome=tmpfs"
        for p in $visible; do
            echo "BindReadOnlyPaths=$p"
        done
    } >"$dir/10-dlogd-paths.conf"
}

visible=$(home_paths)
install -d -m 0755 "$prefix/usr/local/bin" "$etc/systemd/system" \
    "$etc/sysusers.d" "$etc/tmpfiles.d" "$prefix/usr/local/share/doc/dlogd"

write_launcher dlogctl dlogd.cli
write_launcher dlogd-submit dlogd.submit
write_launcher dlogd-ship dlogd.ship
write_launcher dlogd-receive dlogd.receive

client_units="dlogd-submit.socket dlogd-submit@.service dlogd-ship.service dlogd-ship.path dlogd-ship.timer"
server_units="dlogd-receive.socket dlogd-receive@.service"
case $role in
    client) install_units $client_units; start_units="dlogd-submit.socket dlogd-ship.path dlogd-ship.timer" ;;
    server) install_units $server_units; start_units="dlogd-receive.socket" ;;
    both) install_units $client_units $server_units
          start_units="dlogd-submit.socket dlogd-ship.path dlogd-ship.timer dlogd-receive.socket" ;;
esac
case $role in
    client|both) ln -sfn /etc/systemd/system/dlogd-submit.socket "$etc/systemd/system/dlogd.socket" ;;
esac

# Hard-link mode drop-ins: present exactly when asked for, so switching back
# by running install.sh without --hardlink removes them.
for dropin in dlogd-submit@.service.d/20-hardlink.conf dlogd-ship.service.d/20-hardlink.conf; do
    target=$etc/systemd/system/$dropin
    if [ "$hardlink" = yes ] && [ -f "$etc/systemd/system/${dropin%%.d/*}" ]; then
        install -d -m 0755 "${target%/*}"
        install -m 0644 "$units/hardlink/$dropin" "$target"
    else
        rm -f "$target"
        rmdir "${target%/*}" 2>/dev/null || true
    fi
done

install -m 0644 "$units/sysusers.d/dlogd.conf" "$etc/sysusers.d/dlogd.conf"
install -m 0644 "$units/tmpfiles.d/dlogd.conf" "$etc/tmpfiles.d/dlogd.conf"
[ -f "$here/docs/systemd.md" ] && install -m 0644 "$here/docs/systemd.md" "$prefix/usr/local/share/doc/dlogd/systemd.md"

if systemd_running; then
    systemd-sysusers /etc/sysusers.d/dlogd.conf
    systemd-tmpfiles --create /etc/tmpfiles.d/dlogd.conf
fi

# Configuration and TLS material: readable by the dlogd services' group only.
if getent group dlogd >/dev/null 2>&1 && [ -z "$prefix" ]; then
    install -d -m 0750 -o root -g dlogd "$etc/dlogd"
else
    install -d -m 0750 "$etc/dlogd"
fi

if systemd_running; then
    systemctl daemon-reload
    if [ "$enable" = yes ]; then
        # shellcheck disable=SC2086  # a list of unit names
        systemctl enable --now $start_units
    fi
elif [ "$enable" = yes ]; then
    die "--enable needs a running systemd and --prefix /"
else
    echo "install.sh: systemd is not running here (or --prefix given): skipped sysusers, tmpfiles, daemon-reload" >&2
fi
