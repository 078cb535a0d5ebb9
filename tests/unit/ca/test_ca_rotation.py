"""`ca.rotation`: the root rotation's phases on a clock, its files, and recovery after a crash."""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from ca.authority import (
    CA_CERT,
    CA_KEY,
    ROOT_CERT,
    CertificateAuthority,
    generate_intermediate,
    generate_root,
    write_ca_dir,
)
from ca.rotation import IDLE, NEXT_DIR, OVERLAP, PROPAGATING, ROTATION_FILE, RootRotator, RotationError
from ca.serving import RotatingServingCertificate

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> datetime.datetime:
        self.now += datetime.timedelta(seconds=seconds)
        return self.now


def bundle(ca_dir: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((ca_dir / ROOT_CERT).read_bytes())


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    path = tmp_path / "ca"
    CertificateAuthority.load_or_create(path)
    return path


def test_the_phases_follow_the_clock(ca_dir: Path) -> None:
    authority = CertificateAuthority.load(ca_dir)
    old = authority.root
    clock = Clock()
    rotator = RootRotator(authority, ca_dir, clock)
    serving = RotatingServingCertificate(authority, ["127.0.0.1"])
    status = rotator.start(datetime.timedelta(seconds=10), datetime.timedelta(seconds=20))
    assert status["phase"] == PROPAGATING
    new = bundle(ca_dir)[1]
    assert bundle(ca_dir) == [old, new] and authority.root == old  # trusted, not signing yet
    assert authority.bundle == (old, new)
    with pytest.raises(RotationError, match="already under way"):
        rotator.start()
    assert rotator.advance(clock.advance(9)) is False
    assert rotator.advance(clock.advance(1)) is True
    assert rotator.status()["phase"] == OVERLAP
    assert authority.root == new and bundle(ca_dir) == [new, old]  # signs; both trusted
    assert authority.generation == 1
    assert not (ca_dir / NEXT_DIR).exists()
    assert serving.refresh() is True  # the serving certificate follows the new root at once
    assert x509.load_pem_x509_certificate(serving.current.chain_pem).issuer == new.subject
    assert rotator.advance(clock.advance(19)) is False
    assert rotator.advance(clock.advance(1)) is True
    assert rotator.status()["phase"] == IDLE
    assert bundle(ca_dir) == [new] and authority.bundle == (new,)
    assert not (ca_dir / ROTATION_FILE).exists()
    # What a restart loads is what runs.
    again = CertificateAuthority.load(ca_dir)
    assert again.root == new and again.bundle == (new,)


def test_a_zero_propagation_signs_at_once(ca_dir: Path) -> None:
    authority = CertificateAuthority.load(ca_dir)
    old = authority.root
    rotator = RootRotator(authority, ca_dir, Clock())
    assert rotator.start(datetime.timedelta(0), datetime.timedelta(seconds=60))["phase"] == OVERLAP
    assert authority.root != old and authority.bundle == (authority.root, old)


def test_a_restart_mid_rotation_carries_on(ca_dir: Path) -> None:
    clock = Clock()
    authority = CertificateAuthority.load(ca_dir)
    old = authority.root
    RootRotator(authority, ca_dir, clock).start(datetime.timedelta(seconds=5), datetime.timedelta(seconds=5))
    # A crash between the intent (overlap) and the switch of the CA files: recover() finishes it.
    record = json.loads((ca_dir / ROTATION_FILE).read_text())
    (ca_dir / ROTATION_FILE).write_text(json.dumps({**record, "phase": OVERLAP}))
    shutil.copy(ca_dir / NEXT_DIR / CA_KEY, ca_dir / CA_KEY)  # half-written: the new key with the old cert
    RootRotator.recover(ca_dir)
    restarted = CertificateAuthority.load(ca_dir)
    rotator = RootRotator(restarted, ca_dir, clock)
    assert rotator.status()["phase"] == OVERLAP
    assert restarted.root != old and restarted.bundle == (restarted.root, old)
    rotator.advance(clock.advance(11))
    assert restarted.bundle == (restarted.root,)


def test_a_plugged_in_intermediate_is_not_rotated(tmp_path: Path) -> None:
    root_key, root = generate_root()
    key, intermediate = generate_intermediate(root_key, root)
    write_ca_dir(tmp_path, key, [intermediate, root])
    authority = CertificateAuthority.load(tmp_path)
    with pytest.raises(RotationError, match="intermediate"):
        RootRotator(authority, tmp_path).start()
    assert (tmp_path / CA_CERT).exists() and not (tmp_path / ROTATION_FILE).exists()
