"""One writer per output: a lease object, `OUTPUT/_lease.json`, naming the run that holds it.

- Local disks: the lease file is locked with `flock`. The kernel drops the lock when its process
  dies, however it dies, so a dead job's lease is taken over at once and a live one never is.
- S3: the lease is created with a conditional write (`If-None-Match: *`), and renewed by a
  heartbeat thread with `If-Match` on the version it last wrote; a job that finds its lease
  replaced stops before publishing. A lease whose heartbeat is older than its timeout (or whose
  process is gone, when it ran on this host) is taken over, again with `If-Match`, so of two jobs
  taking over the same dead lease exactly one wins. Stores that ignore conditional headers give
  no such guarantee: there the lease only stops a second job that starts after the first.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
LEASE_FILE = "_lease.json"


class LeaseHeld(Exception):
    """Another run holds the output's lease."""


class LeaseLost(Exception):
    """This run's lease was taken over while it ran; it must not publish."""


def holder_record(run_id: str, timeout_s: float) -> dict:
    return {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "heartbeat": time.time(),
        "timeout_s": timeout_s,
    }


def describe_holder(holder: dict) -> str:
    age = time.time() - holder.get("heartbeat", 0)
    return f"run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}, lease renewed {age:.0f}s ago)"


def is_lease(holder: dict) -> bool:
    """Whether a lease file's content is one this job writes (else it is someone else's file)."""
    return isinstance(holder.get("run_id"), str) and {"host", "pid", "heartbeat", "timeout_s"} <= holder.keys()


def foreign(path: str) -> LeaseHeld:
    return LeaseHeld(f"{path} is not a lease this job wrote; the output holds a file of the same name")


def is_dead(holder: dict) -> bool:
    """Whether the holder is gone: its heartbeat is older than its timeout, or it ran on this host
    and its process has ended."""
    if time.time() - holder.get("heartbeat", 0) > holder.get("timeout_s", 0):
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
    return False


class LocalLease:
    """The lease on a local (or mounted) directory: an flock held while the job runs."""

    def __init__(self, directory: str, run_id: str, timeout_s: float) -> None:
        self.path = Path(directory) / LEASE_FILE
        self.run_id, self.timeout_s = run_id, timeout_s
        self._fd: int | None = None

    def acquire(self, take_over: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            created, fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _json_or_empty(os.pread(fd, 1 << 16, 0))
                os.close(fd)
                raise LeaseHeld(f"{self.path.parent} is being written by {describe_holder(holder)}") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # locked a lease file its holder removed on release: lock the current one
        if not created:  # a lease nobody holds: a dead run's, or a file that is not a lease at all
            previous = _json_or_empty(os.pread(fd, 1 << 16, 0))
            if not is_lease(previous):
                os.close(fd)
                raise foreign(str(self.path))
            log.warning("taking over the lease of %s, whose process has ended", describe_holder(previous))
            os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_record(self.run_id, self.timeout_s)).encode(), 0)
        self._fd = fd

    def _open(self) -> tuple[bool, int]:
        """(created, fd): a new lease file, or the existing one; never through a symbolic link."""
        try:
            return True, os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            pass
        try:
            return False, os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:  # a symbolic link (ELOOP), a folder, or gone again
            raise foreign(str(self.path)) from e

    def check(self) -> None:
        """Nothing to check: nobody can take an flock from a live process."""

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # still locked: nobody else can have created it since
        os.close(self._fd)
        self._fd = None


class ObjectLease:
    """The lease on an object store: conditional writes and a heartbeat."""

    def __init__(self, fs, directory: str, run_id: str, timeout_s: float) -> None:
        self.fs, self.key = fs, f"{directory}/{LEASE_FILE}"
        self.run_id, self.timeout_s = run_id, timeout_s
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, take_over: bool = False) -> None:
        for _ in range(3):  # the holder may release between our write and our read: try again
            try:
                self._etag = self._put(IfNoneMatch="*")
                break
            except FileExistsError:
                holder, etag = self._read()
            if etag is not None:
                self._take_over(holder, etag, take_over)
                break
        else:
            raise LeaseHeld(f"s3://{self.key} keeps changing: another job is taking it")
        if self._read()[0].get("run_id") != self.run_id:
            raise LeaseHeld(f"{self.key} was written by another job at the same time")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _take_over(self, holder: dict, etag: str, forced: bool) -> None:
        """Replaces a dead (or, `forced`, any) holder's lease, only if it is still that version."""
        if not is_lease(holder):
            raise foreign(f"s3://{self.key}")
        if not (forced or is_dead(holder)):
            raise LeaseHeld(
                f"s3://{self.key.rsplit('/', 1)[0]} is being written by {describe_holder(holder)}; if that "
                f"job is dead, wait {holder.get('timeout_s', 0):.0f}s past its last heartbeat, "
                "or pass --take-over-lease"
            )
        log.warning("taking over the lease of %s", describe_holder(holder))
        try:
            self._etag = self._put(IfMatch=etag)
        except OSError as e:  # another job took it over first
            raise LeaseHeld(f"another job took over the lease of {self.key} first ({e})") from None

    def check(self) -> None:
        if self._lost:
            raise LeaseLost(self._lost)
        self._renew()
        if self._lost:
            raise LeaseLost(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._etag is not None and not self._lost:
            holder, _ = self._read()
            if holder.get("run_id") == self.run_id:
                self.fs.rm(self.key)
        self._etag = None

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            self._renew()

    def _renew(self) -> None:
        if self._lost:
            return
        try:
            self._etag = self._put(IfMatch=self._etag)
        except OSError as e:
            holder, _ = self._read()
            if holder.get("run_id") != self.run_id:
                self._lost = f"the lease on {self.key} was taken over by {describe_holder(holder)}"
            else:
                log.warning("lease heartbeat failed (%s); retrying", e)

    def _put(self, **condition) -> str:
        bucket, key = self.key.split("/", 1)
        body = json.dumps(holder_record(self.run_id, self.timeout_s)).encode()
        return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)["ETag"]

    def _read(self) -> tuple[dict, str | None]:
        """(holder, its ETag). The ETag is read first: if the lease changes in between, a write
        conditional on that ETag fails, which is the safe way round."""
        self.fs.invalidate_cache(self.key)
        try:
            etag = self.fs.info(self.key).get("ETag")
            return _json_or_empty(self.fs.cat_file(self.key)), etag
        except FileNotFoundError:
            return {}, None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _json_or_empty(data: bytes) -> dict:
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
