"""The workers' seccomp filters: system calls no REPL code needs, each of which widens the
kernel surface a sandboxed process can reach, fail with EPERM.

Denied in every tier that has a filter: new namespaces (`unshare`, `setns`, namespace
flags on `clone`; `clone3` answers ENOSYS so libc falls back to `clone`, whose flags a
filter can read), mounting and `pivot_root`, `ptrace`, `process_vm_readv`/`writev`,
`kcmp`, `pidfd_getfd`, the kernel keyring, `bpf`, `perf_event_open`, `userfaultfd`,
`io_uring`, handle-based opens, module and kexec loading, and a few host-administration
calls. System calls of another ABI (i386 `int 0x80`, x32, arm32 compat) are denied whole,
so they cannot bypass the list.

`network=False` (the unprivileged tier, which has no network namespace) also leaves
`socket` and `socketpair` only for AF_UNIX stream sockets (the control channel's kind)
and denies `connect` outright, so no TCP, UDP, raw, netlink or packet socket exists and no
UNIX socket on the host (an ssh-agent, a container runtime's socket) can be reached.

Built for x86-64 and aarch64 (little-endian); elsewhere `build` returns None: bubblewrap
then runs without a filter, and the unprivileged tier is unavailable.

Programs are classic BPF: `struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}`, native
byte order.
"""

from __future__ import annotations

import errno
import os
import platform
import struct
import sys
from dataclasses import dataclass

__all__ = ["arch", "build", "memfd"]

_CLONE_NAMESPACE_FLAGS = 0x7E020000
"""CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
| CLONE_NEWNET"""
_AF_UNIX = 1
_SOCK_STREAM = 1
_SOCK_TYPE_MASK = 0xF  # the type without SOCK_NONBLOCK / SOCK_CLOEXEC

_LD_ABS_W = 0x20
_AND_K = 0x54
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

_OFFSET_NR = 0
_OFFSET_ARCH = 4
_OFFSET_ARG0_LOW = 16  # little-endian: the low 32 bits of args[0]
_OFFSET_ARG1_LOW = 24

_COMMON_DENIED = (
    "ptrace syslog personality pivot_root acct mount umount2 swapon swapoff reboot "
    "init_module delete_module quotactl kexec_load add_key request_key keyctl unshare "
    "perf_event_open name_to_handle_at open_by_handle_at setns finit_module kexec_file_load "
    "bpf userfaultfd process_vm_readv process_vm_writev kcmp pidfd_getfd io_uring_setup "
    "io_uring_enter io_uring_register open_tree move_mount fsopen fsconfig fsmount fspick "
    "mount_setattr"
).split()


@dataclass(frozen=True, slots=True)
class _Arch:
    audit: int
    numbers: dict[str, int]
    reject_above: int | None
    """Numbers from here up belong to another ABI sharing the entry (x32)."""


# From <asm/unistd_64.h> (x86-64) and <asm-generic/unistd.h> (aarch64).
_X86_64 = _Arch(
    audit=0xC000003E,
    reject_above=0x40000000,
    numbers={
        "ptrace": 101, "syslog": 103, "personality": 135, "pivot_root": 155, "acct": 163,
        "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
        "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179,
        "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
        "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
        "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
        "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "pidfd_getfd": 438, "mount_setattr": 442,
        "clone": 56, "clone3": 435, "socket": 41, "socketpair": 53, "connect": 42,
    },
)  # fmt: skip
_AARCH64 = _Arch(
    audit=0xC00000B7,
    reject_above=None,
    numbers={
        "ptrace": 117, "syslog": 116, "personality": 92, "pivot_root": 41, "acct": 89,
        "mount": 40, "umount2": 39, "swapon": 224, "swapoff": 225, "reboot": 142,
        "init_module": 105, "delete_module": 106, "quotactl": 60, "kexec_load": 104,
        "add_key": 217, "request_key": 218, "keyctl": 219, "unshare": 97,
        "perf_event_open": 241, "name_to_handle_at": 264, "open_by_handle_at": 265,
        "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
        "finit_module": 273, "kexec_file_load": 294, "bpf": 280, "userfaultfd": 282,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "pidfd_getfd": 438, "mount_setattr": 442,
        "clone": 220, "clone3": 435, "socket": 198, "socketpair": 199, "connect": 203,
    },
)  # fmt: skip
_ARCHES = {"x86_64": _X86_64, "amd64": _X86_64, "aarch64": _AARCH64, "arm64": _AARCH64}


def arch() -> str | None:
    """The filter's architecture here ("x86_64" or "aarch64"), or None where none is built."""
    if struct.calcsize("P") != 8 or sys.byteorder != "little":
        return None
    a = _ARCHES.get(platform.machine().lower())
    return None if a is None else ("x86_64" if a is _X86_64 else "aarch64")


_Insn = tuple[int, str | int, str | int, int]


def _program(a: _Arch, *, network: bool) -> list[tuple[int, int, int, int]]:
    n = a.numbers
    code: list[_Insn] = [
        (_LD_ABS_W, 0, 0, _OFFSET_ARCH),
        (_JEQ_K, 0, "deny", a.audit),
        (_LD_ABS_W, 0, 0, _OFFSET_NR),
    ]
    if a.reject_above is not None:
        code.append((_JGE_K, "deny", 0, a.reject_above))
    code += [(_JEQ_K, "clone", 0, n["clone"]), (_JEQ_K, "enosys", 0, n["clone3"])]
    if not network:
        code += [
            (_JEQ_K, "socket", 0, n["socket"]),
            (_JEQ_K, "socket", 0, n["socketpair"]),
            (_JEQ_K, "deny", 0, n["connect"]),
        ]
    denied = sorted({n[name] for name in _COMMON_DENIED} | {n[x] for x in ("iopl", "ioperm") if x in n})
    code += [(_JEQ_K, "deny", 0, nr) for nr in denied]
    labels: dict[str, int] = {}
    code.append((_RET_K, 0, 0, _RET_ALLOW))
    labels["socket"] = len(code)  # AF_UNIX + SOCK_STREAM only
    code += [
        (_LD_ABS_W, 0, 0, _OFFSET_ARG0_LOW),
        (_JEQ_K, 0, "deny", _AF_UNIX),
        (_LD_ABS_W, 0, 0, _OFFSET_ARG1_LOW),
        (_AND_K, 0, 0, _SOCK_TYPE_MASK),
        (_JEQ_K, 0, "deny", _SOCK_STREAM),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    labels["clone"] = len(code)
    code.append((_LD_ABS_W, 0, 0, _OFFSET_ARG0_LOW))
    code.append((_JSET_K, "deny", 0, _CLONE_NAMESPACE_FLAGS))
    code.append((_RET_K, 0, 0, _RET_ALLOW))
    labels["deny"] = len(code)
    code.append((_RET_K, 0, 0, _RET_ERRNO | errno.EPERM))
    labels["enosys"] = len(code)
    code.append((_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS))

    def offset(index: int, target: str | int) -> int:
        if isinstance(target, int):
            return target
        jump = labels[target] - index - 1
        assert 0 <= jump < 256  # classic BPF jumps only forward, by a u8
        return jump

    return [(op, offset(i, jt), offset(i, jf), k) for i, (op, jt, jf, k) in enumerate(code)]


def build(*, network: bool = True) -> bytes | None:
    """The filter for this machine, or None where none is defined. `network=False` adds
    the socket rules of the unprivileged tier."""
    name = arch()
    if name is None:
        return None
    a = _X86_64 if name == "x86_64" else _AARCH64
    return b"".join(struct.pack("=HBBI", *insn) for insn in _program(a, network=network))


def memfd(program: bytes) -> int:
    """An fd holding `program`, positioned at its start, for bwrap to read."""
    fd = os.memfd_create("rlm-seccomp", os.MFD_CLOEXEC)
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
