"""Writes a tiny random-weight Qwen2.5-VL or Qwen3-VL checkpoint (and glimpse modules) for tests and the demo.

No download is possible where this project is tested, so the tokenizer is trained here on a small
built-in text, and weights are random but seeded: the text is meaningless, the arithmetic is real.

    python -m pipeline.synthetic.tiny --out DIR [--architecture qwen3_vl] [--seed N] [--no-glimpse]

writes DIR/base (the Hugging Face layout) and DIR/glimpse (the published module format). For the
default spec, DIR/glimpse holds the trained modules shipped in `pipeline/samples/tiny-glimpse`
(`python -m pipeline.synthetic.demo_modules` rebuilds them), so the demo's pruning is learned;
other specs get random modules.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "what is in the picture",
    "describe the image in detail",
    "how many people are there",
    "answer with a single word",
    "the color of the car is red blue green yellow black white",
    "a cat sits on a mat next to a dog",
    "where is the cat",
    "a photo of a street with cars and people",
    "the sky is blue and the grass is green",
    "is there a person in this image yes no",
    "what does the sign say",
    "a small house by the lake under the mountains",
]


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the model; the defaults are the tiny model, shaped like the shared glimpse-tiny
    fixture. `presets.py` holds real-size shapes built the same way (random weights)."""

    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int | None = None  # None: 2 × hidden
    vision_depth: int = 4
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int | None = None  # None: 2 × vision_hidden
    full_attention_blocks: tuple[int, ...] | None = None  # None: block 1 and the last
    vocab_size: int = 400  # the tokenizer's size; the embedding is at least `embedding_rows`
    embedding_rows: int = 0
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    seed: int = 0
    architecture: str = "qwen2_5_vl"  # or "qwen3_vl"
    # Qwen3-VL only: the vision blocks whose merged outputs DeepStack adds after decoder layers
    # 0, 1, …; None: the first three blocks (all of them in a shorter tower)
    deepstack_blocks: tuple[int, ...] | None = None
    head_dim: int | None = None  # Qwen3-VL only; None: hidden / heads
    position_embeddings: int = 64  # Qwen3-VL only: the learned position grid (a square: 8 × 8)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with Qwen's special tokens (ids 0..6) and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


PATCH_SIZE = {"qwen2_5_vl": 14, "qwen3_vl": 16}
SPECIAL_IDS = dict(image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)


def _text_sizes(spec: TinySpec, vocab_size: int) -> dict:
    """What both families' text configs take alike from `spec`."""
    return dict(
        vocab_size=max(vocab_size, spec.embedding_rows),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate or 2 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=32768,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )


def _vision_sizes(spec: TinySpec) -> dict:
    """What both families' vision configs take alike from `spec`: patches merged 2×2, in pairs of frames."""
    return dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
        num_heads=spec.vision_heads,
        out_hidden_size=spec.hidden,
        patch_size=PATCH_SIZE[spec.architecture],
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )


def build_config(spec: TinySpec, vocab_size: int):
    """A config of `spec`'s family and sizes, with the special token ids of `build_tokenizer`."""
    if spec.architecture == "qwen3_vl":
        return _qwen3_vl_config(spec, vocab_size)
    if spec.architecture != "qwen2_5_vl":
        raise ValueError(f"architecture must be one of {sorted(PATCH_SIZE)}, not {spec.architecture!r}")
    from transformers import Qwen2_5_VLConfig

    half = spec.hidden // spec.heads // 2
    # M-RoPE splits the rotary half-dim over (t, h, w) as Qwen does: 1/4, 3/8, 3/8.
    t = half // 4
    h = (half - t) // 2
    return Qwen2_5_VLConfig(
        text_config=_text_sizes(spec, vocab_size)
        | dict(
            rms_norm_eps=1e-5,
            tie_word_embeddings=spec.tie_word_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": spec.rope_theta,
                "mrope_section": [t, h, half - t - h],
            },
        ),
        vision_config=_vision_sizes(spec)
        | dict(window_size=112, fullatt_block_indexes=list(spec.full_attention_blocks or [1, spec.vision_depth - 1])),
        **SPECIAL_IDS,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def _qwen3_vl_config(spec: TinySpec, vocab_size: int):
    """Qwen3-VL: interleaved M-RoPE over (t, h, w) sections of the rotary half-dim (Qwen3-VL's
    own split is 24, 20, 20 of 64), 16-pixel patches, DeepStack from `spec.deepstack_blocks`."""
    from transformers import Qwen3VLConfig

    head_dim = spec.head_dim or spec.hidden // spec.heads
    half = head_dim // 2
    h = w = 5 * half // 16
    deepstack = spec.deepstack_blocks or tuple(range(min(3, spec.vision_depth)))
    return Qwen3VLConfig(
        text_config=_text_sizes(spec, vocab_size)
        | dict(
            head_dim=head_dim,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": spec.rope_theta,
                "mrope_section": [half - h - w, h, w],
                "mrope_interleaved": True,
            },
        ),
        vision_config=_vision_sizes(spec)
        | dict(num_position_embeddings=spec.position_embeddings, deepstack_visual_indexes=list(deepstack)),
        **SPECIAL_IDS,
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def build_model(spec: TinySpec, vocab_size: int, dtype=None, device=None, attn_implementation: str = "sdpa"):
    """Random seeded weights of `spec`'s shape, made directly on `device` in `dtype`."""
    import torch

    from pipeline.glimpse.architectures import architecture

    config = build_config(spec, vocab_size)
    torch.manual_seed(spec.seed)
    with torch.device(device or "cpu"):
        model = (
            architecture(spec.architecture)
            .model_class()
            ._from_config(config, dtype=dtype or torch.float32, attn_implementation=attn_implementation)
        )
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.eval()


def build_glimpse_modules(
    model_config,
    seed: int,
    reduce_layer: int | None = None,
    selected_visual_layers: list[int] | None = None,
    fuse_size: int = 32,
    cond_size: int = 32,
):
    """Random glimpse modules in the published format, for this model. Defaults: pruning at the
    second-to-last layer, the VIP conditioned on the middle and last vision blocks."""
    import torch

    from pipeline.glimpse.modules import GlimpseModules
    from pipeline.training.recipe import glimpse_config

    text = model_config.text_config
    depth = model_config.vision_config.depth
    config = glimpse_config(
        model_config,
        layer=max(0, text.num_hidden_layers - 2) if reduce_layer is None else reduce_layer,
        vision_blocks=selected_visual_layers or sorted({depth - 1, depth // 2 - 1}, reverse=True),
        fuse_size=fuse_size,
        cond_size=cond_size,
    )
    torch.manual_seed(seed + 1)
    modules = GlimpseModules(config)
    torch.nn.init.normal_(modules.learnable_embeddings, 0.0, 0.02)
    return modules


def build_image_processor(max_pixels: int, architecture: str = "qwen2_5_vl"):
    """The family's image processor settings (Qwen2.5-VL: 14-pixel patches and CLIP's mean and
    std; Qwen3-VL: 16-pixel patches, mean and std 0.5), patches merged 2×2, from 4 merged tokens
    up to `max_pixels`."""
    from pipeline.glimpse.prompts import pil_image_processor_class

    patch = PATCH_SIZE[architecture]
    least = 4 * (2 * patch) ** 2
    normalisation = {} if architecture == "qwen2_5_vl" else dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return pil_image_processor_class()(
        min_pixels=least,
        max_pixels=max_pixels,
        size={"shortest_edge": least, "longest_edge": max_pixels},
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        **normalisation,
    )


TRAINED_GLIMPSE = Path(__file__).resolve().parent.parent / "samples" / "tiny-glimpse"
BASE_DIGEST_FILE = "base.sha256"  # beside the trained modules: the tiny base they were trained on


def base_digest(base: str | Path) -> str:
    """SHA-256 of the base checkpoint's weights file."""
    import hashlib

    return hashlib.sha256((Path(base) / "model.safetensors").read_bytes()).hexdigest()


def trained_modules_for(base: str | Path) -> Path | None:
    """The shipped trained modules when they were trained on exactly this base, else None."""
    marker = TRAINED_GLIMPSE / BASE_DIGEST_FILE
    if not marker.exists() or marker.read_text().strip() != base_digest(base):
        return None
    return TRAINED_GLIMPSE


def write_tiny_checkpoint(out: str | Path, spec: TinySpec = TinySpec(), with_glimpse: bool = True) -> Path:
    """Writes out/base (and out/glimpse); returns `out`. Same spec, same files."""
    import shutil

    out = Path(out)
    base = out / "base"
    tokenizer = build_tokenizer(spec.vocab_size)
    model = build_model(spec, len(tokenizer))
    model.save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    build_image_processor(max_pixels=200704, architecture=spec.architecture).save_pretrained(base)
    if with_glimpse:
        trained = trained_modules_for(base) if spec == TinySpec() else None
        if trained is not None:
            shutil.copytree(trained, out / "glimpse", ignore=shutil.ignore_patterns(BASE_DIGEST_FILE))
        else:
            build_glimpse_modules(model.config, spec.seed).save(out / "glimpse")
    return out


def ensure_tiny_checkpoint(out: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """The tiny checkpoint at `out`, built there first if missing or if its modules are not the
    ones `write_tiny_checkpoint` now writes (a cache from before trained modules shipped). Safe
    when several processes race (Ray workers on one node): each builds in a private folder and
    the first rename wins; the spec is seeded, so every build is the same."""
    import os
    import shutil
    import tempfile

    out = Path(out)
    if _current(out, spec):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    stale = Path(tempfile.mkdtemp(prefix=f".{out.name}-stale-", dir=out.parent))
    try:
        write_tiny_checkpoint(scratch, spec)
        if out.exists():
            os.replace(out, stale / "old")
        os.replace(scratch, out)
    except OSError:
        if not _current(out, spec):
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return out


def _current(out: Path, spec: TinySpec) -> bool:
    """Whether `out` holds a complete build, with the trained modules when they apply to its base."""
    modules = out / "glimpse" / "new_modules_gp.pt"
    if not modules.exists():
        return False
    trained = trained_modules_for(out / "base") if spec == TinySpec() else None
    return trained is None or modules.read_bytes() == (trained / "new_modules_gp.pt").read_bytes()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.synthetic.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to write base/ and glimpse/ into")
    parser.add_argument(
        "--architecture", choices=sorted(PATCH_SIZE), default="qwen2_5_vl", help="the model family (default qwen2_5_vl)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--no-glimpse", action="store_true", help="write the base checkpoint only")
    args = parser.parse_args(argv)
    spec = TinySpec(seed=args.seed, architecture=args.architecture)
    path = write_tiny_checkpoint(args.out, spec, with_glimpse=not args.no_glimpse)
    print(f"tiny checkpoint written to {path}")


if __name__ == "__main__":
    main()
