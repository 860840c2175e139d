"""The DALL·E BART encoder and decoder.

Parameter names match min-dalle's state dicts, so its encoder.pt and decoder.pt load as they are.
Shapes: B batch rows, T text tokens (64), E embed_count, H heads, D head_dim (E // H),
R decoder rows (2 per image: an unconditioned and a conditioned one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import IMAGE_TOKEN_COUNT, ModelConfig
from model.tokenizer import PAD_TOKEN_ID

# Output rows per block of a CPU matrix product with few input rows (see `linear`).
CPU_BLOCK_ROWS = 256
# The most input rows that count as "a few" (a decoder step has 2 per image).
CPU_FEW_ROWS = 64
# oneDNN's fully connected primitive, the op torch.compile uses for linear layers on CPU; None in
# builds without oneDNN.
_onednn_linear = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available()
    else None
)


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T, with a CPU path that suits decoding's products of a few rows.

    A decoder step multiplies 2 rows per image by every weight, so it is bound by how fast the
    product streams the weight from memory. For float32 products of up to CPU_FEW_ROWS rows on
    the CPU, oneDNN's kernels stream it 2 to 2.5 times faster than MKL's GEMM, which F.linear
    calls (measured on a 2-vCPU AMD EPYC VM: a Mini decoder step's products for 2 rows took
    24 ms against 58 ms). Without oneDNN, such products are split into blocks of
    CPU_BLOCK_ROWS output rows, which keeps MKL's repacking of the weight in cache. Other
    shapes, dtypes and devices take the plain path.
    """
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows > CPU_FEW_ROWS:
        return F.linear(x, weight)
    if _onednn_linear is not None and x.dtype == weight.dtype == torch.float32:
        return _onednn_linear(x, weight, None, "none", [], "")
    if rows > 2:
        return torch.cat([F.linear(x, block) for block in weight.split(CPU_BLOCK_ROWS)], dim=-1)
    return F.linear(x, weight)


def fuse_rows(*linears: nn.Linear) -> Tensor:
    """One weight for several products of the same input: the linears' weights stacked by
    output row, so that one product computes them all. Each linear's weight becomes a view of
    its rows of the stack: no second copy of the weights is kept."""
    fused = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = fused[start : start + rows]
        start += rows
    return fused


class Linear(nn.Linear):
    """A bias-free nn.Linear (min-dalle's parameter names) computed with `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)


class GLU(nn.Module):
    """NormFormer-style gated feed-forward block: LN → (GELU(fc0) · fc1) → LN → fc2."""

    def __init__(self, embed_count: int, glu_embed_count: int):
        super().__init__()
        self.ln0 = nn.LayerNorm(embed_count)
        self.ln1 = nn.LayerNorm(glu_embed_count)
        self.fc0 = Linear(embed_count, glu_embed_count)
        self.fc1 = Linear(embed_count, glu_embed_count)
        self.fc2 = Linear(glu_embed_count, embed_count)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln0(x)
        x = F.gelu(self.fc0(x)) * self.fc1(x)
        return self.fc2(self.ln1(x))


class Attention(nn.Module):
    """Projections of one multi-head attention; the attention itself depends on its use."""

    def __init__(self, embed_count: int, head_count: int):
        super().__init__()
        self.head_count = head_count
        self.k_proj = Linear(embed_count, embed_count)
        self.v_proj = Linear(embed_count, embed_count)
        self.q_proj = Linear(embed_count, embed_count)
        self.out_proj = Linear(embed_count, embed_count)

    def split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.head_count, -1).transpose(1, 2)  # (B, H, L, D)

    def merge_heads(self, x: Tensor) -> Tensor:
        batch, _, length, _ = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(batch, length, -1))  # (B, L, E)


# ---------------------------------------------------------------------------------------------
# Encoder


class EncoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_self_attn_layer_norm = nn.LayerNorm(config.embed_count)
        self.self_attn = Attention(config.embed_count, config.attention_head_count)
        self.self_attn_layer_norm = nn.LayerNorm(config.embed_count)
        self.glu = GLU(config.embed_count, config.glu_embed_count)

    def forward(self, x: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.pre_self_attn_layer_norm(x)
        attn = self.self_attn
        q, k, v = (attn.split_heads(proj(h)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        x = x + self.self_attn_layer_norm(attn.merge_heads(h))
        return x + self.glu(x)


class DalleBartEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.text_vocab_count, config.embed_count)
        self.embed_positions = nn.Embedding(config.text_token_count, config.embed_count)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layer_count))
        self.layernorm_embedding = nn.LayerNorm(config.embed_count)
        self.final_ln = nn.LayerNorm(config.embed_count)

    def forward(self, text_tokens: Tensor) -> Tensor:
        """(B, T) token ids → (B, T, E) encoder state. Padding (id 1) is masked out."""
        attention_mask = text_tokens.ne(PAD_TOKEN_ID)[:, None, None, :]  # (B, 1, 1, T)
        positions = torch.arange(text_tokens.shape[1], device=text_tokens.device)
        x = self.embed_tokens(text_tokens) + self.embed_positions(positions)
        x = self.layernorm_embedding(x)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return self.final_ln(x)


# ---------------------------------------------------------------------------------------------
# Decoder


@dataclass
class KVCache:
    """Self-attention keys and values of every image position, preallocated for 256 tokens."""

    keys: Tensor  # (R, H, 256, D)
    values: Tensor  # (R, H, 256, D)

    @classmethod
    def empty(
        cls, rows: int, config: ModelConfig, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        shape = (rows, config.attention_head_count, IMAGE_TOKEN_COUNT, config.head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )

    def update(self, position: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new token's (R, H, 1, D) keys and values; return those of 0…position."""
        self.keys[:, :, position : position + 1] = keys
        self.values[:, :, position : position + 1] = values
        return self.keys[:, :, : position + 1], self.values[:, :, : position + 1]


@dataclass
class TextContext:
    """What the decoder reads from the text, computed once per prompt instead of at every step.

    Decoder rows are grouped by text row: with G text rows (here G=2: unconditioned, conditioned)
    and R decoder rows, rows [g*R/G, (g+1)*R/G) attend to text row g.
    """

    keys: list[Tensor]  # per layer (G, H, T, D)
    values: list[Tensor]  # per layer (G, H, T, D)
    attention_mask: Tensor  # (G, 1, 1, T), True where a text token is not padding


@dataclass(frozen=True)
class FusedWeights:
    """One decoder layer's products of the same input, each as one matrix."""

    qkv: Tensor  # (3E, E): q_proj's rows, then k_proj's, then v_proj's
    fc01: Tensor  # (2G, E): the GLU's fc0 rows (its gate), then fc1's


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_self_attn_layer_norm = nn.LayerNorm(config.embed_count)
        self.self_attn = Attention(config.embed_count, config.attention_head_count)
        self.self_attn_layer_norm = nn.LayerNorm(config.embed_count)
        self.pre_encoder_attn_layer_norm = nn.LayerNorm(config.embed_count)
        self.encoder_attn = Attention(config.embed_count, config.attention_head_count)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.embed_count)
        self.glu = GLU(config.embed_count, config.glu_embed_count)

    def forward(
        self,
        x: Tensor,  # (R, 1, E)
        position: int,
        cache: KVCache,
        text_keys: Tensor,  # (G, H, T, D)
        text_values: Tensor,  # (G, H, T, D)
        text_mask: Tensor,  # (G, 1, 1, T)
    ) -> Tensor:
        # Self-attention over the positions generated so far (all of them precede the query).
        h = self.pre_self_attn_layer_norm(x)
        attn = self.self_attn
        q, k, v = (attn.split_heads(proj(h)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        k, v = cache.update(position, k, v)
        h = F.scaled_dot_product_attention(q, k, v)
        x = x + self.self_attn_layer_norm(attn.merge_heads(h))

        # Cross-attention: the rows of each text group become that group's query sequence,
        # so every row reads its prompt's precomputed keys and values without copying them.
        h = self.pre_encoder_attn_layer_norm(x)
        attn = self.encoder_attn
        groups, rows = text_keys.shape[0], x.shape[0]
        q = attn.split_heads(attn.q_proj(h).view(groups, rows // groups, -1))  # (G, H, R/G, D)
        h = F.scaled_dot_product_attention(q, text_keys, text_values, attn_mask=text_mask)
        h = attn.merge_heads(h).view(rows, 1, -1)  # (R, 1, E)
        x = x + self.encoder_attn_layer_norm(h)

        return x + self.glu(x)


class DalleBartDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # One more embedding than image codes: min-dalle's tables hold a start-token row.
        self.embed_tokens = nn.Embedding(config.image_vocab_count + 1, config.embed_count)
        self.embed_positions = nn.Embedding(IMAGE_TOKEN_COUNT, config.embed_count)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.layer_count))
        self.layernorm_embedding = nn.LayerNorm(config.embed_count)
        self.final_ln = nn.LayerNorm(config.embed_count)
        self.lm_head = nn.Linear(config.embed_count, config.image_vocab_count + 1, bias=False)
        self._fused: list[FusedWeights] | None = None

    def fused_weights(self) -> list[FusedWeights]:
        """Each layer's q/k/v weights as one (3E, E) matrix and fc0/fc1's as one (2G, E), built
        once (`fuse_rows`: the layers keep views of them, not copies)."""
        if self._fused is None:
            with torch.no_grad():
                self._fused = [
                    FusedWeights(
                        fuse_rows(layer.self_attn.q_proj, layer.self_attn.k_proj,
                                  layer.self_attn.v_proj),
                        fuse_rows(layer.glu.fc0, layer.glu.fc1),
                    )
                    for layer in cast("list[DecoderLayer]", self.layers)
                ]  # fmt: skip
        return self._fused

    def text_context(self, encoder_state: Tensor, text_tokens: Tensor) -> TextContext:
        """Project the encoder state into every layer's cross-attention keys and values, once."""
        keys, values = [], []
        for layer in cast("list[DecoderLayer]", self.layers):
            attn = layer.encoder_attn
            keys.append(attn.split_heads(attn.k_proj(encoder_state)))
            values.append(attn.split_heads(attn.v_proj(encoder_state)))
        mask = text_tokens.ne(PAD_TOKEN_ID)[:, None, None, :]
        return TextContext(keys, values, mask)

    def new_caches(self, rows: int, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        return [KVCache.empty(rows, self.config, dtype, device) for _ in self.layers]

    def forward(
        self,
        prev_tokens: Tensor,  # (R,) the token at `position - 1`, or the start token
        position: int,
        caches: list[KVCache],
        text: TextContext,
        code_count: int,
    ) -> Tensor:
        """One decoding step for every row: (R,) tokens → (R, code_count) logits."""
        positions = torch.full_like(prev_tokens, position)
        x = self.embed_tokens(prev_tokens) + self.embed_positions(positions)
        x = self.layernorm_embedding(x[:, None, :])  # (R, 1, E)
        for layer, cache, keys, values in zip(
            self.layers, caches, text.keys, text.values, strict=True
        ):
            x = layer(x, position, cache, keys, values, text.attention_mask)
        x = self.final_ln(x[:, 0])
        # Only the VQGAN's codes can be sampled; the remaining rows of lm_head are never read.
        return linear(x, self.lm_head.weight[:code_count])
