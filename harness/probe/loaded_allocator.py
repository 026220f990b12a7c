"""Which malloc is this very process using? Read from /proc/self/maps, never from LD_PRELOAD.

Standard library only: runs inside the probe process and inside containers.
"""

from __future__ import annotations

import ctypes
import os
import re
from typing import Any

# Library file name patterns of the allocators the harness knows.
ALLOCATOR_PATTERNS: dict[str, re.Pattern[str]] = {
    "jemalloc": re.compile(r"libjemalloc[^/]*\.so"),
    "tcmalloc": re.compile(r"libtcmalloc[^/]*\.so"),
    "mimalloc": re.compile(r"libmimalloc[^/]*\.so"),
    "glibc": re.compile(r"libc[.-][^/]*so"),
}


def _mappings() -> list[tuple[int, int, str]]:
    rows = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            rows.append((lo, hi, parts[5].strip()))
    return rows


def _symbol_address(name: str) -> int | None:
    try:
        return ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value
    except AttributeError:
        return None


class _PhdrInfo(ctypes.Structure):  # the head of struct dl_phdr_info
    _fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p)]


def _link_map_order() -> list[str]:
    """Loaded objects in symbol-search order (dl_iterate_phdr): preloads first, then DT_NEEDED."""
    names: list[str] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_PhdrInfo), ctypes.c_size_t,
                                     ctypes.c_void_p)

    def collect(info: Any, size: int, data: Any) -> int:
        name = info.contents.name
        if name:
            names.append(name.decode(errors="replace"))
        return 0

    ctypes.CDLL(None).dl_iterate_phdr(callback_type(collect), None)
    return names


def _bound_definition(symbol: str, maps: list[tuple[int, int, str]]) -> str | None:
    """The first object in search order that defines `symbol` itself: where calls really go.

    Needed when dlsym(RTLD_DEFAULT) answers with a non-PIE executable's canonical PLT entry
    (e.g. Debian's python3.11 3.11.2-6+deb12u8), which says nothing about the allocator.
    """
    for name in _link_map_order():
        try:
            address = ctypes.cast(getattr(ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY), symbol),
                                  ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
        path = _library_of(address, maps)
        if path and os.path.realpath(path) == os.path.realpath(name):
            return path
    return None


def _library_of(address: int | None, maps: list[tuple[int, int, str]]) -> str | None:
    if address is None:
        return None
    for lo, hi, path in maps:
        if lo <= address < hi:
            return path
    return None


def _classify(path: str | None) -> str | None:
    if path is None:
        return None
    base = os.path.basename(path)
    for name, pattern in ALLOCATOR_PATTERNS.items():
        if pattern.search(base):
            return name
    return "other"


def _version(name: str) -> str | None:
    """Ask the loaded library itself for its version."""
    lib = ctypes.CDLL(None)
    try:
        if name == "glibc":
            fn = lib.gnu_get_libc_version
            fn.restype = ctypes.c_char_p
            return fn().decode()
        if name == "jemalloc":
            value = ctypes.c_char_p()
            size = ctypes.c_size_t(ctypes.sizeof(value))
            for symbol in ("mallctl", "je_mallctl"):
                if hasattr(lib, symbol):
                    rc = getattr(lib, symbol)(b"version", ctypes.byref(value), ctypes.byref(size), None, 0)
                    if rc == 0 and value.value:
                        return value.value.decode()
            return None
        if name == "tcmalloc":
            fn = lib.tc_version
            fn.restype = ctypes.c_char_p
            return fn(None, None, None).decode()
        if name == "mimalloc":
            v = lib.mi_version()
            return f"{v // 100}.{(v // 10) % 10}.{v % 10}"
    except (AttributeError, OSError):
        return None
    return None


# The malloc family, all reported: a mixed result (malloc from one library, free from another) is a red flag.
# A non-PIE executable that takes the address of `malloc` gets a canonical PLT entry: dlsym then returns an
# address inside the executable, not the real definition.
MALLOC_FAMILY = ("malloc", "calloc", "realloc", "free", "posix_memalign", "aligned_alloc", "malloc_usable_size")


def loaded_allocator() -> dict[str, Any]:
    """The allocator that the malloc family resolves to in this process, with every allocator library mapped.

    `malloc_library` is the file that holds the code `malloc` jumps to: the definitive answer. Symbols that
    resolve into the executable itself (canonical PLT entries) are followed to the first loaded object that
    defines them, in symbol-search order.
    """
    maps = _mappings()
    exe = os.path.realpath("/proc/self/exe")
    symbols: dict[str, str | None] = {}
    for sym in MALLOC_FAMILY:
        path = _library_of(_symbol_address(sym), maps)
        if path and os.path.realpath(path) == exe:  # a canonical PLT entry: find the real definition
            path = _bound_definition(sym, maps) or path
        symbols[sym] = path
    malloc_path = symbols["malloc"]
    mapped = sorted({path for _, _, path in maps if _classify(path) not in (None, "other")})
    name = _classify(malloc_path)
    return {
        "name": name,
        "malloc_library": malloc_path,
        "malloc_library_realpath": os.path.realpath(malloc_path) if malloc_path else None,
        "version": _version(name) if name else None,
        "symbols": symbols,
        "mapped_allocator_libraries": mapped,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }
