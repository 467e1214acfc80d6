"""Names and limits every part of dlogd agrees on: one rule, one place.

Standard library only and cheap to import: the submit service (a process per
connection) and the C library's tests read it as well as the schema, the
protocols, the spool and the store.
"""

from __future__ import annotations

import re

# A host name or address as configs write it (``host "logs1"``, ``host "::1"``),
# also the name of a host's marker file in the spool: no "/", no leading "." or "-".
HOST_RE = re.compile(r"[A-Za-z0-9_:][A-Za-z0-9_.:-]{0,252}\Z")
