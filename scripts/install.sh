#!/bin/sh
# Install dlogd on this host by hand: a thin wrapper over ansible/install.yml,
# the same install (dlogd_install role) that site.yml rolls out to a fleet, so
# there is one install path. It builds the wheelhouse from this checkout,
# makes the venv /opt/dlogd/venv with --no-index, writes the launchers in
# /usr/local/bin, installs the units, users, directories and libdlogd.
# Configs, keys and certificates are the operator's (or site.yml's) part;
# start the units with systemctl enable --now once they are in place.
#
# Usage: scripts/install.sh [--client|--server|--both] [--hardlink]
#   --client   submit socket and service, ship service, path and timer
#   --server   receive socket and service
#   --both     both roles (default)
#   --hardlink submit hard-links instead of copying: adds the drop-ins from
#              systemd/hardlink/ (less sandbox, two capabilities; see docs)
# Needs Ansible (pip install '.[fleet]'): the checkout's .venv, else PATH.
# Running it again gives the same result (idempotent).
set -eu

usage() {
    sed -n '10,15s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

here=$(cd "$(dirname "$0")/.." && pwd)
role=both
hardlink=false
while [ $# -gt 0 ]; do
    case $1 in
        --client) role=client ;;
        --server) role=server ;;
        --both) role=both ;;
        --hardlink) hardlink=true ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage ;;
    esac
    shift
done

# The venv's python, not its ansible-playbook script: the script's #! names the
# venv by the path it was made at, which a checkout bound elsewhere (the lab's
# /opt/dlogd-lab-checkout) does not have; the interpreter finds its venv by itself.
python=$here/.venv/bin/python
if [ -x "$python" ] && "$python" -c 'import ansible.cli.playbook' 2>/dev/null; then
    set -- "$python" -m ansible.cli.playbook
elif command -v ansible-playbook >/dev/null; then
    set -- ansible-playbook
else
    echo "install.sh: no ansible-playbook: pip install '$here[fleet]' first" >&2
    exit 1
fi
cd "$here/ansible"
exec "$@" -i localhost, -c local install.yml \
    -e "{\"dlogd_install_role\": \"$role\", \"dlogd_install_hardlink\": $hardlink}"
