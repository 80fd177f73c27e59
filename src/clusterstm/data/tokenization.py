"""Offline tokenizers for ClusterSTM: a WordPiece tokenizer trained on local text, or any local BERT-style folder."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _deterministic_vocabulary(
    texts: list[str],
    normalizer: normalizers.Normalizer,
    pre_tokenizer: pre_tokenizers.PreTokenizer,
    vocab_size: int,
    min_frequency: int,
) -> dict[str, int]:
    """
    Special tokens, then the character alphabet (word-initial and `##` continuations), then whole words by count.

    The `tokenizers` WordPiece trainer is not used because its vocabulary depends on hash-map iteration order, so two
    runs on one corpus give different ids and even different merges (huggingface/tokenizers#1794), which made seeded
    runs irreproducible. Ties here are broken alphabetically; a word outside the vocabulary falls back to its
    characters through WordPiece's greedy longest match.
    """
    word_counts: Counter[str] = Counter()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"Tokenizer training text #{i} is a {type(text).__name__}, expected str.")
        word_counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    initials = sorted({word[0] for word in word_counts})
    continuations = sorted({f"##{char}" for word in word_counts for char in word[1:]})
    tokens = list(SPECIAL_TOKENS) + initials + continuations
    known = set(tokens)
    ranked = sorted(word_counts.items(), key=lambda item: (-item[1], item[0]))
    for word, count in ranked:
        if len(tokens) >= vocab_size or count < min_frequency:
            break
        if word not in known:
            tokens.append(word)
            known.add(word)
    return {token: index for index, token in enumerate(tokens[:vocab_size])}


def train_wordpiece_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1000,
    min_frequency: int = 1,
    lowercase: bool = True,
    model_max_length: int = 64,
    extra_tokens: Iterable[str] | None = None,
) -> BertTokenizerFast:
    """
    Build a BERT-style WordPiece tokenizer from local text with the `tokenizers` library (no download).

    The vocabulary is deterministic (the same corpus always gives the same ids): the characters of the corpus, then
    its most frequent whole words. The tokenizer uses the BERT normaliser (lowercasing and accent stripping when
    `lowercase`), BERT pre-tokenisation, the special tokens `[PAD] [UNK] [CLS] [SEP] [MASK]` (ids 0-4 in that order) and the
    `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` post-processor, and is wrapped in a [`BertTokenizerFast`] that
    saves with `save_pretrained` and reloads with `AutoTokenizer.from_pretrained(folder)` offline.

    Args:
        texts (`Iterable[str]`): Training corpus (captions, questions, answers).
        vocab_size (`int`, *optional*, defaults to 1000): Maximum vocabulary size (a small corpus gives fewer).
        min_frequency (`int`, *optional*, defaults to 1): Minimum count for a word to enter the vocabulary.
        lowercase (`bool`, *optional*, defaults to `True`): Lowercase and strip accents.
        model_max_length (`int`, *optional*, defaults to 64): Default truncation length of the tokenizer.
        extra_tokens (`Iterable[str]`, *optional*): Words that must be whole tokens (e.g. a QA answer vocabulary).

    Returns:
        [`BertTokenizerFast`]
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(
            f"`vocab_size` must be larger than the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}."
        )
    texts = list(texts)
    if extra_tokens is not None:
        # Repeating the words makes them frequent enough to survive as whole tokens.
        texts = texts + [" ".join(extra_tokens)] * 2
    if not texts:
        raise ValueError("Cannot train a tokenizer on an empty corpus.")

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = _deterministic_vocabulary(texts, normalizer, pre_tokenizer, vocab_size, min_frequency)
    tokenizer = Tokenizer(
        models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100)
    )
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")

    return BertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        do_lower_case=lowercase,
        model_max_length=model_max_length,
    )


def load_local_tokenizer(path: str | os.PathLike, **kwargs) -> PreTrainedTokenizerBase:
    """
    Load a tokenizer (any BERT-style checkpoint: `tokenizer.json` or `vocab.txt`) from a local folder, never the Hub.

    Args:
        path (`str` or `os.PathLike`): A folder written by `save_pretrained` (or a BERT checkpoint folder).
        kwargs: Passed to `AutoTokenizer.from_pretrained`.

    Raises:
        `ValueError`: the folder does not exist or holds no tokenizer files.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"Tokenizer folder not found: {path!r} (only local folders are accepted here).")
    files = set(os.listdir(path))
    if not files & {"tokenizer.json", "vocab.txt", "tokenizer_config.json"}:
        raise ValueError(f"No tokenizer files (tokenizer.json / vocab.txt) in {path!r}.")
    kwargs.setdefault("local_files_only", True)
    return AutoTokenizer.from_pretrained(path, **kwargs)


__all__ = ["SPECIAL_TOKENS", "load_local_tokenizer", "train_wordpiece_tokenizer"]
