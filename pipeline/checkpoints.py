"""Where a model or its glimpse modules come from: a local directory, a Hugging Face Hub id, or an
object-store prefix (s3://bucket/prefix).

A location is resolved once, on the driver before Ray starts, to an exact revision (the hub's commit
hash, or a digest of the prefix's listing), so that every worker loads the same files even if the
branch or the prefix moves mid-job, and so that a bad location fails the job in one line before
any work starts. Workers then call `Checkpoint.local_dir` to get the files on their own node.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.glimpse.config import CONFIG_FILE, MODULES_FILE
from pipeline.storage import StorageOptions, UnsupportedURI, filesystem_for, object_version, protocol_of

# The files each role must find in its directory.
REQUIRED_FILES = {"model": (CONFIG_FILE,), "glimpse": (CONFIG_FILE, MODULES_FILE)}
# The Hub's repo id forms, `name` or `org/name`.
HUB_ID = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?")
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


class CheckpointError(ValueError):
    """One line, for the user: what is wrong with which location."""


@dataclass(frozen=True)
class Checkpoint:
    location: str  # a hub id or URI as the user gave it; a local directory as an absolute path
    kind: str  # "local" | "hub" | "s3" (any remote fsspec scheme)
    revision: str | None  # hub: commit hash; remote: digest of the prefix listing; local: None

    def local_dir(self, storage: StorageOptions) -> Path:
        """The checkpoint's files on this node: fetched on a node's first call, cached after."""
        if self.kind == "local":
            path = Path(self.location)
            if not path.is_dir():
                raise CheckpointError(f"{self.location}: no such directory on this node ({socket.gethostname()})")
            return path
        if self.kind == "hub":
            return _hub_snapshot(self.location, self.revision, name=self.location)
        return _fetch_remote(self, storage)

    def config(self, storage: StorageOptions, name: str) -> dict:
        """The checkpoint's config.json, read alone (not the weights): a family or a fit can be
        refused on the driver without fetching gigabytes. CheckpointError, naming the checkpoint
        as `name` (how the user gave it), unless it is a JSON object."""
        import json

        try:
            if self.kind in ("local", "hub"):
                text = (self.local_dir(storage) / CONFIG_FILE).read_bytes()
            else:
                fs, root = filesystem_for(self.location, storage)
                text = fs.cat_file(f"{root.rstrip('/')}/{CONFIG_FILE}")
            loaded = json.loads(text)
        except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
            raise CheckpointError(f"{name}: cannot read its {CONFIG_FILE}: {e}") from None
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{name}: its {CONFIG_FILE} is not a JSON object")
        return loaded

    def lineage(self) -> dict:
        """What the output metadata records about where the checkpoint came from."""
        return {"location": self.location, "kind": self.kind, "revision": self.revision}


def resolve_checkpoint(location: str, revision: str | None, storage: StorageOptions, *, role: str) -> Checkpoint:
    """The checkpoint at `location` for `role` ("model" or "glimpse"), checked to hold the role's
    files. Call on the driver: a hub id downloads into the HF cache here, and a revision is pinned."""
    name = f"--{role} {location}"
    required = REQUIRED_FILES[role]
    if "://" in location and protocol_of(location) != "file":
        if revision is not None:
            raise CheckpointError(f"{name}: a revision applies to hub ids only, not to {protocol_of(location)}://")
        listing = _remote_listing(location, storage, name)
        _check_files(set(listing), required, name, where=location)
        return Checkpoint(location, protocol_of(location), _listing_digest(listing))

    path = Path(location.removeprefix("file://")).expanduser()
    if path.exists() or _looks_like_path(location):
        if not path.exists():
            raise CheckpointError(f"{name}: no such directory")
        if not path.is_dir():
            raise CheckpointError(f"{name}: is a file, not a checkpoint directory")
        if revision is not None:
            raise CheckpointError(f"{name}: a revision applies to hub ids only, not to a local directory")
        path = path.resolve()
        _check_files({p.name for p in path.iterdir() if p.is_file()}, required, name, where=str(path))
        return Checkpoint(str(path), "local", None)

    if not HUB_ID.fullmatch(location):
        raise CheckpointError(f"{name}: not a local directory, a Hugging Face Hub id (org/name) or an s3:// URI")
    snapshot = _hub_snapshot(location, revision, name=name)
    _check_files({p.name for p in snapshot.iterdir()}, required, name, where=f"the Hub snapshot {snapshot}")
    return Checkpoint(location, "hub", snapshot.name)


def _looks_like_path(location: str) -> bool:
    return location.startswith((".", "/", "~")) or location.count("/") > 1


def _check_files(present: set[str], required: tuple[str, ...], name: str, where: str) -> None:
    missing = [f for f in required if f not in present]
    if missing:
        raise CheckpointError(f"{name}: {' and '.join(missing)} not found in {where}")


def _hub_snapshot(repo_id: str, revision: str | None, name: str) -> Path:
    """The repo's snapshot directory in the HF cache (named by its commit hash), downloaded there
    first if missing; the Hub's refusals, and a cache without it, as one line each."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return _hub_download(repo_id, revision)
    except LocalEntryNotFoundError as e:  # also a cached snapshot that lacks files
        raise CheckpointError(
            f"{name}: cannot reach the Hugging Face Hub and it is not in the local cache "
            f"({constants.HF_HUB_CACHE}); download it on a connected machine or set HF_HUB_CACHE"
        ) from e
    except GatedRepoError as e:
        raise CheckpointError(
            f"{name}: the repository is gated; accept its terms on the Hub, then log in (hf auth login or HF_TOKEN)"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"{name}: the Hugging Face Hub has no revision {revision!r} of this repository") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"{name}: no such repository on the Hugging Face Hub, or it is private and you are not logged in "
            "(hf auth login or HF_TOKEN)"
        ) from e
    except HFValidationError as e:
        raise CheckpointError(f"{name}: not a valid Hugging Face Hub id") from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"{name}: the Hugging Face Hub answered HTTP {e.response.status_code}") from e


def _hub_download(repo_id: str, revision: str | None) -> Path:
    """snapshot_download, from the HF cache alone when the Hub does not answer.

    A commit never changes, so a cached one is used without asking the Hub (workers pass the
    commit the driver resolved). Otherwise one quick request (repo_info) asks the Hub first:
    snapshot_download falls back on the cache by itself when it cannot connect, but it raises
    other broken connections (a proxy hanging up) as they are, and for a commit it lists the repo
    with retries that take ~20 s to give up. huggingface_hub reads HF_HUB_OFFLINE and
    HF_HUB_CACHE/HF_HOME itself. Every file of the repo is downloaded (no allow_patterns): repos
    name their weights and processor files in many ways, and unused extras cost disk only.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if revision is not None and COMMIT_HASH.fullmatch(revision):
        try:
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except LocalEntryNotFoundError:
            pass
    try:
        HfApi().repo_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except (HTTPError, OfflineModeIsEnabled):  # no answer, or the Hub failing (5xx): the cache may have it
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    return Path(snapshot_download(repo_id, revision=revision))


def _remote_listing(location: str, storage: StorageOptions, name: str) -> dict[str, str]:
    """{key relative to the prefix: object version} of every object under the prefix."""
    try:
        fs, root = filesystem_for(location, storage)
        root = root.rstrip("/")
        files = fs.find(root, detail=True)
    except UnsupportedURI as e:
        raise CheckpointError(f"{name}: {e}") from e
    except Exception as e:  # no bucket, access denied, or still failing after botocore's retries
        raise CheckpointError(f"{name}: cannot list it: {type(e).__name__}: {e}") from e
    listing = {
        key: object_version(info)
        for path, info in files.items()
        if info["type"] == "file" and (key := path[len(root) + 1 :]) and not key.endswith("/")
    }
    if not listing:
        raise CheckpointError(f"{name}: no objects under this prefix")
    return listing


def _listing_digest(listing: dict[str, str]) -> str:
    lines = "".join(f"{key} {version}\n" for key, version in sorted(listing.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def _fetch_remote(checkpoint: Checkpoint, storage: StorageOptions) -> Path:
    """The prefix's files in `$GLIMPSE_BATCH_CACHE/checkpoints/<revision>`, fetched once per node.

    Processes on a node take turns on an exclusive flock, so one fetches and the others then find
    the directory. Files land in a scratch directory that is renamed into place only when complete
    and still matching the resolved revision, so the cache never holds a partial or mixed copy.
    """
    cache = Path(os.environ.get("GLIMPSE_BATCH_CACHE", "~/.cache/glimpse-batch")).expanduser() / "checkpoints"
    target = cache / checkpoint.revision
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{checkpoint.revision}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
        if target.is_dir():
            return target
        for stale in cache.glob(f".{checkpoint.revision}-*"):  # left by a process that died fetching
            shutil.rmtree(stale, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{checkpoint.revision}-", dir=cache))
        try:
            listing = _remote_listing(checkpoint.location, storage, checkpoint.location)
            _check_unchanged(checkpoint, listing)
            fs, root = filesystem_for(checkpoint.location, storage)
            local = [scratch / key for key in listing]
            for path in local:
                path.parent.mkdir(parents=True, exist_ok=True)
            fs.get([f"{root.rstrip('/')}/{key}" for key in listing], [str(p) for p in local])
            _check_unchanged(checkpoint, _remote_listing(checkpoint.location, storage, checkpoint.location))
            os.rename(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _check_unchanged(checkpoint: Checkpoint, listing: dict[str, str]) -> None:
    if _listing_digest(listing) != checkpoint.revision:
        raise CheckpointError(
            f"{checkpoint.location}: the objects under this prefix changed after the job resolved it "
            f"(revision {checkpoint.revision}); rerun the job to use the new files"
        )


def transformers_config(raw: dict, name: str):
    """A checkpoint's config.json as transformers reads it (its defaults filled in)."""
    import json
    import tempfile

    from transformers import AutoConfig
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its warnings on odd keys would make a refusal two lines
    try:
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / CONFIG_FILE).write_text(json.dumps(raw))
            try:
                return AutoConfig.from_pretrained(directory)
            except Exception as e:  # transformers raises many kinds on a config it cannot use
                reason = " ".join(str(e).split())  # one line: some of transformers' messages span several
                raise CheckpointError(f"{name}: transformers cannot read its {CONFIG_FILE}: {reason}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
