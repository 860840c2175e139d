"""Text → token ids, with min-dalle's rules (BART byte-pair encoding).

Pure Python: the API process imports this to count tokens without importing torch.
"""

from __future__ import annotations

import json
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

from emoji import demojize

# GPT-2/BART byte-level BPE marks the start of a word with chr(ord(" ") + 256) == "Ġ".
WORD_START = "Ġ"
PAD_TOKEN_ID = 1


class TextTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[str]):
        self.token_from_subword = vocab
        pairs = [tuple(merge.split()) for merge in merges]
        # As in min-dalle, a pair listed twice keeps the rank of its last listing.
        self.rank_from_pair: dict[tuple[str, ...], int] = {
            pair: rank for rank, pair in enumerate(pairs)
        }
        self.start_token = vocab["<s>"]
        self.end_token = vocab["</s>"]
        self.unknown_token = vocab["<unk>"]
        self._encode_word = lru_cache(maxsize=65536)(self._byte_pair_encoding)

    @classmethod
    def from_files(cls, vocab_path: Path, merges_path: Path) -> TextTokenizer:
        with open(vocab_path, encoding="utf8") as f:
            vocab = json.load(f)
        with open(merges_path, encoding="utf8") as f:
            # The first line is a "#version" header. min-dalle also drops the last element
            # (empty when the file ends with a newline); we read the file the same way.
            merges = f.read().split("\n")[1:-1]
        return cls(vocab, merges)

    def tokenize(self, text: str) -> list[int]:
        """Token ids for `text`, wrapped in <s> … </s>. Not truncated: see `text_tokens`."""
        text = demojize(text, delimiters=("", ""))
        text = text.lower().encode("ascii", errors="ignore").decode()
        tokens = [
            self.token_from_subword.get(subword, self.unknown_token)
            for word in text.split(" ")
            if word
            for subword in self._encode_word(word)
        ]
        return [self.start_token, *tokens, self.end_token]

    def _byte_pair_encoding(self, word: str) -> tuple[str, ...]:
        subwords = [WORD_START, *word]
        while len(subwords) > 1:
            pairs = list(pairwise(subwords))
            best = min(
                pairs, key=lambda pair: self.rank_from_pair.get(pair, len(self.rank_from_pair))
            )
            if best not in self.rank_from_pair:
                break
            i = pairs.index(best)
            subwords[i : i + 2] = [subwords[i] + subwords[i + 1]]
        return tuple(subwords)


def text_tokens(tokens: list[int], text_token_count: int) -> list[list[int]]:
    """The encoder's two input rows: [unconditioned, conditioned], padded with PAD_TOKEN_ID.

    min-dalle keeps the first `text_token_count` tokens (so a long text loses its </s>), and
    builds the unconditioned row from the first and last *kept* tokens.
    """
    tokens = tokens[:text_token_count]
    unconditioned = [tokens[0], tokens[-1]]
    pad = [PAD_TOKEN_ID] * text_token_count
    return [
        (unconditioned + pad)[:text_token_count],
        (tokens + pad)[:text_token_count],
    ]
