"""Where our image tokens differ from min-dalle's, and how close each differing draw was.

Both implementations sample with `torch.multinomial(probs, 1)`, which draws q ~ Exp(1) for every
code and picks argmax(probs / q). For the same seed both draw the same q, so a differing token
can only come from differing probabilities. This script replays the draws: at each image's first
differing position it prints the two codes' scores under both implementations. A relative gap
far below float32's rounding of the logits (amplified about 31× by supercondition 16) means a
near tie that summation order decided, not a difference in what is computed.

    python -m bench.compare_tokens --grid-size 2 --seed 7
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.bench_cpu import TEXT, mini_weights
from model import MinDalle, ModelConfig
from tests.reference import reference_model


def record_draws(run: Any) -> tuple[Tensor, list[Tensor]]:
    """Call run() with torch.multinomial spied on; return its tokens and every probs it drew on."""
    multinomial, seen = torch.multinomial, []

    def spy(probs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        seen.append(probs.detach().clone())
        return multinomial(probs, *args, **kwargs)

    torch.multinomial = spy  # type: ignore[assignment]
    try:
        tokens = run()
    finally:
        torch.multinomial = multinomial
    return tokens, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-root", type=Path, default=Path("bench/out/mini-random"))
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--grid-size", type=int, default=2)
    args = parser.parse_args()
    root = mini_weights(args.models_root)
    text, seed, grid = args.text, args.seed, args.grid_size

    ours = MinDalle(root, is_mega=False, is_verbose=False)
    our_tokens, our_probs = record_draws(
        lambda: list(ours.generate_image_tokens_stream(text, seed, grid))[-1]
    )
    reference = reference_model(root, ModelConfig.mini())
    captured: list[Tensor] = []
    make_grid = reference.image_grid_from_tokens

    def capture(image_tokens: Tensor, *rest: Any, **kwargs: Any) -> Tensor:
        captured.append(image_tokens.clone())
        return make_grid(image_tokens, *rest, **kwargs)

    reference.image_grid_from_tokens = capture

    def run_reference() -> Tensor:
        with torch.no_grad():
            reference.generate_image(text=text, seed=seed, grid_size=grid)
        return captured[-1]

    ref_tokens, ref_probs = record_draws(run_reference)

    # The exponential noise of every step, drawn as torch.multinomial draws it.
    generator = torch.Generator().manual_seed(seed)
    noise = [torch.empty_like(p).exponential_(generator=generator) for p in our_probs]
    for probs, tokens in ((our_probs, our_tokens), (ref_probs, ref_tokens)):
        replayed = torch.stack([(p / n).argmax(1) for p, n in zip(probs, noise, strict=True)], 1)
        assert torch.equal(replayed, tokens), "the replayed draws do not give the sampled tokens"

    for image in range(grid * grid):
        differs = (our_tokens[image] != ref_tokens[image]).nonzero()
        if len(differs) == 0:
            print(f"image {image}: all 256 tokens identical")
            continue
        step = int(differs[0])
        print(f"image {image}: {len(differs)} of 256 tokens differ, the first at position {step}")
        for name, probs in (("ours", our_probs), ("min-dalle", ref_probs)):
            scores = (probs[step][image] / noise[step][image]).double()
            top = torch.topk(scores, 2)
            gap = float((top.values[0] - top.values[1]) / top.values[0])
            print(f"  {name:9s} best codes {top.indices.tolist()}, relative gap {gap:.2e}")
        ours_p = our_probs[step][image].double()
        ref_p = ref_probs[step][image].double()
        kept = ref_p > 0
        change = ((ours_p[kept] / ours_p.sum()) / (ref_p[kept] / ref_p.sum()) - 1).abs().max()
        print(f"  largest relative difference of a probability at that step: {float(change):.2e}")


if __name__ == "__main__":
    main()
