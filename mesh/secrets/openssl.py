"""EC keys, signatures and chain validation through the OpenSSL that `ssl` already loaded (ctypes).

The data plane needs three things of a crypto library besides TLS: a P-256 key (its PKCS#8 PEM for
`ssl`, its SubjectPublicKeyInfo for the CSR and to match the issued certificate), an ECDSA-SHA256
signature (the CSR's), and RFC 5280 path validation of what the CA returned.  The `ssl` module's
libcrypto (OpenSSL 3) does all three; calling it here spares the agent a second crypto library and its
own copy of OpenSSL.

Every OpenSSL object is freed in a `finally`, every return value is checked, and a failure raises
`OpenSSLError` with the library's own error queue in the message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import ssl
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from mesh.secrets.errors import SecretsError

_P = ctypes.c_void_p
_X509_PURPOSE_SSL_CLIENT = 1
_X509_V_FLAG_X509_STRICT = 0x20
_BIO_CTRL_INFO = 3


class OpenSSLError(SecretsError):
    """An OpenSSL call failed; the message carries OpenSSL's error queue."""


def _load() -> ctypes.CDLL:
    # `ssl` has loaded libcrypto already: dlopen by the same name hands back that copy.
    name = ctypes.util.find_library("crypto") or "libcrypto.so.3"
    lib = ctypes.CDLL(name)
    lib.OpenSSL_version_num.restype = ctypes.c_ulong
    version = lib.OpenSSL_version_num()
    if version >> 28 < 3 or version != ssl.OPENSSL_VERSION_NUMBER:
        raise ImportError(f"{name} is OpenSSL {version:#x}, not the OpenSSL 3 of the ssl module "
                          f"({ssl.OPENSSL_VERSION_NUMBER:#x})")
    signatures: dict[str, tuple[type | None, list[type]]] = {
        "ERR_get_error": (ctypes.c_ulong, []),
        "ERR_error_string_n": (None, [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]),
        "ERR_clear_error": (None, []),
        "EVP_PKEY_CTX_new_from_name": (_P, [_P, ctypes.c_char_p, ctypes.c_char_p]),
        "EVP_PKEY_CTX_free": (None, [_P]),
        "EVP_PKEY_keygen_init": (ctypes.c_int, [_P]),
        "EVP_PKEY_CTX_set_group_name": (ctypes.c_int, [_P, ctypes.c_char_p]),
        "EVP_PKEY_generate": (ctypes.c_int, [_P, ctypes.POINTER(_P)]),
        "EVP_PKEY_free": (None, [_P]),
        "EVP_PKEY_get_octet_string_param": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                                           ctypes.POINTER(ctypes.c_size_t)]),
        "BIO_s_mem": (_P, []),
        "BIO_new": (_P, [_P]),
        "BIO_ctrl": (ctypes.c_long, [_P, ctypes.c_int, ctypes.c_long, _P]),
        "BIO_free": (ctypes.c_int, [_P]),
        "PEM_write_bio_PrivateKey": (ctypes.c_int, [_P, _P, _P, _P, ctypes.c_int, _P, _P]),
        "EVP_sha256": (_P, []),
        "EVP_MD_CTX_new": (_P, []),
        "EVP_MD_CTX_free": (None, [_P]),
        "EVP_DigestSignInit": (ctypes.c_int, [_P, _P, _P, _P, _P]),
        "EVP_DigestSign": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t),
                                          ctypes.c_char_p, ctypes.c_size_t]),
        "d2i_X509": (_P, [_P, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
        "X509_free": (None, [_P]),
        "X509_up_ref": (ctypes.c_int, [_P]),
        "X509_STORE_new": (_P, []),
        "X509_STORE_free": (None, [_P]),
        "X509_STORE_add_cert": (ctypes.c_int, [_P, _P]),
        "X509_STORE_set_flags": (ctypes.c_int, [_P, ctypes.c_ulong]),
        "OPENSSL_sk_new_null": (_P, []),
        "OPENSSL_sk_push": (ctypes.c_int, [_P, _P]),
        "OPENSSL_sk_free": (None, [_P]),
        "X509_STORE_CTX_new": (_P, []),
        "X509_STORE_CTX_free": (None, [_P]),
        "X509_STORE_CTX_init": (ctypes.c_int, [_P, _P, _P, _P]),
        "X509_STORE_CTX_set_time": (None, [_P, ctypes.c_ulong, ctypes.c_int64]),
        "X509_STORE_CTX_set_purpose": (ctypes.c_int, [_P, ctypes.c_int]),
        "X509_STORE_CTX_get_error": (ctypes.c_int, [_P]),
        "X509_verify_cert": (ctypes.c_int, [_P]),
        "X509_verify_cert_error_string": (ctypes.c_char_p, [ctypes.c_long]),
    }
    for fn, (restype, argtypes) in signatures.items():
        f = getattr(lib, fn)
        f.restype = restype
        f.argtypes = argtypes
    return lib


_lib = _load()


def _fail(what: str) -> OpenSSLError:
    """An error for a failed call, with (and emptying) OpenSSL's error queue."""
    reasons = []
    buf = ctypes.create_string_buffer(256)
    while code := _lib.ERR_get_error():
        _lib.ERR_error_string_n(code, buf, len(buf))
        reasons.append(buf.value.decode("ascii", "replace"))
    return OpenSSLError(f"{what} failed: {'; '.join(reasons) or 'no reason given'}")


def _ok(result: int, what: str) -> None:
    if result != 1:
        raise _fail(what)


def _ptr(result: int | None, what: str) -> int:
    if not result:
        raise _fail(what)
    return result


def _bio_bytes(bio: int) -> bytes:
    data = ctypes.c_char_p()
    length = _lib.BIO_ctrl(bio, _BIO_CTRL_INFO, 0, ctypes.byref(data))
    if length <= 0 or not data:
        raise _fail("BIO_get_mem_data")
    return ctypes.string_at(data, length)


# SubjectPublicKeyInfo of a P-256 key up to its point: SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 },
# BIT STRING (no unused bits) { the uncompressed point, 65 bytes } }.
_P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
_P256_POINT = 65


def _public_key_der(pkey: int) -> bytes:
    """The key's SubjectPublicKeyInfo, DER (the point read as a parameter: `i2d_PUBKEY` goes through
    OpenSSL 3's encoder lookup, five times slower)."""
    point = ctypes.create_string_buffer(_P256_POINT)
    size = ctypes.c_size_t(0)
    _ok(_lib.EVP_PKEY_get_octet_string_param(pkey, b"encoded-pub-key", point, len(point), ctypes.byref(size)),
        "EVP_PKEY_get_octet_string_param")
    if size.value != _P256_POINT or point.raw[0] != 0x04:
        raise OpenSSLError(f"the generated key's point is {size.value} bytes, not an uncompressed P-256 point")
    return _P256_SPKI_PREFIX + point.raw


@dataclass(frozen=True)
class PublicKey:
    """A public key as its SubjectPublicKeyInfo DER (what a certificate carries)."""

    der: bytes


class PrivateKey:
    """An EC P-256 private key, held by OpenSSL (freed when this object goes), with its PKCS#8 PEM (for
    `ssl`) and its public key's DER.  Its repr never shows the key."""

    __slots__ = ("__weakref__", "_pem", "_pkey", "public_key_der")

    def __init__(self, pkey: int) -> None:
        """Takes over `pkey` (an `EVP_PKEY *`): it is freed with this object, also if this fails."""
        self._pkey = pkey
        weakref.finalize(self, _lib.EVP_PKEY_free, pkey)
        self.public_key_der = _public_key_der(pkey)  # SubjectPublicKeyInfo, DER
        bio = _ptr(_lib.BIO_new(_lib.BIO_s_mem()), "BIO_new")
        try:
            _ok(_lib.PEM_write_bio_PrivateKey(bio, pkey, None, None, 0, None, None), "PEM_write_bio_PrivateKey")
            self._pem = _bio_bytes(bio)
        finally:
            _lib.BIO_free(bio)

    def public_key(self) -> PublicKey:
        return PublicKey(self.public_key_der)

    def pkcs8_pem(self) -> bytes:
        """The unencrypted PKCS#8 PEM, for `ssl` (`mesh.secrets.tls`) only."""
        return self._pem

    def sign_sha256(self, data: bytes) -> bytes:
        """An ECDSA-with-SHA256 signature of `data` (DER `Ecdsa-Sig-Value`)."""
        mdctx = _ptr(_lib.EVP_MD_CTX_new(), "EVP_MD_CTX_new")
        try:
            _ok(_lib.EVP_DigestSignInit(mdctx, None, _lib.EVP_sha256(), None, self._pkey), "EVP_DigestSignInit")
            size = ctypes.c_size_t(0)
            _ok(_lib.EVP_DigestSign(mdctx, None, ctypes.byref(size), data, len(data)), "EVP_DigestSign")
            sig = ctypes.create_string_buffer(size.value)
            _ok(_lib.EVP_DigestSign(mdctx, sig, ctypes.byref(size), data, len(data)), "EVP_DigestSign")
            return sig.raw[: size.value]
        finally:
            _lib.EVP_MD_CTX_free(mdctx)

    def __repr__(self) -> str:
        return "PrivateKey(EC P-256)"


def generate_ec_p256() -> PrivateKey:
    """A fresh EC P-256 key."""
    pkey = _P()
    ctx = _ptr(_lib.EVP_PKEY_CTX_new_from_name(None, b"EC", None), "EVP_PKEY_CTX_new_from_name")
    try:
        _ok(_lib.EVP_PKEY_keygen_init(ctx), "EVP_PKEY_keygen_init")
        _ok(_lib.EVP_PKEY_CTX_set_group_name(ctx, b"P-256"), "EVP_PKEY_CTX_set_group_name")
        _ok(_lib.EVP_PKEY_generate(ctx, ctypes.byref(pkey)), "EVP_PKEY_generate")
    finally:
        _lib.EVP_PKEY_CTX_free(ctx)
    return PrivateKey(_ptr(pkey.value, "EVP_PKEY_generate"))


def _x509(der: bytes) -> int:
    p = ctypes.c_char_p(der)
    return _ptr(_lib.d2i_X509(None, ctypes.byref(p), len(der)), "d2i_X509")


# Roots parsed once (OpenSSL 3.0's `d2i_X509` takes ~150 us, most of a validation): DER -> `X509 *`, one
# reference held here; the oldest is let go when a rotation brings more than _MAX_ROOTS.
_roots: dict[bytes, int] = {}
_roots_lock = threading.Lock()
_MAX_ROOTS = 8


def _root(der: bytes) -> int:
    """A reference of the caller's own (to `X509_free`) to the parsed root `der`."""
    with _roots_lock:
        x509 = _roots.get(der)
        if x509 is None:
            x509 = _x509(der)
            if len(_roots) >= _MAX_ROOTS:
                _lib.X509_free(_roots.pop(next(iter(_roots))))
            _roots[der] = x509
        _ok(_lib.X509_up_ref(x509), "X509_up_ref")
        return x509


def verify_chain(leaf: bytes, intermediates: Sequence[bytes], roots: Sequence[bytes],
                 now: datetime.datetime) -> str | None:
    """RFC 5280 path validation (OpenSSL's `X509_verify_cert`, strict, for a TLS client) of the DER
    certificate `leaf` through `intermediates` to one of `roots` at `now`: None, or why it fails."""
    made: list[int] = []
    store = untrusted = ctx = None
    try:
        store = _ptr(_lib.X509_STORE_new(), "X509_STORE_new")
        _ok(_lib.X509_STORE_set_flags(store, _X509_V_FLAG_X509_STRICT), "X509_STORE_set_flags")
        for der in roots:
            made.append(_root(der))
            _ok(_lib.X509_STORE_add_cert(store, made[-1]), "X509_STORE_add_cert")
        untrusted = _ptr(_lib.OPENSSL_sk_new_null(), "OPENSSL_sk_new_null")
        for der in intermediates:
            made.append(_x509(der))
            if _lib.OPENSSL_sk_push(untrusted, made[-1]) <= 0:
                raise _fail("OPENSSL_sk_push")
        made.append(_x509(leaf))
        ctx = _ptr(_lib.X509_STORE_CTX_new(), "X509_STORE_CTX_new")
        _ok(_lib.X509_STORE_CTX_init(ctx, store, made[-1], untrusted), "X509_STORE_CTX_init")
        _lib.X509_STORE_CTX_set_time(ctx, 0, int(now.timestamp()))
        _ok(_lib.X509_STORE_CTX_set_purpose(ctx, _X509_PURPOSE_SSL_CLIENT), "X509_STORE_CTX_set_purpose")
        if _lib.X509_verify_cert(ctx) == 1:
            return None
        code = _lib.X509_STORE_CTX_get_error(ctx)
        _lib.ERR_clear_error()
        reason = _lib.X509_verify_cert_error_string(code)
        return reason.decode("ascii", "replace") if reason else f"error {code}"
    finally:
        if ctx:
            _lib.X509_STORE_CTX_free(ctx)
        if untrusted:
            _lib.OPENSSL_sk_free(untrusted)  # the certificates are freed below
        if store:
            _lib.X509_STORE_free(store)  # drops the references X509_STORE_add_cert took
        for x in made:
            _lib.X509_free(x)
