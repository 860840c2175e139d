"""GPU benchmark of the decoder step's Triton kernels (model/kernels/attention.py and norm.py).

DALL·E Mega sizes in bfloat16 (H=32 heads of D=64, T=256 cached positions, E=2048, GLU 4096),
at R=32 and R=2048 decoder rows:

- decode_attention with every row at length 64, 128 or 256, and at staggered lengths (uniform in
  1..256), against the torch path of model/pages.py (matmul, masked float32 softmax, matmul) over
  the page's furthest length and over the whole cache: median ms (L2 flushed before each call,
  triton.testing.do_bench) and the effective TB/s of the bytes each reads; its closeness to the
  torch path and to a float32 reference; batch invariance (a row alone, among other rows, and
  the first 32 rows as their own batch, torch.equal); a CUDA-graph capture and replay with new
  lengths written in place;
- add_layer_norm (with and without the norm of y), gelu_mul_layer_norm and layer_norm against
  the torch op sequences they replace: ms, closeness, row invariance.

    python -m bench.bench_kernels_step --out kernels.json
"""

from __future__ import annotations

import argparse
import functools
import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

HEADS, HEAD_DIM, POSITIONS = 32, 64, 256
EMBED, GLU = 2048, 4096
ROW_COUNTS = (32, 2048)
DTYPE = torch.bfloat16


def say(*parts: object) -> None:
    print(*parts, flush=True)


def median_ms(fn: Callable[[], Any]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def graph_ms(fn: Callable[[], Any]) -> float:
    """Median ms of `fn` replayed from a CUDA graph (no Python or launch overhead per kernel)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up (compilation) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay)


def diff(a: Tensor, b: Tensor) -> dict[str, float]:
    a, b = a.float(), b.float()
    return {
        "max_abs": (a - b).abs().max().item(),
        "mean_abs": (a - b).abs().mean().item(),
        "unequal_share": (a != b).float().mean().item(),
    }


def torch_attention(q: Tensor, keys: Tensor, values: Tensor, lengths: Tensor, length: int):
    """model/pages.py's page attention over the first `length` positions, masked per row."""
    rows, heads, head_dim = q.shape
    mask = (torch.arange(length, device=q.device) < lengths[:, None])[:, None, None, :]
    scores = torch.matmul(q[:, :, None], keys[:, :, :length].transpose(-1, -2)).float()
    scores = scores.mul_(head_dim**-0.5).masked_fill_(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(weights, values[:, :, :length]).view(rows, heads, head_dim)


def reference_attention(q: Tensor, keys: Tensor, values: Tensor, lengths: Tensor) -> Tensor:
    """Float32 reference, computed in chunks of rows to bound memory."""
    outs = []
    for start in range(0, q.shape[0], 256):
        rows = slice(start, start + 256)
        k, v = keys[rows].float(), values[rows].float()
        scores = torch.einsum("rhd,rhtd->rht", q[rows].float(), k) * q.shape[-1] ** -0.5
        unfilled = torch.arange(k.shape[2], device=q.device)[None, :] >= lengths[rows, None]
        weights = scores.masked_fill(unfilled[:, None, :], float("-inf")).softmax(-1)
        outs.append(torch.einsum("rht,rhtd->rhd", weights, v))
    return torch.cat(outs)


def bench_attention() -> dict[str, Any]:
    from model.kernels.attention import SPLIT, decode_attention

    results: dict[str, Any] = {"split": SPLIT}
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows_max = max(ROW_COUNTS)
    shape = (rows_max, HEADS, POSITIONS, HEAD_DIM)
    keys = torch.randn(shape, generator=generator, device="cuda", dtype=DTYPE)
    values = torch.randn(shape, generator=generator, device="cuda", dtype=DTYPE)
    q_all = torch.randn(rows_max, HEADS, HEAD_DIM, generator=generator, device="cuda", dtype=DTYPE)
    size = keys.element_size()
    staggered = torch.randint(1, POSITIONS + 1, (rows_max,), generator=generator, device="cuda")
    for rows in ROW_COUNTS:
        q, k, v = q_all[:rows], keys[:rows], values[:rows]  # row prefixes, as a page passes them
        for case in ("64", "128", "256", "staggered"):
            name = f"R{rows}_len{case}"
            try:
                if case == "staggered":
                    lengths = staggered[:rows].clone()
                else:
                    lengths = torch.full((rows,), int(case), device="cuda", dtype=torch.long)
                furthest = int(lengths.max())
                filled = int(lengths.sum())
                kernel_bytes = 2 * filled * HEADS * HEAD_DIM * size + 2 * q.numel() * size
                torch_bytes = 2 * rows * HEADS * furthest * HEAD_DIM * size + 2 * q.numel() * size
                full_bytes = 2 * rows * HEADS * POSITIONS * HEAD_DIM * size + 2 * q.numel() * size
                out = decode_attention(q, k, v, lengths)
                expected = torch_attention(q, k, v, lengths, furthest)
                reference = reference_attention(q, k, v, lengths)
                entry: dict[str, Any] = {"furthest": furthest, "mean_length": filled / rows}
                kernel = functools.partial(decode_attention, q, k, v, lengths)
                entry["kernel_ms"] = median_ms(kernel)
                entry["kernel_graph_ms"] = graph_ms(kernel)
                entry["torch_ms"] = median_ms(
                    functools.partial(torch_attention, q, k, v, lengths, furthest)
                )
                entry["torch_full_T_ms"] = median_ms(
                    functools.partial(torch_attention, q, k, v, lengths, POSITIONS)
                )
                entry["kernel_TBps"] = kernel_bytes / entry["kernel_ms"] / 1e9
                entry["kernel_graph_TBps"] = kernel_bytes / entry["kernel_graph_ms"] / 1e9
                entry["torch_TBps"] = torch_bytes / entry["torch_ms"] / 1e9
                entry["torch_full_T_TBps"] = full_bytes / entry["torch_full_T_ms"] / 1e9
                entry["speedup_vs_torch"] = entry["torch_ms"] / entry["kernel_ms"]
                entry["vs_torch_path"] = diff(out, expected)
                entry["kernel_vs_fp32"] = diff(out, reference)
                entry["torch_vs_fp32"] = diff(expected, reference)
                results[name] = entry
                say(name, json.dumps(entry))
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                say(name, "FAILED", results[name]["error"])
    try:
        results["invariance"] = attention_invariance(decode_attention, q_all, keys, values)
        say("attention invariance", results["invariance"])
    except Exception:
        results["invariance"] = {"error": traceback.format_exc()}
        say("attention invariance FAILED", results["invariance"]["error"])
    try:
        results["cuda_graph"] = attention_graph(decode_attention, q_all, keys, values, staggered)
        say("attention cuda graph", results["cuda_graph"])
    except Exception:
        results["cuda_graph"] = {"error": traceback.format_exc()}
        say("attention cuda graph FAILED", results["cuda_graph"]["error"])
    return results


def attention_invariance(
    decode_attention: Callable[..., Tensor], q: Tensor, keys: Tensor, values: Tensor
) -> dict[str, bool]:
    generator = torch.Generator(device="cuda").manual_seed(1)
    rows = q.shape[0]
    lengths = torch.randint(1, POSITIONS + 1, (rows,), generator=generator, device="cuda")
    batch = decode_attention(q, keys, values, lengths)
    checks = {}
    for row in (0, 17, rows - 1):
        one = slice(row, row + 1)
        alone = decode_attention(q[one], keys[one], values[one], lengths[one])
        checks[f"row{row}_alone_equals_batch"] = torch.equal(alone, batch[row : row + 1])
    checks["first32_equal_batch"] = torch.equal(
        decode_attention(q[:32], keys[:32], values[:32], lengths[:32]), batch[:32]
    )
    # Row 5 among 40 other rows of other contents and lengths, at index 20.
    others = torch.randperm(rows, generator=generator, device="cuda")[:40]
    others = others[others != 5]
    picked = torch.cat([others[:20], torch.tensor([5], device="cuda"), others[20:]])
    mixed = decode_attention(q[picked], keys[picked], values[picked], lengths[picked])
    checks["row5_among_others_equals_batch"] = torch.equal(mixed[20:21], batch[5:6])
    lengths_b = lengths.clone()
    lengths_b[6:] = POSITIONS + 1 - lengths_b[6:]  # every other row's length changes
    checks["row5_with_other_lengths"] = torch.equal(
        decode_attention(q, keys, values, lengths_b)[5:6], batch[5:6]
    )
    return checks


def attention_graph(
    decode_attention: Callable[..., Tensor],
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    lengths: Tensor,
) -> dict[str, bool]:
    """Capture at some lengths, write others in place, replay: equal to an eager call."""
    rows = 256
    q, keys, values = q[:rows], keys[:rows], values[:rows]
    static = torch.ones(rows, dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention(q, keys, values, static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, keys, values, static)
    static.copy_(lengths[:rows])
    graph.replay()
    return {"replay_equals_eager": torch.equal(out, decode_attention(q, keys, values, static))}


def bench_norms() -> dict[str, Any]:
    from model.kernels.norm import add_layer_norm, gelu_mul_layer_norm, layer_norm

    results: dict[str, Any] = {}
    generator = torch.Generator(device="cuda").manual_seed(2)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator, device="cuda", dtype=DTYPE)

    def ln(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)

    w, b, yw, yb = randn(EMBED), randn(EMBED), randn(EMBED), randn(EMBED)
    gw, gb = randn(GLU), randn(GLU)
    for rows in ROW_COUNTS:
        x, y, gate_up = randn(rows, EMBED), randn(rows, EMBED), randn(rows, 2 * GLU)

        def torch_gelu_mul(gate_up: Tensor = gate_up) -> Tensor:
            gate, up = gate_up.chunk(2, dim=-1)
            return ln(F.gelu(gate) * up, gw, gb)

        def torch_add_norm_y(x: Tensor = x, y: Tensor = y) -> tuple[Tensor, Tensor]:
            s = x + ln(y, yw, yb)
            return s, ln(s, w, b)

        def torch_add(x: Tensor = x, y: Tensor = y) -> tuple[Tensor, Tensor]:
            s = x + y
            return s, ln(s, w, b)

        cases: dict[str, tuple[Callable[..., Any], Callable[..., Any], tuple[Tensor, ...]]] = {
            "layer_norm": (lambda x: layer_norm(x, w, b), lambda x: ln(x, w, b), (x,)),
            "add_layer_norm_y": (
                lambda x, y: add_layer_norm(x, y, w, b, yw, yb),
                torch_add_norm_y,
                (x, y),
            ),
            "add_layer_norm": (lambda x, y: add_layer_norm(x, y, w, b), torch_add, (x, y)),
            "gelu_mul_layer_norm": (
                lambda gu: gelu_mul_layer_norm(gu, gw, gb),
                torch_gelu_mul,
                (gate_up,),
            ),
        }
        for op, (kernel, reference, args) in cases.items():
            name = f"R{rows}_{op}"
            try:
                got, expected = kernel(*args), reference(*args)
                got_t = got if isinstance(got, tuple) else (got,)
                expected_t = expected if isinstance(expected, tuple) else (expected,)
                entry: dict[str, Any] = {
                    "kernel_ms": median_ms(functools.partial(kernel, *args)),
                    "kernel_graph_ms": graph_ms(functools.partial(kernel, *args)),
                    "torch_ms": median_ms(functools.partial(reference, *args)),
                    "torch_graph_ms": graph_ms(functools.partial(reference, *args)),
                    "vs_torch": [diff(g, e) for g, e in zip(got_t, expected_t, strict=True)],
                }
                alone = kernel(*(a[7:8] for a in args))
                alone_t = alone if isinstance(alone, tuple) else (alone,)
                entry["row_invariant"] = all(
                    torch.equal(a, g[7:8]) for a, g in zip(alone_t, got_t, strict=True)
                )
                results[name] = entry
                say(name, json.dumps(entry))
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                say(name, "FAILED", results[name]["error"])
    return results


def bench_attention_and_norms() -> dict[str, Any]:
    """Every part, each on its own: one failure is recorded and the rest still run."""
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    try:
        import triton

        results["triton"] = triton.__version__
    except Exception:
        results["triton"] = {"error": traceback.format_exc()}
    for name, part in (("attention", bench_attention), ("norms", bench_norms)):
        try:
            results[name] = part()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            say(name, "FAILED", results[name]["error"])
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    results = bench_attention_and_norms()
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text)
    say(text)


if __name__ == "__main__":
    main()
