"""GPU benchmark (issues 2, 4 and 13): DALL·E Mega in bfloat16, ours against min-dalle 0.4.11.

Mega-size random weights (the real shapes, float16 .pt files as published) are written to
--models-root; min-dalle must be importable (`pip install min-dalle==0.4.11`, or its package
folder on PYTHONPATH). Every case runs in this one process, on one GPU:

- min-dalle 0.4.11 generate_images, one 4×4 grid;
- our MinDalle.generate_images (the min-dalle-compatible sampler), one 4×4 grid;
- the BatchDecoder's startup self-check on this GPU (BatchDecoder.self_check);
- the farm's BatchDecoder, one 4×4 job, with each set of step operations (--kernels: "triton",
  model/kernels/, and "torch" in blocks of --block-rows), replayed from CUDA graphs;
- the BatchDecoder with each of --jobs concurrent 4×4 jobs: images/s, the step's time against
  its graph's replay alone (the host's share), and the CUDA kernels one step launches;
- batch invariance on the GPU: a job's tokens alone, among the concurrent jobs, joined late;
- the VQGAN one job at a time against batches of images from many jobs.

Latencies are wall time from the request (tokenize) to the pixels on the GPU (VQGAN done,
synchronized), best of --repeat after a warm-up. Each BatchDecoder case also gets its floor: the
bytes a step must move (the decoder's weights once, each row's filled cache positions, each
distinct text row's cross-attention keys and values) over the copy bandwidth measured here, or
its arithmetic over the measured matrix rate, whichever is longer.

    python -m bench.bench_gpu --models-root /tmp/mega --jobs 64 128 --out results.json

Results are written to --out after every part, so a run cut short keeps what it measured.
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
from torch import Tensor

from bench.bench_batch import Job, make_jobs
from model import MinDalle, ModelConfig
from model.batch import BatchDecoder
from model.batch_ops import CUDA_BLOCK_ROWS
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
) -> dict[str, Tensor]:
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


def step_costs(decoder: BatchDecoder, model: MinDalle, jobs: list[Job], name: str) -> None:
    """At mid-image (position 128) with these jobs: the whole step against its CUDA graph's
    replay alone, and the CUDA kernels one step launches (counted by the profiler, eagerly)."""
    for job in jobs:
        decoder.add(job.id, job.text, job.seed, GRID, SamplingSettings())
    for _ in range(IMAGE_TOKEN_COUNT // 2):
        decoder.step()
    step_ms = event_ms(decoder.step, repeat=20)  # graphs captured at the earlier steps
    graph = next(reversed(decoder.paged._graphs.values()))  # the one the last step replayed
    replay_ms = event_ms(graph.replay, repeat=20)
    host = 1 - replay_ms / step_ms
    RESULTS[f"{name} step ms"] = step_ms
    RESULTS[f"{name} graph replay ms"] = replay_ms
    RESULTS[f"{name} host share of a step"] = host
    print(
        f"{name}: step {step_ms:.2f} ms, graph replay alone {replay_ms:.2f} ms (host share "
        f"{host:.1%})",
        flush=True,
    )
    layout = [(page, page.used) for pages in decoder._pages.values() for page in pages]
    layout = [(page, used) for page, used in layout if used]
    try:
        cuda = torch.profiler.ProfilerActivity.CUDA
        with torch.inference_mode(), torch.profiler.profile(activities=[cuda]) as profile:
            decoder.paged.run(layout, IMAGE_TOKEN_COUNT, 256)  # one step, eagerly
            torch.cuda.synchronize()
        kernels = sum(1 for event in profile.events() if event.device_type.name == "CUDA")
        RESULTS[f"{name} CUDA kernels per step"] = kernels
        print(f"{name}: {kernels} CUDA kernels (and copies) per step", flush=True)
    finally:
        for job_id in decoder.active:
            decoder.cancel(job_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-root", type=Path, default=Path("bench/out/mega-random"))
    parser.add_argument("--jobs", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--skip-min-dalle", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-vqgan", action="store_true")
    parser.add_argument("--kernels", nargs="+", default=["triton", "torch"])
    parser.add_argument("--block-rows", type=int, default=CUDA_BLOCK_ROWS, help="torch's blocks")
    parser.add_argument(
        "--concurrent-kernels", nargs="+", default=["triton"],
        help="the step operations timed with --jobs concurrent jobs",
    )  # fmt: skip
    args = parser.parse_args()

    def save() -> None:
        if args.out is not None:
            args.out.write_text(json.dumps(RESULTS, indent=1, default=str))

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

    jobs = make_jobs(max(args.jobs), args.seed)
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
        save()

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
    RESULTS.pop("_min_dalle_images", None)
    save()

    def new_decoder(kernels: str, max_rows: int) -> BatchDecoder:
        block_rows = args.block_rows if kernels == "torch" else None
        return BatchDecoder(model, max_rows=max_rows, block_rows=block_rows, kernels=kernels)

    def self_check_case(kernels: str) -> None:
        decoder = new_decoder(kernels, 2048)
        start = time.perf_counter()
        passed = decoder.self_check()
        RESULTS[f"self-check {kernels}"] = passed
        RESULTS[f"self-check {kernels} s"] = time.perf_counter() - start
        print(f"self-check of the {kernels!r} kernels, 2048 rows: passed {passed} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)  # fmt: skip

    for kernels in args.kernels:
        section(f"self-check {kernels}", lambda: self_check_case(kernels))  # noqa: B023
        save()

    single_floor = step_floor(model, 2 * GRID**2, 2, bandwidth, flop_rate)
    RESULTS["floor one 4x4 decode s"] = single_floor
    alone: dict[str, Tensor] = {}  # job 0's tokens by kernels

    def single_case(kernels: str) -> None:
        decoder = new_decoder(kernels, 2 * GRID**2)
        warm = run_jobs(decoder, model, [first], {})[first.id]  # warm-up (and graph capture)
        seconds, tokens = best_of(args.repeat, lambda: run_jobs(decoder, model, [first], {}))
        alone[kernels] = tokens[first.id]
        RESULTS[f"one 4x4 {kernels} s"] = seconds
        RESULTS[f"one 4x4 {kernels} repeatable"] = torch.equal(warm, alone[kernels])
        print(
            f"BatchDecoder one 4×4 job, {kernels}: {seconds:.3f} s (decode floor "
            f"{single_floor:.3f} s: {single_floor / seconds:.0%}); same tokens as its first "
            f"run: {torch.equal(warm, alone[kernels])}",
            flush=True,
        )
        step_costs(decoder, model, [first], f"one 4x4 {kernels}")

    for kernels in args.kernels:
        section(f"one job, {kernels}", lambda: single_case(kernels))  # noqa: B023
        save()

    def concurrent_case(kernels: str, count: int) -> None:
        rows = 2 * GRID**2 * count
        decoder = new_decoder(kernels, rows)
        run_jobs(decoder, model, jobs[:count], {})  # warm-up (and graph capture)
        start = synchronized()
        tokens = run_jobs(decoder, model, jobs[:count], {})
        seconds = synchronized() - start
        images = count * GRID**2
        floor = step_floor(model, rows, count + 1, bandwidth, flop_rate)
        name = f"{count} jobs {kernels}"
        RESULTS[f"floor {count} jobs decode s"] = floor
        RESULTS[f"{name} s"] = seconds
        RESULTS[f"{name} images/s"] = images / seconds
        print(
            f"BatchDecoder {count} concurrent 4×4 jobs, {kernels}: {seconds:.2f} s, "
            f"{images / seconds:.1f} images/s (decode floor {floor:.2f} s: "
            f"{floor / seconds:.0%})",
            flush=True,
        )
        if kernels in alone:
            same = torch.equal(tokens[first.id], alone[kernels])
            RESULTS[f"alone == among {count} ({kernels})"] = same
            print(f"job 0 alone and among {count}: tokens identical: {same}", flush=True)
        step_costs(decoder, model, jobs[:count], name)
        RESULTS["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
        del decoder
        torch.cuda.empty_cache()

    for kernels in args.concurrent_kernels:
        for count in args.jobs:
            section(f"{count} jobs, {kernels}", lambda: concurrent_case(kernels, count))  # noqa: B023
            save()

    def late_join_case(kernels: str) -> None:
        others = make_jobs(9, 1000)[1:]
        decoder = new_decoder(kernels, 2 * GRID**2 * 9)
        tokens = run_jobs(decoder, model, [first, *others], {first.id: 37})
        same = torch.equal(tokens[first.id], alone[kernels])
        RESULTS[f"alone == joined late ({kernels})"] = same
        print(f"job 0 alone and joined at step 37 among 8 ({kernels}): identical: {same}")

    for kernels in args.concurrent_kernels:
        section(f"late join, {kernels}", lambda: late_join_case(kernels))  # noqa: B023
    save()

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
    save()
    print("\n" + json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
