#!/bin/sh
# Set up a development/test environment: Debian packages, then a venv with dlogd
# and its test and fleet extras (Ansible, ansible-lint). Idempotent; `make`
# calls it before anything else.
set -eu
cd "$(dirname "$0")/.."

# libsystemd-dev + pkg-config: systemd-python builds from source.
# systemd: systemd-socket-activate, systemd-analyze. systemd-container + iproute2:
# the lab (systemd-nspawn, ip netns). gcc/make: libdlogd.so. rsync, socat,
# openssh: benchmarks compare against them; the lab runs Ansible over SSH
# (sshd in each lab host). python3-cryptography: community.crypto on the lab
# hosts (their Python is /usr/bin/python3). vagrant: `vagrant validate` of
# vagrant/Vagrantfile (no provider is needed for that). time: a child's own peak
# RSS in the memory tests. auditd, logrotate: dlogd-watch is tested against the
# real ones (tests/process/test_auditd_watch.py, examples/logrotate.d). ceph-*,
# radosgw: the archive tier's single-node Ceph (tests/archive; no Recommends).
# rclone, s3cmd: the archive benchmark compares against them.
PACKAGES="libsystemd-dev pkg-config systemd systemd-container iproute2 gcc make \
python3-venv python3-cryptography rsync socat openssh-client openssh-server acl \
util-linux vagrant pandoc groff-base man-db time auditd logrotate \
ceph-mon ceph-osd ceph-mgr radosgw ceph-common rclone s3cmd"

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing Debian packages:$missing" >&2
        echo "setup: run: sudo apt-get install$missing" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q -e '.[test,fleet,archive]'
