"""Landlock (Linux >= 5.13), through three system calls and ctypes: the unprivileged tier's
filesystem allowlist, its TCP bind/connect denial (ABI >= 4) and its signal and abstract
UNIX-socket scoping (ABI >= 6).

Standard library only: the worker loads this file by path (it never imports rlm_async),
and the engine imports it to probe the kernel. A ruleset is applied with `restrict`, once
per process, after `PR_SET_NO_NEW_PRIVS`; it binds the process and every process it forks
and cannot be lifted. Rules name paths that are opened here (`O_PATH`), so call `restrict`
while the paths are still reachable (before giving up root, for a path under a 0700 home).

What a Landlock domain also does, at every ABI: a process inside it cannot ptrace, or read
`/proc/<pid>/mem`, `environ` or `fd` of, a process outside it.
"""

from __future__ import annotations

import ctypes
import os
import struct

__all__ = [
    "FS_ALL",
    "FS_READ",
    "FS_READ_WRITE_FILE",
    "abi",
    "handled_fs",
    "restrict",
]

_SYS_CREATE_RULESET = 444  # the same number on every architecture (the unified table)
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

# Filesystem rights (include/uapi/linux/landlock.h), by the ABI that introduced them.
_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_NET_TCP = 0b11  # BIND_TCP | CONNECT_TCP, ABI 4
_SCOPE_ALL = 0b11  # ABSTRACT_UNIX_SOCKET | SIGNAL, ABI 6

FS_READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
"""Read-only access to a directory tree: list, read and execute."""
FS_READ_WRITE_FILE = _FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
"""Read and write one existing file (a device such as /dev/null; `open(.., "w")` truncates)."""
FS_ALL = (1 << 16) - 1
"""Every right: the worker's private temp directory."""

_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
"""The rights a rule on a file (not a directory) may carry."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is absent or disabled."""
    version = _libc.syscall(
        ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION)
    )
    return max(int(version), 0)


def handled_fs(version: int) -> int:
    """Every filesystem right the kernel knows at `version`: all are denied unless a rule allows."""
    handled = _FS_ABI1
    if version >= 2:
        handled |= _FS_REFER
    if version >= 3:
        handled |= _FS_TRUNCATE
    if version >= 5:
        handled |= _FS_IOCTL_DEV
    return handled


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"landlock: {what}: {os.strerror(err)}")


def _add_path_rule(ruleset: int, path: str, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # an optional path (/lib32, /dev/urandom in odd containers): nothing to allow
    try:
        if not os.path.isdir(path):
            access &= _FILE_ONLY
        attr = struct.pack("=Qi", access, fd)  # struct landlock_path_beneath_attr is packed
        buf = ctypes.create_string_buffer(attr, len(attr))
        rc = _libc.syscall(
            ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), buf, 0
        )
        if rc != 0:
            raise _fail(f"add_rule {path!r}")
    finally:
        os.close(fd)


def restrict(rules: list[tuple[str, int]], *, deny_tcp: bool, scope: bool) -> int:
    """Confine this process (and its future children) to `rules` (path, rights): every
    filesystem right not granted there is denied, and also, where the kernel supports them,
    TCP bind/connect (`deny_tcp`) and signals/abstract sockets to processes outside the
    domain (`scope`). Returns the ABI used. Raises OSError where Landlock cannot apply."""
    version = abi()
    if version < 1:
        raise OSError("landlock: not supported by this kernel")
    fs = handled_fs(version)
    net = _NET_TCP if deny_tcp and version >= 4 else 0
    scoped = _SCOPE_ALL if scope and version >= 6 else 0
    attr = struct.pack("=QQQ", fs, net, scoped)
    size = 8 if version < 4 else (16 if version < 6 else 24)
    buf = ctypes.create_string_buffer(attr[:size], size)
    ruleset = _libc.syscall(
        ctypes.c_long(_SYS_CREATE_RULESET), buf, ctypes.c_size_t(size), ctypes.c_uint32(0)
    )
    if ruleset < 0:
        raise _fail("create_ruleset")
    try:
        for path, access in rules:
            _add_path_rule(ruleset, path, access & fs)
        if _libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise _fail("restrict_self")
    finally:
        os.close(ruleset)
    return version
