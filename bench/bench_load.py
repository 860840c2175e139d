"""Worker ready time (issue 6): loading Mini from min-dalle's .pt files against converted
.safetensors files, with a warm disk cache; and what converting a Flax checkpoint costs.

    python -m bench.bench_load                 # first run writes about 4.5 GB to bench/out/load/
    python -m bench.bench_load --repeat 5
    python -m bench.bench_load --mega          # also convert a Mega-size checkpoint (10.4 GB)

1. ``pt/``: Mini-size random weights as min-dalle's .pt files (float16 BART, float32 VQGAN).
2. ``hub/``: the same weights as the hub's Flax checkpoints (float32, scanned layer stacks).
3. ``converted/``: ``dalle-farm weights convert`` of those, in a child process: wall time and
   the child's peak resident memory.
4. For each layout, a child process like a starting CPU worker: import the model, build MinDalle
   (float32, CPU, every stage resident), then hash the weights against the manifest
   (weights_identity, what job.json records). One warm-up run fills the disk cache; then
   ``--repeat`` runs, reported as median and best.
5. With ``--mega``: a Mega-size DalleBart Flax checkpoint of random float32 values (10.4 GB,
   streamed to disk so that writing it needs little memory), converted in a child process: wall
   time and peak resident memory, the figure that says whether Mega converts on a 24 GB machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs in a child process, so that every run starts cold in Python and warm on disk.
# VmHWM, not getrusage's ru_maxrss: the latter keeps the parent's peak across fork and exec.
PEAK_RSS = """
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

WORKER_START = (
    PEAK_RSS
    + """
import json, sys, time
start = time.perf_counter()
import torch
from model.weights.manifest import weights_identity
from model.min_dalle import MinDalle
imported = time.perf_counter()
model = MinDalle(sys.argv[1], dtype=torch.float32, device="cpu", is_mega=False,
                 is_reusable=True, is_verbose=False)
loaded = time.perf_counter()
identity = weights_identity(model.paths)
hashed = time.perf_counter()
print(json.dumps({
    "import_s": imported - start, "load_s": loaded - imported, "hash_s": hashed - loaded,
    "format": identity["format"],
    "peak_rss_mb": peak_rss_mb(),
}))
"""
)

CONVERT = (
    PEAK_RSS
    + """
import json, sys, time
from cli.main import main
start = time.perf_counter()
status = main(["weights", "convert", *sys.argv[2:], "--models-root", sys.argv[1]])
print(json.dumps({"status": status, "convert_s": time.perf_counter() - start,
                  "peak_rss_mb": peak_rss_mb()}))
"""
)


def child(script: str, *args: str | Path) -> dict[str, float | str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"child failed:\n{result.stderr}")
    output: dict[str, float | str] = json.loads(result.stdout.strip().splitlines()[-1])
    return output


def prepare(out: Path) -> tuple[Path, Path]:
    """The .pt weights and their Flax checkpoints, written once."""
    from model import ModelConfig
    from model.weights.files import WeightPaths
    from model.weights.random_flax import write_flax_checkpoints
    from model.weights.random_weights import write_random_weights

    pt_root, hub = out / "pt", out / "hub"
    if not (pt_root / "vqgan" / "detoker.pt").exists():
        print(f"writing Mini-size random weights to {pt_root}")
        write_random_weights(pt_root, ModelConfig.mini(), is_mega=False, seed=0)
    if not (hub / "dalle-mini" / "vqgan_imagenet_f16_16384" / "config.json").exists():
        print(f"writing them as Flax checkpoints to {hub}")
        write_flax_checkpoints(WeightPaths(pt_root, False), ModelConfig.mini(), hub)
    return pt_root, hub


def write_mega_sized_checkpoint(folder: Path, vocab_from: Path) -> None:
    """DalleBart's Flax layout at Mega's sizes, random values, written as flax.serialization
    would (msgpack maps, arrays as ext type 1), one array at a time and in chunks."""
    import msgpack
    import numpy as np

    from model import ModelConfig
    from model.weights.random_flax import dalle_mini_config

    config = ModelConfig.mega()
    layers, embed, glu = config.layer_count, config.embed_count, config.glu_embed_count
    attention = {f"{name}_proj": {"kernel": (layers, embed, embed)} for name in "qkvo"}
    attention["out_proj"] = attention.pop("o_proj")
    layer: dict[str, object] = {
        "LayerNorm_0": {"bias": (layers, embed)},
        "FlaxBartAttention_0": attention,
        "LayerNorm_1": {"bias": (layers, embed), "scale": (layers, embed)},
        "GLU_0": {
            "Dense_0": {"kernel": (layers, embed, glu)},
            "Dense_1": {"kernel": (layers, embed, glu)},
            "Dense_2": {"kernel": (layers, glu, embed)},
            "LayerNorm_0": {"bias": (layers, embed)},
            "LayerNorm_1": {"bias": (layers, glu)},
        },
    }
    decoder_layer = {
        **layer,
        "LayerNorm_2": {"bias": (layers, embed)},
        "FlaxBartAttention_1": attention,
        "LayerNorm_3": {"bias": (layers, embed), "scale": (layers, embed)},
    }

    def codec(vocab: int, positions: int, name: str, layer_tree: dict[str, object]) -> dict:
        return {
            "embed_tokens": {"embedding": (vocab, embed)},
            "embed_positions": {"embedding": (positions, embed)},
            "layernorm_embedding": {"bias": (embed,), "scale": (embed,)},
            "final_ln": {"bias": (embed,)},
            "layers": {f"FlaxBart{name}Layers": layer_tree},
        }

    tree = {
        "model": {
            "encoder": codec(config.text_vocab_count, config.text_token_count, "Encoder", layer),
            "decoder": codec(config.image_vocab_count + 1, 256, "Decoder", decoder_layer),
        },
        "lm_head": {"kernel": (embed, config.image_vocab_count + 1)},
    }
    rng = np.random.default_rng(0)
    packer = msgpack.Packer(use_bin_type=True)
    chunk_values = 1 << 24

    def emit(out: Any, node: dict) -> None:
        out.write(packer.pack_map_header(len(node)))
        for name, value in node.items():
            out.write(packer.pack(name))
            if isinstance(value, dict):
                emit(out, value)
                continue
            count = int(np.prod(value))
            head = b"\x93" + packer.pack(list(value)) + packer.pack("float32")
            head += b"\xc6" + (count * 4).to_bytes(4, "big")
            out.write(b"\xc9" + (len(head) + count * 4).to_bytes(4, "big") + b"\x01" + head)
            for start in range(0, count, chunk_values):
                size = min(chunk_values, count - start)
                out.write((0.02 * rng.standard_normal(size, dtype=np.float32)).tobytes())

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "flax_model.msgpack").open("wb") as out:
        emit(out, tree)
    (folder / "config.json").write_text(json.dumps(dalle_mini_config(config), indent=2))
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(vocab_from / name, folder / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "load")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mega", action="store_true", help="also convert a Mega-size checkpoint")
    args = parser.parse_args()

    pt_root, hub = prepare(args.out)
    converted = args.out / "converted"
    shutil.rmtree(converted, ignore_errors=True)
    checkpoints = [
        hub / "dalle-mini" / "dalle-mini",
        hub / "dalle-mini" / "vqgan_imagenet_f16_16384",
    ]
    msgpack_gb = sum((folder / "flax_model.msgpack").stat().st_size for folder in checkpoints) / 1e9
    conversion = child(CONVERT, converted, *checkpoints)
    print(
        f"convert {msgpack_gb:.2f} GB of Flax checkpoints: {conversion['convert_s']:.1f} s, "
        f"peak RSS {conversion['peak_rss_mb']:.0f} MB"
    )

    # The .pt layout gets a manifest too, so that both starts hash their files the same way.
    from model.weights.manifest import record_folder

    for folder in (pt_root / "dalle_bart_mini", pt_root / "vqgan"):
        record_folder(folder, source={"kind": "bench"})

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; median (best) of {args.repeat} after a warm-up run"
    )
    print("| files | import s | MinDalle() s | verify hashes s | total s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for root in (pt_root, converted):
        child(WORKER_START, root)  # warm-up: fills the disk cache
        runs = [child(WORKER_START, root) for _ in range(args.repeat)]

        def cell(key: str, runs: list[dict[str, float | str]] = runs) -> str:
            values = [float(run[key]) for run in runs]
            return f"{statistics.median(values):.2f} ({min(values):.2f})"

        totals = [float(r["import_s"]) + float(r["load_s"]) + float(r["hash_s"]) for r in runs]
        print(
            f"| {runs[0]['format']} | {cell('import_s')} | {cell('load_s')} | {cell('hash_s')} "
            f"| {statistics.median(totals):.2f} ({min(totals):.2f}) "
            f"| {statistics.median(float(r['peak_rss_mb']) for r in runs):.0f} |"
        )
    print(f"measured {time.strftime('%Y-%m-%d')}")

    if args.mega:
        folder = args.out / "mega-hub" / "dalle-mega"
        if not (folder / "merges.txt").exists():
            print(f"writing a Mega-size random Flax checkpoint to {folder}")
            write_mega_sized_checkpoint(folder, pt_root / "dalle_bart_mini")
        size_gb = (folder / "flax_model.msgpack").stat().st_size / 1e9
        mega_out = args.out / "mega-converted"
        shutil.rmtree(mega_out, ignore_errors=True)
        conversion = child(CONVERT, mega_out, folder)
        shutil.rmtree(mega_out, ignore_errors=True)
        print(
            f"convert a Mega-size {size_gb:.2f} GB Flax checkpoint: "
            f"{conversion['convert_s']:.1f} s, peak RSS {conversion['peak_rss_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
