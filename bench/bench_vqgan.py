"""VQGAN throughput: per job (16-image grids) against MinDalle.detokenize_many, per precision.

```sh
python -m bench.bench_vqgan --images 4 --grid 1 --batches 2 4       # CPU, Mini random weights
python -m bench.bench_vqgan --models-root /tmp/mega --mega --device cuda --out vqgan.json
```

Each case decodes the same random codes (`--images` of them, as jobs of `--grid`² images) and
reports images/s (best of `--repeat`, after a warm-up). Per job runs MinDalle.detokenize per
grid; "N at once" runs detokenize_many with max_images=N. On CUDA every case runs with NCHW and
without cuDNN autotuning (the farm's float32 mode), then with channels_last weights and
activations and cudnn.benchmark on (its fast and bfloat16 modes); batches are padded to
their size, as the farm pads them. The
"same pixels" column compares each case's uint8 pixels with float32 per job in the same layout.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from bench.bench_cpu import mini_weights
from model import MinDalle
from model.config import VQGAN_CODE_COUNT


def seconds(run: Callable[[], list[torch.Tensor]], device: torch.device, repeat: int) -> float:
    """The fastest of `repeat` runs, after one warm-up (cuDNN's autotuning happens there)."""
    run()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cases(
    model: MinDalle, grids: list[torch.Tensor], batches: list[int]
) -> dict[str, Callable[[], list[torch.Tensor]]]:
    runs: dict[str, Callable[[], list[torch.Tensor]]] = {
        "per job": lambda: [model.detokenize(grid) for grid in grids]
    }
    for size in batches:
        runs[f"{size} at once"] = partial(
            model.detokenize_many, grids, max_images=size, pad=model.device.type == "cuda"
        )
    return runs


def measure(args: argparse.Namespace, channels_last: bool) -> list[dict[str, object]]:
    device = torch.device(args.device)
    model = MinDalle(
        args.models_root, device=device, is_mega=args.mega, is_verbose=False,
        vqgan_channels_last=channels_last,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, VQGAN_CODE_COUNT, (args.images, 256), generator=generator)
    grids = [grid.to(device) for grid in codes.split(args.grid**2)]
    rows, reference = [], None
    for precision in args.precisions:
        model.set_vqgan_precision(precision)
        for name, run in cases(model, grids, args.batches).items():
            pixels = torch.cat([grid.flatten() for grid in run()]).to(torch.uint8)
            reference = pixels if reference is None else reference
            changed = float((pixels != reference).float().mean())
            images_per_s = args.images / seconds(run, device, args.repeat)
            rows.append({
                "precision": precision, "layout": "channels_last" if channels_last else "NCHW",
                "case": name, "images/s": round(images_per_s, 2),
                "same pixels": changed == 0, "changed share": changed,
            })  # fmt: skip
            print(" | ".join(str(value) for value in rows[-1].values()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-root", type=Path, default=Path("bench/out/mini-random"))
    parser.add_argument("--mega", action="store_true", help="Mega weights (default: Mini)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=256, help="images in all (whole grids)")
    parser.add_argument("--grid", type=int, default=4, help="grid side of each job (4: 16 images)")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.images % args.grid**2:
        parser.error(
            f"--images must be a multiple of {args.grid**2} (whole {args.grid}×{args.grid} grids)"
        )
    if not args.mega:
        mini_weights(args.models_root)
    print(f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("precision | layout | case | images/s | same pixels | changed share")
    # The farm's modes (DALLE_FARM_VQGAN_MODE): float32 is NCHW without cuDNN autotuning;
    # fast and bfloat16 are channels-last with it (the float32 rows of the second pass: fast).
    rows = measure(args, channels_last=False)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # a bench process: nothing else runs in it
        rows += measure(args, channels_last=True)
    if args.out:
        machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
        report = {"device": args.device, "machine": machine, "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "images": args.images, "grid": args.grid,
                  "rows": rows}  # fmt: skip
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
