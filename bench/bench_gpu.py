"""GPU benchmark (issues 2 and 4): DALL·E Mega in bfloat16, ours against min-dalle 0.4.11.

Mega-size random weights (the real shapes, float16 .pt files as published) are written to
--models-root; min-dalle must be importable (`pip install min-dalle==0.4.11`, or its package
folder on PYTHONPATH). Every case runs in this one process, on one GPU:

- min-dalle 0.4.11 generate_images, one 4×4 grid;
- our MinDalle.generate_images (the min-dalle-compatible sampler), one 4×4 grid;
- the farm's BatchDecoder, one 4×4 job, step by step (eager) and replayed from CUDA graphs;
- the BatchDecoder with --jobs concurrent 4×4 jobs: images/s;
- batch invariance on the GPU: a job's tokens alone, among the concurrent jobs, joined late
  among others, eager and graphed;
- the VQGAN one job at a time against batches of images from many jobs.

Latencies are wall time from the request (tokenize) to the pixels on the GPU (VQGAN done,
synchronized), best of --repeat after a warm-up. Each BatchDecoder case also gets its floor: the
bytes a step must move (the decoder's weights once, each row's filled cache positions, each
distinct text row's cross-attention keys and values) over the copy bandwidth measured here, or
its arithmetic over the measured matrix rate, whichever is longer.

    python -m bench.bench_gpu --models-root /tmp/mega --jobs 64 --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.bench_batch import Job, make_jobs
from model import MinDalle, ModelConfig
from model.batch import BatchDecoder
from model.batch_forward import CUDA_BLOCK_ROWS
from model.config import IMAGE_TOKEN_COUNT, VQGAN_CODE_COUNT
from model.generate import SamplingSettings
from model.weights.random_weights import write_random_weights

GRID = 4
RESULTS: dict[str, Any] = {}


def synchronized() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def best_of(repeat: int, run: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = synchronized()
        result = run()
        best = min(best, synchronized() - start)
    return best, result


def section(name: str, body: Callable[[], None]) -> None:
    """Run one part; a failure is printed and recorded, and the next part still runs."""
    print(f"\n== {name}", flush=True)
    try:
        body()
    except Exception:  # a benchmark reports what broke and carries on
        traceback.print_exc()
        RESULTS[f"{name} error"] = traceback.format_exc(limit=3)


def event_ms(run: Callable[[], Any], repeat: int = 10) -> float:
    """Median milliseconds of run() by CUDA events, after three warm-ups."""
    for _ in range(3):
        run()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def ceilings() -> tuple[float, float]:
    """(bytes/s of a device-to-device copy, counting read + write; bf16 matmul FLOP/s)."""
    source = torch.randn(2**30, device="cuda", dtype=torch.float32)  # 4 GiB
    target = torch.empty_like(source)
    copy_s = event_ms(lambda: target.copy_(source)) / 1e3
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_s = event_ms(lambda: a @ b) / 1e3
    return 2 * 2**32 / copy_s, 2 * 8192**3 / matmul_s


def step_floor(
    model: MinDalle, rows: int, text_rows: int, bandwidth: float, flop_rate: float
) -> float:
    """Seconds that 256 steps of `rows` rows (all at the same position) need at least."""
    decoder = model.decoder
    assert decoder is not None
    config, itemsize = decoder.config, model.dtype.itemsize
    skipped = ("encoder_attn.k_proj", "encoder_attn.v_proj", "embed_", "lm_head")
    weights = sum(
        p.numel() for name, p in decoder.named_parameters() if not any(s in name for s in skipped)
    )
    weights += VQGAN_CODE_COUNT * config.embed_count  # the lm_head rows that are read
    layers, embed = config.layer_count, config.embed_count
    seconds = 0.0
    for position in range(IMAGE_TOKEN_COUNT):
        cache = rows * layers * 2 * (position + 2) * embed  # read 0…position, write position
        text = text_rows * layers * 2 * config.text_token_count * embed
        moved = (weights + cache + text) * itemsize
        flops = 2 * rows * weights + 2 * rows * layers * 2 * (position + 1) * embed
        seconds += max(moved / bandwidth, flops / flop_rate)
    return seconds


def run_jobs(
    decoder: BatchDecoder, model: MinDalle, jobs: list[Job], joins: dict[str, int]
) -> dict:
    """Add the jobs (each at its join step, default 0), step until all are done, VQGAN each."""
    tokens: dict[str, Tensor] = {}
    step = 0
    pending = list(jobs)
    while pending or decoder.active:
        for job in [job for job in pending if joins.get(job.id, 0) <= step]:
            decoder.add(job.id, job.text, job.seed, GRID, SamplingSettings())
            pending.remove(job)
        for job_id, job_tokens in decoder.step().finished.items():
            model.detokenize(job_tokens)
            tokens[job_id] = job_tokens.clone()
        step += 1
    return tokens


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-root", type=Path, default=Path("bench/out/mega-random"))
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--skip-min-dalle", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-vqgan", action="store_true")
    parser.add_argument("--eager", action="store_true", help="also time without CUDA graphs")
    parser.add_argument("--block-rows", type=int, nargs="+", default=[CUDA_BLOCK_ROWS, 0])
    args = parser.parse_args()

    props = torch.cuda.get_device_properties(0)
    RESULTS["device"] = (
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
    )
    print(RESULTS["device"], flush=True)
    bandwidth, flop_rate = ceilings()
    RESULTS["copy_bandwidth_TBps"] = bandwidth / 1e12
    RESULTS["bf16_matmul_TFLOPps"] = flop_rate / 1e12
    print(f"ceilings: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flop_rate / 1e12:.0f} TFLOP/s")

    root = args.models_root
    if not (root / "vqgan" / "detoker.pt").exists():
        start = time.perf_counter()
        write_random_weights(root, ModelConfig.mega(), is_mega=True, seed=0)
        print(f"wrote Mega-size random weights in {time.perf_counter() - start:.0f} s", flush=True)

    jobs = make_jobs(args.jobs, args.seed)
    first = jobs[0]
    grid_args = {"text": first.text, "seed": first.seed, "grid_size": GRID}

    if not args.skip_min_dalle:

        def reference_case() -> None:
            from tests.reference import reference_model

            reference = reference_model(
                root, ModelConfig.mega(), is_mega=True, dtype=torch.bfloat16, device="cuda"
            )
            with torch.no_grad():
                reference.generate_images(**grid_args)  # warm-up
                seconds, images = best_of(
                    args.repeat, lambda: reference.generate_images(**grid_args)
                )
            RESULTS["min-dalle 4x4 s"] = seconds
            RESULTS["_min_dalle_images"] = images.cpu()
            print(f"min-dalle 0.4.11 generate_images 4×4: {seconds:.2f} s")
            del reference
            torch.cuda.empty_cache()

        section("min-dalle", reference_case)

    model = MinDalle(root, dtype=torch.bfloat16, device="cuda", is_mega=True, is_verbose=False)

    def ours_case() -> None:
        model.generate_images(**grid_args)  # warm-up
        seconds, images = best_of(args.repeat, lambda: model.generate_images(**grid_args))
        RESULTS["ours generate_images 4x4 s"] = seconds
        print(f"MinDalle.generate_images 4×4: {seconds:.2f} s")
        reference_images = RESULTS.pop("_min_dalle_images", None)
        if reference_images is not None:
            same = [torch.equal(a, b) for a, b in zip(images.cpu(), reference_images, strict=True)]
            RESULTS["identical images vs min-dalle"] = f"{sum(same)}/{len(same)}"
            print(f"images identical to min-dalle's: {sum(same)}/{len(same)}")

    if not args.skip_ours:
        section("ours", ours_case)

    single_floor = step_floor(model, 2 * GRID**2, 2, bandwidth, flop_rate)
    RESULTS["floor one 4x4 decode s"] = single_floor
    alone: dict[str, Tensor] = {}  # job 0's tokens by case name

    def single_case(block_rows: int, use_graphs: bool) -> None:
        name = f"block {block_rows}, {'graphs' if use_graphs else 'eager'}"
        decoder = BatchDecoder(
            model, max_rows=2 * GRID**2, block_rows=block_rows, use_cuda_graphs=use_graphs
        )
        warm = run_jobs(decoder, model, [first], {})[first.id]  # warm-up (and graph capture)
        seconds, tokens = best_of(args.repeat, lambda: run_jobs(decoder, model, [first], {}))
        alone[name] = tokens[first.id]
        RESULTS[f"one 4x4 {name} s"] = seconds
        RESULTS[f"one 4x4 {name} repeatable"] = torch.equal(warm, alone[name])
        print(
            f"BatchDecoder one 4×4 job, {name}: {seconds:.3f} s (decode floor "
            f"{single_floor:.3f} s: {single_floor / seconds:.0%}); same tokens as its first "
            f"run: {torch.equal(warm, alone[name])}"
        )

    for block_rows in args.block_rows:
        for use_graphs in (False, True) if args.eager else (True,):
            section(f"one job, block {block_rows}", lambda: single_case(block_rows, use_graphs))  # noqa: B023
    names = list(alone)
    for i, name in enumerate(names):
        for other in names[i + 1 :]:
            same = torch.equal(alone[name], alone[other])
            RESULTS[f"tokens {name} == {other}"] = same
            print(f"one job: tokens of {name} and {other} identical: {same}")

    def concurrent_case(block_rows: int) -> None:
        rows = 2 * GRID**2 * len(jobs)
        decoder = BatchDecoder(model, max_rows=rows, block_rows=block_rows)
        run_jobs(decoder, model, jobs, {})  # warm-up (and graph capture)
        for use_graphs in (True, False) if args.eager else (True,):
            name = f"block {block_rows}, {'graphs' if use_graphs else 'eager'}"
            decoder.paged.use_cuda_graphs = use_graphs
            start = synchronized()
            tokens = run_jobs(decoder, model, jobs, {})
            seconds = synchronized() - start
            images = len(jobs) * GRID**2
            floor = step_floor(model, rows, len(jobs) + 1, bandwidth, flop_rate)
            RESULTS[f"floor {len(jobs)} jobs decode s"] = floor
            RESULTS[f"{len(jobs)} jobs {name} s"] = seconds
            RESULTS[f"{len(jobs)} jobs {name} images/s"] = images / seconds
            print(
                f"BatchDecoder {len(jobs)} concurrent 4×4 jobs, {name}: {seconds:.2f} s, "
                f"{images / seconds:.1f} images/s (decode floor {floor:.2f} s: "
                f"{floor / seconds:.0%})"
            )
            if name in alone:
                same = torch.equal(tokens[first.id], alone[name])
                RESULTS[f"alone == among {len(jobs)} ({name})"] = same
                print(f"job 0 alone and among {len(jobs)}: tokens identical: {same}")
        RESULTS["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
        del decoder
        torch.cuda.empty_cache()

    for block_rows in args.block_rows:
        section(f"concurrent jobs, block {block_rows}", lambda: concurrent_case(block_rows))  # noqa: B023

    def late_join_case(block_rows: int) -> None:
        others = make_jobs(9, 1000)[1:]
        decoder = BatchDecoder(model, max_rows=2 * GRID**2 * 9, block_rows=block_rows)
        tokens = run_jobs(decoder, model, [first, *others], {first.id: 37})
        name = f"block {block_rows}, graphs"
        same = torch.equal(tokens[first.id], alone[name])
        RESULTS[f"alone == joined late ({name})"] = same
        print(f"job 0 alone and joined at step 37 among 8 ({name}): identical: {same}")

    for block_rows in args.block_rows:
        section(f"late join, block {block_rows}", lambda: late_join_case(block_rows))  # noqa: B023
    section("kernels", kernels_case)

    def vqgan_case() -> None:
        detokenizer = model.detokenizer
        assert detokenizer is not None
        generator = torch.Generator(device="cuda").manual_seed(0)
        codes = torch.randint(0, VQGAN_CODE_COUNT, (16 * GRID**2, 256), device="cuda",
                              generator=generator)  # fmt: skip

        def per_job() -> None:
            for job_codes in codes.split(GRID**2):
                model.detokenize(job_codes)

        def batched(size: int) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode():
                    for chunk in codes.split(size):
                        z = detokenizer.embedding(chunk.view(-1, 16, 16)).permute(0, 3, 1, 2)
                        detokenizer.decoder(detokenizer.post_quant_conv(z.contiguous()))

            return run

        images = codes.shape[0]
        for name, run in (("per job (16)", per_job), ("64 at once", batched(64)),
                          ("128 at once", batched(128))):  # fmt: skip
            seconds = event_ms(run, repeat=3) / 1e3
            RESULTS[f"VQGAN {name} images/s"] = images / seconds
            print(f"VQGAN {name}: {images / seconds:.0f} images/s")

    if not args.skip_vqgan:
        section("VQGAN", vqgan_case)

    print("\n" + json.dumps(RESULTS, indent=1, default=str))
    if args.out is not None:
        args.out.write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
