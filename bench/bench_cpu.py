"""CPU benchmark: our MinDalle against min-dalle 0.4.11, same weights, same process, same settings.

Mini-size random weights (the real shapes, float16 .pt files as published) are written once to
--models-root. Each case runs min-dalle, then ours, `--repeat` times, and reports the best wall
time of the whole generate_image call (tokenize → encode → 256 decoder steps → VQGAN) per image,
and whether the two images are identical.

    python -m bench.bench_cpu                      # 1 image and a 2×2 grid
    python -m bench.bench_cpu --grid-sizes 1 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model import MinDalle, ModelConfig
from model.weights.random_weights import write_random_weights
from tests.reference import reference_model

TEXT = "a painting of a fox in the snow"


def mini_weights(models_root: Path) -> Path:
    if not (models_root / "vqgan" / "detoker.pt").exists():
        print(f"writing Mini-size random weights to {models_root}")
        write_random_weights(models_root, ModelConfig.mini(), is_mega=False, seed=0)
    return models_root


def best_time(
    generate: Callable[..., Image.Image], settings: dict, repeat: int
) -> tuple[float, Image.Image]:
    """The fastest of `repeat` calls of generate(**settings), and the image it made."""
    best, image = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        with torch.no_grad():  # the reference expects autograd off; ours turns it off itself
            image = generate(**settings)
        best = min(best, time.perf_counter() - start)
    assert image is not None
    return best, image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-root", type=Path, default=Path("bench/out/mini-random"))
    parser.add_argument("--grid-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    root = mini_weights(args.models_root)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    ours = MinDalle(root, dtype=torch.float32, device="cpu", is_mega=False, is_verbose=False)
    reference = reference_model(root, ModelConfig.mini())

    rows = []
    for grid_size in args.grid_sizes:
        settings = {"text": TEXT, "seed": args.seed, "grid_size": grid_size}
        ref_time, ref_image = best_time(reference.generate_image, settings, args.repeat)
        our_time, our_image = best_time(ours.generate_image, settings, args.repeat)
        images = grid_size**2
        same = np.array_equal(np.asarray(ref_image), np.asarray(our_image))
        rows.append((grid_size, ref_time / images, our_time / images, ref_time / our_time, same))
        print(f"grid {grid_size}: min-dalle {ref_time:.2f} s, ours {our_time:.2f} s")

    print()
    print("| grid | images | min-dalle s/image | dalle-farm s/image | speedup | identical image |")
    print("|---|---|---|---|---|---|")
    for grid_size, ref_per, our_per, ratio, same in rows:
        print(
            f"| {grid_size}×{grid_size} | {grid_size**2} | {ref_per:.2f} | {our_per:.2f} | "
            f"{ratio:.2f}× | {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
