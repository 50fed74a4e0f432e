"""Atomic outputs: folders and files.

Written beside the target and swapped in at the end, so a crash leaves the old or the new one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from lora_studio.core.errors import UserError


@contextmanager
def atomic_output_dir(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one step.

    On any error or cancellation the temporary folder is removed and ``target`` is
    left exactly as it was. An existing ``target`` is replaced only with ``overwrite``,
    and then by an atomic exchange (Linux ``renameat2``), so a crash at any moment
    leaves either the old folder or the complete new one at ``target``. Temporary
    folders of runs that were killed are removed on the next run.
    """
    target, parent, tmp = _prepare(target, overwrite, "folder")
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a folder", "choose another output path")
    try:
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write in {parent}: {exc.strerror or exc}", "choose a writable output folder") from exc
    try:
        yield tmp
        _fsync_dir(tmp)
        if target.exists() and not overwrite:
            raise _appeared(target)
        if target.exists():
            if _exchange(tmp, target):
                _remove_replaced(tmp)  # tmp now holds the old folder (or the link that stood there)
            else:  # no renameat2: two renames, old folder kept aside until the new one is in place
                old = parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old, target)
                    raise
                _remove_replaced(old)
        else:
            _rename_no_replace(tmp, target)
        _fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_write_error(exc, parent)
        raise


def _remove_replaced(path: Path) -> None:
    """What an output replaced: a folder, or a link to one (the link goes; the folder it named stays)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _prepare(target: Path, overwrite: bool, kind: str) -> tuple[Path, Path, Path]:
    """(target, its parent, the temporary sibling's path): stale temporaries removed, an existing target refused
    without ``overwrite``, the parent created."""
    target = Path(os.path.abspath(target))  # abspath, not absolute(): "." and ".." are resolved, never a name
    parent = target.parent
    if parent.is_dir():
        _remove_stale_temporaries(parent, target.name)
    if target.exists() and not overwrite:
        raise UserError(
            f"{target} already exists", f"choose another output {kind}, or confirm overwriting it (--overwrite)"
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {parent}: {exc.strerror or exc}", "choose a writable location") from exc
    return target, parent, parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _discard(tmp: Path) -> None:
    """Remove a temporary file, if there is one: on a read-only file system unlink fails (EROFS) even for a file
    that was never created, and that must not hide the error that says why nothing was written."""
    with suppress(OSError):
        tmp.unlink(missing_ok=True)


def _raise_write_error(exc: BaseException, parent: Path) -> None:
    """A full or read-only disk is the user's to fix: say so in one line (the partial output is already gone)."""
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        raise UserError(
            f"the disk holding {parent} is full",
            "free some space or choose another output location; nothing was written",
        ) from exc
    if isinstance(exc, OSError) and exc.errno in (13, 30):  # EACCES, EROFS
        raise UserError(
            f"cannot write to {parent}: {exc.strerror}", "choose a writable output location; nothing was written"
        ) from exc
    if not isinstance(exc, OSError):
        return
    if any(str(name).startswith(str(parent)) and ".partial-" in str(name) for name in (exc.filename, exc.filename2)):
        # the temporary itself could not be made (a name too long, a folder like /proc that takes no new files)
        raise UserError(
            f"cannot write in {parent}: {exc.strerror}",
            "choose another output location or a shorter name; nothing was written",
        ) from exc


@contextmanager
def atomic_output_file(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is renamed to ``target`` (one atomic step).

    On any error or cancellation the temporary file is removed and ``target`` is untouched.
    """
    target, parent, tmp = _prepare(target, overwrite, "file")
    if target.is_dir():
        raise UserError(f"{target} is a folder", "choose an output file name")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            _rename_no_replace(tmp, target)
        _fsync_dir(parent)
    except BaseException as exc:
        _discard(tmp)
        _raise_write_error(exc, parent)
        raise


def replace_text(path: Path, text: str) -> None:
    """Write a small text file in place of ``path`` atomically (a reader sees the old or the new text)."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, "utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _appeared(target: Path) -> UserError:
    return UserError(
        f"{target} appeared while this job was running; it was not replaced",
        "the new output was discarded; choose another name, or confirm overwriting (--overwrite)",
    )


def _rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if nothing is at ``dst`` at that instant (renameat2 RENAME_NOREPLACE), so an
    output that another job or the user created meanwhile is never replaced."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        AT_FDCWD, RENAME_NOREPLACE = -100, 1
        if renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == 17:  # EEXIST
            raise _appeared(dst)
        if err not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: no renameat2 here, use the plain path
            raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir():
        if dst.exists():
            raise _appeared(dst)
        os.rename(src, dst)  # a window of microseconds remains where renameat2 is missing
        return
    try:
        os.link(src, dst)  # a hard link fails if dst exists: no-replace for a file without renameat2
    except FileExistsError:
        raise _appeared(dst) from None
    os.unlink(src)


def exchange_folders(a: Path, b: Path) -> None:
    """Swap two folders: in one step where the filesystem can (renameat2), else by three renames through a parked
    name that no cleanup removes (``.<a>.swap-<pid>``), so an interrupted swap leaves every file somewhere."""
    if _exchange(a, b):
        _fsync_dir(a.parent)
        return
    parked = a.with_name(f".{a.name}.swap-{os.getpid()}")
    os.rename(a, parked)
    os.rename(b, a)
    os.rename(parked, b)
    _fsync_dir(a.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: filesystem or kernel without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    """Delete temporary folders and files left by runs that were killed (their process is gone)."""
    # the names compared, not globbed: a glob of each output's name reads "[…]" in it as a pattern, and compiles
    # (and caches, for the process's life) a pattern per name written
    names = [entry.name for entry in os.scandir(parent)]
    for prefix in (f".{name}.partial-", f".{name}.old-"):
        for path in (parent / found for found in names if found.startswith(prefix)):
            try:
                pid = int(path.name[len(prefix) :].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                if prefix.endswith(".old-") and not (parent / name).exists():
                    os.rename(path, parent / name)  # killed between two renames: put the old folder back
                elif path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
