"""One typed job config: what to read, which model, how to prune, how to batch, where to write.

Loadable from YAML (`--config job.yaml`) and overridable from the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.storage import StorageOptions

DEFAULT_PROMPT = "Describe the image."
SAMPLES_DIR = Path(__file__).parent / "samples"


class Options(BaseModel):
    """Typed options a job reads from YAML and the command line, checked with errors that name
    each option and never quote its value."""

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides):
        """The YAML's options overlaid with `overrides`. Errors never quote the file's values:
        a mis-indented secret must not end up in a terminal or a log."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ValueError(f"cannot read the config file {path}: {e.strerror}") from None
        except yaml.MarkedYAMLError as e:
            where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
            raise ValueError(f"{path} is not valid YAML{where}: {e.problem}") from None
        except yaml.YAMLError:
            raise ValueError(f"{path} is not valid YAML") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of job options")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.validated(data, source=str(path))

    @classmethod
    def validated(cls, data: dict, source: str = "the job options"):
        """model_validate, with errors that name each option and what is wrong, never its value."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = [_problem(error) for error in e.errors(include_url=False, include_input=False)]
            raise ValueError(f"{source}: " + "; ".join(problems)) from None


class JobConfig(Options):
    """A VQA / captioning job. Exactly one input (manifest, images prefix, dataset) or none: the
    bundled sample images. No model: a tiny random-weight one is built in `tiny_model_dir`."""

    model_config = ConfigDict(extra="forbid")

    manifest: str | None = Field(None, description="Parquet, JSONL or CSV manifest (local path or URI)")
    images: str | None = Field(None, description="caption every image under this prefix (local or URI)")
    dataset: str | None = Field(None, description="a `datasets` dataset saved with save_to_disk")
    image_column: str = Field("image", description="dataset column holding the image")
    question_column: str = Field("question", description="dataset column holding the question, if any")
    id_column: str = Field("id", description="dataset column holding the id; absent: the row index")
    prompt: str = Field(DEFAULT_PROMPT, min_length=1, description="question for rows that have none")
    output: str = Field("out", description="output directory (local or URI) for Parquet and _summary.json")

    model: str | None = Field(
        None,
        description="Qwen2.5-VL or Qwen3-VL checkpoint: hub id, directory or s3:// prefix; none: the tiny demo model",
    )
    model_revision: str | None = Field(None, description="hub revision of the model: branch, tag or commit")
    glimpse: str | None = Field(
        None, description="GlimpsePrune modules: hub id, directory or s3:// prefix; none with no model: the tiny ones"
    )
    glimpse_revision: str | None = Field(None, description="hub revision of the modules: branch, tag or commit")
    prune: bool = Field(True, description="prune with the glimpse modules (false: baseline)")
    tiny_model_dir: str = Field(".cache/tiny", description="where the demo's tiny model is built")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("auto", description="auto: bf16 on GPU")
    attn: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="attention implementation")
    threshold: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="keep tokens scored above this, 0-1 (none: the modules')"
    )
    max_keep_ratio: float | None = Field(
        None, gt=0, le=1, description="keep at most this share of visual tokens, in (0, 1]"
    )
    min_kept: int | None = Field(None, ge=0, description="keep at least this many visual tokens")
    keep_ratio: float | None = Field(
        None, gt=0, le=1, description="benchmarks: keep exactly this share of visual tokens (e.g. 0.074)"
    )
    ignore_eos: bool = Field(False, description="benchmarks: generate exactly max_new_tokens, past end-of-sequence")
    max_new_tokens: int = Field(64, ge=1, description="answer length for rows that set none")
    min_pixels: int | None = Field(None, ge=1, description="image processor min_pixels (default: checkpoint's)")
    max_pixels: int | None = Field(None, ge=1, description="image processor max_pixels (default: checkpoint's)")
    max_image_bytes: int = Field(64 << 20, ge=1, description="objects larger than this are refused unread")
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="images with more pixels are refused from their header, before decoding"
    )
    max_question_tokens: int = Field(1024, ge=1, description="longer questions are refused")

    batch_size: int | None = Field(
        None,
        ge=1,
        description="rows per engine call (none: 256 with GPUs, 8 without); they are sorted by prompt length, "
        "prefilled prefill-rows at a time and decoded together as far as the KV-cache budget allows",
    )
    prefill_rows: int | None = Field(None, ge=1, description="rows per prefill chunk (none: 8 with GPUs, all without)")
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="decode KV-cache budget per actor "
        "(none: 70 percent of the GPU memory free after loading; no budget on CPU)",
    )
    num_actors: str = Field(
        "1",
        pattern=r"^[0-9]+(:[0-9]+)?$",
        description="answering actors, one engine each: N, or MIN:MAX for a pool that autoscales",
    )
    gpus_per_actor: float | None = Field(None, ge=0, description="none: 1 when the cluster has GPUs, else 0")
    rows_per_block: int = Field(
        1000,
        ge=1,
        description="rows per block: the unit of streaming, retries, resuming and output files "
        "(a larger prepare_batch_size merges blocks)",
    )
    prepare_batch_size: int = Field(16, ge=1, description="rows per CPU preparation task")
    group_by_image: bool = Field(
        False,
        description="sort each block's rows by their images, so questions about one image share its prefill",
    )
    repartition_by_image: bool = Field(
        False,
        description="first put every question about an image in one block (a Ray Data all-to-all shuffle); "
        "implies group_by_image",
    )
    prepare_cpus: float = Field(
        0.5,
        gt=0,
        description="CPUs reserved per preparation task (fetching is mostly waiting; 1 on a GPU-less "
        "cluster would make Ray Data run preparation inside the answering actors)",
    )

    control_fraction: float = Field(
        0.0, ge=0, le=1, description="share of rows also run unpruned, to measure savings and agreement"
    )
    control_rows: int | None = Field(
        None, ge=1, description="run this many rows also unpruned (a fixed sample by id), instead of a fraction"
    )
    metric: Literal["vqa", "exact", "anls", "contains"] | None = Field(
        None, description="how answers are scored against the references (none: vqa with 3+ references, else exact)"
    )
    keep_masks: bool = Field(False, description="store each row's kept mask (bit-packed) for the report's gallery")
    hourly_usd: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="price of one answering device per hour (a GPU; a CPU on GPU-less runs), for the costs",
    )
    progress_interval_s: float = Field(30.0, gt=0, allow_inf_nan=False, description="seconds between progress lines")
    max_failed_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="above this share of failed rows the job exits non-zero (output and summary still written)",
    )
    lease_timeout_s: float = Field(
        120.0,
        gt=0,
        description="S3 outputs: a lease whose heartbeat (every quarter of this) is older is a dead job's, "
        "and is taken over",
    )

    storage: StorageOptions = Field(default_factory=StorageOptions, description="S3 options")

    @field_validator("manifest", "images", "dataset", "output", "model", "glimpse", "tiny_model_dir")
    @classmethod
    def not_empty(cls, value: str | None) -> str | None:
        """An empty location (an unset shell variable) is a mistake, never "use the default"."""
        if value is not None and not value.strip():
            raise ValueError("is empty")
        return value

    @field_validator("num_actors", mode="before")
    @classmethod
    def actors_as_text(cls, value):
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @property
    def actor_pool(self) -> tuple[int, int]:
        """(min, max) answering actors."""
        low, _, high = self.num_actors.partition(":")
        return int(low), int(high or low)

    @model_validator(mode="after")
    def one_input(self) -> JobConfig:
        given = [name for name in ("manifest", "images", "dataset") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"give one input, not {given}")
        if self.glimpse and not self.model:
            raise ValueError("glimpse modules need their model: set model too")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} is over max_pixels {self.max_pixels}")
        if self.control_rows and self.control_fraction:
            raise ValueError("give control_rows or control_fraction, not both")
        if (self.control_rows or self.control_fraction) and not self.prune:
            raise ValueError("control rows compare pruned answers with unpruned ones: they need pruning (prune true)")
        low, high = self.actor_pool
        if not 1 <= low <= high:
            raise ValueError(f"num_actors {self.num_actors}: need 1 <= MIN <= MAX")
        for name in ("model", "glimpse"):
            if getattr(self, f"{name}_revision") and not getattr(self, name):
                raise ValueError(f"{name}_revision needs {name}")
        return self


def _problem(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "options"
    if error["type"] == "value_error":  # our own checks: their message as written
        message = str(error["ctx"]["error"])
        return f"{where}: {message}" if error["loc"] else message
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown option (is it indented under the right section?)"
    return f"{where}: {error['msg']}"
