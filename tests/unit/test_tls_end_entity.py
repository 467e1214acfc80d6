"""A fleet-signed certificate is a host's identity only if it is a host certificate.

OpenSSL's chain check accepts anything the fleet CA signed; these leaves are
signed by the real test fleet CA, so only dlogd's own end-entity rule can
refuse them.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dlogd.config import Host
from dlogd.tls import Identity, PeerRefused, Refusal, check_collector, identify_sender
from tests.tlsfixtures import LOOPBACK, SENDER, Fleet, fleet

__all__ = ["fleet"]  # fixture, re-exported for pytest


def _leaf(
    fleet: Fleet, name: str, *, ca: bool, usages: list[x509.ObjectIdentifier] | None
) -> Identity:
    ca_cert = x509.load_pem_x509_certificate(Path(fleet.ca.certificate).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(fleet.ca.key).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    )
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return Identity.from_certificate(builder.sign(ca_key, hashes.SHA256()))


SENDERS = {SENDER: Host(SENDER, LOOPBACK)}


def test_ca_certificate_is_not_accepted_as_a_sender(fleet: Fleet) -> None:
    identity = _leaf(fleet, SENDER, ca=True, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(PeerRefused) as refused:
        identify_sender(identity, LOOPBACK, SENDERS)
    assert refused.value.code is Refusal.NOT_END_ENTITY


def test_ca_certificate_is_not_accepted_as_a_collector(fleet: Fleet) -> None:
    identity = _leaf(fleet, "logs1", ca=True, usages=None)
    with pytest.raises(PeerRefused) as refused:
        check_collector(identity, Host("logs1", "logs1"))
    assert refused.value.code is Refusal.NOT_END_ENTITY


def test_server_only_certificate_cannot_send(fleet: Fleet) -> None:
    identity = _leaf(fleet, SENDER, ca=False, usages=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(PeerRefused) as refused:
        identify_sender(identity, LOOPBACK, SENDERS)
    assert refused.value.code is Refusal.WRONG_PURPOSE
    assert "clientAuth" in str(refused.value)


def test_client_only_certificate_cannot_collect(fleet: Fleet) -> None:
    identity = _leaf(fleet, "logs1", ca=False, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(PeerRefused) as refused:
        check_collector(identity, Host("logs1", "logs1"))
    assert refused.value.code is Refusal.WRONG_PURPOSE


@pytest.mark.parametrize("usages", [None, [ExtendedKeyUsageOID.CLIENT_AUTH]])
def test_host_certificate_fit_for_sending_is_accepted(
    fleet: Fleet, usages: list[x509.ObjectIdentifier] | None
) -> None:
    identity = _leaf(fleet, SENDER, ca=False, usages=usages)
    assert identify_sender(identity, LOOPBACK, SENDERS) is SENDERS[SENDER]


def test_refusal_reason_names_its_code_once(fleet: Fleet) -> None:
    identity = _leaf(fleet, SENDER, ca=True, usages=None)
    with pytest.raises(PeerRefused) as refused:
        identify_sender(identity, LOOPBACK, SENDERS)
    assert str(refused.value).count("not-end-entity") == 1
