"""Training and evaluation data: text files -> documents -> tokens -> fixed-length packed sequences.

Files are JSONL (`.jsonl`/`.json`, one object per line with a text field) or plain text (any other
suffix; documents are paragraphs separated by blank lines). Each document is tokenized with the model's
tokenizer (its own special tokens, e.g. BOS) and followed by EOS; documents are concatenated and cut into
sequences of `seq_len` tokens (packing, as transformers' `group_texts`); the last partial sequence of the
data is right-padded and masked.

Training streams the files (a large file is never in memory): sequences are collected into blocks of
at least `shuffle_buffer` sequences, cut at a document boundary, and each block is permuted with a seed
from (seed, epoch, block). The position in the stream is a small JSON-able `DataState`, so a resumed run
sees the same batches in the same order.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

MAX_DOC_CHARS = 1 << 20  # a plain-text paragraph longer than this is cut at a line boundary
TOKENIZE_BATCH = 64


class DataError(ValueError):
    """Unusable data (missing/empty file, bad JSONL line); the message names the file and line."""


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".json")


def check_files(paths: Sequence[str | Path], field: str = "data") -> list[Path]:
    """The paths as Paths, each an existing file; DataError naming `field` otherwise."""
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DataError(f"{field}: {p}: no such file")
        out.append(p)
    if not out:
        raise DataError(f"{field}: no files given")
    return out


def read_documents(paths: Sequence[Path], text_field: str = "text", file: int = 0,
                   offset: int = 0) -> Iterator[tuple[str, int, int]]:
    """Yield (document text, file index, byte offset just after it), from (file, offset) on."""
    for fi in range(file, len(paths)):
        path = paths[fi]
        with open(path, "rb") as f:
            f.seek(offset if fi == file else 0)
            if _is_jsonl(path):
                while True:
                    line = f.readline()
                    if not line:
                        break
                    if not line.strip():
                        continue
                    where = f"{path}: the line at byte {f.tell() - len(line)}"
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where} is not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                        raise DataError(f"{where} has no string field '{text_field}'")
                    if obj[text_field]:
                        yield obj[text_field], fi, f.tell()
            else:
                para: list[str] = []
                size = 0
                while True:
                    line = f.readline()
                    if line.strip():
                        text = line.decode("utf-8", errors="replace")
                        para.append(text)
                        size += len(text)
                        if size < MAX_DOC_CHARS:
                            continue
                    if para:
                        yield "".join(para).rstrip("\n"), fi, f.tell()
                        para, size = [], 0
                    if not line:
                        break


class Tokenize:
    """text -> token ids with the tokenizer's own special tokens, then EOS (if it has one)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos = getattr(tokenizer, "eos_token_id", None)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        out = []
        for ids in self.tokenizer(texts)["input_ids"]:
            ids = list(ids)
            if self.eos is not None and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)
            out.append(ids)
        return out


def _token_docs(paths: Sequence[Path], tokenize: Tokenize, text_field: str, file: int = 0,
                offset: int = 0) -> Iterator[tuple[list[int], int, int]]:
    """(token ids, file, offset after) per document, tokenized in small batches."""
    batch: list[tuple[str, int, int]] = []
    for doc in read_documents(paths, text_field, file, offset):
        batch.append(doc)
        if len(batch) == TOKENIZE_BATCH:
            yield from zip(tokenize([d[0] for d in batch]), *zip(*[d[1:] for d in batch]))
            batch = []
    if batch:
        yield from zip(tokenize([d[0] for d in batch]), *zip(*[d[1:] for d in batch]))


def pack(token_docs: Iterator[list[int]], seq_len: int, pad_id: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Concatenate documents and cut into (ids [seq_len], mask [seq_len]); the last one padded."""
    buf: list[int] = []
    for ids in token_docs:
        buf.extend(ids)
        while len(buf) >= seq_len:
            yield np.asarray(buf[:seq_len], np.int32), np.ones(seq_len, np.int32)
            buf = buf[seq_len:]
    if buf:
        yield _padded(buf, seq_len, pad_id)


def _padded(buf: list[int], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full(seq_len, pad_id, np.int32)
    mask = np.zeros(seq_len, np.int32)
    ids[: len(buf)] = buf
    mask[: len(buf)] = 1
    return ids, mask


@dataclasses.dataclass
class DataState:
    """Where the stream is: the current block starts at (file, offset) with `carry` tokens left over from
    the previous block; `index` sequences of that block have been used."""

    epoch: int = 0
    block: int = 0
    file: int = 0
    offset: int = 0
    carry: list[int] = dataclasses.field(default_factory=list)
    index: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DataState":
        return cls(**{k: d[k] for k in ("epoch", "block", "file", "offset", "carry", "index")})


class PackedStream:
    """Endless shuffled packed sequences over `paths`, resumable from a `DataState`."""

    def __init__(self, paths: Sequence[str | Path], tokenizer: Any, seq_len: int, *, seed: int = 0,
                 shuffle_buffer: int = 1024, text_field: str = "text", pad_id: int = 0,
                 state: DataState | None = None) -> None:
        self.paths = check_files(paths, "data.train")
        self.tokenize = Tokenize(tokenizer)
        self.seq_len, self.seed, self.text_field, self.pad_id = seq_len, seed, text_field, pad_id
        self.buffer = max(1, shuffle_buffer)
        self.state = dataclasses.replace(state) if state is not None else DataState()
        self._block: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._next: tuple[int, int, list[int], bool] | None = None

    def check_not_empty(self) -> None:
        """DataError if the files hold no text at all."""
        for _ in read_documents(self.paths, self.text_field):
            return
        raise DataError(f"data.train: {', '.join(map(str, self.paths))}: no text (empty file or no "
                        f"non-empty '{self.text_field}' values)")

    def _make_block(self) -> None:
        s = self.state
        seqs: list[tuple[np.ndarray, np.ndarray]] = []
        buf = list(s.carry)
        nxt = None
        for ids, fi, off in _token_docs(self.paths, self.tokenize, self.text_field, s.file, s.offset):
            buf.extend(ids)
            while len(buf) >= self.seq_len:
                seqs.append((np.asarray(buf[: self.seq_len], np.int32), np.ones(self.seq_len, np.int32)))
                buf = buf[self.seq_len:]
            if len(seqs) >= self.buffer:
                nxt = (fi, off, buf, False)
                break
        if nxt is None:  # end of the data: flush the remainder, the next block starts a new epoch
            if buf:
                seqs.append(_padded(buf, self.seq_len, self.pad_id))
            nxt = (0, 0, [], True)
        if not seqs:
            raise DataError(f"data.train: {', '.join(map(str, self.paths))}: no text to train on")
        rng = np.random.default_rng([self.seed, s.epoch, s.block])
        self._block = [seqs[i] for i in rng.permutation(len(seqs))]
        self._next = nxt

    def next_sequence(self) -> tuple[np.ndarray, np.ndarray]:
        """The next (ids, mask); advances `state`."""
        if self._block is None:
            self._make_block()
        seq = self._block[self.state.index]
        self.state.index += 1
        if self.state.index == len(self._block):
            fi, off, carry, new_epoch = self._next
            s = self.state
            self.state = DataState(s.epoch + 1 if new_epoch else s.epoch, 0 if new_epoch else s.block + 1,
                                   fi, off, list(carry), 0)
            self._block = None
        return seq

    def next_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [batch, seq_len] int32, mask [batch, seq_len] int32)."""
        seqs = [self.next_sequence() for _ in range(batch_size)]
        return np.stack([s[0] for s in seqs]), np.stack([s[1] for s in seqs])


def iter_sequences(paths: Sequence[str | Path], tokenizer: Any, seq_len: int, text_field: str = "text",
                   pad_id: int = 0, max_sequences: int | None = None,
                   field: str = "data.eval") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The packed sequences of the files in order (streamed), at most `max_sequences`; DataError if none."""
    paths = check_files(paths, field)
    docs = (ids for ids, _, _ in _token_docs(paths, Tokenize(tokenizer), text_field))
    n = 0
    for seq in pack(docs, seq_len, pad_id):
        yield seq
        n += 1
        if max_sequences is not None and n >= max_sequences:
            return
    if not n:
        raise DataError(f"{field}: {', '.join(map(str, paths))}: no text (empty file or no non-empty "
                        f"'{text_field}' values)")


def eval_sequences(paths: Sequence[str | Path], tokenizer: Any, seq_len: int, text_field: str = "text",
                   pad_id: int = 0, max_sequences: int | None = None,
                   field: str = "data.eval") -> tuple[np.ndarray, np.ndarray]:
    """`iter_sequences` as arrays (ids, mask) [N, seq_len]."""
    seqs = list(iter_sequences(paths, tokenizer, seq_len, text_field, pad_id, max_sequences, field))
    return np.stack([s[0] for s in seqs]), np.stack([s[1] for s in seqs])


def fit_batches(sequences: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int,
                bucket: int = 64) -> tuple[tuple[int, int], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """`batches` with the shape fitted to the data: ((rows, width), the batches).

    Packed sequences are all full except the data's last one, so only data shorter than one batch leaves
    room to save: then rows = the number of sequences and width = the longest one's real length rounded up
    to a multiple of `bucket` (a handful of shapes, so compiles are reused), at most the sequences' length.
    A short text then costs one small forward pass instead of `batch_size` x `seq_len` mostly padding (78
    tokens were scored as 8 x 2048). Longer data keeps (batch_size, seq_len). Sequences are right-padded,
    so cutting masked columns off the end changes no score. Empty input gives ((0, 0), no batches).
    """
    if batch_size < 1 or bucket < 1:
        raise ValueError(f"batch_size and bucket must be positive, got {batch_size} and {bucket}")
    it = iter(sequences)
    head = list(itertools.islice(it, batch_size + 1))  # one more than a batch: is this all the data?
    if not head:
        return (0, 0), iter(())
    seq_len = len(head[0][0])
    if len(head) > batch_size:
        return (batch_size, seq_len), batches(itertools.chain(head, it), batch_size)
    longest = max(int(np.flatnonzero(mask).max()) + 1 if mask.any() else 1 for _, mask in head)
    width = min(seq_len, -(-longest // bucket) * bucket)
    cut = [(ids[:width], mask[:width]) for ids, mask in head]
    return (len(cut), width), batches(cut, len(cut))


def batches(sequences: Iterable[tuple[np.ndarray, np.ndarray]],
            batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fixed-size (ids, mask) batches; the last one is filled with fully masked rows (shapes never change)."""
    buf: list[tuple[np.ndarray, np.ndarray]] = []
    for seq in sequences:
        buf.append(seq)
        if len(buf) == batch_size:
            yield np.stack([b[0] for b in buf]), np.stack([b[1] for b in buf])
            buf = []
    if buf:
        blank = (np.zeros_like(buf[0][0]), np.zeros_like(buf[0][1]))
        buf += [blank] * (batch_size - len(buf))
        yield np.stack([b[0] for b in buf]), np.stack([b[1] for b in buf])
