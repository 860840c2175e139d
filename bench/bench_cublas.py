"""Which of torch's CUDA kernels keep a row's result independent of the other rows (issue 4)?

For each kernel a decoder step used before model/kernels/ (Mega's shapes, bfloat16): is a row's
result the same alone and in a batch, and what do 128-row blocks cost a product? These findings
set `CUDA_BLOCK_ROWS` (model/batch_ops.py), the torch operations' blocks on a GPU.

    python -m bench.bench_cublas
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.bench_gpu import RESULTS, event_ms
from model.config import VQGAN_CODE_COUNT


def kernels_case() -> None:
    """Is a row's result independent of the other rows, on this GPU, for each kernel a step
    uses (Mega's shapes, bfloat16)? And the cost of blocking the matrix products."""
    torch.manual_seed(0)
    embed, glu, heads, head_dim = 2048, 4096, 32, 64

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    checks: dict[str, bool] = {}
    for name, (out_features, in_features) in {
        "linear E→E": (embed, embed),
        "linear E→G": (glu, embed),
        "linear G→E": (embed, glu),
        "lm_head": (VQGAN_CODE_COUNT, embed),
    }.items():
        weight, x = randn(out_features, in_features) / in_features**0.5, randn(2048, in_features)
        full = F.linear(x, weight)
        for m in (2, 32, 128, 256, 1024):
            checks[f"{name}: first {m} rows alone"] = torch.equal(F.linear(x[:m], weight), full[:m])
        checks[f"{name}: rows 100..131 alone"] = torch.equal(
            F.linear(x[100:132], weight), full[100:132]
        )
    q, k, v = (
        randn(2048, heads, 1, head_dim),
        randn(2048, heads, 256, head_dim),
        randn(2048, heads, 256, head_dim),
    )
    positions = torch.randint(0, 64, (2048,), device="cuda")

    def self_attention(rows: int, length: int) -> Tensor:
        mask = torch.arange(length, device="cuda") <= positions[:rows, None]
        return F.scaled_dot_product_attention(
            q[:rows], k[:rows, :, :length], v[:rows, :, :length], attn_mask=mask[:, None, None]
        )

    late = torch.randint(129, 256, (2048,), device="cuda")  # more than 128 positions filled
    late_mask = (torch.arange(256, device="cuda") <= late[:, None])[:, None, None]

    def spelled_out(rows: int) -> Tensor:  # as BatchDecoder._self_attention does it
        scores = torch.matmul(q[:rows], k[:rows].transpose(-1, -2)).float() * head_dim**-0.5
        scores = scores.masked_fill(~late_mask[:rows], float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v[:rows])

    def sdpa_late() -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=late_mask)

    checks["SDPA, over 128 positions: repeatable"] = torch.equal(sdpa_late(), sdpa_late())
    checks["spelled-out attention: repeatable"] = torch.equal(spelled_out(2048), spelled_out(2048))
    checks["spelled-out attention: 32 rows vs 2048"] = torch.equal(
        spelled_out(32), spelled_out(2048)[:32]
    )
    base = self_attention(32, 64)
    checks["self-attention: 32 rows vs 2048"] = torch.equal(self_attention(2048, 64)[:32], base)
    checks["self-attention: length 64 vs 128 (masked)"] = torch.equal(self_attention(32, 128), base)
    checks["self-attention: length 64 vs 256, 2048 rows"] = torch.equal(
        self_attention(2048, 256)[:32], base
    )
    qc, kc, vc = (
        randn(128, heads, 16, head_dim),
        randn(128, heads, 64, head_dim),
        randn(128, heads, 64, head_dim),
    )
    text_mask = (torch.arange(64, device="cuda") < torch.randint(2, 64, (128, 1), device="cuda"))[
        :, None, None
    ]
    cross = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=text_mask)
    checks["cross-attention: 2 text rows vs 128"] = torch.equal(
        F.scaled_dot_product_attention(qc[:2], kc[:2], vc[:2], attn_mask=text_mask[:2]), cross[:2]
    )
    norm = torch.nn.LayerNorm(embed, device="cuda", dtype=torch.bfloat16)
    x = randn(2048, embed)
    checks["layer norm: 32 rows vs 2048"] = torch.equal(norm(x[:32]), norm(x)[:32])
    checks["gelu: 32 rows vs 2048"] = torch.equal(F.gelu(x[:32]), F.gelu(x)[:32])
    for name, same in checks.items():
        print(f"{'same' if same else 'DIFFERS'}: {name}")
    RESULTS["kernel row invariance"] = checks

    weight, x = randn(glu, embed) / embed**0.5, randn(2048, embed)
    for block in (32, 128, 256, 2048):
        blocks = x.split(block)
        ms = event_ms(lambda: torch.cat([F.linear(b, weight) for b in blocks]))  # noqa: B023
        RESULTS[f"fc0 2048 rows in blocks of {block} ms"] = ms
        print(f"fc0, 2048 rows in blocks of {block}: {ms:.3f} ms")


if __name__ == "__main__":
    kernels_case()
    print(json.dumps(RESULTS, indent=1))
