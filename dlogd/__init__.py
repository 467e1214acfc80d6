"""dlogd: ship finished log files off a host to collectors, securely and without loss.

The package is the whole flow: ``client`` (the ``submit()`` call an application
makes) -> ``submit_service`` (the socket-activated service that spools) ->
``spool`` -> ``ship`` (the drain) -> ``shipwire`` (the protocol) through
``driver`` over ``tls`` -> ``receive`` (the collector) -> ``store``. ``config``
is read by all of them, ``names`` holds the rules they share; ``cli`` is the
operator's ``dlogctl``.

Importing this package must stay cheap: the submit path starts a process per
connection, so nothing heavy is imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from dlogd.client import SubmitError, Submitted, submit

__all__ = ["SubmitError", "Submitted", "__version__", "submit"]


def __getattr__(name: str) -> Any:
    # Lazy so that the submit service (``dlogd.submit_service``) does not pay for the client.
    if name in ("submit", "Submitted", "SubmitError"):
        from dlogd import client

        return getattr(client, name)
    raise AttributeError(name)
