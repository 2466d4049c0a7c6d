"""No network for subprocesses: a ``sitecustomize`` that refuses and records connections.

:func:`guard_env` returns an environment whose Python processes (and the Jupyter kernels they
start, which inherit it) import a ``sitecustomize`` module that replaces
``socket.socket.connect`` / ``connect_ex`` / ``sendto`` and ``socket.getaddrinfo``: any attempt
to reach a non-local address raises ``OSError(ENETUNREACH)`` and is appended to a log file, so a
test can assert that nothing even tried (code that catches the error and falls back is caught
too). Unix sockets are always allowed; loopback (127.0.0.0/8, ::1, localhost) only when asked:
papermill talks to its kernels over ZMQ on localhost (ZMQ's own sockets live in C and are not
seen here; the network namespace of :func:`netns_prefix` covers them).

:func:`netns_prefix` gives a command prefix that runs a program in a new network namespace
(``unshare -rn``) with no interface but loopback, where the kernel itself refuses every other
connection; ``None`` where unprivileged namespaces are not available.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

SITECUSTOMIZE = r'''
"""Installed by tests/netguard.py: refuse and record network connections (offline tests)."""
import errno
import ipaddress
import os
import socket

_LOG = os.environ.get("CNP_NETGUARD_LOG", "")
_LOOPBACK_OK = os.environ.get("CNP_NETGUARD_LOOPBACK") == "1"


def _is_loopback(host):
    if host in (None, "", "localhost", "ip6-localhost", b"localhost"):
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(kind, target):
    if _LOG:
        with open(_LOG, "a") as fh:
            fh.write(f"{os.getpid()} {kind} {target!r}\n")
    raise OSError(errno.ENETUNREACH, f"network access blocked by the offline test: {kind} {target!r}")


def _allowed(sock, address):
    if sock.family == getattr(socket, "AF_UNIX", object()):
        return True
    host = address[0] if isinstance(address, tuple) else address
    return _LOOPBACK_OK and _is_loopback(host)


def _wrap(name):
    orig = getattr(socket.socket, name)

    def guarded(self, *args):
        address = args[-1]
        if not _allowed(self, address):
            _refuse(name, address)
        return orig(self, *args)

    setattr(socket.socket, name, guarded)


for _name in ("connect", "connect_ex", "sendto"):
    _wrap(_name)

_orig_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host, *args, **kwargs):
    if host is not None and not (_LOOPBACK_OK and _is_loopback(host)):
        _refuse("getaddrinfo", host)
    return _orig_getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo
'''


def guard_env(env: dict, folder: Path, allow_loopback: bool = False) -> tuple[dict, Path]:
    """``env`` plus the guard (its ``sitecustomize`` written to ``folder``); returns the
    environment and the log file that records refused attempts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = folder / "refused.log"
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    out["CNP_NETGUARD_LOG"] = str(log)
    out["CNP_NETGUARD_LOOPBACK"] = "1" if allow_loopback else "0"
    return out, log


def refused(log: Path) -> list[str]:
    """The attempts recorded in ``log`` (empty when nothing tried to use the network)."""
    return log.read_text().splitlines() if log.exists() else []


@functools.cache
def netns_prefix(loopback: bool = False) -> tuple[str, ...] | None:
    """A command prefix running the program in a network namespace without interfaces (only
    ``lo``, brought up when ``loopback``); ``None`` when ``unshare -rn`` is not permitted."""
    unshare = shutil.which("unshare")
    if unshare is None or (loopback and shutil.which("ip") is None):
        return None
    setup = "ip link set lo up && " if loopback else ""
    prefix = (unshare, "-rn", "sh", "-c", setup + 'exec "$0" "$@"')
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else None


def refuse_in_process(monkeypatch) -> None:
    """Make any network connection from this process fail the test (pytest's ``monkeypatch``)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
