"""Sweep of model/kernels/matmul.py's configs on a GPU: speed against cuBLAS, and invariance.

For each weight shape (N, K) and each config (`candidates(n, k)` plus the one `config_for`
picks today), at each row count M:

- time: one CUDA graph of COPIES products, each on its own copy of the weight (together more
  than the L2 holds, as a real step's 24 layers are), replayed REPEAT times after a warm-up; the
  median replay over COPIES is one product's time. A graph keeps Python's launch cost out, as
  the decoder's graphed step does;
- TB/s counts the weight, x and the output once; TFLOP/s is 2·M·N·K over the time;
- cuBLAS (F.linear) is timed the same way on the same data;
- invariance (torch.equal): rows [:32] of the M=max product against the M=32 product, and rows
  5..36 multiplied alone against the same rows of the big product;
- correctness: the error against a float32 product must stay within twice cuBLAS's (plus a
  small floor).

A config that fails to compile or run, or fails invariance or correctness, is disqualified. The
chosen config per shape minimises the sum over M of t(M) / t_cuBLAS(M), one fixed criterion
that weighs the decoder step's few rows and a big batch's many rows alike.

    python -m bench.bench_kernels [--shapes mega|mini|all] [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from model.kernels.matmul import GemmConfig, candidates, config_for, matmul

MEGA_SHAPES = [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 4096), (16383, 2048)]
MINI_SHAPES = [(3072, 1024), (1024, 1024), (5460, 1024), (1024, 2730), (16383, 1024)]
COPIES = 24
WARMUP = 3
REPEAT = 20


def graph_time(products: Sequence[Callable[[], Any]]) -> float:
    """Seconds per product: `products` captured in one CUDA graph, median replay over count."""
    for product in products:  # compiles and warms up outside the capture
        product()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for product in products:
            product()  # outputs are dropped: their memory is reused within the graph
    for _ in range(WARMUP):
        graph.replay()
    times = []
    for _ in range(REPEAT):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(products))
    del graph
    return statistics.median(times)


def rates(m: int, n: int, k: int, seconds: float, itemsize: int) -> dict[str, float]:
    moved = (n * k + m * k + m * n) * itemsize
    return {
        "us": seconds * 1e6,
        "tb_s": moved / seconds / 1e12,
        "tflop_s": 2 * m * n * k / seconds / 1e12,
    }


def check(x: Tensor, weight: Tensor, config: GemmConfig, cublas_err: float) -> dict[str, Any]:
    """Invariance and correctness of one config on x (the biggest M's rows)."""
    big = matmul(x, weight, config)
    small = matmul(x[:32], weight, config)
    middle = matmul(x[5:37], weight, config)
    exact = x.float() @ weight.float().T
    err = (big.float() - exact).abs().max().item()
    scale = exact.abs().max().item()
    result = {
        "rows_0_32_equal": torch.equal(big[:32], small),
        "rows_5_37_equal": torch.equal(big[5:37], middle),
        "max_abs_err": err,
        "cublas_max_abs_err": cublas_err,
        "correct": err <= 2 * cublas_err + 1e-3 * scale,
    }
    result["ok"] = result["rows_0_32_equal"] and result["rows_5_37_equal"] and result["correct"]
    return result


def sweep_shape(n: int, k: int, rows: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(COPIES)]
    x = torch.randn(max(rows), k, device="cuda", dtype=dtype)
    exact = x.float() @ weights[0].float().T
    cublas_err = (F.linear(x, weights[0]).float() - exact).abs().max().item()
    del exact
    cublas = {}
    for m in rows:
        xm = x[:m]
        seconds = graph_time([functools.partial(F.linear, xm, w) for w in weights])
        cublas[m] = rates(m, n, k, seconds, itemsize)
    print(
        f"\n(N, K) = ({n}, {k})  cuBLAS: " + "  ".join(fmt(m, cublas[m]) for m in rows), flush=True
    )

    table = config_for(n, k, dtype)
    configs = list(dict.fromkeys([*candidates(n, k), table]))
    results = []
    for config in configs:
        entry: dict[str, Any] = {"config": dataclasses.asdict(config), "table": config == table}
        started = time.perf_counter()
        try:
            entry["check"] = check(x, weights[0], config, cublas_err)
            timings = {}
            for m in rows:
                xm = x[:m]
                products = [functools.partial(matmul, xm, w, config) for w in weights]
                seconds = graph_time(products)
                timings[m] = rates(m, n, k, seconds, itemsize)
                timings[m]["vs_cublas"] = timings[m]["us"] / cublas[m]["us"]
            entry["rows"] = {str(m): t for m, t in timings.items()}
            entry["score"] = sum(t["vs_cublas"] for t in timings.values())
            entry["ok"] = entry["check"]["ok"]
        except Exception as error:  # a config that cannot compile or run is skipped
            entry["ok"] = False
            entry["error"] = f"{type(error).__name__}: {error}"[:500]
            traceback.print_exc()
        entry["wall_s"] = time.perf_counter() - started
        results.append(entry)
        print(describe(entry, rows), flush=True)

    valid = [entry for entry in results if entry["ok"]]
    best = min(valid, key=lambda entry: entry["score"]) if valid else None
    print("  chosen: " + (describe(best, rows) if best else "none passed"), flush=True)
    del weights
    torch.cuda.empty_cache()
    return {
        "cublas": {str(m): t for m, t in cublas.items()},
        "configs": results,
        "chosen": best["config"] if best else None,
    }


def fmt(m: int, t: dict[str, float]) -> str:
    return f"M={m}: {t['us']:7.1f} us {t['tb_s']:4.2f} TB/s {t['tflop_s']:5.0f} TFLOP/s"


def describe(entry: dict[str, Any], rows: tuple[int, ...]) -> str:
    c = entry["config"]
    name = (
        f"  {c['block_m']:>3}x{c['block_n']:<3} bk{c['block_k']:<3} split{c['split_k']} "
        f"w{c['num_warps']} s{c['num_stages']}{' (table)' if entry['table'] else ''}"
    )
    if "error" in entry:
        return f"{name}: FAILED {entry['error'][:160]}"
    timings = "  ".join(
        fmt(m, entry["rows"][str(m)]) + f" x{entry['rows'][str(m)]['vs_cublas']:.2f}" for m in rows
    )
    check = entry["check"]
    verdict = "ok" if entry["ok"] else f"DISQUALIFIED {check}"
    return f"{name}: {timings}  score {entry['score']:.2f} {verdict}"


def sweep_matmul(
    shapes: list[tuple[int, int]] | None = None,
    rows: tuple[int, ...] = (32, 2048),
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Every shape's configs timed and checked; see the module docstring. Needs CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_kernels needs a CUDA GPU")
    if min(rows) < 32 or max(rows) < 37:
        raise ValueError("the invariance checks need rows of at least 32 and a largest of 37+")
    torch.manual_seed(0)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "dtype": str(dtype),
        "rows": list(rows),
        "copies": COPIES,
        "criterion": "min over valid configs of sum over M of t(M) / t_cublas(M)",
        "shapes": {},
    }
    for n, k in shapes or MEGA_SHAPES:
        result["shapes"][f"{n}x{k}"] = sweep_shape(n, k, rows, dtype)
    result["wall_s"] = time.perf_counter() - started
    print(f"\nsweep took {result['wall_s']:.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=["mega", "mini", "all"], default="mega")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    shapes = {"mega": MEGA_SHAPES, "mini": MINI_SHAPES, "all": MEGA_SHAPES + MINI_SHAPES}
    result = sweep_matmul(shapes[args.shapes])
    text = json.dumps(result, indent=2)
    print(json.dumps({key: value["chosen"] for key, value in result["shapes"].items()}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
