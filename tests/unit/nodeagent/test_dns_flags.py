"""The node agent's DNS flags: on by default, `--dns-capture=false` turns the capture off (the redirectors
then make no DNS rule or program setting), and bad values stop the agent with what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.main import parse_args
from nodeagent.redirect.iptables import IptablesRedirector
from nodeagent.redirect.rules import install_script


def args(tmp_path: Path, *extra: str) -> list[str]:
    cert = tmp_path / "root.pem"
    cert.write_text("x")
    return ["--node", "n1", "--pod-netns", "/run/netns/{name}", "--control-plane", "127.0.0.1:15012",
            "--root-cert", str(cert), "--token-file", str(cert), *extra]


def test_dns_capture_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    on = parse_args(args(tmp_path, "--dns-upstream", "10.96.0.10,10.0.0.2:5353", "--dns-timeout", "0.5"))
    assert (on.dns_capture, on.dns_upstream, on.dns_timeout) == (True, (("10.96.0.10", 53), ("10.0.0.2", 5353)), 0.5)
    off = parse_args(args(tmp_path, "--dns-capture=false"))
    assert off.dns_capture is False
    assert IptablesRedirector(dns_capture=off.dns_capture).dns_capture is False
    assert "--dport 53" not in install_script(dns=False) and "--dport 53" in install_script(dns=True)


@pytest.mark.parametrize(("extra", "message"), [
    (("--dns-capture", "maybe"), "'maybe' is not true or false"),
    (("--dns-upstream", "resolver.example"), "--dns-upstream: 'resolver.example': the upstream must be an IPv4"),
    (("--dns-upstream", "10.0.0.1:70000"), "port 70000 is not between 1 and 65535"),
    (("--dns-timeout", "0"), "--dns-timeout must be positive"),
])
def test_bad_dns_flags_say_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        extra: tuple[str, ...], message: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(args(tmp_path, *extra))
    assert message in capsys.readouterr().err
