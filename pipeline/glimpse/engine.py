"""Batched GlimpsePrune inference: prefill with a glimpse, prune, decode on the pruned cache.

The engine drives transformers' own modules (vision tower, decoder layers, rotary embedding,
rope index) and owns only what the method changes: the glimpse token, the attention read-out at
the selected layers, the VIP, and the shortened sequences and KV cache after the pruning layer.
What differs between model families (Qwen2.5-VL, Qwen3-VL) is asked of the model's adapter
(`pipeline.glimpse.architectures`). Baseline mode (no modules, or prune=False) runs the same code
without the glimpse.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image

from pipeline.glimpse.accounting import CostModel, RowCost, share_seconds
from pipeline.glimpse.architectures import architecture_of, architecture_of_checkpoint
from pipeline.glimpse.cache import PrunableKVCache
from pipeline.glimpse.inputs import add_deepstack, decoder_inputs, token_inputs
from pipeline.glimpse.masks import attention_mask
from pipeline.glimpse.modules import GlimpseModules
from pipeline.glimpse.prefixes import SharedPrefixes, prefill_chunks
from pipeline.glimpse.prompts import DTYPES, PreparedPrompt, PromptBuilder
from pipeline.glimpse.readout import glimpse_logits
from pipeline.glimpse.sampling import BatchSampler, SamplingParams
from pipeline.glimpse.selection import SelectionOptions, select_tokens


@dataclass
class Request:
    """One question about one or more images."""

    id: str
    images: list[Image.Image]
    question: str
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Result:
    """What a request got, and what it cost. batch_prefill_s and batch_decode_s are the batch's
    (decode until this request finished), not this request's: summing them over requests counts a
    batch many times. engine_s is this request's share of the batch's engine seconds."""

    id: str
    answer: str
    new_tokens: list[int]
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_new_tokens reached)
    pruned: bool
    n_visual_tokens: int
    n_visual_kept: int
    n_prompt_tokens: int
    n_prompt_tokens_kept: int
    n_generated_tokens: int
    batch_prefill_s: float
    batch_decode_s: float
    engine_s: float
    cost: RowCost
    prefix_shared_by: int = 1  # rows that prefilled this one's image prefix together, itself included
    kept_mask: list[int] | None = None  # with emit_masks: 1 per kept visual token, raster order per image
    image_grid_thw: list[list[int]] | None = None  # with emit_masks: each image's patch grid, to lay the mask out

    def columns(self) -> dict:
        """Flat fields, the cost's included, as result rows hold them."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cost"}
        return {**flat, **asdict(self.cost)}


@dataclass
class _Prefill:
    """State after prefill, rows in batch order. logits [B, vocab]; valid [B, T] (False at padding);
    next_pos [3, B] the position of the first new token; kept: per row, a keep mask over its visual tokens."""

    logits: torch.Tensor
    cache: PrunableKVCache
    valid: torch.Tensor
    next_pos: torch.Tensor
    kept: list[torch.Tensor]
    sharing: list[tuple[int, int]]  # per row: its shared prefix's tokens and the rows sharing it; (0, 1) alone


@dataclass
class _Early:
    """State after the early layers (0..K pruning, all of them not): hidden [B, T, H] and positions
    [3, B, T] of the sequence the later layers continue (when not pruning, only the last column
    matters); valid and image [B, T]; the cache; the glimpse's reads (pruning); the VIP's vision
    features and each image's grid, images in row order; the rows' sharing of prefixes; the
    DeepStack features [N, H] of the visual tokens at `image` (row-major), one per decoder layer
    they are added after (Qwen3-VL; empty otherwise)."""

    hidden: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    image: torch.Tensor
    cache: PrunableKVCache
    reads: list[torch.Tensor] | None
    selected: list[torch.Tensor]
    grids: list[list[int]]
    sharing: list[tuple[int, int]]
    deepstack: list[torch.Tensor]


@dataclass
class _Chunk:
    """Requests prefilled together: their indices, the state, the prefill seconds."""

    rows: list[int]
    state: _Prefill
    seconds: float


class GlimpseEngine:
    """Answers batches of requests with one model loaded once."""

    def __init__(
        self,
        model,
        prompts: PromptBuilder,
        modules: GlimpseModules | None = None,
        selection: SelectionOptions | None = None,
    ) -> None:
        self.model = model.eval()
        self.prompts = prompts
        self.modules = modules.to(device=model.device, dtype=model.dtype).eval() if modules is not None else None
        glimpse = modules.config if modules is not None else None
        self.selection = selection or SelectionOptions(
            threshold=glimpse.reduce_threshold if glimpse else 0.5,
            max_keep_ratio=glimpse.max_remain_ratio if glimpse else None,
            min_kept=glimpse.min_remain_num if glimpse else 1,
        )
        config = model.config
        self.architecture = architecture_of(config)
        self.text_config = getattr(config, "text_config", config)
        self.image_token_id = config.image_token_id
        self.merge_unit = config.vision_config.spatial_merge_size**2
        self.attn_implementation = self.text_config._attn_implementation or "sdpa"
        self.pad_token_id = prompts.tokenizer.pad_token_id or 0
        self.eos_token_ids = _eos_ids(model, prompts.tokenizer)
        self.language_model = model.model.language_model
        self.costs = CostModel(config, glimpse, model.dtype.itemsize)
        # Rows that share an image prefix prefill it once. Not with flash-attention: its varlen path
        # is not checked with padding inside a sequence (no GPU here to check it on).
        self.share_prefixes = self.attn_implementation != "flash_attention_2"
        self.images_encoded = 0  # images the vision tower has run on, over this engine's life
        self.glimpse_embeddings = None
        if self.modules is not None:
            with torch.inference_mode():
                self.glimpse_embeddings = self.modules.glimpse_embeddings()

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        glimpse: str | Path | None = None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        attn_implementation: str = "sdpa",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        selection: SelectionOptions | None = None,
    ) -> GlimpseEngine:
        """Loads a checkpoint of a supported family (hub id or local directory) and, optionally,
        glimpse modules."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if attn_implementation == "flash_attention_2" and dtype == "float32":
            raise ValueError(
                "attn_implementation='flash_attention_2' does not run in dtype='float32' (flash-attn takes "
                "float16 or bfloat16 only): load with dtype='bfloat16' or 'float16', or attn_implementation='sdpa'"
            )
        loaded = architecture_of_checkpoint(model).load(
            model, dtype=DTYPES[dtype], attn_implementation=attn_implementation, device=device
        )
        modules = GlimpseModules.load(glimpse, loaded.config) if glimpse is not None else None
        prompts = PromptBuilder.from_pretrained(model, loaded.config, min_pixels=min_pixels, max_pixels=max_pixels)
        return cls(loaded, prompts, modules, selection)

    @property
    def can_prune(self) -> bool:
        return self.modules is not None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prepare(self, request: Request) -> PreparedPrompt:
        return self.prompts(request.images, request.question)

    def generate(
        self, requests: list[Request], *, prune: bool = True, emit_masks: bool = False, batch_size: int = 8
    ) -> list[Result]:
        """Answers `requests` in order, `batch_size` at a time, batches formed by prompt length."""
        prompts = [self.prepare(r) for r in requests]
        results: dict[int, Result] = {}
        for group in length_batches([len(p.input_ids) for p in prompts], batch_size):
            answered = self.generate_prepared(
                [requests[i] for i in group], [prompts[i] for i in group], prune, emit_masks
            )
            results.update(zip(group, answered))
        return [results[i] for i in range(len(requests))]

    @torch.inference_mode()
    def generate_prepared(
        self,
        requests: list[Request],
        prompts: list[PreparedPrompt],
        prune: bool = True,
        emit_masks: bool = False,
        *,
        prefill_rows: int | None = None,
        cache_budget_bytes: int | None = None,
    ) -> list[Result]:
        """Answers `requests` (results in their order). Prefill runs `prefill_rows` requests at a
        time (default: all at once), shortest prompts first; each chunk's pruned cache joins one
        decode batch while the KV cache stays within `cache_budget_bytes` at its peak (see
        `_cache_peak`): pruning shrinks the cache, so the budget holds more rows.

        Invariant, so the budget holds at every moment (a single chunk over it alone excepted):
        between chunks, the waiting chunks' peak plus the next chunk's prefill cache fit."""
        prune = prune and self.can_prune
        sharing = self.image_token_id if self.share_prefixes else None
        chunks = prefill_chunks(prompts, sharing, prefill_rows or max(len(prompts), 1))
        results: list[Result | None] = [None] * len(requests)
        waiting: list[_Chunk] = []
        budget = math.inf if cache_budget_bytes is None else cache_budget_bytes
        for index, (rows, shared) in enumerate(chunks):
            upcoming = chunks[index + 1] if index + 1 < len(chunks) else None
            started = time.perf_counter()
            state = self._prefill([prompts[i] for i in rows], prune, shared)
            self._synchronize()
            prefilled = _Chunk(rows, state, time.perf_counter() - started)
            if waiting and self._cache_peak([*waiting, prefilled], requests) > budget:
                self._decode_chunks(waiting, requests, prompts, prune, emit_masks, results)
                waiting = []
            waiting.append(prefilled)
            if self._cache_peak(waiting, requests) + self._prefill_cache(upcoming, prompts) > budget:
                self._decode_chunks(waiting, requests, prompts, prune, emit_masks, results)
                waiting = []
        if waiting:
            self._decode_chunks(waiting, requests, prompts, prune, emit_masks, results)
        return results

    def _synchronize(self) -> None:
        """Waits for queued GPU work, so that a timer read next measures it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _cache_peak(self, chunks: list[_Chunk], requests: list[Request]) -> float:
        """KV-cache bytes at the peak of decoding `chunks` together: the merged decode cache
        (rows × (widest kept prompt + longest answer)), plus the one layer of the chunks' own
        caches that the merge (and a later drop of finished rows) holds beside it."""
        rows = [r for c in chunks for r in c.rows]
        width = max(c.state.valid.shape[1] for c in chunks) + max(requests[r].sampling.max_new_tokens for r in rows)
        merged = len(rows) * width * self.costs.kv_bytes_per_token()
        return merged * (1 + 1 / len(self.language_model.layers))

    def _prefill_cache(self, chunk: tuple[list[int], SharedPrefixes | None] | None, prompts) -> float:
        """KV-cache bytes the prefill of `chunk` may hold: unpruned, every layer, with the glimpse;
        a shared chunk's rows are as wide as its widest prefix and its widest own tokens together."""
        if chunk is None:
            return 0.0
        rows, shared = chunk
        width = max(len(prompts[r].input_ids) for r in rows) + 1
        if shared is not None:
            own = max(len(prompts[r].input_ids) - shared.lengths[u] for r, u in zip(rows, shared.of_row))
            width = max(shared.lengths) + own + 1
        return len(rows) * width * self.costs.kv_bytes_per_token()

    def _decode_chunks(self, chunks, requests, prompts, prune, emit_masks, results) -> None:
        """Decodes prefilled chunks as one batch and fills their rows of `results`."""
        rows = [r for c in chunks for r in c.rows]
        state = _merge([c.state for c in chunks], max(requests[r].sampling.max_new_tokens for r in rows))
        prefill_s = sum(c.seconds for c in chunks)
        tokens, reasons, decode_s = self._decode(state, [requests[r].sampling for r in rows])
        counts = [self._token_counts(prompts[r], kept) for r, kept in zip(rows, state.kept)]
        costs = [
            self.costs.row(_grid(prompts[r]), n_prompt, n_prompt_kept, len(new), prune, sharing)
            for r, (_, _, n_prompt, n_prompt_kept), new, sharing in zip(rows, counts, tokens, state.sharing)
        ]
        engine_s = share_seconds(prefill_s, [c.prefill_flops for c in costs], decode_s)
        for slot, (r, new, (n_visual, n_kept, n_prompt, n_prompt_kept)) in enumerate(zip(rows, tokens, counts)):
            results[r] = Result(
                id=requests[r].id,
                answer=self.prompts.tokenizer.decode(new, skip_special_tokens=True),
                new_tokens=new,
                finish_reason=reasons[slot],
                pruned=prune,
                n_visual_tokens=n_visual,
                n_visual_kept=n_kept,
                n_prompt_tokens=n_prompt,
                n_prompt_tokens_kept=n_prompt_kept,
                n_generated_tokens=len(new),
                batch_prefill_s=prefill_s,
                batch_decode_s=decode_s[slot],
                engine_s=engine_s[slot],
                cost=costs[slot],
                prefix_shared_by=state.sharing[slot][1],
                kept_mask=state.kept[slot].int().tolist() if emit_masks and prune else None,
                image_grid_thw=prompts[r].image_grid_thw.tolist() if emit_masks and prune else None,
            )

    def _token_counts(self, prompt: PreparedPrompt, kept: torch.Tensor) -> tuple[int, int, int, int]:
        """Visual tokens before and after pruning, prompt tokens before and after."""
        n_visual, n_kept, n_prompt = (
            int((prompt.input_ids == self.image_token_id).sum()),
            int(kept.sum()),
            len(prompt.input_ids),
        )
        return n_visual, n_kept, n_prompt, n_prompt - n_visual + n_kept

    # ---- prefill -------------------------------------------------------------------------------

    def _prefill(self, prompts: list[PreparedPrompt], prune: bool, shared: SharedPrefixes | None) -> _Prefill:
        """Layers 0..K over each row's prompt (and the glimpse token), then, pruned, the VIP's choice
        of visual tokens and layers K+1.. over the kept ones; unpruned, every layer over the prompt.
        Rows that share an image prefix (`shared`) run it once: see `_early_shared`."""
        early = range(self.modules.config.reduce_layer + 1) if prune else range(len(self.language_model.layers))
        state = self._early_shared(prompts, shared, early, prune) if shared else self._early(prompts, early, prune)
        if not prune:
            kept = [torch.ones(int(n), dtype=torch.bool, device=self.device) for n in state.image.sum(dim=1)]
            return self._finish_prefill(state.hidden, state.positions, state.valid, state.cache, kept, state.sharing)
        return self._prune(state, early)

    def _early(self, prompts: list[PreparedPrompt], early: range, prune: bool) -> _Early:
        """The early layers over each row's whole prompt, the glimpse token last when pruning."""
        inputs = decoder_inputs(self.model, prompts, self.pad_token_id, self._vision_blocks(prune))
        self.images_encoded += inputs.grid.shape[0]
        embeds, positions, valid, image = inputs.embeds, inputs.positions, inputs.valid, inputs.image
        if prune:
            embeds, positions, valid, image = self._with_glimpse(embeds, positions, valid, image)
        cache, reads = PrunableKVCache(len(self.language_model.layers)), [] if prune else None
        deepstack = inputs.vision.deepstack
        hidden = self._run_layers(early, embeds, positions, valid, cache, reads, deepstack=(image, deepstack))
        grids = inputs.grid.tolist()
        sharing = [(0, 1)] * len(prompts)
        return _Early(hidden, positions, valid, image, cache, reads, inputs.vision.selected, grids, sharing, deepstack)

    def _early_shared(self, prompts: list[PreparedPrompt], shared: SharedPrefixes, early: range, prune: bool) -> _Early:
        """The early layers with each shared prefix run once: the vision tower and the prefix's keys
        and values, then each row's own tokens (its question, the glimpse) against them. The rows'
        sequences are their prefix (left-padded to the widest) followed by their own tokens
        (left-padded too): padding in the middle, masked out like padding on the left."""
        heads = [_head(prompts[owner], length) for owner, length in zip(shared.owners, shared.lengths)]
        head = decoder_inputs(self.model, heads, self.pad_token_id, self._vision_blocks(prune))
        self.images_encoded += head.grid.shape[0]
        head_cache = PrunableKVCache(len(self.language_model.layers))
        head_hidden = self._run_layers(
            early, head.embeds, head.positions, head.valid, head_cache, deepstack=(head.image, head.vision.deepstack)
        )

        of_row = torch.tensor(shared.of_row, device=self.device)
        tails = [len(p.input_ids) - shared.lengths[u] for p, u in zip(prompts, shared.of_row)]
        width = max(tails)
        whole = token_inputs(self.model, prompts, self.pad_token_id)  # right-aligned: each tail is last
        valid = (
            torch.arange(width, device=self.device)[None, :] >= width - torch.tensor(tails, device=self.device)[:, None]
        )
        ids = whole.ids[:, -width:].masked_fill(~valid, self.pad_token_id)
        positions = whole.positions[:, :, -width:]
        embeds = self.language_model.embed_tokens(ids)
        image = torch.zeros_like(valid)
        if prune:
            embeds, positions, valid, image = self._with_glimpse(embeds, positions, valid, image)

        cache = PrunableKVCache(len(self.language_model.layers))
        for i in early:
            keys, values = head_cache.layer(i)
            cache.update(keys.index_select(0, of_row), values.index_select(0, of_row), i)
        valid = torch.cat([head.valid.index_select(0, of_row), valid], dim=1)
        image = torch.cat([head.image.index_select(0, of_row), image], dim=1)
        reads = [] if prune else None
        hidden = self._run_layers(early, embeds, positions, valid, cache, reads)
        positions = torch.cat([head.positions.index_select(1, of_row), positions], dim=2)
        if prune:  # layers K+1.. go on with the kept prefix tokens, so their hidden states join the rows'
            hidden = torch.cat([head_hidden.index_select(0, of_row), hidden], dim=1)
        per_prefix = head.image.sum(dim=1).tolist()
        starts = [sum(per_prefix[:u]) for u in range(len(per_prefix))]
        tokens = torch.cat([torch.arange(starts[u], starts[u] + per_prefix[u]) for u in shared.of_row]).to(self.device)
        selected = [features.index_select(0, tokens) for features in head.vision.selected]
        deepstack = [features.index_select(0, tokens) for features in head.vision.deepstack]
        grids = [g for p in prompts for g in p.image_grid_thw.tolist()]
        return _Early(hidden, positions, valid, image, cache, reads, selected, grids, shared.sharing(), deepstack)

    def _vision_blocks(self, prune: bool) -> list[int]:
        """The vision blocks the VIP is conditioned on: kept from the tower's run when pruning."""
        return self.modules.config.selected_visual_layers if prune else []

    def _with_glimpse(self, embeds, positions, valid, image):
        """The glimpse token appended after the last prompt token, at the next position on all three axes."""
        batch = embeds.shape[0]
        return (
            torch.cat([embeds, self.glimpse_embeddings[0].expand(batch, 1, -1)], dim=1),
            torch.cat([positions, positions[:, :, -1:] + 1], dim=2),
            torch.cat([valid, valid.new_ones(batch, 1)], dim=1),
            torch.cat([image, image.new_zeros(batch, 1)], dim=1),
        )

    def _prune(self, state: _Early, early: range) -> _Prefill:
        """The VIP's choice of each row's visual tokens from the glimpse's reads; the glimpse token and
        the pruned tokens leave the sequence and the cache, and the later layers run on the rest."""
        feats = torch.stack(state.reads, dim=2).flatten(2)  # (B, T, layers·heads), layer-major
        logits = self.modules.attn_fuser(
            feats[state.image].to(self.modules.attn_fuser.attn_in_proj.weight.dtype),
            state.selected,
            self.architecture.vip_grid(state.grids, self.modules.config.spatial_merge_size),
        )
        kept = [select_tokens(row, self.selection) for row in logits.split(state.image.sum(1).tolist())]

        # Drop the glimpse token and the pruned visual tokens; kept tokens keep their positions.
        keep = state.valid.clone()
        keep[:, -1] = False
        keep[state.image] = torch.cat(kept)
        index, valid = _left_packed(keep)
        cache = state.cache
        cache.gather_columns(index, early)
        hidden = state.hidden.gather(1, index[:, :, None].expand(-1, -1, state.hidden.shape[-1]))
        positions = state.positions.gather(2, index[None].expand(3, -1, -1))
        late = range(early.stop, len(self.language_model.layers))
        # DeepStack features still to be added after the pruning layer go with their kept tokens.
        image = state.image.gather(1, index) & valid
        deepstack = [features[torch.cat(kept)] for features in state.deepstack]
        hidden = self._run_layers(
            late, hidden, positions, valid, cache, add_glimpse=False, deepstack=(image, deepstack)
        )
        return self._finish_prefill(hidden, positions, valid, cache, kept, state.sharing)

    def _run_layers(self, indices, hidden, positions, valid, cache, reads=None, add_glimpse=True, deepstack=None):
        """Runs decoder layers `indices` over the whole sequence. With `reads`, appends the glimpse
        token's attention logits [B, heads, T] at each selected layer; with glimpse modules loaded and
        `add_glimpse`, adds g_l to the last (glimpse) position before each layer l > 0 in le_layers.
        `deepstack` = (image [B, T], features): after layer i, features[i] are added at the image
        positions, for each i that has features."""
        image, features = deepstack or (None, [])
        rotary = self.language_model.rotary_emb(hidden, positions)
        mask = attention_mask(valid, hidden.shape[1], self.attn_implementation, hidden.dtype)
        selected = self.modules.config.selected_layers if reads is not None else ()
        use_logits = self.modules is not None and self.modules.config.use_attention_logits
        last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
        for i in indices:
            layer = self.language_model.layers[i]
            if add_glimpse and reads is not None and i > 0 and i in self.glimpse_embeddings:
                hidden[:, -1] += self.glimpse_embeddings[i]
            query = self.architecture.glimpse_query(layer, hidden, rotary, last) if i in selected else None
            hidden = _layer_output(
                layer(hidden, attention_mask=mask, position_embeddings=rotary, past_key_values=cache)
            )
            if i < len(features):
                hidden = add_deepstack(hidden, image, features[i])
            if query is not None:
                reads.append(glimpse_logits(layer, query, cache.layer(i)[0], valid, use_logits))
        return hidden

    def _finish_prefill(self, hidden, positions, valid, cache, kept, sharing) -> _Prefill:
        """The first token's logits from the last position's hidden state."""
        logits = self.model.lm_head(self.language_model.norm(hidden[:, -1]))
        return _Prefill(logits, cache, valid, positions[:, :, -1] + 1, kept, sharing)

    # ---- decode --------------------------------------------------------------------------------

    def _decode(self, state: _Prefill, params: list[SamplingParams]):
        """Generates on the merged cache, writing each step's keys and values in place. The host
        reads each step's tokens one step late, while the device already runs the next step, so
        no step waits on a device-to-host copy; a step is launched only if some row may need it.
        Finished rows ride along (their tokens ignored) until a quarter of the batch has finished,
        then leave it in one copy. Returns per row: new token ids, finish reason, decode seconds
        until it finished."""
        started = time.perf_counter()
        batch = len(params)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        seconds = [0.0] * batch
        finished = [False] * batch
        sampler, step = BatchSampler(params, self.device), 0  # step: the answer position being chosen
        owners = list(range(batch))  # batch slot → request index
        cache, valid, next_pos = state.cache, state.valid, state.next_pos
        chosen = sampler(state.logits, step)
        while True:
            read_chosen, chosen_by = _copy_to_host(chosen), owners
            if any(not finished[r] and len(tokens[r]) + 1 < params[r].max_new_tokens for r in owners):
                step += 1
                chosen = self._decode_step(chosen, cache, valid, next_pos, sampler, step)
                next_pos = next_pos + 1
            for r, token in zip(chosen_by, read_chosen()):
                if finished[r]:
                    continue
                tokens[r].append(token)
                stop = token in self.eos_token_ids and not params[r].ignore_eos
                if stop:
                    reasons[r] = "stop"
                if stop or len(tokens[r]) >= params[r].max_new_tokens:
                    seconds[r], finished[r] = time.perf_counter() - started, True
            live = [slot for slot, r in enumerate(owners) if not finished[r]]
            if not live:
                return tokens, reasons, seconds
            if len(live) <= 3 * len(owners) // 4:
                keep = torch.tensor(live, device=self.device)
                cache.select_rows(keep)
                valid, next_pos, chosen = valid[keep], next_pos[:, keep], chosen[keep]
                owners = [owners[slot] for slot in live]
                sampler = BatchSampler([params[r] for r in owners], self.device)

    def _decode_step(self, chosen, cache, valid, next_pos, sampler: BatchSampler, step: int) -> torch.Tensor:
        """One token for every row: `chosen` [B] in, the tokens at answer position `step` [B] out
        (marks the new column valid). Runs SDPA where flash-attention was asked for: transformers'
        flash-attention path unpads the cache at every layer of every step (a host sync and a copy
        of the whole cache), where SDPA reads it in place with a boolean mask. Not measured here
        (no GPU, no flash-attn); prefill keeps flash-attention."""
        used = cache.lengths[0] + 1
        valid[:, used - 1] = True
        hidden = self.language_model.embed_tokens(chosen[:, None])
        rotary = self.language_model.rotary_emb(hidden, next_pos[:, :, None])
        implementation = _DECODE_ATTENTION.get(self.attn_implementation, self.attn_implementation)
        mask = attention_mask(valid[:, :used], 1, implementation, hidden.dtype)
        with _attention(self.text_config, implementation):
            for layer in self.language_model.layers:
                hidden = _layer_output(
                    layer(hidden, attention_mask=mask, position_embeddings=rotary, past_key_values=cache)
                )
        logits = self.model.lm_head(self.language_model.norm(hidden[:, -1]))
        return sampler(logits, step)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped `batch_size` at a time in order of length, so a batch pads little."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _merge(states: list[_Prefill], extra: int) -> _Prefill:
    """Prefilled chunks as one decode batch: rows in order, right-aligned, `extra` columns free."""
    cache = PrunableKVCache.merged([s.cache for s in states], extra)
    width = cache.lengths[0]
    valid = states[0].valid.new_zeros(sum(s.valid.shape[0] for s in states), width + extra)
    start = 0
    for s in states:
        end = start + s.valid.shape[0]
        valid[start:end, width - s.valid.shape[1] : width] = s.valid
        start = end
    return _Prefill(
        logits=torch.cat([s.logits for s in states]),
        cache=cache,
        valid=valid,
        next_pos=torch.cat([s.next_pos for s in states], dim=1),
        kept=[k for s in states for k in s.kept],
        sharing=[share for s in states for share in s.sharing],
    )


def _copy_to_host(tokens: torch.Tensor):
    """Starts copying `tokens` to the host without waiting for the device; returns a function that
    waits for that copy alone (not for work queued after it) and gives the tokens as a list."""
    if tokens.device.type != "cuda":
        return tokens.tolist
    host = tokens.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return read


# Decode attends one query per row to the whole cache: what each implementation decodes with.
_DECODE_ATTENTION = {"flash_attention_2": "sdpa"}


@contextmanager
def _attention(config, implementation: str):
    """Runs the decoder layers with `implementation`: their attention reads the config's at every call."""
    before = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


def _layer_output(output):
    """Decoder layers return a tensor in transformers 5.x and a tuple before."""
    return output[0] if isinstance(output, tuple) else output


def _left_packed(keep: torch.Tensor):
    """keep [B, T] bool → (index [B, T'] of kept columns, left-padded; valid [B, T'])."""
    counts = keep.sum(dim=1)
    width = int(counts.max())
    valid = torch.arange(width, device=keep.device)[None, :] >= (width - counts)[:, None]
    # Stable sort puts dropped columns first and kept ones after, in order; take the last `width`.
    # The padding slots of a shorter row point at dropped columns: finite values, masked out.
    return torch.sort(keep.int(), dim=1, stable=True).indices[:, -width:], valid


def _head(prompt: PreparedPrompt, length: int) -> PreparedPrompt:
    """The prompt's first `length` tokens, with all its images (they lie within them)."""
    return PreparedPrompt(prompt.input_ids[:length], prompt.pixel_values, prompt.image_grid_thw)


def _grid(prompt: PreparedPrompt) -> list[tuple[int, int, int]]:
    return [tuple(g) for g in prompt.image_grid_thw.tolist()]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
