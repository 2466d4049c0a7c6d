"""Files: atomic writes, content hashes, safe loading and safe paths.

Every result the companion writes goes through :func:`atomic_write_bytes` (temp file in the
same directory, ``fsync``, then ``os.replace``), so a killed process never leaves a truncated
file behind that a later stage would trust.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # torch is imported where it is used: `import cnp.io` stays torch-free
    import torch



class CNPError(ValueError):
    """A problem with the user's input or environment, with a message that says how to fix it."""


def check_dir_writable(directory: str | os.PathLike) -> None:
    """Create ``directory`` if needed; CNPError (one line, with the fix) when it cannot be written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CNPError(
            f"cannot create the directory {directory}: {exc.strerror}. "
            "Choose a writable location (e.g. the run_dir parameter)."
        ) from exc
    if not os.access(directory, os.W_OK):
        raise CNPError(
            f"the directory {directory} is not writable. "
            "Fix its permissions or choose another location (e.g. the run_dir parameter)."
        )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename.

    Raises
    ------
    CNPError
        When the directory is not writable or the disk is full; the previous file (if any) is
        left untouched.
    """
    path = Path(path)
    check_dir_writable(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CNPError(
                f"the disk is full while writing {path}; nothing was overwritten. "
                "Free some space and run again (finished results are kept)."
            ) from exc
        raise CNPError(f"could not write {path}: {exc}") from exc
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Atomically write ``obj`` as JSON (sorted keys, so equal objects give equal bytes)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically ``torch.save`` an object made of tensors, numbers, strings, lists and dicts."""
    import torch  # imported here: the sweep's worker processes import this module without torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs on load).

    Raises
    ------
    CNPError
        When the file is missing, truncated or not a weights-only checkpoint.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CNPError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CNPError(
            f"could not load {path} as a weights-only checkpoint ({type(exc).__name__}: {_reason(exc)}). "
            "The file is corrupt or truncated, or was not written by cnp: delete it and rebuild."
        ) from exc


def _reason(exc: BaseException) -> str:
    """One line of an exception's message (torch's weights-only refusal spans many lines)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    hit = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    line = hit.group(1) if hit else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= 200 else line[:197] + "..."


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def recipe_hash(recipe: Mapping[str, Any], length: int = 16) -> str:
    """A short, stable hash of a JSON-serialisable recipe (dict keys sorted)."""
    blob = json.dumps(recipe, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def tensor_hash(*tensors: torch.Tensor, length: int = 16) -> str:
    """A short content hash of tensors (shape, dtype and bytes)."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        # the values in logical order, 1-D (a scalar, e.g. BatchNorm's counter, and a channels_last
        # (n, c, 1, 1) weight, which counts as contiguous with a last stride of c, alike)
        t = t.reshape(-1)
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself, no copy
    return h.hexdigest()[:length]


# ============================================================================ the cache
T = TypeVar("T")


def cache_dir() -> Path:
    """Where generated data, decoded images and pretrained backbones are cached: ``$CNP_CACHE``,
    else ``~/.cache/cnp``."""
    return Path(os.environ.get("CNP_CACHE", Path.home() / ".cache" / "cnp")).expanduser()


def load_current(path: str | os.PathLike, *, what: str, check: Callable[[Any], str | None] = lambda _obj: None,
                 load: Callable[[Path], Any] = safe_torch_load, then: str = "rebuilding",
                 report: Callable[[str], Any] | None = print, name: str | None = None) -> Any | None:
    """The object stored at ``path`` when it can be trusted, else ``None``.

    Every cache and checkpoint of the companion is read through this function: a file that
    does not exist gives ``None`` silently; one that cannot be read (``load`` raises
    :class:`CNPError`) or that ``check`` refuses (it returns the reason, e.g. "was made from
    another recipe") gives ``None`` and one line through ``report``:
    ``[cnp] <what> <name> <reason>: <then>``.

    Parameters
    ----------
    path : path
        The file (its name usually carries the hash of the recipe that made it).
    what : str
        What the file is, for the message ("cached pair data", "pruning checkpoint").
    check : callable
        ``check(obj)`` -> ``None`` when ``obj`` is what the caller needs, else the reason.
    load : callable
        Reads the file (default :func:`safe_torch_load`); raises :class:`CNPError` when it cannot.
    then : str
        What happens instead, for the message ("rebuilding", "starting over").
    report : callable or None
        Where the line goes (``print``; ``None``: nowhere).
    name : str, optional
        How the message names the file before ``check``'s reason (default: the file's name;
        ``""`` when the reason names what failed itself). An unreadable file is always named.
    """
    path = Path(path)
    if not path.exists():
        return None
    name = path.name if name is None else name
    try:
        obj = load(path)
        why = check(obj)
        if why is not None and name:
            why = f"{name} {why}"
    except CNPError as exc:
        why = (f"{path.name} is unreadable and is ignored (it is corrupt, truncated or not cnp's; "
               f"could not be read: {_reason(exc)})")
    if why is None:
        return obj
    if report is not None:
        report(f"[cnp] {what} {why}: {then}")
    return None


def load_or_build(path: str | os.PathLike, build: Callable[[], T], *, what: str,
                  save: Callable[[Path, T], Any], check: Callable[[T], str | None] = lambda _obj: None,
                  load: Callable[[Path], T] = safe_torch_load, use_cache: bool = True, verbose: bool = True) -> T:
    """The hash-keyed file cache: ``path``'s object when :func:`load_current` trusts it, else
    ``build()``, written with ``save(path, obj)`` (atomically: use the ``atomic_*`` writers).

    With ``use_cache=False`` the file is neither read nor written.
    """
    path = Path(path)
    if not use_cache:
        return build()
    report = print if verbose else None
    obj = load_current(path, what=what, check=check, load=load, report=report)
    if obj is not None:
        return obj
    # Another process (a second notebook, a sweep worker, a parallel test) may be building the
    # same entry: wait for it, then use its file instead of building the object a second time.
    with build_lock(path):
        obj = load_current(path, what=what, check=check, load=load, report=None)
        if obj is not None:
            return obj
        obj = build()
        save(path, obj)
    return obj


@contextmanager
def build_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on the hidden file ``.<name>.lock`` beside ``path``, for as long
    as the block runs.

    Processes that build the same cache entry take turns; the lock file itself is left in place
    (deleting it would let a third process lock a new file while the second still holds the old
    one). Where ``fcntl`` is missing (Windows) or the directory cannot hold the lock file, the
    block runs unlocked: concurrent builders then each build, and the atomic writes keep the
    file whole.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def safe_join(root: str | os.PathLike, relpath: str) -> Path:
    """Join ``relpath`` under ``root`` and refuse anything that escapes it.

    Absolute paths, ``..`` components and symlinks that resolve outside ``root`` are rejected,
    so file names read from manifests or label CSVs cannot reach other files.

    Raises
    ------
    CNPError
        When ``relpath`` is absolute, contains ``..`` or resolves outside ``root``.
    """
    root_p = Path(root).resolve()
    rel = Path(relpath)
    if rel.is_absolute() or relpath.startswith(("/", "\\")):
        raise CNPError(f"path {relpath!r} is absolute; manifest and label paths must be relative to {root_p}")
    if any(part == ".." for part in rel.parts):
        raise CNPError(f"path {relpath!r} contains '..'; paths must stay inside {root_p}")
    full = (root_p / rel).resolve()
    if full != root_p and root_p not in full.parents:
        raise CNPError(f"path {relpath!r} resolves to {full}, outside the data root {root_p} (a symlink out?)")
    return full
