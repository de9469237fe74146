"""Run a Python module as on a CPU without AMX: Linux refuses this process the AMX tiles.

Linux hands AMX tile state to a process only after it asks, with
arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA); XLA (through oneDNN / YNNPACK), PyTorch's oneDNN
and qjax's kernel library (`qjax.integer.kernels.amx_int8`) all ask before using AMX and fall
back to AVX-512 VNNI when refused. This script installs a seccomp filter that makes exactly
that request fail with EPERM (every other system call is untouched), then runs the module, so
one machine measures both an AMX and a VNNI-only CPU:

  python -m experiments.no_amx -m experiments.bench_gemm --quick
  python -m experiments.no_amx -m experiments.bench_inference

The filter is inherited by threads and child processes and cannot be removed; it is installed
with no_new_privs (no privileges needed). Linux x86-64 only.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import runpy
import sys
from collections.abc import Sequence

ARCH_REQ_XCOMP_PERM = 0x1023
SYS_ARCH_PRCTL = 158  # x86-64
_AUDIT_ARCH_X86_64 = 0xC000003E
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K


class _Filter(ctypes.Structure):
  _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
              ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
  _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


def deny_amx() -> None:
  """Installs the filter: from now on arch_prctl(ARCH_REQ_XCOMP_PERM, ...) fails with EPERM
  in this process and its children.

  The program (classic BPF over struct seccomp_data: nr at offset 0, arch at 4, args[0]'s low
  32 bits at 16):  arch != x86-64 -> allow;  nr != arch_prctl -> allow;
  args[0] != ARCH_REQ_XCOMP_PERM -> allow;  else return EPERM.

  Raises:
    OSError: not Linux x86-64, or the kernel refused the filter.

  Example:
    >>> import subprocess, sys
    >>> code = "from experiments import no_amx; no_amx.deny_amx(); print(no_amx.amx_request())"
    >>> subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
    ...                check=True).stdout.strip() == str(errno.EPERM)
    True
  """
  if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
    raise OSError(f"no_amx: needs Linux on x86-64; this is {sys.platform} "
                  f"{platform.machine()}.")
  code = [
      _Filter(_LD_W_ABS, 0, 0, 4),
      _Filter(_JEQ_K, 0, 5, _AUDIT_ARCH_X86_64),
      _Filter(_LD_W_ABS, 0, 0, 0),
      _Filter(_JEQ_K, 0, 3, SYS_ARCH_PRCTL),
      _Filter(_LD_W_ABS, 0, 0, 16),
      _Filter(_JEQ_K, 0, 1, ARCH_REQ_XCOMP_PERM),
      _Filter(_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),
      _Filter(_RET_K, 0, 0, _RET_ALLOW),
  ]
  filters = (_Filter * len(code))(*code)
  program = _Program(len(code), filters)
  libc = ctypes.CDLL(None, use_errno=True)
  libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                         ctypes.c_ulong]
  if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "no_amx: prctl(PR_SET_NO_NEW_PRIVS) failed")
  if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(program), 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "no_amx: prctl(PR_SET_SECCOMP) refused the filter")


def amx_request() -> int:
  """0 if arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) succeeds, else its errno (EPERM under the
  filter; EOPNOTSUPP or EINVAL on a CPU or kernel without AMX)."""
  libc = ctypes.CDLL(None, use_errno=True)
  xtiledata = 18
  result = libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, xtiledata)
  return 0 if result == 0 else ctypes.get_errno()


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m experiments.no_amx -m MODULE [ARGS...]`: deny AMX, then run MODULE as
  __main__ with ARGS."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if len(argv) < 2 or argv[0] != "-m":
    raise SystemExit("usage: python -m experiments.no_amx -m MODULE [ARGS...]\n"
                     + __doc__.split("\n\n")[0])
  module, rest = argv[1], argv[2:]
  deny_amx()
  print(f"no_amx: AMX tiles refused to this process (request -> errno {amx_request()})",
        flush=True)
  sys.argv = [module, *rest]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
