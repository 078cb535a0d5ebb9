"""bpf/layout.py mirrors bpf/redirect.h: every #define and every struct, field by field."""

from __future__ import annotations

import ctypes
import re
import sys
from pathlib import Path

import pytest

from bpf import layout
from bpf.compiler import map_slots

HEADER = Path(layout.__file__).with_name(layout.HEADER)
_C_SIZES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8}


def header_defines() -> dict[str, int]:
    text = HEADER.read_text()
    found = dict(re.findall(r"^#define\s+([A-Z][A-Z0-9_]*)\s+(0x[0-9a-fA-F]+|\d+)\s*$", text, re.M))
    return {name: int(value, 0) for name, value in found.items()}


def header_structs() -> dict[str, list[tuple[str, int]]]:
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    structs = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\};", text, re.S):
        structs[name] = [(field, _C_SIZES[ctype]) for ctype, field in re.findall(r"(__u\d+)\s+(\w+)\s*;", body)]
    return structs


def test_every_define_of_the_header_is_mirrored_with_its_value() -> None:
    defines = header_defines()
    defines.pop("AMBIENT_REDIRECT_H", None)
    assert {"OUTBOUND_PORT", "HBONE_PORT", "AGENT_MARK", "ORIG_DST_MAX_ENTRIES"} <= set(defines)
    for name, value in defines.items():
        assert getattr(layout, name) == value, name


def test_the_header_defines_no_directive_the_parser_cannot_read() -> None:
    lines = [line for line in HEADER.read_text().splitlines() if line.startswith("#define")]
    assert len(lines) == len(header_defines()) + 1  # + the include guard


@pytest.mark.parametrize("struct", sorted(layout.HEADER_STRUCTS))
def test_structs_have_the_same_fields_sizes_and_offsets(struct: str) -> None:
    ours = layout.HEADER_STRUCTS[struct]
    theirs = header_structs()[struct]
    assert [(f[0], ctypes.sizeof(f[1])) for f in ours._fields_] == theirs
    offset = 0
    for name, size in theirs:  # all naturally aligned, no implicit padding
        assert getattr(ours, name).offset == offset
        offset += size
    assert ctypes.sizeof(ours) == offset


def test_every_struct_of_the_header_is_mirrored() -> None:
    assert set(header_structs()) == set(layout.HEADER_STRUCTS)


def test_agent_ports_are_the_header_ports() -> None:
    d = header_defines()
    assert set(layout.AGENT_PORTS) == {d[n] for n in d if n.endswith("_PORT")}


@pytest.mark.parametrize("pod_id", ["default/web-1", "a.b/c_d", "ns/pod~x", "ünï/cödé", "x"])
def test_pod_keys_round_trip_and_are_plain_names(pod_id: str) -> None:
    key = layout.pod_key(pod_id)
    assert layout.pod_id_of(key) == pod_id
    assert re.fullmatch(r"[A-Za-z0-9_%-]+", key)


def test_pod_key_of_a_namespaced_name() -> None:
    assert layout.pod_key("default/web-1") == "default%2Fweb-1"
    with pytest.raises(ValueError):
        layout.pod_key("")


def test_byte_order_helpers_give_network_order_in_memory() -> None:
    key = layout.ConnKey(app_ip4=layout.be32("10.1.2.3"), app_port=layout.be16(15001))
    raw = bytes(key)
    assert raw[0:4] == bytes([10, 1, 2, 3])
    assert raw[8:10] == (15001).to_bytes(2, "big")
    assert layout.ip4_of(key.app_ip4) == "10.1.2.3"
    assert layout.port_of(key.app_port) == 15001


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    regs = (src << 4 | dst) if sys.byteorder == "little" else (dst << 4 | src)
    return bytes([code, regs]) + off.to_bytes(2, sys.byteorder, signed=True) + imm.to_bytes(4, sys.byteorder,
                                                                                            signed=True)


def test_map_slots_finds_the_map_loads_and_skips_their_second_half() -> None:
    code = (_insn(0xB7, dst=1, imm=7)  # r1 = 7
            + _insn(0x18, dst=1, src=1, imm=42) + _insn(0)  # r1 = map fd 42
            + _insn(0x18, dst=2, imm=5) + _insn(0, imm=1)  # r2 = plain 64-bit constant
            + _insn(0x18, dst=1, src=1, imm=43) + _insn(0)
            + _insn(0x95))  # exit
    assert map_slots(code, {42: "pod_config", 43: "orig_by_conn"}) == ((1, "pod_config"), (5, "orig_by_conn"))


def test_map_slots_refuses_an_unknown_map() -> None:
    from bpf.errors import BpfError
    with pytest.raises(BpfError, match="map fd 9"):
        map_slots(_insn(0x18, src=1, imm=9) + _insn(0), {42: "pod_config"})
