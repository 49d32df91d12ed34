"""The job's output location, and what a job may do there: write only into a location that is
empty or holds its own earlier output, resume only the same work, publish atomically per file,
and remove only what it wrote.

    OUTPUT/*.parquet      the results, moved here from _pending when the run ends
    OUTPUT/_summary.json  the job's totals
    OUTPUT/_scores.pq     scores written offline by `jobs.score` (Parquet); they replace the rows' own
    OUTPUT/_job.json      the job record: fingerprint, runs, state, the result files it published
    OUTPUT/_lease.json    present while a run writes (pipeline.lease)
    OUTPUT/_pending/RUN/  a run's results while it writes (readers skip `_` names)
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import faults
from pipeline.fingerprint import differences
from pipeline.lease import LEASE_FILE, LocalLease, ObjectLease
from pipeline.lineage import file_schema
from pipeline.scoring import SCORE_COLUMNS, with_scores
from pipeline.storage import StorageOptions, filesystem_for, protocol_of, pyarrow_filesystem
from pipeline.summary import SUMMARY_FILE
from schemas import RESULT_SCHEMA

log = logging.getLogger(__name__)
PENDING = "_pending"
# Parquet, named so that a reader globbing OUTPUT/*.parquet for the results does not take it in.
SCORES_FILE = "_scores.pq"
RECORD_FILE = "_job.json"
STARTED_FILE = "_started"
STATES = ("running", "publishing", "done", "overwriting")
RUN_ID = re.compile(r"[0-9a-f]{32}")
# A record, summary or scores file being written (_replace): written beside, then moved over.
RECORD_TEMPORARY = re.compile(r"_(job\.json|summary\.json|scores\.pq)\.[0-9a-f]{32}")
RESULT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.parquet")
SHOWN = 5


class OutputError(Exception):
    """The output location cannot be used as asked; nothing in it was changed."""


@dataclass
class JobRecord:
    """What a job wrote to its output. `state`: running → publishing → done; overwriting while
    --overwrite removes an earlier job's files."""

    fingerprint: dict[str, str]
    runs: list[str]
    state: str = "running"
    files: list[str] = field(default_factory=list)  # result files published, or about to be

    @classmethod
    def from_json(cls, data: bytes) -> JobRecord:
        """The record, checked: every name in it is one this job could have written, so that no
        edited or corrupt record can make the job read, move or delete anything else."""
        value = json.loads(data)
        record = cls(**{k: value[k] for k in ("fingerprint", "runs", "state", "files")})
        if not (isinstance(record.fingerprint, dict) and all(isinstance(v, str) for v in record.fingerprint.values())):
            raise ValueError("its fingerprint is not a mapping of strings")
        if record.state not in STATES:
            raise ValueError(f"its state is not one of {STATES}")
        if not (isinstance(record.runs, list) and record.runs and all(is_run_id(r) for r in record.runs)):
            raise ValueError("its runs are not run ids")
        if not (isinstance(record.files, list) and all(is_result_name(f) for f in record.files)):
            raise ValueError("its files are not result file names")
        return record


def new_run_id() -> str:
    return uuid.uuid4().hex


def is_run_id(value) -> bool:
    return isinstance(value, str) and RUN_ID.fullmatch(value) is not None


def is_result_name(value) -> bool:
    """A plain file name in OUTPUT: no folder, not hidden or `_`-prefixed, ending in .parquet."""
    return isinstance(value, str) and RESULT_NAME.fullmatch(value) is not None


class OutputDir:
    def __init__(self, uri: str, storage: StorageOptions) -> None:
        self.uri = uri.rstrip("/")
        self.storage = storage
        self.fs, path = filesystem_for(self.uri, storage)
        self.path = path.rstrip("/")
        self.record: JobRecord | None = None
        self.lease: LocalLease | ObjectLease | None = None
        self.salvaged: list[str] = []  # earlier runs' complete pending files this run resumes from

    def check_location(self) -> None:
        if self.fs.isfile(self.path):
            raise OutputError(f"--output {self.uri} is a file; give a directory or prefix")

    @contextmanager
    def leased(self, run_id: str, timeout_s: float, take_over: bool = False):
        """Holds the output's lease while open: no other job writes here meanwhile."""
        if protocol_of(self.uri) == "file":
            self.lease = LocalLease(self.path, run_id, timeout_s)
        else:
            self.lease = ObjectLease(self.fs, self.path, run_id, timeout_s)
        try:
            self.lease.acquire(take_over)
        except OSError as e:  # no such bucket, no permission to write there…
            raise OutputError(f"cannot take the lease on {self.uri}: {type(e).__name__}: {e}") from e
        try:
            yield self
        finally:
            self.lease.release()

    def begin(self, run_id: str, fingerprint: dict[str, str], overwrite: bool, input_ids: set[str] | None) -> pa.Array:
        """Readies the location for this run; returns the ids that earlier runs of the same job
        already answered. Refuses foreign files, a finished job (unless `overwrite`, which removes
        only that job's files) and an unfinished run of another configuration."""
        record = self._read_record()
        entries = self._entries(self.path)
        foreign = self._foreign_entries(record, entries)
        if foreign:
            names = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
            raise OutputError(
                f"{self.uri} holds {len(foreign)} {'entry' if len(foreign) == 1 else 'entries'} this job did not "
                f"write ({names}); write into an empty "
                "location or one holding this job's own output (glimpse-batch never deletes what it did not write)"
            )
        for name in entries:  # records a killed run left half-written
            if RECORD_TEMPORARY.fullmatch(name):
                self._remove(f"{self.path}/{name}")
        done = pa.array([], pa.string())
        if record is not None and overwrite:
            self._remove_owned(record, run_id)
            record = None
        elif record is not None and record.state == "overwriting":
            raise OutputError(f"an --overwrite of {self.uri} was interrupted; rerun it with --overwrite")
        elif record is not None and record.state == "done":
            raise OutputError(
                f"{self.uri} holds a finished job's output; pass --overwrite to replace it "
                "(that removes only the files the job wrote)"
            )
        elif record is not None:
            changed = differences(record.fingerprint, fingerprint)
            if changed:
                raise OutputError(
                    f"{self.uri} holds an unfinished run with another configuration: {'; '.join(changed)}. "
                    "Rerun with the same input, model and options to resume it, or pass --overwrite to start over"
                )
            done = self._salvage(record, input_ids)
            record.runs.append(run_id)
        self.record = record or JobRecord(fingerprint, [run_id])
        self._write_record()
        # A marker, so that the run's folder exists on object stores too: Ray removes the folder of
        # a write that wrote no rows (all were answered already), and fails where there is none.
        self.fs.makedirs(f"{self.path}/{PENDING}/{run_id}", exist_ok=True)
        self.fs.pipe_file(f"{self.path}/{PENDING}/{run_id}/{STARTED_FILE}", b"")
        return done

    @property
    def absolute_uri(self) -> str:
        """The location as a full URI: file:///… for a local directory, s3://… for a prefix."""
        return self.fs.unstrip_protocol(posixpath.normpath(self.path))

    def write_pending(self, dataset, run_id: str, lineage: dict) -> None:
        """Runs `dataset` to the end, its result rows written as Parquet files under this run's
        pending folder, each file's metadata holding the lineage and the file's write time."""
        fs, path = pyarrow_filesystem(f"{self.uri}/{PENDING}/{run_id}", self.storage)
        dataset.write_parquet(path, filesystem=fs, arrow_parquet_args_fn=lambda: {"schema": file_schema(lineage)})

    def publish(self) -> None:
        """Moves every run's finished files into place, one atomic rename (or S3 copy) each. The
        record lists them first, so a publication cut short is finished by the next run."""
        self.lease.check()
        # This run's files and the earlier runs' files it resumed from, never files that appeared
        # since: a run whose lease was taken over may still be writing into its own folder.
        pending = [*self.salvaged, *self._pending_files(self.record.runs[-1:])]
        self.record.files = sorted(set(self.record.files) | {posixpath.basename(p) for p in pending})
        self.record.state = "publishing"
        self._write_record()
        for i, path in enumerate(pending, 1):
            self.fs.mv(path, f"{self.path}/{posixpath.basename(path)}")
            faults.reached(f"published {i}")
        for run in self.record.runs:
            self._remove(f"{self.path}/{PENDING}/{run}")
        self._remove_if_empty(f"{self.path}/{PENDING}")

    def require_finished(self) -> None:
        """Raises OutputError unless the location holds a job that finished (its summary written)."""
        record = self._read_record()
        if record is None:
            raise OutputError(f"{self.uri or repr(self.uri)} holds no job output (no {RECORD_FILE})")
        if record.state != "done":
            raise OutputError(
                f"the job in {self.uri} has not finished (it is {record.state}); rerun it to the end first"
            )

    def read_results(self, columns: list[str], scored: bool = True) -> pa.Table:
        """This job's published rows (only the files its record lists), `columns` of them; with
        `scored`, the scores `jobs.score` wrote in place of the rows' own."""
        record = self.record or self._read_record()
        if record is None:
            raise OutputError(f"{self.uri} holds no job output (no {RECORD_FILE})")
        if record.state == "overwriting":
            raise OutputError(f"{self.uri} is being replaced by an --overwrite that has not finished")
        if not record.files:
            return pa.schema([RESULT_SCHEMA.field(c) for c in columns]).empty_table()
        arrow_fs, _ = pyarrow_filesystem(self.uri, self.storage)
        # No partitioning: a `model=x` folder in the output's path is a location, not a column.
        paths = [f"{self.path}/{name}" for name in record.files]
        wanted = list(dict.fromkeys([*columns, "id"]))
        try:
            dataset = pq.ParquetDataset(paths, filesystem=arrow_fs, partitioning=None)
            present = [c for c in wanted if c in dataset.schema.names]
            table = dataset.read(columns=present)
        except pa.ArrowException as e:
            raise OutputError(f"{self.uri} holds a result file that cannot be read ({e})") from e
        for name in [c for c in wanted if c not in present]:
            # An output of an older schema: the columns it predates are null (no scores, no masks).
            field = RESULT_SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        scores = self._read_scores() if scored and set(columns) & set(SCORE_COLUMNS) else None
        if scores is not None:
            table = with_scores(table, scores)
        return table.select(columns)

    def write_scores(self, scores: pa.Table) -> None:
        """Offline scores (id and SCORE_COLUMNS) beside a finished job's results; read_results
        gives them in place of the rows' own. An --overwrite of the job removes them."""
        self.require_finished()
        buffer = pa.BufferOutputStream()
        pq.write_table(scores, buffer)
        self._replace(SCORES_FILE, buffer.getvalue().to_pybytes())

    def _read_scores(self) -> pa.Table | None:
        path = f"{self.path}/{SCORES_FILE}"
        if not self.fs.exists(path):
            return None
        try:
            return pq.read_table(pa.BufferReader(self._read_file(SCORES_FILE)))
        except (OSError, pa.ArrowException) as e:
            raise OutputError(f"{self.uri}/{SCORES_FILE} cannot be read ({e}); run jobs.score again") from e

    def _read_file(self, name: str) -> bytes:
        """A file of the job's, refused unless it is a regular file: a FIFO in its place would
        block the reader forever."""
        path = f"{self.path}/{name}"
        if not self.fs.isfile(path):
            raise OutputError(f"{self.uri}/{name} is not a regular file")
        return self.fs.cat_file(path)

    def _replace(self, name: str, data: bytes) -> None:
        """Writes `name` whole or not at all: beside, then moved over the old one (a link in its
        place is replaced, not followed)."""
        temporary = f"{self.path}/{name}.{uuid.uuid4().hex}"
        self.fs.pipe_file(temporary, data)
        self.fs.mv(temporary, f"{self.path}/{name}")

    def read_summary(self) -> dict:
        """The job's `_summary.json`, or {} before the job has written it."""
        if not self.fs.exists(f"{self.path}/{SUMMARY_FILE}"):
            return {}
        try:
            summary = json.loads(self._read_file(SUMMARY_FILE))
        except ValueError as e:
            raise OutputError(f"{self.uri}/{SUMMARY_FILE} is not JSON ({e})") from e
        if not isinstance(summary, dict):
            raise OutputError(f"{self.uri}/{SUMMARY_FILE} is not a job summary")
        return summary

    def finish(self, summary: dict) -> None:
        """Writes the summary, then marks the job done."""
        self.write_summary(summary)
        self.record.state = "done"
        self._write_record()

    def write_summary(self, summary: dict) -> None:
        self._replace(SUMMARY_FILE, json.dumps(summary, indent=2).encode())

    def _read_record(self) -> JobRecord | None:
        path = f"{self.path}/{RECORD_FILE}"
        self.fs.invalidate_cache(self.path)
        if not self.fs.exists(path):
            return None
        try:
            return JobRecord.from_json(self._read_file(RECORD_FILE))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OutputError(
                f"{self.uri}/{RECORD_FILE} is not a job record this version can read ({e}); nothing was changed"
            ) from e

    def _write_record(self) -> None:
        self._replace(RECORD_FILE, json.dumps(asdict(self.record), indent=2).encode())

    def _foreign_entries(self, record: JobRecord | None, entries: dict[str, str]) -> list[str]:
        """Names in the location, and in its _pending folder, that no run of this job wrote (a
        name of ours on an entry of the wrong kind, such as a file called _pending, is foreign)."""
        runs = record.runs if record is not None else []
        files = {RECORD_FILE, LEASE_FILE}
        if record is not None:
            files |= {SUMMARY_FILE, SCORES_FILE, *record.files}
        foreign = [
            name
            for name, kind in entries.items()
            if not (
                (kind == "file" and (name in files or RECORD_TEMPORARY.fullmatch(name)))
                or (kind == "directory" and name == PENDING)
            )
        ]
        if entries.get(PENDING) == "directory":
            pending = self._entries(f"{self.path}/{PENDING}")
            foreign += [
                f"{PENDING}/{name}" for name, kind in pending.items() if not (kind == "directory" and name in runs)
            ]
        return sorted(foreign)

    def _entries(self, directory: str) -> dict[str, str]:
        """{name: "file" | "directory" | "other"} in a folder (none if it does not exist); an S3
        console's folder marker, the folder's own zero-byte key, is not an entry."""
        self.fs.invalidate_cache(directory)
        if not self.fs.isdir(directory):
            return {}
        entries = {}
        for info in self.fs.ls(directory, detail=True):
            path = info["name"].rstrip("/")
            if path and path != directory:
                entries[posixpath.basename(path)] = info["type"] if info.get("islink") is not True else "link"
        return entries

    def _remove_owned(self, record: JobRecord, run_id: str) -> None:
        """--overwrite: the files the recorded job wrote, and nothing else. The record says so
        first, so that an --overwrite cut short is never taken for a finished or resumable job."""
        self.record = JobRecord(record.fingerprint, [*record.runs, run_id], "overwriting", record.files)
        self._write_record()
        owned = [f"{self.path}/{name}" for name in [*record.files, SUMMARY_FILE, SCORES_FILE]]
        log.warning("--overwrite: removing %d files of the earlier job in %s", len(record.files), self.uri)
        for path in owned:
            self._remove(path)
        for run in record.runs:
            self._remove(f"{self.path}/{PENDING}/{run}")
        self._remove_if_empty(f"{self.path}/{PENDING}")

    def _salvage(self, record: JobRecord, input_ids: set[str] | None) -> pa.Array:
        """Ids in the earlier runs' complete files. A file cut short by the interruption, or
        holding ids the input no longer has or that another file already holds, is removed, so
        its rows run again. A file that cannot be read stops the job and is kept."""
        published = [f"{self.path}/{name}" for name in record.files if self.fs.exists(f"{self.path}/{name}")]
        seen: set[str] = set()
        done = []
        self.salvaged = []
        pending = self._pending_files(record.runs)
        for path in [*published, *pending]:
            ids = self._ids_in(path)
            if ids is None:
                reason = "left incomplete by an interrupted run"
            elif input_ids is not None and not input_ids.issuperset(ids):
                reason = "holding ids that are no longer in the input"
            elif seen.intersection(ids):
                reason = "holding ids another file holds"
            else:
                seen.update(ids)
                done.extend(ids)
                if path in pending:
                    self.salvaged.append(path)
                continue
            log.warning("removing %s, %s", path, reason)
            self.fs.rm(path)
        if done:
            log.warning("resuming: %d rows were answered by an earlier run of this job", len(done))
        return pa.array(done, pa.string())

    def _ids_in(self, path: str) -> list[str] | None:
        """A result file's ids; None when the file is incomplete (no readable footer)."""
        try:
            data = self.fs.cat_file(path)
        except Exception as e:
            raise OutputError(f"cannot read {path} to resume ({e}); nothing was removed, rerun to try again") from e
        try:
            return pq.read_table(pa.BufferReader(data), columns=["id"]).column("id").to_pylist()
        except pa.ArrowException:
            return None

    def _pending_files(self, runs: list[str]) -> list[str]:
        files = []
        for run in runs:
            directory = f"{self.path}/{PENDING}/{run}"
            self.fs.invalidate_cache(directory)  # Ray's workers wrote there, not this process
            if self.fs.exists(directory):
                files += sorted(p for p in self.fs.find(directory) if p.endswith(".parquet"))
        return files

    def _remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def _remove_if_empty(self, directory: str) -> None:
        self.fs.invalidate_cache(directory)
        if self.fs.isdir(directory) and not self.fs.ls(directory):
            self.fs.rmdir(directory)
