"""The VQGAN detokenizer: a 16×16 map of codes → a 256×256 RGB image.

Parameter names match min-dalle's detoker.pt. The arithmetic follows min-dalle's op for op
(x * sigmoid(x) rather than a fused SiLU, and so on) so that images come out bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import VQGAN_CODE_COUNT

CODE_EMBED_COUNT = 256
TOKENS_PER_SIDE = 16  # codes per image side; each code becomes 16×16 pixels
PIXELS_PER_SIDE = 256


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels of a 512-channel feature map."""

    def __init__(self, channels: int = 512):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(batch, channels, -1).permute(0, 2, 1)  # (B, HW, C)
        k = self.k(h).reshape(batch, channels, -1)  # (B, C, HW)
        v = self.v(h).reshape(batch, channels, -1)  # (B, C, HW)
        weights = torch.bmm(q, k) / channels**0.5  # (B, HW query, HW key)
        weights = torch.softmax(weights, dim=2).permute(0, 2, 1)
        h = torch.bmm(v, weights).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class MiddleLayer(nn.Module):
    def __init__(self, channels: int = 512):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttentionBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpsampleBlock(nn.Module):
    def __init__(
        self, channels_in: int, channels_out: int, has_attention: bool, has_upsample: bool
    ):
        super().__init__()
        self.block = nn.ModuleList(
            [
                ResnetBlock(channels_in, channels_out),
                ResnetBlock(channels_out, channels_out),
                ResnetBlock(channels_out, channels_out),
            ]
        )
        self.attn = nn.ModuleList(AttentionBlock() for _ in range(3)) if has_attention else None
        self.upsample = Upsample(channels_out) if has_upsample else None

    def forward(self, h: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if self.attn is not None:
                h = self.attn[j](h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(256, 512, 3, padding=1)
        self.mid = MiddleLayer(512)
        # Stored from the output end; run from up[4] (16×16) to up[0] (256×256).
        self.up = nn.ModuleList(
            [
                UpsampleBlock(128, 128, has_attention=False, has_upsample=False),
                UpsampleBlock(256, 128, has_attention=False, has_upsample=True),
                UpsampleBlock(256, 256, has_attention=False, has_upsample=True),
                UpsampleBlock(512, 256, has_attention=False, has_upsample=True),
                UpsampleBlock(512, 512, has_attention=True, has_upsample=True),
            ]
        )
        self.norm_out = nn.GroupNorm(32, 128)
        self.conv_out = nn.Conv2d(128, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        z = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            z = up(z)
        return self.conv_out(swish(self.norm_out(z)))


class VQGanDetokenizer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VQGAN_CODE_COUNT, CODE_EMBED_COUNT)
        self.post_quant_conv = nn.Conv2d(CODE_EMBED_COUNT, CODE_EMBED_COUNT, 1)
        self.decoder = Decoder()
        # channels_last on CUDA only (MinDalle decides): on the CPU it changes pixels.
        self.memory_format = torch.contiguous_format

    def forward(self, image_tokens: Tensor, is_seamless: bool = False) -> Tensor:
        """(N, 256) codes of a square grid of N images → (S, S, 3) pixels in [0, 255], S = √N·256.

        Seamless: the grid's code maps are joined into one map before decoding, so the VQGAN
        blends across tile borders and the result tiles without seams.
        """
        pixels = self.decode(code_maps(image_tokens, is_seamless))
        return assemble_grid(pixels, grid_side(image_tokens), is_seamless)

    def use_channels_last(self) -> None:
        """Convolution weights and activations in NHWC: faster with cuDNN. Not for the CPU,
        where it changed 473 of 786,432 pixel values of a 2×2 grid (BENCHMARKS.md)."""
        self.memory_format = torch.channels_last
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=self.memory_format)

    def decode(self, code_map: Tensor) -> Tensor:
        """(B, h, w) code maps → (B, 16h, 16w, 3) float32 pixels in [0, 255], each map alone."""
        z = self.embedding(code_map).permute(0, 3, 1, 2)  # (B, 256, h, w)
        z = self.decoder(self.post_quant_conv(z.contiguous(memory_format=self.memory_format)))
        # A bfloat16 copy's pixels become float32 before the caller's truncation to uint8.
        return z.permute(0, 2, 3, 1).float().clip(0.0, 1.0) * 255


def grid_side(image_tokens: Tensor) -> int:
    """The side of a square grid of image_tokens.shape[0] images; ValueError if not square."""
    if image_tokens.dim() != 2 or image_tokens.shape[1] != TOKENS_PER_SIDE**2:
        raise ValueError(f"image tokens must be (N, 256), got {tuple(image_tokens.shape)}")
    side = round(image_tokens.shape[0] ** 0.5)
    if side < 1 or side * side != image_tokens.shape[0]:
        raise ValueError(f"{image_tokens.shape[0]} images do not make a square grid")
    return side


def code_maps(image_tokens: Tensor, is_seamless: bool) -> Tensor:
    """(N, 256) codes → the (B, h, w) maps to decode: N 16×16 maps, or one joined if seamless."""
    grid_size = grid_side(image_tokens)
    # min-dalle's layout, kept for identical grids: image i = a·grid + b sits in tile row b,
    # tile column a (column-major).
    tiles = image_tokens.view(grid_size, grid_size, TOKENS_PER_SIDE, TOKENS_PER_SIDE)
    if is_seamless:
        side = grid_size * TOKENS_PER_SIDE
        return tiles.permute(1, 2, 0, 3).reshape(1, side, side)
    return tiles.reshape(-1, TOKENS_PER_SIDE, TOKENS_PER_SIDE)


def assemble_grid(pixels: Tensor, grid_size: int, is_seamless: bool) -> Tensor:
    """decode()'s (B, h, w, 3) pixels of one grid → the (S, S, 3) grid in min-dalle's layout."""
    if is_seamless:
        return pixels[0]
    side = grid_size * PIXELS_PER_SIDE
    pixels = pixels.view(grid_size, grid_size, PIXELS_PER_SIDE, PIXELS_PER_SIDE, 3)
    return pixels.permute(1, 2, 0, 3, 4).reshape(side, side, 3)


# -- decoding images of many grids together ---------------------------------------------------

# At one intra-op thread, torch runs a 1×1 convolution with its own im2col + GEMM below 16
# images and with oneDNN from 16 images up (ConvParams::use_mkldnn), and the two round
# differently. Every other VQGAN op gave an image the same bits alone or in a batch of 2–17
# (measured on torch 2.13, AVX2; see tests/test_vqgan.py), so batches never cross this line.
ONEDNN_MIN_BATCH = 16


def exact_on_cpu(threads: int) -> bool:
    """Whether CPU batches give each image the bits it gets alone, at this intra-op thread count.

    An elementwise op such as sigmoid splits its tensor into one equal chunk per thread and
    computes each chunk's last few (< 2 vectors) values with the scalar libm function, not the
    vectorised one; the two differ in the last bit. With a power-of-two thread count every chunk
    is a whole number of vectors for any batch; with 3, 6 or 12 threads the scalar values fall
    at batch-dependent places, so a batch is never exactly the per-grid result.
    """
    return threads >= 1 and threads & (threads - 1) == 0


def plan_batches(rows: list[int], max_rows: int, exact: bool) -> list[list[int]]:
    """Group grids (by index, in order) into batches of at most max_rows decoder rows.

    rows[i] is the number of maps grid i decodes. A grid is never split, so one larger than
    max_rows is a batch of its own. With `exact` (the CPU in float32), grids of fewer than
    ONEDNN_MIN_BATCH rows only share batches that stay below it, and larger grids only share
    with larger grids: each image then meets the same convolution code as in its own grid.
    """
    batches: list[list[int]] = []
    open_batch: dict[bool, list[int]] = {}  # the batch being filled, per size class
    open_rows: dict[bool, int] = {}
    for index, count in enumerate(rows):
        large = exact and count >= ONEDNN_MIN_BATCH
        limit = max_rows if large or not exact else min(max_rows, ONEDNN_MIN_BATCH - 1)
        batch = open_batch.get(large)
        if batch is None or open_rows[large] + count > limit:
            batch = open_batch[large] = []
            open_rows[large] = 0
            batches.append(batch)
        batch.append(index)
        open_rows[large] += count
    return batches
