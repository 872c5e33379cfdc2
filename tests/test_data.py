"""kforcing.data: corpora, tokenizers, the token cache and the batch sampler."""

import json
import sys
import types

import numpy as np
import pytest
import torch

from kforcing.data import (CorpusError, DataCacheError, TokenDataset, TokenizerError, iter_documents, load_tokenizer,
                           parse_hf_spec, prepare_dataset, stdlib_files, train_tokenizer)

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "def f(x):\n    return x + 1\n" * 40)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [text for _, text in iter_documents("stdlib", max_bytes=300_000)]
    return train_tokenizer(texts, vocab_size=512)


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(40):
        (d / f"doc{i:02d}.txt").write_text(f"document {i}. " + TEXT[i:] + "\n")
    return d


# ---------------------------------------------------------------------------------------------------------
# Corpora


def test_stdlib_corpus_is_discovered_at_run_time():
    files = stdlib_files()
    names = {f.name for f in files}
    assert {"os.py", "functools.py", "argparse.py"} <= names
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    docs = iter_documents("stdlib")
    first_name, first_text = next(docs)
    assert first_name.startswith("pydoc_data.topics:") and len(first_text) > 0  # English prose first
    total = sum(len(text) for _, text in iter_documents("stdlib", max_bytes=2_000_000))
    assert 2_000_000 <= total < 2_500_000  # max_bytes stops after the document that crosses it


def test_file_dir_glob_and_jsonl_corpora(tmp_path, corpus_dir):
    single = corpus_dir / "doc03.txt"
    assert [name for name, _ in iter_documents(str(single))] == [str(single)]
    assert len(list(iter_documents(str(corpus_dir)))) == 40
    assert len(list(iter_documents(str(corpus_dir / "doc1*.txt")))) == 10
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"row {i}", "id": i}) for i in range(5)) + "\n\n")
    assert [text for _, text in iter_documents(str(jsonl))] == [f"row {i}" for i in range(5)]
    assert len(list(iter_documents([str(single), str(jsonl)]))) == 6
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "x"}) + "\n")
    assert [t for _, t in iter_documents(str(other), text_field="body")] == ["x"]
    with pytest.raises(CorpusError, match="text field 'text'"):
        list(iter_documents(str(other)))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(CorpusError, match="not valid JSON"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))


def test_missing_and_empty_corpora(tmp_path):
    with pytest.raises(CorpusError, match="no such file or directory"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    with pytest.raises(CorpusError, match="no files match"):
        list(iter_documents(str(tmp_path / "*.md")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no files"):
        list(iter_documents(str(tmp_path / "empty")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="is empty: it holds no text"):
        list(iter_documents(str(tmp_path / "empty.txt")))
    with pytest.raises(CorpusError, match="'/dev/null' is empty"):
        list(iter_documents("/dev/null"))
    with pytest.raises(CorpusError, match="empty corpus"):
        train_tokenizer([], vocab_size=300)


def test_hf_datasets_path(tmp_path, monkeypatch):
    assert parse_hf_spec("hf:openwebtext") == ("openwebtext", None, "train")
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1@validation") == ("wikitext", "wikitext-2-raw-v1",
                                                                          "validation")
    with pytest.raises(CorpusError, match="hf:NAME"):
        parse_hf_spec("hf:")
    # Without the package: a clear error.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CorpusError, match="needs the optional `datasets` package"):
        list(iter_documents("hf:lm1b"))
    # With it (a stand-in that reads a local JSONL file the way load_dataset(streaming=True) yields rows).
    local = tmp_path / "rows.jsonl"
    local.write_text("\n".join(json.dumps({"text": f"sentence {i}"}) for i in range(3)))
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if name != str(local):
            raise ConnectionError("the hub is unreachable")
        return (json.loads(line) for line in local.read_text().splitlines())

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert [t for _, t in iter_documents(f"hf:{local}@train")] == ["sentence 0", "sentence 1", "sentence 2"]
    assert calls[-1] == (str(local), None, "train", True)
    with pytest.raises(CorpusError, match="the hub is unreachable.*local path"):
        list(iter_documents("hf:openwebtext"))
    with pytest.raises(CorpusError, match="no field 'content'"):
        list(iter_documents(f"hf:{local}", text_field="content"))


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


def test_bpe_tokenizer_round_trips_and_saves(tmp_path, tokenizer):
    assert tokenizer.vocab_size == 512 and tokenizer.eos_id == 0 and tokenizer.pad_id == 1
    for text in ["def f(x):\n    return x  # comment\n", "naïve café — ünïcødé ✓ 😀", "\t\n  spaces  "]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert max(ids) < tokenizer.vocab_size
    code = "import os\nimport sys\n\n\ndef main():\n    pass\n"
    assert len(tokenizer.encode(code)) < 0.75 * len(code.encode())  # it learned merges from the corpus
    path = tokenizer.save(tmp_path)
    assert path.name == "tokenizer.json"
    for source in (path, tmp_path):
        loaded = load_tokenizer(source)
        assert loaded.fingerprint() == tokenizer.fingerprint() and loaded.encode(code) == tokenizer.encode(code)


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying the network
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing" / "tokenizer.json")
    with pytest.raises(TokenizerError, match="Hugging Face hub failed"):
        load_tokenizer("gpt2")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(TokenizerError, match="without a tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="vocab_size must be >= 259"):
        train_tokenizer(["abc"], vocab_size=100)


# ---------------------------------------------------------------------------------------------------------
# Token cache


def test_prepare_dataset_writes_splits_and_reuses_the_cache(tmp_path, corpus_dir, tokenizer):
    cache = tmp_path / "cache"
    ds = prepare_dataset(str(corpus_dir), tokenizer, cache, val_fraction=0.1)
    meta = ds.meta
    assert meta["train_documents"] + meta["val_documents"] == 40 and meta["val_documents"] >= 1
    assert ds.train.dtype == np.uint16 and len(ds.train) == meta["train_tokens"]
    # Every document ends with EOS, and the two splits hold all the tokens of the corpus.
    expected = sum(len(tokenizer.encode(text)) + 1 for _, text in iter_documents(str(corpus_dir)))
    assert meta["train_tokens"] + meta["val_tokens"] == expected
    assert int((ds.train == tokenizer.eos_id).sum()) == meta["train_documents"]
    stamp = (cache / "train.bin").stat().st_mtime_ns
    again = prepare_dataset(str(corpus_dir), tokenizer, cache, val_fraction=0.1)
    assert (cache / "train.bin").stat().st_mtime_ns == stamp and again.meta == meta


def test_single_document_corpus_holds_out_the_tail(tmp_path, tokenizer):
    path = tmp_path / "one.txt"
    path.write_text(TEXT)
    ds = prepare_dataset(str(path), tokenizer, tmp_path / "cache", val_fraction=0.1)
    total = len(tokenizer.encode(TEXT)) + 1
    assert ds.meta["val_tokens"] == round(total * 0.1) and ds.meta["train_tokens"] == total - ds.meta["val_tokens"]


def test_cache_mismatch_and_corruption_are_detected(tmp_path, corpus_dir, tokenizer):
    cache = tmp_path / "cache"
    prepare_dataset(str(corpus_dir), tokenizer, cache)
    other_tokenizer = train_tokenizer([TEXT], vocab_size=300)
    with pytest.raises(DataCacheError, match="another tokenizer.*rebuild"):
        prepare_dataset(str(corpus_dir), other_tokenizer, cache)
    # What differs is said in the words of the option that changes it.
    with pytest.raises(DataCacheError, match=r"from all of it of the corpus, this run reads its first 0.0001 MB "
                                             r"\(--corpus-max-mb\)"):
        prepare_dataset(str(corpus_dir), tokenizer, cache, max_bytes=100)
    with pytest.raises(DataCacheError, match="from another corpus"):
        prepare_dataset([str(corpus_dir), str(corpus_dir / "doc00.txt")], tokenizer, cache)
    with pytest.raises(DataCacheError, match="another validation split"):
        prepare_dataset(str(corpus_dir), tokenizer, cache, val_fraction=0.2)
    (corpus_dir / "doc00.txt").write_text("changed")
    with pytest.raises(DataCacheError, match=r"as its files were then \(they changed since\)"):
        prepare_dataset(str(corpus_dir), tokenizer, cache)
    ds = prepare_dataset(str(corpus_dir), tokenizer, cache, rebuild=True)
    assert ds.meta["corpus_fingerprint"] != ""

    data = bytearray((cache / "train.bin").read_bytes())
    data[10] ^= 0xFF  # flip bits, same size
    (cache / "train.bin").write_bytes(bytes(data))
    with pytest.raises(DataCacheError, match="checksum of train.bin"):
        prepare_dataset(str(corpus_dir), tokenizer, cache)
    (cache / "train.bin").write_bytes(bytes(data[:-6]))  # truncated
    with pytest.raises(DataCacheError, match="train.bin has size"):
        TokenDataset(cache, verify=False)
    (cache / "meta.json").write_text("{truncated")
    with pytest.raises(DataCacheError, match="meta.json is unreadable"):
        prepare_dataset(str(corpus_dir), tokenizer, cache)
    prepare_dataset(str(corpus_dir), tokenizer, cache, rebuild=True)
    TokenDataset(cache)  # valid again


def test_batches_are_pure_functions_of_seed_step_and_index(tmp_path, corpus_dir, tokenizer):
    ds = prepare_dataset(str(corpus_dir), tokenizer, tmp_path / "cache", val_fraction=0.2)
    x, y = ds.batch("train", step=3, batch_size=6, seq_len=16, seed=1)
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    x2, _ = ds.batch("train", step=3, batch_size=6, seq_len=16, seed=1)
    assert torch.equal(x, x2)
    # A DDP rank's share (first_index) is a slice of the global batch.
    part, _ = ds.batch("train", step=3, batch_size=2, seq_len=16, seed=1, first_index=4)
    assert torch.equal(part, x[4:])
    assert not torch.equal(ds.batch("train", step=4, batch_size=6, seq_len=16, seed=1)[0], x)
    assert not torch.equal(ds.batch("train", step=3, batch_size=6, seq_len=16, seed=2)[0], x)
    # Each window is a real slice of the token file.
    train = torch.from_numpy(np.asarray(ds.train, dtype=np.int64))
    row = x[0]
    starts = [s for s in range(len(train) - 16) if torch.equal(train[s:s + 16], row)]
    assert starts
    # Offsets cover the file (no window is always skipped).
    seen = torch.cat([ds.batch("train", s, 64, 16, seed=0)[0][:, 0] for s in range(20)])
    assert len(set(seen.tolist())) > 20
    with pytest.raises(ValueError, match="too few for sequences"):
        ds.batch("val", 0, 1, len(ds.val) + 5)
    with pytest.raises(ValueError, match="split must be"):
        ds.batch("test", 0, 1, 4)
