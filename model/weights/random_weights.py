"""Random weights in min-dalle's real file layout, for tests and benchmarks.

No real weights can be downloaded where tests run, so tests build a small model (or a Mini-size
one with real shapes), write it exactly as the published files are written (float16 BART state
dicts without the scale-free norm weights, a float32 VQGAN, a BPE vocab and merges.txt), and load
it through the real loading code.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import torch
from torch import nn

from model.bart import DalleBartDecoder, DalleBartEncoder
from model.config import ModelConfig
from model.tokenizer import WORD_START
from model.vqgan import VQGanDetokenizer
from model.weights.files import WeightPaths, is_scale_free_norm_weight

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in BART; the pad id is 1
# Digits are left out of the alphabet on purpose, so tests can exercise <unk>.
ALPHABET = "abcdefghijklmnopqrstuvwxyz.,!?'-:_&"
CORPUS = (
    "a painting of a fox in the snow by claude monet an astronaut riding a horse on the moon "
    "a bowl of soup that looks like a monster made of plasticine dali painting of walle "
    "an armchair in the shape of an avocado the face of a smiling cat with a red hat "
    "sunset over the mountains with a lake and trees a photo of a city street at night in the rain"
)


def train_merges(words: list[str], merge_count: int) -> list[tuple[str, str]]:
    """A tiny byte-pair-encoding trainer: repeatedly merge the most frequent adjacent pair."""
    words_as_symbols = [[WORD_START, *word] for word in words]
    merges: list[tuple[str, str]] = []
    for _ in range(merge_count):
        pair_counts = Counter(pair for symbols in words_as_symbols for pair in pairwise(symbols))
        if not pair_counts:
            break
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merges.append(best)
        for symbols in words_as_symbols:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
                i += 1
    return merges


def write_tokenizer(directory: Path, merge_count: int = 200) -> int:
    """Write vocab.json and merges.txt; returns the vocabulary size."""
    merges = train_merges(CORPUS.split(), merge_count)
    symbols = [*SPECIAL_TOKENS, WORD_START, *ALPHABET, *(WORD_START + c for c in ALPHABET)]
    symbols += [a + b for a, b in merges]
    vocab = {symbol: i for i, symbol in enumerate(dict.fromkeys(symbols))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf8")
    return len(vocab)


def randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Fill parameters so that activations keep a unit scale through the layers."""
    for name, param in module.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight") or (".ln" in name and name.endswith("weight")):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            elif param.dim() == 1:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel()
                std = 1.0 if "embed" in name else fan_in**-0.5
                param.copy_(std * torch.randn(param.shape, generator=generator))


def randomize_vqgan_(detokenizer: VQGanDetokenizer, generator: torch.Generator) -> None:
    """Conv weights at PyTorch's default scale, unit group norms, and an output centred on grey,
    so that images vary with their tokens instead of clipping to black."""
    for name, param in detokenizer.named_parameters():
        with torch.no_grad():
            if param.dim() == 1:
                is_norm_scale = "norm" in name and name.endswith("weight")
                param.copy_(
                    (1.0 if is_norm_scale else 0.0)
                    + 0.1 * torch.randn(param.shape, generator=generator)
                )
            elif name == "embedding.weight":
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                bound = param[0].numel() ** -0.5
                param.uniform_(-bound, bound, generator=generator)
        if name == "decoder.conv_out.bias":
            with torch.no_grad():
                param.add_(0.5)


def bart_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """As published: float16, and without the weights of scale-free layer norms."""
    return {
        key: value.to(torch.float16).contiguous()
        for key, value in module.state_dict().items()
        if not is_scale_free_norm_weight(key)
    }


def write_random_weights(
    models_root: Path, config: ModelConfig, is_mega: bool = False, seed: int = 0
) -> WeightPaths:
    """Write a complete random model under models_root, with a config.json describing it."""
    paths = WeightPaths(Path(models_root), is_mega)
    vocab_size = write_tokenizer(paths.dalle_dir)
    if vocab_size > config.text_vocab_count:
        raise ValueError(f"text_vocab_count must be at least {vocab_size}")
    config.to_json(paths.config)

    generator = torch.Generator().manual_seed(seed)
    encoder, decoder = DalleBartEncoder(config), DalleBartDecoder(config)
    randomize_(encoder, generator)
    randomize_(decoder, generator)
    torch.save(bart_state_dict(encoder), paths.stage_files("encoder")[1])
    torch.save(bart_state_dict(decoder), paths.stage_files("decoder")[1])

    detokenizer = VQGanDetokenizer()
    randomize_vqgan_(detokenizer, generator)
    paths.vqgan_dir.mkdir(parents=True, exist_ok=True)
    torch.save(detokenizer.state_dict(), paths.stage_files("detoker")[1])
    return paths


# A model small enough to decode in a second on a CPU; the VQGAN keeps its real size.
SMALL_CONFIG = ModelConfig(
    layer_count=2,
    attention_head_count=4,
    embed_count=64,
    glu_embed_count=96,
    text_vocab_count=512,
    image_vocab_count=16384,
)


def main() -> None:
    """`python -m model.weights.random_weights ROOT [--size small|mini]`: write random weights
    to try the pipeline without real ones. Their images are noise."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("models_root", type=Path)
    parser.add_argument("--size", choices=("small", "mini"), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--flax",
        type=Path,
        metavar="HUB_DIR",
        help="also write the same weights as the hub's Flax checkpoints under HUB_DIR/dalle-mini/, "
        "to try `dalle-farm weights convert` or `weights fetch --from HUB_DIR`",
    )
    args = parser.parse_args()
    config = SMALL_CONFIG if args.size == "small" else ModelConfig.mini()
    paths = write_random_weights(args.models_root, config, is_mega=False, seed=args.seed)
    print(f"wrote random {args.size} weights (images will be noise) to {paths.models_root}")  # noqa: T201
    if args.flax is not None:
        from model.weights.random_flax import write_flax_checkpoints

        folders = write_flax_checkpoints(paths, config, args.flax)
        print(f"wrote them as Flax checkpoints to {folders[0]} and {folders[1]}")  # noqa: T201


if __name__ == "__main__":
    main()
