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

    def forward(self, image_tokens: Tensor, is_seamless: bool = False) -> Tensor:
        """(N, 256) codes of a square grid of N images → (S, S, 3) pixels in [0, 255], S = √N·256.

        Seamless: the grid's code maps are joined into one map before decoding, so the VQGAN
        blends across tile borders and the result tiles without seams.
        """
        grid_size = round(image_tokens.shape[0] ** 0.5)
        # min-dalle's layout, kept for identical grids: image i = a·grid + b sits in tile row b,
        # tile column a (column-major).
        tiles = image_tokens.view(grid_size, grid_size, TOKENS_PER_SIDE, TOKENS_PER_SIDE)
        if is_seamless:
            side = grid_size * TOKENS_PER_SIDE
            code_map = tiles.permute(1, 2, 0, 3).reshape(1, side, side)
        else:
            code_map = tiles.reshape(-1, TOKENS_PER_SIDE, TOKENS_PER_SIDE)
        z = self.embedding(code_map).permute(0, 3, 1, 2).contiguous()  # (B, 256, h, w)
        z = self.decoder(self.post_quant_conv(z))
        pixels = z.permute(0, 2, 3, 1).clip(0.0, 1.0) * 255  # (B, h, w, 3)
        if is_seamless:
            return pixels[0]
        side = grid_size * PIXELS_PER_SIDE
        pixels = pixels.view(grid_size, grid_size, PIXELS_PER_SIDE, PIXELS_PER_SIDE, 3)
        return pixels.permute(1, 2, 0, 3, 4).reshape(side, side, 3)
