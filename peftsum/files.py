"""Files: every one written atomically (a unique temporary name in the same folder, then a rename), the
temporary files a killed run leaves removed, one lock per weights file, and the checks that a folder can take what a
run will write there, made before the work (imports no torch)."""
from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError  # (imports no torch)

from peftsum.errors import UsageError, first_line


def copy_file(source: Path, target: Path) -> None:
    """`source` copied to `target` atomically: a reader sees the old file or the new one whole, never a part."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)



def usual_permissions(path: Path) -> None:
    """Give a file the permissions open() gives a new one, 0666 less the umask: safetensors' save_file writes
    through a temporary file of mkstemp's, readable by its owner alone (another user of a shared machine, or of a
    container's volume, could not read the weights). Best effort: a file system without Unix permissions (FAT, some
    network mounts) refuses chmod, and the file written is kept as it is."""
    try:
        os.chmod(path, 0o666 & ~umask())
    except OSError:
        pass


def umask() -> int:
    """The process's umask, read where Linux shows it (os.umask can only read it by setting it, which would change
    it for a moment for every thread: a checkpoint written by the signal watcher meanwhile)."""
    try:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")



@contextmanager
def atomic_path(path: Path, private_folder: bool = False):
    """A temporary path beside `path` to write a file or a folder to, renamed to `path` when the block succeeds: a
    reader, or a run killed at any moment, only ever sees the old or the new one whole. Its name is unique (process
    id + random), so concurrent writers never collide, and `remove_orphans` knows a killed writer's leftovers. With
    `private_folder`, the temporary path lies inside a temporary folder of that name, for writers that leave files
    of their own beside the path they write. A failed write (disk full, read-only folder) is a UsageError naming
    the path, and leaves no temporary file."""
    tmp = path.with_name(temporary_name(path.name))
    target = tmp / path.name if private_folder else tmp
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if private_folder:
            tmp.mkdir()
        yield target
        os.replace(target, path)
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e, 100)
        raise UsageError(f"cannot write {path}: {reason}") from None
    finally:
        remove_path(tmp)



def temporary_name(name: str) -> str:
    """atomic_path's temporary name for `name`: `.<name>.<process id>-<8 hex digits>.tmp`."""
    return f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"



def remove_path(path: Path) -> None:
    """Remove a file or a folder if it is there; never raises (a cleanup must not hide the error it follows)."""
    try:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass



def remove_orphans(path: Path) -> None:
    """Remove the temporary files that killed runs left beside `path` (those whose process is gone, on this
    machine), and say so; where processes cannot be checked (not POSIX), only report them. Also removes the
    temporary files that safetensors' save_file left there when earlier versions of these scripts wrote through it
    (see `safetensors_orphans`)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)-[0-9a-f]+\.tmp")
    found = [(p, int(m[1])) for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp")
             if (m := pattern.fullmatch(p.name))]
    if os.name != "posix":
        if found:
            print(f"found {len(found)} temporary file(s) beside {path} that a killed run may have left: remove them "
                  "if no run is writing there")
        return
    orphans = [p for p, pid in found if not process_alive(pid)] + safetensors_orphans(path.parent)
    for p in orphans:
        remove_path(p)
    if orphans:
        print(f"removed {len(orphans)} temporary file(s) that a killed run left beside {path}")



def safetensors_orphans(folder: Path) -> list[Path]:
    """safetensors' own temporary files (`.tmp` + 6 letters or digits) in `folder` that a killed run of these
    scripts left: those whose header holds our metadata (a run record or a training state), owned by this user,
    and open in no process of this user, so that no live writer's file is ever taken (Linux, where /proc shows
    what each process holds open; elsewhere none)."""
    candidates = [p for p in folder.glob(".tmp*") if re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", p.name) and p.is_file()
                  and p.stat().st_uid == os.getuid() and written_by_us(p)]
    if not candidates or not Path("/proc/self/fd").is_dir():
        return []
    held = open_files()
    return [p for p in candidates if (p.stat().st_dev, p.stat().st_ino) not in held]



def written_by_us(path: Path) -> bool:
    """Whether a (possibly truncated) safetensors file's header holds our metadata: "record" or "state"."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < 2**27 else None
    except (OSError, ValueError):  # unreadable, or a header cut short or not JSON
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and bool({"record", "state"} & set(metadata))



def open_files() -> set[tuple[int, int]]:
    """(device, inode) of every file that a process of this user holds open (Linux: /proc/<pid>/fd)."""
    held = set()
    for fds in Path("/proc").glob("[0-9]*/fd"):
        try:
            names = os.listdir(fds) if fds.parent.stat().st_uid == os.getuid() else []
        except OSError:  # the process ended while we looked
            continue
        for fd in names:
            try:
                st = os.stat(fds / fd)
            except OSError:  # closed while we looked
                continue
            held.add((st.st_dev, st.st_ino))
    return held



def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True



@contextmanager
def weights_lock(path: Path):
    """Hold `<path>.lock` while a run trains into `path`; a second run gets a UsageError that names the holder
    (process, host, start, command). An OS lock (flock), so that a run killed in any way releases it; on Windows
    there is none."""
    try:
        import fcntl  # POSIX only: where it is missing (Windows) there is no lock
    except ImportError:
        yield
        return
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(lock, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            f.close()
            raise UsageError(f"{path} is locked by another run training into it ({holder}): wait for it to finish, "
                             "or pass another --weights") from None
        try:  # the holder before us removes the file when it ends: lock the file that is there now
            if os.path.samestat(os.fstat(f.fileno()), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                    f"{shlex.join(sys.argv)}")
            f.flush()
        except OSError as e:  # a full disk: the lock is held all the same, but say it now, not after an epoch
            raise UsageError(f"cannot write {lock}: {e.strerror or e}") from None
        HELD_LOCKS.add(lock)
        yield
    finally:
        HELD_LOCKS.discard(lock)
        lock.unlink(missing_ok=True)
        f.close()  # releases the lock



HELD_LOCKS: set[Path] = set()  # the lock files this process holds



def remove_held_locks() -> None:
    """For a process about to end without unwinding (os._exit): remove its lock files, as each `weights_lock` would
    on its way out. The OS releases the locks themselves when the process ends."""
    for lock in list(HELD_LOCKS):
        lock.unlink(missing_ok=True)



def nearest_existing(folder: Path) -> Path:
    """`folder`, or while it does not exist the nearest folder above it: where its files will be created."""
    existing = folder.resolve()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing



def check_writable(folder: Path) -> None:
    """Whether files can be created in `folder` (or where it will be created): an output that cannot be written
    fails before the work, not after it. Leaves nothing."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise UsageError(f"cannot write to {folder}: {existing} is a file, not a folder")
    probe = existing / f".write-probe.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to {folder}: {e.strerror or e}") from None



def name_max(folder: Path) -> int:
    """The longest file name, in bytes, that the file system of `folder` (or where it will be created) allows."""
    try:
        limit = os.pathconf(nearest_existing(folder), "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or the file system does not say
        limit = None
    return limit if isinstance(limit, int) and limit > 0 else 255



def check_name_length(path: Path, flag: str, folder_flag: str | None = None) -> None:
    """Every name that writing `path` creates fits its file system: the folders still to be made (named by
    `folder_flag`, else `flag`) and the file's temporary name, the longest (atomic_path's). Checked before the
    work: a name too long would otherwise fail at the first write, after an epoch or a whole evaluation."""
    limit = name_max(path.parent)
    names = [(p.name, folder_flag or flag, "the folder") for p in [path.parent, *path.parent.parents]
             if p.name and not p.exists()]
    names.append((temporary_name(path.name), flag, f"the temporary file of {shorten(path.name)}"))
    for name, which, what in names:
        if len(os.fsencode(name)) > limit:
            raise UsageError(f"{which} makes a name too long for the file system: {what} would be named with "
                             f"{len(os.fsencode(name))} bytes ({shorten(name)}), and at most {limit} are allowed; "
                             f"pass a shorter {which}")



def shorten(name: str, keep: int = 24) -> str:
    return name if len(name) <= 2 * keep + 3 else f"{name[:keep]}...{name[-keep:]}"



def check_free_space(folder: Path, n_bytes: int, what: str, flag: str) -> None:
    """Room for `what` (about n_bytes) in `folder` (or where it will be created)."""
    free = shutil.disk_usage(nearest_existing(folder)).free
    if free < n_bytes:
        raise UsageError(f"{folder} has {free / 2**20:.1f} MiB free, and this run needs about "
                         f"{max(n_bytes / 2**20, 0.1):.1f} MiB there for {what}: free some space or pass another {flag}")
