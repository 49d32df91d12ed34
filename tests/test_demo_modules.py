"""The demo's shipped modules: trained for the tiny base built here, and pruning that follows the question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.glimpse.engine import GlimpseEngine, Request
from pipeline.glimpse.objective import ref_token_mask
from pipeline.glimpse.sampling import SamplingParams
from pipeline.synthetic.tiny import TRAINED_GLIMPSE, ensure_tiny_checkpoint, trained_modules_for

SAMPLES = Path(__file__).resolve().parents[1] / "pipeline" / "samples"


@pytest.fixture(scope="module")
def demo_tiny(tmp_path_factory) -> Path:
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("demo") / "tiny")


def test_the_shipped_modules_fit_the_tiny_base_this_machine_builds(demo_tiny):
    """The digest beside the modules is of the base they were trained on; a torch or transformers
    that initialised the seeded base differently would leave the demo with random modules."""
    assert trained_modules_for(demo_tiny / "base") == TRAINED_GLIMPSE
    shipped = (TRAINED_GLIMPSE / "new_modules_gp.pt").read_bytes()
    assert (demo_tiny / "glimpse" / "new_modules_gp.pt").read_bytes() == shipped
    assert len(shipped) < 1 << 20  # small enough to ship in the package


def test_a_cache_from_before_the_trained_modules_is_rebuilt(demo_tiny, tmp_path):
    import shutil

    from pipeline.synthetic.tiny import build_glimpse_modules

    stale = tmp_path / "tiny"
    shutil.copytree(demo_tiny, stale)
    from transformers import AutoConfig

    build_glimpse_modules(AutoConfig.from_pretrained(stale / "base"), seed=0).save(stale / "glimpse")
    ensure_tiny_checkpoint(stale)
    assert (stale / "glimpse" / "new_modules_gp.pt").read_bytes() == (
        TRAINED_GLIMPSE / "new_modules_gp.pt"
    ).read_bytes()


def test_the_demo_prunes_to_the_shape_the_question_names(demo_tiny):
    """Each bundled shapes image is asked about two shapes: what is kept moves with the question,
    and overlaps the named shape's box more than the other's."""
    cases = [c for c in json.loads((SAMPLES / "cases.json").read_text()) if "boxes" in c]
    assert len(cases) == 4
    engine = GlimpseEngine.from_pretrained(demo_tiny / "base", demo_tiny / "glimpse")
    requests = []
    for case in cases:
        with Image.open(SAMPLES / case["images"][0]) as image:
            requests.append(Request(case["id"], [image.copy()], case["question"], SamplingParams(max_new_tokens=1)))
    results = {r.id: r for r in engine.generate(requests, emit_masks=True)}
    by_image: dict[str, list[dict]] = {}
    for case in cases:
        by_image.setdefault(case["images"][0], []).append(case)
    for first, second in by_image.values():
        kept = {c["id"]: torch.tensor(results[c["id"]].kept_mask, dtype=torch.bool) for c in (first, second)}
        grid = results[first["id"]].image_grid_thw[0]
        boxes = {c["id"]: ref_token_mask(c["boxes"], (grid[1] // 2, grid[2] // 2)) for c in (first, second)}
        assert not kept[first["id"]].equal(kept[second["id"]])
        for asked, other in ((first, second), (second, first)):
            mask = kept[asked["id"]]
            assert (mask & boxes[asked["id"]]).sum() > (mask & boxes[other["id"]]).sum(), asked["id"]
