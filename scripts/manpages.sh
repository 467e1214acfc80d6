#!/bin/sh
# Render the man pages from their Markdown sources (one text, two forms):
# docs/dlogctl.md -> dlogctl.1, docs/config.md -> dlogd.conf.5. The rendered
# pages are committed in docs/man/ so that installing needs no pandoc; the
# tests render them again and fail when the committed ones are stale.
#
# Usage: scripts/manpages.sh [OUTDIR]     (default: docs/man)
set -eu
cd "$(dirname "$0")/.."
out=${1:-docs/man}
mkdir -p "$out"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

render() {  # SOURCE NAME SECTION
    # The Markdown's "# name(N)" title becomes the .TH line; its "##" sections
    # become .SH. --shift-heading-level-by drops the title heading.
    pandoc --standalone --from gfm --to man --shift-heading-level-by=-1 \
        --metadata title="$2" --metadata section="$3" \
        --metadata header="dlogd manual" --metadata footer="dlogd $version" \
        --metadata date="" "$1" --output "$out/$2.$3"
}

render docs/dlogctl.md dlogctl 1
render docs/config.md dlogd.conf 5
