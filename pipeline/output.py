"""The job's output directory: results are written under OUTPUT/_pending and moved into OUTPUT
when the job ends, so a reader of OUTPUT never sees a partial file (readers skip `_` folders),
and a rerun after an interruption answers only the rows _pending does not hold yet."""

from __future__ import annotations

import logging
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import StorageOptions, filesystem_for

log = logging.getLogger(__name__)
PENDING = "_pending"


class OutputDir:
    def __init__(self, uri: str, storage: StorageOptions) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.path = filesystem_for(self.uri, storage)
        self.path = self.path.rstrip("/")
        self.pending_uri = f"{self.uri}/{PENDING}"
        self.pending_path = f"{self.path}/{PENDING}"

    def start(self, overwrite: bool) -> pa.Array:
        """Readies the directory; returns the ids an interrupted run already answered. A finished
        job's output is refused unless `overwrite`, which also drops what an interrupted run left."""
        if self._parquet_files(self.path, recursive=False):
            if not overwrite:
                raise FileExistsError(f"{self.uri} already holds Parquet files; pass --overwrite to replace them")
        if overwrite and self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
        return self._salvage()

    def publish(self) -> None:
        """Moves the finished files into place, one atomic rename (or S3 object copy) each."""
        for path in self._parquet_files(self.pending_path):
            self.fs.mv(path, f"{self.path}/{posixpath.basename(path)}")
        self.fs.invalidate_cache(self.pending_path)
        if self.fs.exists(self.pending_path):  # object stores have no folder left to remove
            self.fs.rm(self.pending_path, recursive=True)

    def _salvage(self) -> pa.Array:
        """Ids in the complete files under _pending; files cut short by the interruption are removed."""
        ids = []
        for path in self._parquet_files(self.pending_path):
            try:
                with self.fs.open(path, "rb") as f:
                    ids.append(pq.read_table(f, columns=["id"]).column("id"))
            except Exception as e:  # a file the interrupted writer never finished has no footer
                log.warning("removing %s, left incomplete by an interrupted run (%s)", path, e)
                self.fs.rm(path)
        done = pa.chunked_array([c for column in ids for c in column.chunks], type=pa.string()).combine_chunks()
        if len(done):
            log.info("resuming: %d rows were answered by an earlier run of this job", len(done))
        return done

    def _parquet_files(self, path: str, recursive: bool = True) -> list[str]:
        self.fs.invalidate_cache(path)  # Ray's workers wrote there, not this process
        if not self.fs.exists(path):
            return []
        found = self.fs.find(path, maxdepth=None if recursive else 1)
        return sorted(p for p in found if p.endswith(".parquet"))
