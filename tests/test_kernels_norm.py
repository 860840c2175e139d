"""model/kernels/norm.py against F.layer_norm and F.gelu (on the CPU, in Triton's interpreter):
results at odd widths, torch's rounding of intermediates (in float16, which the interpreter rounds
like torch), and batch invariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from model.kernels.norm import add_layer_norm, gelu_mul_layer_norm, layer_norm  # noqa: E402


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5)


def torch_add_layer_norm(x, y, w, b, yw=None, yb=None):
    s = x + (ln(y, yw, yb) if yw is not None else y)
    return s, ln(s, w, b)


def torch_gelu_mul_layer_norm(gate_up, w, b):
    gate, up = gate_up.chunk(2, dim=-1)
    return ln(F.gelu(gate) * up, w, b)


def params(width: int, seed: int, dtype: torch.dtype = torch.float32):
    return randn(width, seed=seed, dtype=dtype), randn(width, seed=seed + 1, dtype=dtype)


@pytest.mark.parametrize("width", [40, 90])
def test_layer_norm(width: int) -> None:
    w, b = params(width, seed=1)
    x = randn(5, 1, width, seed=0) * 3 + 1  # (R, 1, C), as the decoder's x
    out = layer_norm(x, w, b)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ln(x, w, b), atol=2e-5, rtol=1e-5)
    # Rows with a stride (a column slice of a wider tensor).
    wide = randn(4, width + 7, seed=3)
    torch.testing.assert_close(layer_norm(wide[:, :width], w, b), ln(wide[:, :width], w, b))


@pytest.mark.parametrize("width", [40, 90])
@pytest.mark.parametrize("norm_y", [True, False])
def test_add_layer_norm(width: int, norm_y: bool) -> None:
    x, y = randn(6, width, seed=0), randn(6, width, seed=1) * 2
    w, b = params(width, seed=2)
    yw, yb = params(width, seed=4) if norm_y else (None, None)
    s, out = add_layer_norm(x, y, w, b, yw, yb)
    s_ref, out_ref = torch_add_layer_norm(x, y, w, b, yw, yb)
    torch.testing.assert_close(s, s_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [48, 90])
def test_gelu_mul_layer_norm(width: int) -> None:
    gate_up = randn(5, 2 * width, seed=0) * 2
    w, b = params(width, seed=1)
    out = gelu_mul_layer_norm(gate_up, w, b)
    assert out.shape == (5, width)
    torch.testing.assert_close(out, torch_gelu_mul_layer_norm(gate_up, w, b), atol=2e-5, rtol=1e-5)


def test_low_precision_rounds_like_torch() -> None:
    """In float16, each intermediate torch stores in the input dtype (LN_y(y), x + LN_y(y),
    gelu(gate), gelu(gate) · up) is rounded the same way, so the results agree with torch's
    nearly everywhere; without those roundings a sizeable share of them differ by an ulp.
    (bfloat16 cannot be checked here: the interpreter truncates float32 to bfloat16.)"""
    rows, width, glu_width = 16, 40, 90
    x, y = (
        randn(rows, width, seed=0, dtype=torch.half),
        randn(rows, width, seed=1, dtype=torch.half),
    )
    w, b = params(width, seed=2, dtype=torch.half)
    yw, yb = params(width, seed=4, dtype=torch.half)
    gate_up = randn(rows, 2 * glu_width, seed=6, dtype=torch.half)
    gw, gb = params(glu_width, seed=7, dtype=torch.half)
    pairs = [
        *zip(
            add_layer_norm(x, y, w, b, yw, yb),
            torch_add_layer_norm(x, y, w, b, yw, yb),
            strict=True,
        ),
        (gelu_mul_layer_norm(gate_up, gw, gb), torch_gelu_mul_layer_norm(gate_up, gw, gb)),
    ]
    for got, expected in pairs:
        assert got.dtype == torch.half
        torch.testing.assert_close(got, expected, atol=4e-3, rtol=2e-3)
        assert (got != expected).float().mean() < 0.01


def test_rows_are_batch_invariant() -> None:
    width, glu_width = 40, 90
    w, b = params(width, seed=0)
    yw, yb = params(width, seed=2)
    gw, gb = params(glu_width, seed=4)

    def run(x: torch.Tensor, y: torch.Tensor, gate_up: torch.Tensor) -> list[torch.Tensor]:
        return [
            layer_norm(x, w, b),
            *add_layer_norm(x, y, w, b),
            *add_layer_norm(x, y, w, b, yw, yb),
            gelu_mul_layer_norm(gate_up, gw, gb),
        ]

    x, y, gate_up = randn(1, width, seed=6), randn(1, width, seed=7), randn(1, 180, seed=8)
    alone = run(x, y, gate_up)
    for rows, at in ((5, 2), (9, 8)):
        others = (randn(rows, width, seed=rows), randn(rows, width, seed=rows + 1) * 10)
        other_gu = randn(rows, 2 * glu_width, seed=rows + 2) * 5

        def put(mine: torch.Tensor, theirs: torch.Tensor, at: int = at) -> torch.Tensor:
            return torch.cat([theirs[:at], mine, theirs[at:]])

        batch = run(put(x, others[0]), put(y, others[1]), put(gate_up, other_gu))
        for mine, batched in zip(alone, batch, strict=True):
            assert torch.equal(batched[at : at + 1], mine)
