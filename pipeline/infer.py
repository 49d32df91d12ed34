"""GPU stage: a Ray Data callable class around the engine, loaded once per actor."""

from __future__ import annotations

import logging
import time
import uuid

import pyarrow as pa
import torch

from pipeline import faults
from pipeline.checkpoints import Checkpoint
from pipeline.control import in_control_sample
from pipeline.failures import RowFailure, describe
from pipeline.glimpse.engine import GlimpseEngine, Request, Result
from pipeline.glimpse.prompts import PreparedPrompt
from pipeline.glimpse.sampling import SamplingParams
from pipeline.keep_masks import pack
from pipeline.metrics import JobMetrics
from pipeline.progress import batch_counts
from pipeline.scoring import score_columns
from pipeline.storage import StorageOptions
from schemas import CARRIED_COLUMNS, RESULT_SCHEMA, align

log = logging.getLogger(__name__)


class Answerer:
    """`map_batches` callable: PREPARED_SCHEMA rows → RESULT_SCHEMA rows, one out per row in. The
    model runs on the actor's GPU if it has one, in `dtype` (the job resolves "auto" for both stages)."""

    def __init__(
        self,
        model: Checkpoint,
        glimpse: Checkpoint | None,
        storage: StorageOptions,
        prune: bool,
        dtype: str,
        attn: str = "sdpa",
        selection: dict | None = None,
        control_fraction: float = 0.0,
        control_ids: frozenset[str] = frozenset(),
        progress=None,
        prefill_rows: int | None = None,
        kv_cache_gib: float | None = None,
        ignore_eos: bool = False,
        keep_masks: bool = False,
        metric: str | None = None,
    ) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.engine = GlimpseEngine.from_pretrained(
            model.local_dir(storage),
            glimpse.local_dir(storage) if glimpse is not None else None,
            dtype=dtype,
            device=device,
            attn_implementation=attn,
        )
        if self.engine.can_prune:
            self.engine.selection = self.engine.selection.overridden(**(selection or {}))
        self.prune = prune and self.engine.can_prune
        self.model_name = model.location
        self.glimpse_name = glimpse.location if self.prune else None
        self.control_fraction = control_fraction if self.prune else 0.0
        self.control_ids = control_ids if self.prune else frozenset()
        self.keep_masks, self.metric = keep_masks, metric
        self.progress = progress
        self.metrics = JobMetrics()
        self.actor = uuid.uuid4().hex  # this actor, to the progress counter
        self.ignore_eos = ignore_eos
        self.batching = dict(prefill_rows=prefill_rows, cache_budget_bytes=cache_budget_bytes(kv_cache_gib, device))
        self.engine_s = 0.0  # wall seconds inside the engine during the current call

    def __call__(self, batch: pa.Table) -> pa.Table:
        started, self.engine_s, encoded = time.time(), 0.0, self.engine.images_encoded
        faults.before_batch()
        rows = batch.to_pylist()
        for row in rows:
            if row["error"] is None:
                self._check_answer_fits(row)
        todo = [row for row in rows if row["error"] is None]
        results = self._answer(todo, self.prune) if todo else {}
        encoded = self.engine.images_encoded - encoded  # the answers' images, not the control runs'
        out = [self._output(row, results.get(row["id"])) for row in rows]
        control = [
            row for row in todo if row["id"] in self.control_ids or in_control_sample(row["id"], self.control_fraction)
        ]
        if control:
            self._add_control(control, {row["id"]: row for row in out})
        for row in out:
            row.update(
                score_columns(row["references"], row.get("answer"), row.get("control_unpruned_answer"), self.metric)
            )
        table = align(out, RESULT_SCHEMA)
        counts = {**batch_counts(out), "images_encoded": encoded}
        self.metrics.record(counts, self.engine_s)
        if self.progress is not None:
            self.progress.add.remote(counts, started, time.time(), self.engine_s, self.actor)
        return table

    def _check_answer_fits(self, row: dict) -> None:
        """A row whose answer alone would pass the KV-cache budget fails alone, as `invalid_row`."""
        budget = self.batching["cache_budget_bytes"]
        needed = int(row["max_new_tokens"]) * self.engine.costs.kv_bytes_per_token()
        if budget is not None and needed > budget:
            row["error_code"] = "invalid_row"
            row["error"] = (
                f"max_new_tokens {row['max_new_tokens']} needs {needed} bytes of KV cache, "
                f"over the budget of {budget} (--kv-cache-gib)"
            )

    def _answer(self, rows: list[dict], prune: bool) -> dict[str, Result | Exception]:
        """Answers the rows together. Out of memory: each half again, down to single rows. Any other
        failure: each row alone, so that one bad row fails alone.

        The retries run after the `except` block, not in it: a caught exception's traceback holds
        the frames of the failed call, and with them its tensors, so inside the block the memory
        the failed batch took could not be freed for the halves."""
        requests = [_request(row, self.ignore_eos) for row in rows]
        prompts = [PreparedPrompt.from_columns(row) for row in rows]
        try:
            faults.before_engine(len(rows))
            return {r.id: r for r in self._generate(requests, prompts, prune, emit_masks=self.keep_masks)}
        except torch.OutOfMemoryError as e:
            failure, out_of_memory = str(e), True  # the message only: the exception holds the traceback
        except Exception as e:
            if len(rows) == 1:
                log.warning("row %s failed: %s", rows[0]["id"], e)
                return {rows[0]["id"]: e}
            failure, out_of_memory = f"{type(e).__name__}: {e}", False
        del requests, prompts
        if out_of_memory:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(rows) == 1:
                return {rows[0]["id"]: RowFailure("out_of_memory", f"out of memory alone in a batch: {failure}")}
            log.warning("batch of %d ran out of memory; splitting it in two", len(rows))
            half = len(rows) // 2
            return {**self._answer(rows[:half], prune), **self._answer(rows[half:], prune)}
        log.warning("batch of %d failed (%s); answering its rows one by one", len(rows), failure)
        out = {}
        for row in rows:
            out.update(self._answer([row], prune))
        return out

    def _generate(
        self, requests: list[Request], prompts: list[PreparedPrompt], prune: bool, emit_masks: bool
    ) -> list[Result]:
        """The engine call, its wall time added to this call's engine seconds (busy time)."""
        started = time.perf_counter()
        try:
            return self.engine.generate_prepared(requests, prompts, prune, emit_masks, **self.batching)
        finally:
            self.engine_s += time.perf_counter() - started

    def _add_control(self, rows: list[dict], outputs: dict[str, dict]) -> None:
        """Runs the control rows again, pruned and unpruned, as two batches of the same shape, so
        that their measured engine seconds compare like with like."""
        pruned, unpruned = self._answer(rows, prune=True), self._answer(rows, prune=False)
        for row in rows:
            with_pruning, without = pruned[row["id"]], unpruned[row["id"]]
            if isinstance(with_pruning, Exception) or isinstance(without, Exception):
                continue
            outputs[row["id"]].update(
                control_pruned_engine_s=with_pruning.engine_s,
                control_unpruned_engine_s=without.engine_s,
                control_unpruned_answer=without.answer,
                control_unpruned_generated_tokens=without.n_generated_tokens,
            )

    def _output(self, row: dict, result: Result | Exception | None) -> dict:
        out = {k: row[k] for k in CARRIED_COLUMNS}
        out.update(model=self.model_name, glimpse_modules=self.glimpse_name, pruned=self.prune)
        if isinstance(result, Exception):
            out["error_code"], out["error"] = describe(result)
        elif result is not None:
            out.update({k: v for k, v in result.columns().items() if k in RESULT_SCHEMA.names and k not in out})
            if result.kept_mask is not None:
                out["kept_mask"] = pack(result.kept_mask)
                out["image_grid_thw"] = [n for grid in result.image_grid_thw for n in grid]
        return out


def cache_budget_bytes(kv_cache_gib: float | None, device: str) -> int | None:
    """The decode KV-cache budget: as given; on a GPU by default 70% of the memory free once the
    model is loaded (the rest is left to prefill activations); on a CPU none (one decode batch)."""
    if kv_cache_gib is not None:
        return int(kv_cache_gib * 2**30)
    if device == "cuda":
        return int(0.7 * torch.cuda.mem_get_info()[0])
    return None


def _request(row: dict, ignore_eos: bool) -> Request:
    # Images were already turned into pixel values by the CPU stage.
    sampling = SamplingParams(max_new_tokens=int(row["max_new_tokens"]), ignore_eos=ignore_eos)
    return Request(row["id"], [], row["question"], sampling)
