"""Certificates as plain data: the few fields the data plane reads, from the DER itself.

The node agent and the waypoint read a certificate for its serial, its validity, its SAN URIs (the
workload identity), its public key (to match the key we generated) and its SHA-256 fingerprint.  That
is a short walk over the DER (ITU-T X.690) of RFC 5280's `Certificate`; this module does it with
strict bounds checks and nothing else: signatures and chains are checked by OpenSSL
(`mesh.secrets.openssl`), the same library that runs the TLS.

Anything that is not a well-formed certificate (truncated, a wrong tag, a length past the end, bytes
after the end, bad PEM) raises `InvalidCertificateError` saying what and where; nothing else escapes.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from mesh.secrets.errors import InvalidCertificateError

# Universal tags (X.690 8.1.2), and the context-specific ones of RFC 5280's TBSCertificate.
_BOOLEAN, _INTEGER, _BIT_STRING, _OCTET_STRING, _OID = 0x01, 0x02, 0x03, 0x04, 0x06
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18
_SEQUENCE = 0x30
_VERSION, _ISSUER_UID, _SUBJECT_UID, _EXTENSIONS = 0xA0, 0x81, 0x82, 0xA3
_SAN_URI = 0x86  # GeneralName uniformResourceIdentifier: [6] IMPLICIT IA5String
_SAN_OID = bytes((0x55, 0x1D, 0x11))  # 2.5.29.17 subjectAltName
_MAX_LENGTH_OCTETS = 4

_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)
_UTC_RE = re.compile(rb"(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z")
_GENERALIZED_RE = re.compile(rb"(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z")


class _Tlv(NamedTuple):
    tag: int
    head: int  # first byte of the element (its tag)
    start: int  # first byte of the value
    end: int  # one past the last byte of the value


def _read(data: bytes, pos: int, end: int, what: str) -> _Tlv:
    """The element at `pos`, which must lie wholly before `end`."""
    if pos + 2 > end:
        raise InvalidCertificateError(f"{what}: truncated at byte {pos}")
    head = pos
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise InvalidCertificateError(f"{what}: multi-byte tag at byte {pos}")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > _MAX_LENGTH_OCTETS:
            raise InvalidCertificateError(f"{what}: unsupported length form at byte {pos - 1}")
        if pos + count > end:
            raise InvalidCertificateError(f"{what}: truncated length at byte {pos}")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise InvalidCertificateError(f"{what}: length not in its shortest form at byte {pos - 1}")
        pos += count
    if pos + length > end:
        raise InvalidCertificateError(f"{what}: length {length} at byte {pos} runs past the end ({end})")
    return _Tlv(tag, head, pos, pos + length)


def _expect(data: bytes, pos: int, end: int, tag: int, what: str) -> _Tlv:
    tlv = _read(data, pos, end, what)
    if tlv.tag != tag:
        raise InvalidCertificateError(f"{what}: expected tag 0x{tag:02x} at byte {pos}, found 0x{tlv.tag:02x}")
    return tlv


def _children(data: bytes, parent: _Tlv, what: str) -> list[_Tlv]:
    out = []
    pos = parent.start
    while pos < parent.end:
        tlv = _read(data, pos, parent.end, what)
        out.append(tlv)
        pos = tlv.end
    return out


def _time(data: bytes, tlv: _Tlv, what: str) -> datetime.datetime:
    raw = data[tlv.start : tlv.end]
    if tlv.tag == _UTC_TIME:
        match = _UTC_RE.fullmatch(raw)
        year_digits = 2
    elif tlv.tag == _GENERALIZED_TIME:
        match = _GENERALIZED_RE.fullmatch(raw)
        year_digits = 4
    else:
        raise InvalidCertificateError(f"{what}: expected UTCTime or GeneralizedTime, found tag 0x{tlv.tag:02x}")
    if match is None:
        raise InvalidCertificateError(f"{what}: {raw!r} is not a time in the form RFC 5280 allows")
    year, month, day, hour, minute, second = (int(g) for g in match.groups())
    if year_digits == 2:
        year += 1900 if year >= 50 else 2000  # RFC 5280 4.1.2.5.1
    try:
        return datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)
    except ValueError as exc:
        raise InvalidCertificateError(f"{what}: {raw!r} is not a valid time ({exc})") from None


def _san_uris(data: bytes, value: _Tlv) -> tuple[str, ...]:
    """The URIs of a subjectAltName extension's OCTET STRING value."""
    names = _expect(data, value.start, value.end, _SEQUENCE, "subjectAltName")
    if names.end != value.end:
        raise InvalidCertificateError("subjectAltName: bytes after its names")
    uris = []
    for name in _children(data, names, "subjectAltName"):
        if name.tag == _SAN_URI:
            try:
                uris.append(data[name.start : name.end].decode("ascii"))
            except UnicodeDecodeError:
                raise InvalidCertificateError(f"subjectAltName: URI at byte {name.start} is not ASCII") from None
    return tuple(uris)


def _extensions(data: bytes, wrapper: _Tlv) -> tuple[str, ...]:
    """The SAN URIs of a TBSCertificate's `[3] EXPLICIT Extensions` (empty when there is no SAN)."""
    seq = _expect(data, wrapper.start, wrapper.end, _SEQUENCE, "extensions")
    if seq.end != wrapper.end:
        raise InvalidCertificateError("extensions: bytes after the extension list")
    uris: tuple[str, ...] = ()
    seen_san = False
    for ext in _children(data, seq, "extensions"):
        if ext.tag != _SEQUENCE:
            raise InvalidCertificateError(f"extensions: expected a SEQUENCE at byte {ext.start}")
        oid = _expect(data, ext.start, ext.end, _OID, "extension")
        if data[oid.start : oid.end] != _SAN_OID:
            continue  # what other extensions say is OpenSSL's to check (path validation, TLS)
        if seen_san:
            raise InvalidCertificateError("extensions: more than one subjectAltName")
        seen_san = True
        parts = _children(data, ext, "subjectAltName extension")
        if len(parts) not in (2, 3) or parts[-1].tag != _OCTET_STRING or (len(parts) == 3 and parts[1].tag != _BOOLEAN):
            raise InvalidCertificateError(f"extension at byte {ext.start}: not (OID, [critical], OCTET STRING)")
        uris = _san_uris(data, parts[-1])
    return uris


@dataclass(frozen=True)
class Certificate:
    """One X.509 certificate: its DER (what equality and hashing look at) and the fields read from it."""

    der: bytes
    serial_number: int = field(compare=False)
    not_valid_before_utc: datetime.datetime = field(compare=False)
    not_valid_after_utc: datetime.datetime = field(compare=False)
    uri_sans: tuple[str, ...] = field(compare=False)
    public_key_der: bytes = field(compare=False)  # the SubjectPublicKeyInfo, DER
    sha256_fingerprint: bytes = field(compare=False)

    @classmethod
    def from_der(cls, der: bytes) -> Certificate:
        data = bytes(der)
        cert = _expect(data, 0, len(data), _SEQUENCE, "certificate")
        if cert.end != len(data):
            raise InvalidCertificateError(f"certificate: {len(data) - cert.end} bytes after its end")
        parts = _children(data, cert, "certificate")
        if len(parts) != 3 or parts[0].tag != _SEQUENCE or parts[1].tag != _SEQUENCE or parts[2].tag != _BIT_STRING:
            raise InvalidCertificateError("certificate: not (TBSCertificate, AlgorithmIdentifier, BIT STRING)")
        fields = _children(data, parts[0], "tbsCertificate")
        i = 1 if fields and fields[0].tag == _VERSION else 0
        if len(fields) < i + 6:
            raise InvalidCertificateError(f"tbsCertificate: {len(fields)} fields, too few")
        serial, algorithm, issuer, validity, subject, spki = fields[i : i + 6]
        for tlv, tag, what in ((serial, _INTEGER, "serialNumber"), (algorithm, _SEQUENCE, "signature"),
                               (issuer, _SEQUENCE, "issuer"), (validity, _SEQUENCE, "validity"),
                               (subject, _SEQUENCE, "subject"), (spki, _SEQUENCE, "subjectPublicKeyInfo")):
            if tlv.tag != tag:
                raise InvalidCertificateError(f"{what}: expected tag 0x{tag:02x} at byte {tlv.start}, "
                                              f"found 0x{tlv.tag:02x}")
        if serial.start == serial.end:
            raise InvalidCertificateError("serialNumber: empty INTEGER")
        times = _children(data, validity, "validity")
        if len(times) != 2:
            raise InvalidCertificateError(f"validity: {len(times)} times, expected notBefore and notAfter")
        uris: tuple[str, ...] = ()
        tags = [t.tag for t in fields[i + 6 :]]
        if tags not in ([], [_EXTENSIONS], [_ISSUER_UID, _EXTENSIONS], [_SUBJECT_UID, _EXTENSIONS],
                        [_ISSUER_UID, _SUBJECT_UID, _EXTENSIONS], [_ISSUER_UID], [_SUBJECT_UID],
                        [_ISSUER_UID, _SUBJECT_UID]):
            raise InvalidCertificateError(f"tbsCertificate: unexpected fields after the public key: {tags}")
        if tags and tags[-1] == _EXTENSIONS:
            uris = _extensions(data, fields[-1])
        return cls(
            der=data,
            serial_number=int.from_bytes(data[serial.start : serial.end], "big", signed=True),
            not_valid_before_utc=_time(data, times[0], "notBefore"),
            not_valid_after_utc=_time(data, times[1], "notAfter"),
            uri_sans=uris,
            public_key_der=data[spki.head : spki.end],
            sha256_fingerprint=hashlib.sha256(data).digest(),
        )

    def pem(self) -> bytes:
        return pem_block("CERTIFICATE", self.der)

    def __repr__(self) -> str:
        return (f"Certificate(serial={self.serial_number:x}, uri_sans={list(self.uri_sans)}, "
                f"not_after={self.not_valid_after_utc.isoformat()})")


def pem_block(label: str, der: bytes) -> bytes:
    """`der` as a PEM block of `label` (base64 in lines of 64, RFC 7468)."""
    body = base64.b64encode(der)
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label.encode(), lines, label.encode())


def load_der_certificate(der: bytes) -> Certificate:
    return Certificate.from_der(der)


def load_pem_certificates(pem: str | bytes) -> tuple[Certificate, ...]:
    """Every `CERTIFICATE` block of `pem`, in order (text around the blocks is ignored, as OpenSSL does)."""
    if isinstance(pem, str):
        try:
            data = pem.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidCertificateError("PEM is not ASCII") from None
    else:
        data = pem
    blocks = _PEM_RE.findall(data)
    if data.count(b"-----BEGIN CERTIFICATE-----") != len(blocks):
        raise InvalidCertificateError("PEM: a BEGIN CERTIFICATE line without its END line")
    if not blocks:
        raise InvalidCertificateError("PEM holds no CERTIFICATE block")
    certs = []
    for n, block in enumerate(blocks, 1):
        try:
            der = base64.b64decode(b"".join(block.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidCertificateError(f"PEM certificate {n}: not valid base64") from None
        try:
            certs.append(Certificate.from_der(der))
        except InvalidCertificateError as exc:
            raise InvalidCertificateError(f"PEM certificate {n}: {exc}") from None
    return tuple(certs)


def load_pem_certificate(pem: str | bytes) -> Certificate:
    """The one certificate of `pem`."""
    certs = load_pem_certificates(pem)
    if len(certs) != 1:
        raise InvalidCertificateError(f"PEM holds {len(certs)} certificates, expected one")
    return certs[0]
