"""Corpora, tokenizers and memory-mapped token files for training.

Corpora (`iter_documents`; several specs can be combined):
    "stdlib"            The default, available offline everywhere and never committed: the running Python's own
                        standard-library sources (*.py, without site-packages and the test suites) and the
                        English prose of `pydoc_data.topics`, discovered at run time. About 12 MB of text.
    path/to/file.txt    A text file (one document). Any other suffix but .jsonl/.json is read as text too.
    path/to/dir         Every file below it, in sorted order (undecodable files are skipped).
    "data/*.txt"        A glob (recursive with **).
    file.jsonl          JSON Lines, one document per record, from the field `text_field` (default "text").
    "hf:NAME[:CONFIG][@SPLIT]"
                        A Hugging Face dataset through the optional `datasets` package, streamed, e.g.
                        "hf:lm1b", "hf:openwebtext", "hf:wikitext:wikitext-103-raw-v1@train". It needs the
                        package and the hub (or a local dataset path as NAME); otherwise a clear error. The
                        field's conventions (docs/method.md §7): LM1B with the bert-base-uncased tokenizer and
                        128-token sequences; OpenWebText with the GPT-2 tokenizer and 1024-token sequences
                        (`--tokenizer bert-base-uncased --seq-len 128`, `--tokenizer gpt2 --seq-len 1024`).

Tokenizers (`Tokenizer`): a byte-level BPE trained with the `tokenizers` library on the training corpus
(`train_tokenizer`) and saved with every checkpoint as tokenizer.json, or any Hugging Face tokenizer by local path
or, when the hub is reachable, by name (`load_tokenizer`).

Token files (`prepare_dataset` -> `TokenDataset`): documents are tokenised once, each followed by the EOS token,
into train.bin and val.bin (uint16, or uint32 for vocabularies over 65535 tokens) plus meta.json in a cache
directory, and memory-mapped. A document goes to the held-out split when a hash of its index falls below
`val_fraction` (if none does, the tail of the stream is held out). Re-running with the same corpus and tokenizer
reuses the files; a cache made from another corpus or tokenizer, or whose files are truncated or altered
(sizes and SHA-256 are checked), raises `DataCacheError` unless `rebuild=True`.

Batches (`TokenDataset.batch`) are pure functions of (seed, step, sample index): the same data on every run,
any number of processes (DDP ranks take disjoint sample indices), and exact resumption without saving a cursor.
"""

import glob as _glob
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .noise import counter_randint, hash3_python
from .runtime import sha256_file, write_text_atomic

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
FORMAT_VERSION = 1
_TEXT_SUFFIXES_SKIPPED = {".pyc", ".so", ".o", ".a", ".png", ".jpg", ".gif", ".zip", ".gz", ".bin", ".exe"}


class CorpusError(ValueError):
    """A corpus spec names nothing, names something unreadable, or yields no text."""


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or is unusable."""


class DataCacheError(RuntimeError):
    """A token cache is corrupt or was made from another corpus/tokenizer."""


# ---------------------------------------------------------------------------------------------------------
# Corpora


def stdlib_files() -> List[Path]:
    """The running interpreter's standard-library *.py files, sorted; site-packages and test suites excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusError(f"corpus 'stdlib': the standard library was not found at {root}")
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_documents():
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        topics = {}
    for key in sorted(topics):
        yield f"pydoc_data.topics:{key}", topics[key]
    for path in stdlib_files():
        yield str(path), path.read_text(encoding="utf-8", errors="replace")


def _read_jsonl(path: Path, text_field: str):
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CorpusError(f"{path}:{line_no}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise CorpusError(f"{path}:{line_no}: a record without the text field {text_field!r} "
                                  f"(set text_field / --text-field)")
            yield f"{path}:{line_no}", str(record[text_field])


def _read_text(path: Path, strict: bool):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        if strict:
            raise CorpusError(f"{path} is not UTF-8 text") from None
        return None
    except OSError as error:
        raise CorpusError(f"cannot read {path}: {error}") from None


def _file_documents(path: Path, text_field: str, strict: bool):
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field)
        return
    if path.suffix.lower() in _TEXT_SUFFIXES_SKIPPED and not strict:
        return
    text = _read_text(path, strict)
    if text is not None:
        yield str(path), text


def parse_hf_spec(spec: str) -> Tuple[str, Optional[str], str]:
    """"hf:NAME[:CONFIG][@SPLIT]" -> (name, config or None, split (default "train"))."""
    body = spec[len("hf:"):]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise CorpusError(f"corpus {spec!r}: expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:openwebtext")
    return name, config or None, split or "train"


def _hf_documents(spec: str, text_field: str):
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"corpus {spec!r} needs the optional `datasets` package (pip install datasets), and the "
                          "Hugging Face hub or a local copy of the dataset") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
        for i, record in enumerate(dataset):
            if text_field not in record:
                raise CorpusError(f"corpus {spec!r}: records have no field {text_field!r} "
                                  f"(fields: {sorted(record)}); set text_field / --text-field")
            yield f"{spec}#{i}", str(record[text_field])
    except CorpusError:
        raise
    except Exception as error:  # the hub is unreachable, the name is wrong, ...
        raise CorpusError(f"corpus {spec!r}: loading the Hugging Face dataset {name!r} (config {config}, split "
                          f"{split}) failed: {type(error).__name__}: {error}. Without network access, use a "
                          "local path (hf:/path/to/dataset) or convert it to JSONL.") from error


def _expand_spec(spec: str) -> List[Path]:
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(p) for p in _glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matches:
            raise CorpusError(f"corpus {spec!r}: no files match this pattern")
        return matches
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise CorpusError(f"corpus {spec!r}: the directory holds no files")
        return files
    if path.exists():  # a file, or a device or pipe such as /dev/null
        return [path]
    raise CorpusError(f"corpus {spec!r}: no such file or directory (use 'stdlib' for the built-in corpus, a path, "
                      "a glob, a .jsonl file or hf:NAME)")


def _as_specs(corpus: Union[str, Sequence[str]]) -> List[str]:
    specs = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    specs = [str(s) for s in specs]
    if not specs or any(not s.strip() for s in specs):
        raise CorpusError(f"corpus spec must be a non-empty string or list of strings, got {corpus!r}")
    return specs


def iter_documents(corpus: Union[str, Sequence[str]], text_field: str = "text",
                   max_bytes: Optional[int] = None) -> Iterator[Tuple[str, str]]:
    """Yield (name, text) documents of the corpus specs in a deterministic order (see the module docstring).

    Args:
        corpus: one spec or a list of them.
        text_field: the field of JSONL records / dataset rows that holds the text.
        max_bytes: stop once this many UTF-8 bytes were yielded (the document that crosses it is the last one);
            None reads everything.

    Raises CorpusError for a spec that names nothing or holds no text. Empty documents are skipped.
    """
    total = 0
    for spec in _as_specs(corpus):
        if spec == "stdlib":
            source = _stdlib_documents()
        elif spec.startswith("hf:"):
            source = _hf_documents(spec, text_field)
        else:
            files = _expand_spec(spec)
            strict = len(files) == 1
            source = (doc for path in files for doc in _file_documents(path, text_field, strict))
        found = False
        for name, text in source:
            if not text:
                continue
            found = True
            yield name, text
            total += len(text.encode("utf-8"))
            if max_bytes is not None and total >= max_bytes:
                return
        if not found:
            raise CorpusError(f"corpus {spec!r} is empty: it holds no text")


def corpus_fingerprint(corpus, text_field="text", max_bytes=None) -> str:
    """A SHA-256 naming the corpus: spec strings, and (size, mtime) of every file they name; cheap to compute.

    Hugging Face specs are named by the spec string alone.
    """
    entries = {"specs": _as_specs(corpus), "text_field": text_field, "max_bytes": max_bytes, "files": []}
    for spec in entries["specs"]:
        if spec.startswith("hf:"):
            continue
        files = stdlib_files() if spec == "stdlib" else _expand_spec(spec)
        if spec == "stdlib":
            entries["files"].append(f"python {sys.version_info[:3]}")
        for path in files:
            stat = path.stat()
            entries["files"].append([str(path), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "[SEP]", "<|end_of_text|>")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]")


class Tokenizer:
    """A thin wrapper of a `tokenizers.Tokenizer` with the EOS/PAD ids the training and decoding code needs.

    Attributes:
        vocab_size: the number of token ids (model's vocab_size must be at least this).
        eos_id: the end-of-text token appended after each document (and the stop token in `kforcing sample`).
        pad_id: padding (the EOS id when the tokenizer has no pad token).
    """

    def __init__(self, backend):
        import tokenizers

        if not isinstance(backend, tokenizers.Tokenizer):
            raise TokenizerError(f"expected a tokenizers.Tokenizer, got {type(backend).__name__}")
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        eos = next((t for t in _EOS_CANDIDATES if t in vocab), None)
        if eos is None:
            raise TokenizerError(f"the tokenizer has none of the end-of-text tokens {_EOS_CANDIDATES}")
        self.eos_token, self.eos_id = eos, vocab[eos]
        pad = next((t for t in _PAD_CANDIDATES if t in vocab), eos)
        self.pad_token, self.pad_id = pad, vocab[pad]

    def encode(self, text: str) -> List[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        return self.backend.to_str()

    def fingerprint(self) -> str:
        """SHA-256 of the serialised tokenizer: two tokenizers with equal fingerprints tokenise identically."""
        return hashlib.sha256(self.to_str().encode()).hexdigest()

    def save(self, path):
        """Write tokenizer.json to `path` (a file path, or a directory to put tokenizer.json in), atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        write_text_atomic(path, self.to_str())
        return path

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r})"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: every byte is a token, so any text round-trips) on `texts`.

    The special tokens <|endoftext|> (id 0) and <|pad|> (id 1) are added. vocab_size counts them and the 256
    byte tokens, so it must be at least 258+.
    """
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 259:
        raise TokenizerError(f"vocab_size must be >= 259 (256 bytes + 2 special tokens + 1 merge), got {vocab_size}")
    backend = _HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    count = [0]

    def counted():
        for text in texts:
            count[0] += 1
            yield text

    backend.train_from_iterator(counted(), trainer)
    if count[0] == 0:
        raise CorpusError("cannot train a tokenizer on an empty corpus")
    return Tokenizer(backend)


def load_tokenizer(name_or_path) -> Tokenizer:
    """A tokenizer from a tokenizer.json file, a directory holding one, or a Hugging Face hub name.

    Hub names (e.g. "gpt2", "bert-base-uncased") need network access; without it the error says so and what to
    pass instead.
    """
    from tokenizers import Tokenizer as _HFTokenizer

    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"{path} is a directory without a tokenizer.json")
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer(_HFTokenizer.from_file(str(path)))
        except TokenizerError:
            raise
        except Exception as error:
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({error})") from None
    name = str(name_or_path)
    looks_like_path = name.endswith(".json") or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path:  # hub ids are NAME or ORG/NAME
        raise TokenizerError(f"tokenizer {name!r}: no such file or directory")
    try:
        backend = _HFTokenizer.from_pretrained(str(name_or_path))
    except Exception as error:
        raise TokenizerError(
            f"tokenizer {str(name_or_path)!r} is not a local file or directory, and loading it from the Hugging "
            f"Face hub failed ({type(error).__name__}: {error}). Pass a path to a tokenizer.json, or omit "
            "--tokenizer to train a byte-level BPE on the corpus.") from None
    return Tokenizer(backend)


# ---------------------------------------------------------------------------------------------------------
# Token files


def _token_dtype(vocab_size):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def _is_val_document(index: int, val_fraction: float) -> bool:
    return hash3_python(0x5EED, index, 0) >> 11 < val_fraction * (1 << 53)


class TokenDataset:
    """Memory-mapped train/val token arrays of a prepared corpus (see `prepare_dataset`).

    Attributes:
        train, val: 1-D numpy memmaps of token ids.
        meta: the cache's meta.json (token counts, fingerprints, checksums).
    """

    def __init__(self, directory, verify: bool = True):
        self.directory = Path(directory)
        self.meta = _read_meta(self.directory)
        dtype = np.dtype(self.meta["dtype"])
        for split in ("train", "val"):
            path = self.directory / f"{split}.bin"
            expected = self.meta[f"{split}_tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                size = path.stat().st_size if path.is_file() else "missing"
                raise DataCacheError(f"token cache {self.directory} is corrupt: {path.name} has size {size}, "
                                     f"expected {expected} bytes; rebuild it (rebuild=True / --rebuild-data)")
            if verify and sha256_file(path) != self.meta[f"{split}_sha256"]:
                raise DataCacheError(f"token cache {self.directory} is corrupt: the checksum of {path.name} does not "
                                     "match meta.json; rebuild it (rebuild=True / --rebuild-data)")
        self.train = np.memmap(self.directory / "train.bin", dtype=dtype, mode="r") if self.meta["train_tokens"] \
            else np.zeros(0, dtype)
        self.val = np.memmap(self.directory / "val.bin", dtype=dtype, mode="r") if self.meta["val_tokens"] \
            else np.zeros(0, dtype)

    @property
    def vocab_size(self):
        return self.meta["vocab_size"]

    def split(self, name):
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int = 0, first_index: int = 0,
              device=None):
        """Inputs and next-token targets, two (batch_size, seq_len) int64 tensors.

        Sample i of the batch is the window starting at a pseudo-random offset, a pure function of
        (seed, split, step, first_index + i): a DDP rank r with per-rank batch b passes first_index = r * b.
        """
        data = self.split(split)
        windows = len(data) - seq_len
        if windows < 1:
            raise ValueError(f"the {split} split has {len(data)} tokens, too few for sequences of {seq_len} "
                             "tokens (+1 target); use a bigger corpus, a shorter --seq-len or a larger val_fraction")
        salt = 0 if split == "train" else 1 << 40
        index = torch.arange(first_index, first_index + batch_size, dtype=torch.int64)
        starts = counter_randint(seed + salt, index, step, windows).tolist()
        rows = np.stack([np.asarray(data[s:s + seq_len + 1], dtype=np.int64) for s in starts])
        rows = torch.from_numpy(rows)
        if device is not None:
            rows = rows.to(device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]


def _read_meta(directory: Path):
    path = directory / "meta.json"
    if not path.is_file():
        raise DataCacheError(f"{directory} holds no token cache (meta.json is missing)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataCacheError(f"token cache {directory} is corrupt: meta.json is unreadable ({error}); rebuild it "
                             "(rebuild=True / --rebuild-data)") from None
    needed = ("format", "dtype", "train_tokens", "val_tokens", "train_sha256", "val_sha256", "corpus_fingerprint",
              "tokenizer_fingerprint", "vocab_size")
    if not isinstance(meta, dict) or any(key not in meta for key in needed) or meta["format"] != FORMAT_VERSION:
        raise DataCacheError(f"token cache {directory}: meta.json is not a format-{FORMAT_VERSION} token cache; "
                             "rebuild it (rebuild=True / --rebuild-data)")
    return meta


def _megabytes(max_bytes) -> str:
    return "all of it" if max_bytes is None else f"its first {max_bytes / 1e6:g} MB (--corpus-max-mb)"


def _cache_difference(meta: dict, wanted: dict, corpus, text_field: str, max_bytes) -> str:
    """How an existing cache's making differs from this run's, in words (what a user changes to match it)."""
    reasons = []
    if meta.get("corpus_fingerprint") != wanted["corpus_fingerprint"]:
        specs = [str(spec) for spec in _as_specs(corpus)]
        if meta.get("corpus") != specs:
            reasons.append(f"from another corpus ({meta.get('corpus')}, this run: {specs})")
        elif meta.get("text_field", "text") != text_field:
            reasons.append(f"from another text field ({meta.get('text_field')!r}, this run: {text_field!r})")
        elif meta.get("max_bytes") != max_bytes:
            reasons.append(f"from {_megabytes(meta.get('max_bytes'))} of the corpus, this run reads "
                           f"{_megabytes(max_bytes)}")
        else:
            reasons.append(f"from the corpus {specs} as its files were then (they changed since)")
    if meta.get("tokenizer_fingerprint") != wanted["tokenizer_fingerprint"]:
        reasons.append("with another tokenizer")
    if meta.get("val_fraction") != wanted["val_fraction"]:
        reasons.append(f"with another validation split ({meta.get('val_fraction')}, this run: "
                       f"{wanted['val_fraction']})")
    return " and ".join(reasons)


def prepare_dataset(corpus, tokenizer: Tokenizer, cache_dir, val_fraction: float = 0.01, text_field: str = "text",
                    max_bytes: Optional[int] = None, rebuild: bool = False, verify: bool = True,
                    progress: bool = False) -> TokenDataset:
    """Tokenise `corpus` into `cache_dir` (train.bin, val.bin, meta.json) and memory-map it; reuse a valid cache.

    Args:
        corpus, text_field, max_bytes: as in `iter_documents`.
        tokenizer: the `Tokenizer` to encode with.
        cache_dir: the cache directory (created if needed).
        val_fraction: the share of documents held out for validation, in (0, 0.5].
        rebuild: overwrite an existing cache instead of checking it.
        verify: check SHA-256 checksums on reuse (sizes are always checked).
        progress: show a tqdm bar while tokenising.

    Raises:
        CorpusError: the corpus names nothing or holds no text.
        DataCacheError: an existing cache is corrupt or belongs to another corpus/tokenizer (and rebuild=False).
    """
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    cache_dir = Path(cache_dir)
    fingerprint = corpus_fingerprint(corpus, text_field, max_bytes)
    wanted = {"corpus_fingerprint": fingerprint, "tokenizer_fingerprint": tokenizer.fingerprint(),
              "val_fraction": val_fraction}
    if (cache_dir / "meta.json").exists() and not rebuild:
        meta = _read_meta(cache_dir)
        diff = [key for key, value in wanted.items() if meta.get(key) != value]
        if diff:
            raise DataCacheError(
                f"token cache {cache_dir} was built {_cache_difference(meta, wanted, corpus, text_field, max_bytes)}; "
                "pass rebuild=True / --rebuild-data to overwrite it, or use another data directory")
        return TokenDataset(cache_dir, verify=verify)

    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "meta.json").unlink(missing_ok=True)  # an incomplete cache is never mistaken for a valid one
    dtype = _token_dtype(tokenizer.vocab_size)
    tmp = {split: cache_dir / f".{split}.bin.tmp{os.getpid()}" for split in ("train", "val")}
    counts = {"train": 0, "val": 0}
    documents = {"train": 0, "val": 0}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="tokenising", unit="doc")
    try:
        with open(tmp["train"], "wb") as train_file, open(tmp["val"], "wb") as val_file:
            files = {"train": train_file, "val": val_file}
            chunk: List[str] = []
            index = 0

            def flush():
                nonlocal index
                for ids in tokenizer.encode_batch(chunk):
                    split = "val" if _is_val_document(index, val_fraction) else "train"
                    array = np.asarray(ids + [tokenizer.eos_id], dtype=dtype)
                    files[split].write(array.tobytes())
                    counts[split] += len(array)
                    documents[split] += 1
                    index += 1
                if bar is not None:
                    bar.update(len(chunk))
                chunk.clear()

            for _, text in iter_documents(corpus, text_field, max_bytes):
                chunk.append(text)
                if len(chunk) >= 256:
                    flush()
            if chunk:
                flush()
        if counts["train"] + counts["val"] == 0:
            raise CorpusError(f"corpus {corpus!r} holds no text")
        if counts["val"] == 0 or counts["train"] == 0:
            _split_tail(tmp, counts, dtype, val_fraction)
        for split in ("train", "val"):
            os.replace(tmp[split], cache_dir / f"{split}.bin")
    finally:
        if bar is not None:
            bar.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
    meta = {
        "format": FORMAT_VERSION, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
        "corpus": [str(s) for s in _as_specs(corpus)], "text_field": text_field, "max_bytes": max_bytes,
        "train_tokens": counts["train"], "val_tokens": counts["val"],
        "train_documents": documents["train"], "val_documents": documents["val"],
        "train_sha256": sha256_file(cache_dir / "train.bin"), "val_sha256": sha256_file(cache_dir / "val.bin"),
        **wanted,
    }
    write_text_atomic(cache_dir / "meta.json", json.dumps(meta, indent=2))
    return TokenDataset(cache_dir, verify=False)


def find_token_cache(candidates: Sequence, tokenizer: Optional[Tokenizer]) -> Optional[TokenDataset]:
    """The first of `candidates` (token cache directories, None entries skipped) made with `tokenizer` (any
    tokenizer when None), memory-mapped; None when no candidate fits.

    The candidates come from the run directories' typed metadata
    (`kforcing.checkpoints.checkpoint.Provenance.token_cache`), in the caller's order of preference.
    """
    fingerprint = tokenizer.fingerprint() if tokenizer is not None else None
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            meta = _read_meta(Path(candidate))
        except DataCacheError:
            continue
        if fingerprint is None or meta["tokenizer_fingerprint"] == fingerprint:
            return TokenDataset(candidate, verify=False)
    return None


def heldout_contexts(dataset: TokenDataset, num: int, max_len: int, min_len: int = 4, seed: int = 0,
                     split: str = "val") -> List[List[int]]:
    """`num` contexts from a split: context i starts at a pseudo-random offset and has a pseudo-random length in
    [min_len, max_len], both pure functions of (seed, i)."""
    data = dataset.split(split)
    min_len = max(1, min(min_len, max_len))
    if len(data) <= max_len:
        raise ValueError(f"the {split} split has {len(data)} tokens, too few for contexts of {max_len} tokens")
    index = torch.arange(num, dtype=torch.int64)
    lengths = (min_len + counter_randint(seed ^ 0xC0, index, 0, max_len - min_len + 1)).tolist()
    starts = counter_randint(seed ^ 0xC1, index, 0, len(data) - max_len).tolist()
    return [[int(t) for t in data[s:s + n]] for s, n in zip(starts, lengths)]


def _split_tail(tmp, counts, dtype, val_fraction):
    """When no document (or every one) landed in val, hold out the tail of the whole stream instead."""
    tokens = np.concatenate([np.fromfile(tmp["train"], dtype=dtype), np.fromfile(tmp["val"], dtype=dtype)])
    cut = len(tokens) - max(1, int(round(len(tokens) * val_fraction)))
    if cut < 1:
        raise CorpusError(f"the corpus has only {len(tokens)} token(s): too few to hold out a validation split")
    tokens[:cut].tofile(tmp["train"])
    tokens[cut:].tofile(tmp["val"])
    counts["train"], counts["val"] = cut, len(tokens) - cut


__all__ = [
    "CorpusError", "DataCacheError", "EOS_TOKEN", "PAD_TOKEN", "TokenDataset", "Tokenizer", "TokenizerError",
    "corpus_fingerprint", "find_token_cache", "heldout_contexts", "iter_documents", "load_tokenizer", "parse_hf_spec",
    "prepare_dataset", "stdlib_files", "train_tokenizer",
]
