"""Compiles the redirect programs with bcc, in a process of its own: the only bcc importer.

    python -m bpf.compiler [--source-dir DIR]

bcc compiles C with LLVM and clang, which it loads into the process that compiles (libLLVM and
libclang-cpp alone take ~80 MiB resident, the compiler's heap ~50 MiB more, and bcc keeps a compiled
module for the life of its `BPF` object).  So the loader runs this module as a short-lived child: it
compiles `connect.bpf.c` and `sklookup.bpf.c`, loads every program once as a check (which also gives
the kernel's tag of the code), and prints one JSON line on its standard output: per program its
instructions (hex), where they load a map by fd and which map, its tag, licence and kernel version;
per map its shape.  The process that asked then loads its own copies of the programs with libbpf
(`objects.prog_load`) and never holds LLVM.  On failure it prints `{"error": ..., "unavailable": ...}`
and exits 1; the compiler's own output goes to standard error, as it did in-process.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bpf import layout, objects
from bpf.errors import BpfError, EbpfUnavailable

_PSEUDO_MAP_FD = 1  # src_reg of a 64-bit immediate load that names a map by fd
_LD_IMM64 = 0x18
_LOAD_HINTS = {layout.PROG_TYPE_SK_LOOKUP: "sk_lookup programs need Linux 5.9 or later",
               layout.PROG_TYPE_CGROUP_SOCK_ADDR: "cgroup connect programs need Linux 4.17 or later",
               layout.PROG_TYPE_SOCK_OPS: "sock_ops programs need Linux 4.13 or later"}


def _bcc() -> tuple[Any, Any]:
    try:
        from bcc import BPF
        from bcc.libbcc import lib
    except ImportError as exc:
        raise EbpfUnavailable(f"bcc cannot be imported ({exc}); install the Debian package python3-bpfcc "
                              "and let the virtual environment see /usr/lib/python3/dist-packages") from exc
    return BPF, lib


def compile_programs(source_dir: Path) -> dict[str, Any]:
    """The programs of `source_dir`, compiled and loaded once as a check: what the loader needs to load
    copies of them (see the module's docstring), as JSON-ready values."""
    bpf_class, lib = _bcc()
    maps: dict[str, objects.MapInfo] = {}
    programs: dict[str, dict[str, Any]] = {}
    for source in layout.SOURCES:
        try:
            module = bpf_class(src_file=str(source_dir / source).encode(), cflags=[f"-I{source_dir}"])
        except Exception as exc:  # bcc raises bare Exception; its compiler output went to stderr
            raise EbpfUnavailable(f"bcc could not compile bpf/{source} ({exc}); compiling needs root and the "
                                  f"kernel headers under /lib/modules/{os.uname().release}/build") from exc
        by_fd: dict[int, str] = {}
        for name in layout.MAPS:
            fd = lib.bpf_table_fd(module.module, name.encode())
            if fd < 0:
                continue
            by_fd[fd] = name
            info = objects.map_info(fd)
            if shape(maps.setdefault(name, info)) != shape(info):
                raise BpfError(f"map {name} is declared differently in the programs' sources")
        for spec in (p for p in layout.PROGRAMS if p.source == source):
            start, size = lib.bpf_function_start(module.module, spec.name.encode()), \
                lib.bpf_function_size(module.module, spec.name.encode())
            insns = ctypes.string_at(start, size)
            try:
                fd = module.load_func(spec.name.encode(), spec.prog_type, attach_type=spec.attach_type).fd
            except Exception as exc:
                raise EbpfUnavailable(f"the kernel refused the program {spec.name} ({exc}); "
                                      f"{_LOAD_HINTS[spec.prog_type]}, and loading needs root") from exc
            programs[spec.name] = {
                "insns": insns.hex(), "map_slots": map_slots(insns, by_fd), "tag": objects.prog_info(fd).tag,
                "license": (lib.bpf_module_license(module.module) or b"").decode(),
                "kern_version": int(lib.bpf_module_kern_version(module.module)),
            }
    return {"programs": programs, "maps": {name: asdict(info) for name, info in maps.items()}}


def shape(info: objects.MapInfo) -> tuple[int, ...]:
    return (info.type, info.key_size, info.value_size, info.max_entries, info.flags)


def map_slots(insns: bytes, by_fd: dict[int, str]) -> tuple[tuple[int, str], ...]:
    """Where the compiled code loads a map by fd, and which map it is."""
    slots: list[tuple[int, str]] = []
    i, count = 0, len(insns) // 8
    while i < count:
        code, regs = insns[8 * i], insns[8 * i + 1]
        src = regs >> 4 if sys.byteorder == "little" else regs & 0xF
        if code == _LD_IMM64:
            if src == _PSEUDO_MAP_FD:
                fd = int.from_bytes(insns[8 * i + 4: 8 * i + 8], sys.byteorder, signed=True)
                if fd not in by_fd:
                    raise BpfError(f"compiled code refers to map fd {fd}, which is none of the known maps")
                slots.append((i, by_fd[fd]))
            elif src != 0:
                raise BpfError(f"compiled code uses a 64-bit load of kind {src}, which the loader cannot relocate")
            i += 2
        else:
            i += 1
    return tuple(slots)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bpf.compiler", description="Compile the redirect programs (prints JSON).")
    p.add_argument("--source-dir", type=Path, default=Path(__file__).resolve().parent,
                   help="where the *.bpf.c files and their header are (default: this package)")
    args = p.parse_args(argv)
    try:
        out: dict[str, Any] = compile_programs(args.source_dir)
    except EbpfUnavailable as exc:
        out = {"error": exc.missing, "unavailable": True}
    except BpfError as exc:
        out = {"error": str(exc), "unavailable": False}
    print(json.dumps(out), flush=True)
    return 1 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main())
