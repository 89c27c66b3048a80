"""Data: corpora (TFDS array_record builders), the sentencepiece tokenizer and grain pipelines."""
from omni.data.builders import (DataError, LocalText, StdlibCorpus, TextSource, builder, documents,
                                validation_keys)
from omni.data.pipelines import (eval_batches, get_tokenizer, tokenizer_path, train_iterator,
                                 unigram_perplexity)
from omni.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "DataError", "LocalText", "StdlibCorpus", "TextSource", "Tokenizer", "builder", "documents",
    "eval_batches", "get_tokenizer", "tokenizer_path", "train_iterator", "train_tokenizer",
    "unigram_perplexity", "validation_keys",
]
