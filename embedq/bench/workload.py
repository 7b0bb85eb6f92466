"""What the worker embeds of one copy of a corpus, as the ceilings around the end-to-end run need it:
each document's token ids truncated at max_seq_len, or in a chunked scenario (`--chunk`) the
chunks the worker cuts the whole documents into (`embedq.chunking`), and texts of the same
sequences for sentence-transformers."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedq.bench.scenarios import Scenario
    from embedq.chunking import Chunking
    from embedq.model import ModelInfo
    from embedq.tokenization import TokenizedDocs


@dataclass(frozen=True)
class Workload:
    """`texts` (the source documents) and the `sequences` the engine runs for them: one per document,
    or with `chunking` one per chunk, in document order."""

    model: ModelInfo
    texts: list[str]
    sequences: TokenizedDocs
    chunking: Chunking | None = None

    @classmethod
    def of(cls, model: ModelInfo, texts: list[str], chunk_tokens: int = 0, chunk_overlap: int = 0) -> Workload:
        """The sequences a worker embeds for `texts`: tokenized as the job's tokenizer does
        (`Tokenizer.for_model`), then cut as the job's record cuts them (`Chunking.for_tokenizer`)."""
        from embedq.chunking import Chunking
        from embedq.tokenization import Tokenizer

        tokenizer = Tokenizer.for_model(model, chunked=bool(chunk_tokens))
        docs = tokenizer.encode(texts)
        if not chunk_tokens:
            return cls(model, texts, docs)
        chunking = Chunking.for_tokenizer(tokenizer, chunk_tokens, chunk_overlap)
        return cls(model, texts, chunking.split(docs)[0], chunking)

    @classmethod
    def of_scenario(cls, model: ModelInfo, texts: list[str], scenario: Scenario) -> Workload:
        """What the scenario's job embeds of one copy of `texts` (its corpus, `scenario.repeat` copies)."""
        return cls.of(model, texts[: len(texts) // scenario.repeat], scenario.chunk_tokens, scenario.chunk_overlap)

    def seq_lens(self) -> tuple[int, ...]:
        """Bucket lengths fitted to the sequences the engine runs (a chunked job's chunks, not its
        documents truncated)."""
        from embedq.engines.profiles import fit_seq_lens

        return fit_seq_lens(self.sequences.lengths, self.model.max_seq_len)

    @property
    def documents(self) -> int:
        return len(self.texts)

    @property
    def tokens(self) -> int:
        """Tokens the engine embeds (special and prompt tokens included, in every chunk)."""
        return int(self.sequences.lengths.sum())

    def sentence_texts(self) -> list[str]:
        """Texts for sentence-transformers to embed the same sequences: the documents, or each chunk's
        window of text tokens decoded back to text (`tokenizers`' decode; sentence-transformers puts
        the special tokens and the prompt around it again). An approximation of the same windows:
        decoded text re-tokenizes to about the same ids, not always exactly (a window that starts
        inside a word starts with the word's rest as a word of its own; [UNK] decodes to nothing).
        Measured with MiniLM's tokenizer and `--chunk 512 --overlap 64`
        (2026-11-30): the long documents' 4,432 chunks of 2,152,838 tokens re-tokenize to 2,152,938
        (+0.005%), 96.8% of chunks to exactly their length and none off by more than 2 tokens (91.5%
        to exactly their ids); the passages' 14,641 chunks, 1,930,934 tokens to 1,930,937 (99.95% to
        exactly their length)."""
        if self.chunking is None:
            return self.texts
        from tokenizers import Tokenizer as Decoder

        decoder = Decoder.from_file(str(self.model.tokenizer_file))
        prefix, tail = self.chunking.head + self.chunking.prompt, self.chunking.tail
        offsets, tokens = self.sequences.offsets, self.sequences.tokens
        windows = [tokens[start + prefix:stop - tail].tolist() for start, stop in itertools.pairwise(offsets)]
        texts = decoder.decode_batch(windows, skip_special_tokens=True)
        # WordPiece decodes a window that starts inside a word with the piece's "##", which would
        # tokenize as two more tokens; the rest of the word alone is nearer the window's ids.
        continuation = getattr(decoder.decoder, "prefix", "")
        return [text.removeprefix(continuation) for text in texts] if continuation else texts
