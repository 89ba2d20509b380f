"""Futex wait/wake on a 32-bit word in a shared mapping, for cross-process wake-ups.

A waiter sleeps in the kernel only while the word still holds the value it
last read, so a waker that changes the word and then calls ``wake`` can never
be missed. The words live in a MAP_SHARED mapping of a /dev/shm file, so the
futexes are shared ones (no FUTEX_PRIVATE_FLAG). ctypes releases the GIL for
the call, so a sleeping thread leaves the process's other threads running.

Where the futex syscall number is unknown (not x86_64 or aarch64), ``wait``
degrades to a short sleep: callers re-check their condition in a loop anyway.
"""

from __future__ import annotations

import ctypes
import os
import platform
import time

_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine().lower())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_WAKE_ALL = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

available = _SYS_FUTEX is not None and os.name == "posix"


def futex_wait(addr: int, expected: int, timeout_s: float) -> None:
    """Sleep while the u32 at ``addr`` equals ``expected``, at most ``timeout_s``.

    Returns on a wake, a timeout, a signal, or at once if the word already differs;
    the caller re-checks what it waits for.
    """
    if not available:
        time.sleep(min(timeout_s, 50e-6))
        return
    ts = _Timespec(int(timeout_s), int((timeout_s % 1.0) * 1e9))
    _syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_long(_FUTEX_WAIT),
             ctypes.c_long(expected & 0xFFFFFFFF), ctypes.byref(ts), ctypes.c_void_p(0),
             ctypes.c_long(0))


def futex_wake(addr: int) -> None:
    """Wake every thread (of any process) sleeping on the u32 at ``addr``."""
    if not available:
        return
    _syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_long(_FUTEX_WAKE),
             ctypes.c_long(_WAKE_ALL), ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_long(0))
