"""The training job's options: data, base model, modules to start from, recipe, resources, output.

Defaults are the release's published 7B recipe: AdamW at lr 1e-4, cosine decay after 10% warmup,
gradient accumulation 8, batch 1, loss weights loc 1 (Dice 1, BCE 0.1) and le 1, clipping at 1.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from pipeline.config import Options
from pipeline.storage import StorageOptions


class TrainConfig(Options):
    model_config = ConfigDict(extra="forbid")

    manifest: str | None = Field(
        None, description="Parquet, JSONL or CSV rows with id, image, question, answer, boxes (local or URI)"
    )
    dataset: str | None = Field(None, description="a `datasets` dataset saved with save_to_disk, same columns")
    image_column: str = Field("image", description="dataset column holding the image")
    id_column: str = Field("id", description="dataset column holding the id; absent: the row index")
    output: str = Field(..., description="where checkpoints/, glimpse/ and _train_summary.json go (local or URI)")

    model: str = Field(..., description="Qwen2.5-VL or Qwen3-VL checkpoint: hub id, directory or s3:// prefix")
    model_revision: str | None = Field(None, description="hub revision of the model: branch, tag or commit")
    init_glimpse: str | None = Field(None, description="start from these modules (hub id, directory or s3://)")
    fresh: bool = Field(False, description="start from freshly initialised modules, shaped for the model")
    layer: int | None = Field(
        None, ge=0, description="fresh: the decoder layer the glimpse is read and tokens pruned at (published)"
    )
    read_layers: str | None = Field(
        None,
        pattern=r"^[0-9]+(,[0-9]+)*$",
        description="fresh: the decoder layers whose glimpse attention the VIP reads, e.g. 0,1,2 (default: layer)",
    )
    vision_blocks: str | None = Field(
        None, pattern=r"^[0-9]+(,[0-9]+)*$", description="fresh: the vision blocks the VIP sees, e.g. 31,23,15,7"
    )
    fuse_size: int = Field(256, ge=1, description="fresh: the VIP's attention-feature width")
    cond_size: int = Field(512, ge=1, description="fresh: the VIP's vision-condition width")
    vip_heads: int = Field(4, ge=1, description="fresh: the VIP's attention heads")
    dtype: Literal["float32", "bfloat16", "auto"] = Field("auto", description="base model dtype; auto: bf16 on GPU")
    attn: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="attention implementation")
    min_pixels: int | None = Field(None, ge=1, description="image processor min_pixels (default: checkpoint's)")
    max_pixels: int | None = Field(None, ge=1, description="image processor max_pixels (default: checkpoint's)")

    steps: int = Field(..., ge=1, description="optimizer steps")
    batch_size: int = Field(1, ge=1, description="examples per worker per forward")
    grad_accum: int = Field(8, ge=1, description="forwards per optimizer step")
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False, description="peak learning rate (AdamW)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps warming up before cosine decay")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, allow_inf_nan=False, description="gradient clipping norm")
    loc_weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="weight of the localisation loss")
    dice_weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="weight of Dice in it")
    bce_weight: float = Field(0.1, ge=0, allow_inf_nan=False, description="weight of BCE in it")
    le_weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="weight of the answer's cross-entropy")
    seed: int = Field(0, description="seed of the fresh init and of the data order")

    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel, DDP over the modules)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    prepare_batch_size: int = Field(8, ge=1, description="rows per CPU preparation task")
    max_image_bytes: int = Field(64 << 20, ge=1, description="objects larger than this are refused unread")
    max_image_pixels: int = Field(64_000_000, ge=1, description="images with more pixels are refused from the header")

    log_every: int = Field(10, ge=1, description="steps between progress lines")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept under OUTPUT/checkpoints")

    storage: StorageOptions = Field(default_factory=StorageOptions, description="S3 options")

    @field_validator("manifest", "dataset", "output", "model", "init_glimpse")
    @classmethod
    def not_empty(cls, value: str | None) -> str | None:
        """An empty location (an unset shell variable) is a mistake, never "use the default"."""
        if value is not None and not value.strip():
            raise ValueError("is empty")
        return value

    @model_validator(mode="after")
    def consistent(self) -> TrainConfig:
        if bool(self.manifest) == bool(self.dataset):
            raise ValueError("give one input: manifest or dataset")
        if bool(self.init_glimpse) == self.fresh:
            raise ValueError("give init_glimpse (modules to start from) or fresh, one of them")
        shaped = [name for name in ("layer", "read_layers", "vision_blocks") if getattr(self, name) is not None]
        if shaped and not self.fresh:
            raise ValueError(f"{', '.join(shaped)} shape fresh modules only; init_glimpse has its own")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} is over max_pixels {self.max_pixels}")
        if self.read_layers and self.layer is not None and max(self.read_layer_list) > self.layer:
            raise ValueError(f"read_layers {self.read_layers} must not come after layer {self.layer}")
        if self.loc_weight == 0 and self.le_weight == 0:
            raise ValueError("loc_weight and le_weight are both 0: nothing to train")
        return self

    @property
    def read_layer_list(self) -> list[int] | None:
        return [int(b) for b in self.read_layers.split(",")] if self.read_layers else None

    @property
    def vision_block_list(self) -> list[int] | None:
        return [int(b) for b in self.vision_blocks.split(",")] if self.vision_blocks else None

    @property
    def rows_per_step(self) -> int:
        """Examples one optimizer step consumes, over all workers."""
        return self.batch_size * self.grad_accum * self.num_workers

    def model_dtype(self, on_gpu: bool) -> str:
        return ("bfloat16" if on_gpu else "float32") if self.dtype == "auto" else self.dtype
