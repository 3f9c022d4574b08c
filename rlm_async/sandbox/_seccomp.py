"""A small seccomp filter for bubblewrap (`--seccomp FD`): system calls no REPL code needs,
each of which widens the kernel surface a sandboxed process can reach, fail with EPERM.

Denied: new namespaces (`unshare`, `setns`, namespace flags on `clone`; `clone3` answers
ENOSYS so libc falls back to `clone`, whose flags a filter can read), mounting and
`pivot_root`, `ptrace`, the kernel keyring, `bpf`, `perf_event_open`, `userfaultfd`,
`io_uring`, handle-based opens, module and kexec loading, and a few host-administration
calls. System calls of another ABI (i386 `int 0x80`, x32) are denied whole, so they
cannot bypass the list. The filter is built for x86-64 only; elsewhere there is none
(`build()` returns None) and the rest of the sandbox stands alone.

Programs are classic BPF: `struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}`, native
byte order, read by bwrap from the fd until EOF.
"""

from __future__ import annotations

import errno
import os
import platform
import struct

__all__ = ["build", "memfd"]

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_CLONE_NAMESPACE_FLAGS = 0x7E020000
"""CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
| CLONE_NEWNET"""

_LD_ABS_W = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

_OFFSET_NR = 0
_OFFSET_ARCH = 4
_OFFSET_ARG0_LOW = 16  # little-endian: the low 32 bits of args[0]

_X86_64_CLONE = 56
_X86_64_CLONE3 = 435
_X86_64_DENIED = {
    "ptrace": 101,
    "syslog": 103,
    "personality": 135,
    "pivot_root": 155,
    "acct": 163,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
}


def _program_x86_64() -> list[tuple[int, int, int, int]]:
    # Built with symbolic jump targets, resolved to relative offsets below.
    code: list[tuple[int, str | int, str | int, int]] = [
        (_LD_ABS_W, 0, 0, _OFFSET_ARCH),
        (_JEQ_K, 0, "deny", _AUDIT_ARCH_X86_64),
        (_LD_ABS_W, 0, 0, _OFFSET_NR),
        (_JGE_K, "deny", 0, _X32_SYSCALL_BIT),
        (_JEQ_K, "clone", 0, _X86_64_CLONE),
        (_JEQ_K, "enosys", 0, _X86_64_CLONE3),
    ]
    for nr in sorted(_X86_64_DENIED.values()):
        code.append((_JEQ_K, "deny", 0, nr))
    labels: dict[str, int] = {}
    code.append((_RET_K, 0, 0, _RET_ALLOW))
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


def build() -> bytes | None:
    """The filter for this machine, or None where none is defined."""
    if platform.machine() not in ("x86_64", "AMD64") or struct.calcsize("P") != 8:
        return None
    return b"".join(struct.pack("=HBBI", *insn) for insn in _program_x86_64())


def memfd(program: bytes) -> int:
    """An fd holding `program`, positioned at its start, for bwrap to read."""
    fd = os.memfd_create("rlm-seccomp", os.MFD_CLOEXEC)
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
