"""A throwaway fleet PKI: one CA and per-host certificates, for demos and tests.

Place in the flow: no service imports this module. ``dlogctl demo`` (a
product command, so this lives in the package rather than among the tests),
the test suites and the lab use it to mint the files that
:class:`dlogd.config.TLSFiles` points at and that :mod:`dlogd.tls` loads. A real
fleet gets its certificates from Ansible; this is the same shape, made small:
EC P-256 keys, a CA that can sign only leaf certificates (path length 0), and
host certificates good for both TLS client and server auth (a host ships *and*
may collect), naming the host in a DNS subjectAltName.

Keys are written 0600 and certificates 0644, each through a temporary file that
is fsynced and then linked into place, so a crash never leaves a half-written
key behind. Existing files are never replaced unless asked: silently
overwriting a CA key would orphan every certificate it signed.

It needs ``cryptography``, a declared dependency (pyproject.toml): ``tls``
uses it too, and pyOpenSSL is built on it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dlogd.config import TLSFiles

CA_VALIDITY = datetime.timedelta(days=3650)
HOST_VALIDITY = datetime.timedelta(days=825)
# Clocks across a fleet drift; a certificate minted now must already be valid
# on a peer whose clock runs a little behind.
CLOCK_SKEW = datetime.timedelta(minutes=5)

KEY_MODE = 0o600
CERT_MODE = 0o644

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class CertPaths:
    """Where one certificate and its private key were written."""

    certificate: Path
    key: Path


def make_ca(directory: str | os.PathLike[str], name: str, *, overwrite: bool = False) -> CertPaths:
    """Create a self-signed fleet CA as ``ca.crt`` / ``ca.key`` in *directory*."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(Path(directory), "ca", cert, key, overwrite=overwrite)


def make_host_cert(
    ca: CertPaths,
    host_name: str,
    directory: str | os.PathLike[str],
    *,
    ip_addresses: Iterable[str] = (),
    dns_names: Sequence[str] | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    overwrite: bool = False,
) -> CertPaths:
    """Create ``<host_name>.crt`` / ``<host_name>.key`` in *directory*, signed by *ca*.

    The common name is always *host_name*. *dns_names* defaults to
    ``(host_name,)``; pass ``()`` for a certificate without DNS names, which
    peers then identify by its common name. *not_before*/*not_after* let tests
    mint expired or not-yet-valid certificates.
    """
    _check_file_stem(host_name)
    ca_cert = load_certificate(ca.certificate)
    ca_key = _load_ca_key(ca.key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(host_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(not_before if not_before is not None else now - CLOCK_SKEW)
        .not_valid_after(not_after if not_after is not None else now + HOST_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    alt_names = _alt_names((host_name,) if dns_names is None else dns_names, ip_addresses)
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _write_pair(Path(directory), host_name, cert, key, overwrite=overwrite)


def tls_files(ca: CertPaths, host: CertPaths, *, min_version: str = "1.3") -> TLSFiles:
    """The :class:`TLSFiles` of a host holding certificate *host* from fleet *ca*."""
    return TLSFiles(
        certificate=str(host.certificate),
        key=str(host.key),
        ca=str(ca.certificate),
        min_version=min_version,
    )


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Read one PEM certificate."""
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def fingerprint(cert_path: str | os.PathLike[str]) -> str:
    """Lowercase hex SHA-256 of the certificate's DER form: the value a host pin holds."""
    return load_certificate(cert_path).fingerprint(hashes.SHA256()).hex()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _serial() -> int:
    # RFC 5280: positive, at most 20 octets; 159 random bits satisfy both.
    return secrets.randbits(159) | 1


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _alt_names(dns_names: Sequence[str], ip_addresses: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    return names


def _check_file_stem(host_name: str) -> None:
    # The host name becomes a file name: refuse anything that could leave the directory.
    if not host_name or host_name.startswith(".") or "/" in host_name or "\0" in host_name:
        raise ValueError(f"host name {host_name!r} cannot be used as a file name")


def _load_ca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: CA key is not an EC key")
    return key


def _write_pair(
    directory: Path,
    stem: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    overwrite: bool,
) -> CertPaths:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    paths = CertPaths(certificate=directory / f"{stem}.crt", key=directory / f"{stem}.key")
    directory.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not overwrite:
            _refuse_existing(dir_fd, paths)
        # Key first: a certificate on disk without its key would look usable but is not.
        _write_atomic(dir_fd, paths.key.name, key_pem, KEY_MODE, overwrite=overwrite)
        _write_atomic(
            dir_fd,
            paths.certificate.name,
            cert.public_bytes(serialization.Encoding.PEM),
            CERT_MODE,
            overwrite=overwrite,
        )
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return paths


def _refuse_existing(dir_fd: int, paths: CertPaths) -> None:
    # Checked for both files before writing either, so a refusal never leaves a new
    # key next to an old certificate.
    for path in (paths.key, paths.certificate):
        try:
            os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        raise FileExistsError(f"{path}: already exists; refusing to replace it")


def _write_atomic(dir_fd: int, name: str, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write *data* to *name* under *dir_fd*: temp file, fsync, then link or rename into place."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    # O_EXCL|O_NOFOLLOW: never write through a planted symlink; the mode is set at creation
    # so a key is never readable by others, not even for an instant.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have cleared bits we want (0644 certificates)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            # link() fails with EEXIST instead of replacing: an atomic "create, no replace".
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    finally:
        with contextlib.suppress(FileNotFoundError):  # already renamed into place
            os.unlink(tmp, dir_fd=dir_fd)
