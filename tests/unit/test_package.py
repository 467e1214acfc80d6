"""The package as an application imports it: its public names, whatever else is imported."""

from __future__ import annotations

import importlib
import pkgutil

import dlogd
import dlogd.client


def test_importing_every_module_leaves_the_public_submit_callable() -> None:
    """``import dlogd.submit`` (the service, now ``submit_service``) replaced the documented ``dlogd.submit()``."""
    for module in pkgutil.walk_packages(dlogd.__path__, "dlogd."):
        importlib.import_module(module.name)
    assert dlogd.submit is dlogd.client.submit
    assert dlogd.Submitted is dlogd.client.Submitted
    assert dlogd.SubmitError is dlogd.client.SubmitError
