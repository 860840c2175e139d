"""The batch decoder's step operations (model/batch_ops.py): fused weights, the self-check, and
the Triton operations (model/kernels/) on the small model.

Without a GPU the kernels run in Triton's interpreter (float32; tests/conftest.py sets
TRITON_INTERPRET=1), so this checks their arithmetic inside the real step, not their speed."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch
from torch import Tensor

from model.bart import DecoderLayer
from model.batch import BatchDecoder
from model.batch_ops import TorchOps
from model.config import IMAGE_TOKEN_COUNT
from model.generate import SamplingSettings
from model.min_dalle import MinDalle
from tests.test_batch import SPECS, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(small_models_root: Path) -> MinDalle:
    return MinDalle(small_models_root, device="cpu", is_mega=False, is_verbose=False)


def test_fused_weights_give_the_separate_products_logits(model: MinDalle) -> None:
    """q/k/v and fc0/fc1 as one product each: the step's logits are the decoder's own (separate
    products), within float32 rounding, and the layers' weights are views of the fused ones."""
    engine = BatchDecoder(model)
    spec = SPECS[1]  # a 2×2 grid
    engine.add(spec.job_id, spec.text, spec.seed, spec.grid_size, spec.settings)
    job = engine._jobs[spec.job_id]
    with torch.inference_mode():
        fused = engine.paged.logits([(job.page, 1)], 0)
        text = model._text_context(spec.text)  # rows grouped by text row, as in the page
        rows = 2 * spec.grid_size**2
        caches = engine.decoder.new_caches(rows, torch.float32, torch.device("cpu"))
        prev = torch.full((rows,), 16383)
        separate = engine.decoder(prev, 0, caches, text, 16384)
    torch.testing.assert_close(fused[:rows], separate, rtol=1e-4, atol=1e-4)
    layers = cast("list[DecoderLayer]", engine.decoder.layers)
    for layer, weights in zip(layers, engine.paged.fused, strict=True):
        attn, glu = layer.self_attn, layer.glu
        assert attn.q_proj.weight.data_ptr() == weights.qkv.data_ptr()
        assert (
            attn.v_proj.weight.data_ptr()
            == weights.qkv[2 * attn.q_proj.weight.shape[0] :].data_ptr()
        )
        assert glu.fc1.weight.data_ptr() == weights.fc01[glu.fc0.weight.shape[0] :].data_ptr()


class RowCountDependent(TorchOps):
    """Operations whose products change with the batch's row count, as a kernel whose
    configuration depends on it would."""

    name = "row-count-dependent"

    def linear(self, x: Tensor, weight: Tensor) -> Tensor:
        out = super().linear(x, weight)
        return out.roll(1, dims=1) if x.shape[0] > self.block_rows else out


def test_self_check_passes_the_torch_operations_and_drops_a_batch_dependent_set(
    model: MinDalle, caplog: pytest.LogCaptureFixture
) -> None:
    engine = BatchDecoder(model)
    assert engine.self_check(rows=40, steps=4)
    assert engine.paged.kernels == "torch"

    engine.paged.ops = RowCountDependent(16, page_attention=False, per_job_gelu=True)
    with caplog.at_level("WARNING", logger="model.batch"):
        assert not engine.self_check(rows=40, steps=4)
    assert "falling back to 'torch'" in caplog.text and "other tokens among 40 rows" in caplog.text
    assert engine.paged.kernels == "torch"
    assert run(engine, {0: [SPECS[0]]})[SPECS[0].job_id].shape == (1, IMAGE_TOKEN_COUNT)


# -- the Triton operations, in the interpreter -------------------------------------------


def first_logits(model: MinDalle, kernels: str) -> torch.Tensor:
    engine = BatchDecoder(model, kernels=kernels)
    engine.add("job", "a fox in the snow", 3, 2, SamplingSettings())
    job = engine._jobs["job"]
    with torch.inference_mode():
        return engine.paged.logits([(job.page, 1)], 0)[: job.rows]


def test_triton_step_gives_the_torch_step_s_logits(model: MinDalle) -> None:
    pytest.importorskip("triton")
    torch.testing.assert_close(
        first_logits(model, "triton"), first_logits(model, "torch"), rtol=1e-4, atol=1e-4
    )


def test_triton_step_passes_the_self_check_and_decodes(model: MinDalle) -> None:
    """A job's tokens alone and among others are the same, so the engine keeps the Triton
    operations; greedy, they decode the torch operations' tokens."""
    pytest.importorskip("triton")
    engine = BatchDecoder(model, kernels="triton")
    assert engine.self_check(rows=40, steps=3)
    assert engine.paged.kernels == "triton"
    torch_engine = BatchDecoder(model, kernels="torch")
    for decoder in (engine, torch_engine):
        decoder.add("job", "a fox in the snow", 3, 1, SamplingSettings(1.0, 1, 16.0))
        for _ in range(3):
            decoder.step()
    assert torch.equal(engine.tokens("job"), torch_engine.tokens("job"))
