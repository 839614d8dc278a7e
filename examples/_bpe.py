"""A tiny byte-level BPE trainer that yields a ``tiktoken.Encoding`` built locally (nothing is downloaded).

tiktoken ships no trainer, only the fast encoder. Its encoder needs ``mergeable_ranks``: token bytes -> rank,
where the 256 single bytes come first and every later token is the concatenation of two earlier ones, in the
order they were learned (tiktoken merges the adjacent pair with the lowest rank first, like GPT-2's BPE).
Learning a few hundred merges on a sample of the corpus takes seconds in pure Python.
"""

from __future__ import annotations

import collections

import regex
import tiktoken

# GPT-2's pre-tokenizer, with runs of spaces kept whole so that Python indentation becomes a few tokens.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\n| +(?=\S)|\s+(?!\S)|\s+"""
END_OF_TEXT = "<|endoftext|>"


def train_ranks(texts: list[str], merges: int, sample_chars: int = 1_000_000) -> dict[bytes, int]:
    """Byte-level ranks plus up to ``merges`` learned merges, from the first ``sample_chars`` of ``texts``."""
    words: collections.Counter[bytes] = collections.Counter()
    budget = sample_chars
    for text in texts:
        if budget <= 0:
            break
        words.update(w.encode() for w in regex.findall(PAT_STR, text[:budget]))
        budget -= len(text)
    ranks = {bytes([i]): i for i in range(256)}
    # Each distinct pre-token is a list of token byte strings; pair counts are kept up to date incrementally
    # (only the words that contain the merged pair are touched), which is what makes this fast enough.
    vocab = [([bytes([b]) for b in word], count) for word, count in words.items()]
    pairs: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
    where: dict[tuple[bytes, bytes], set[int]] = collections.defaultdict(set)
    for i, (parts, count) in enumerate(vocab):
        for pair in zip(parts, parts[1:], strict=False):
            pairs[pair] += count
            where[pair].add(i)
    while len(ranks) < 256 + merges and pairs:
        # Ties broken by the bytes themselves so that the result is the same on every run.
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if pairs[best] < 2:
            break
        merged = best[0] + best[1]
        ranks.setdefault(merged, len(ranks))
        for i in list(where[best]):
            parts, count = vocab[i]
            for pair in zip(parts, parts[1:], strict=False):
                pairs[pair] -= count
                if pairs[pair] <= 0:
                    del pairs[pair]
            new: list[bytes] = []
            j = 0
            while j < len(parts):
                if j + 1 < len(parts) and (parts[j], parts[j + 1]) == best:
                    new.append(merged)
                    j += 2
                else:
                    new.append(parts[j])
                    j += 1
            vocab[i] = (new, count)
            for pair in zip(new, new[1:], strict=False):
                pairs[pair] += count
                where[pair].add(i)
        del where[best]
    return ranks


def build_encoding(texts: list[str], merges: int, sample_chars: int = 1_000_000) -> tiktoken.Encoding:
    ranks = train_ranks(texts, merges, sample_chars)
    return tiktoken.Encoding(
        name=f"stdlib-bpe-{len(ranks)}",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: len(ranks)},
    )
