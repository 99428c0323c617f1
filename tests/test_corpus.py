"""collect_corpus: packing, truncation, BOS, the document split, budgets, bad input, row_mask."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from support.configs import make
from support.tiny import tiny_tokenizer
from token_journey.config.corpus import CorpusConfig
from token_journey.data.corpus import collect_corpus, doc_in_eval, drop_norm_outliers, expects_bos, read_sequences, row_mask, special_ids
from token_journey.errors import TokenJourneyError

WORDS = "the capital of France is Paris and the word travelled through every layer of the network".split()


def _write_docs(folder, n_docs=40, seed=0):
    """Text files of varied length, deterministic; returns the sorted file paths (= doc ids)."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_docs):
        n = int(torch.randint(5, 60, (1,), generator=gen))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=gen)]
        path = folder / f"doc{i:03d}.txt"
        path.write_text(f"Document {i}: " + " ".join(words) + ".")
        paths.append(path)
    return sorted(paths)


def _cfg(folder, **kw):
    base = dict(name="t", source="local", path=str(folder / "*.txt"), context_size=16, max_tokens=100000, eval_tokens=100000, eval_fraction=0.25)
    base.update(kw)
    return make(CorpusConfig, **base)


def _bos_tokenizer():
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


@pytest.mark.parametrize("cap", [0, 10])
def test_pack_is_the_concatenation_of_each_splits_documents(tmp_path, cap):
    """Reference: tokenize each file ourselves (keep its first `cap` tokens), join with EOS in the
    order documents appear, cut."""
    paths = _write_docs(tmp_path / "docs")
    tok = tiny_tokenizer()
    stats = collect_corpus(_cfg(tmp_path / "docs", max_doc_tokens=cap), tok, 256, tmp_path / "out", seed=3)
    seen = {}
    for split in ("train", "eval"):
        seqs = read_sequences(tmp_path / "out" / f"{split}.parquet")
        assert seqs.input_ids.shape[1] == 16
        assert seqs.sequence_ids.tolist() == list(range(len(seqs.sequence_ids)))
        flat = seqs.input_ids.reshape(-1).tolist()
        docs = _doc_tokens(tok, paths, cap)
        # Walk the stream document by document (each piece must equal one file's tokens + EOS).
        starts, at, pieces = {}, 0, []
        while at < len(flat):
            match = [i for i, d in docs.items() if flat[at : at + len(d)] == d[: len(flat) - at]]
            assert match, f"no document starts at token {at}"
            pieces.append(match[0])
            for pos in range(at, min(len(flat), at + len(docs[match[0]]))):
                starts[pos] = match
            at += len(docs[match[0]])
        for j, doc in enumerate(seqs.doc_ids.tolist()):
            assert doc in starts[j * 16], "doc_id is not the document the sequence starts in"
        seen[split] = set(pieces[:-1])
        assert all(doc_in_eval(d, 3, 0.25) == (split == "eval") for d in seen[split])
        assert stats["sequences"][split] == len(seqs.sequence_ids)
    assert not seen["train"] & seen["eval"] and seen["eval"]
    assert (sum(stats["documents_truncated"].values()) > 0) == (cap > 0)


def _doc_tokens(tok, paths, cap=0):
    """Each file's tokens (the first `cap` when cap > 0) followed by EOS."""
    docs = {i: tok(p.read_text(), add_special_tokens=False)["input_ids"] for i, p in enumerate(paths)}
    return {i: (ids[:cap] if cap else ids) + [tok.eos_token_id] for i, ids in docs.items()}


def test_budget_truncate_and_determinism(tmp_path):
    _write_docs(tmp_path / "docs", n_docs=60)
    tok = tiny_tokenizer()
    collect_corpus(_cfg(tmp_path / "docs", max_tokens=160, eval_tokens=32), tok, 256, tmp_path / "a", seed=0)
    assert read_sequences(tmp_path / "a/train.parquet").input_ids.shape == (10, 16)
    assert read_sequences(tmp_path / "a/eval.parquet").input_ids.shape == (2, 16)
    collect_corpus(_cfg(tmp_path / "docs", max_tokens=160, eval_tokens=32), tok, 256, tmp_path / "b", seed=0)
    assert pq.read_table(tmp_path / "a/train.parquet").equals(pq.read_table(tmp_path / "b/train.parquet"))
    stats = collect_corpus(_cfg(tmp_path / "docs", packing="truncate"), tok, 256, tmp_path / "c", seed=0)
    seqs = read_sequences(tmp_path / "c/train.parquet")
    assert len(set(seqs.doc_ids.tolist())) == len(seqs.doc_ids) == stats["documents"]["train"]
    for row in seqs.input_ids.tolist():  # one document per row: no EOS inside, pad only at the end
        real = [t for t in row if t != tok.pad_token_id]
        assert row[: len(real)] == real and tok.eos_token_id not in real


def test_bos_is_prepended_when_the_tokenizer_adds_one(tmp_path):
    _write_docs(tmp_path / "docs")
    tok = _bos_tokenizer()
    assert expects_bos(tok) and not expects_bos(tiny_tokenizer())
    stats = collect_corpus(_cfg(tmp_path / "docs"), tok, 256, tmp_path / "out", seed=0)
    ids = read_sequences(tmp_path / "out/train.parquet").input_ids
    assert (ids[:, 0] == tok.bos_token_id).all() and not (ids[:, 1:] == tok.bos_token_id).any()
    assert stats["bos_token_id"] == tok.bos_token_id


def test_row_mask_matches_a_hand_loop():
    ids = torch.tensor([[0, 5, 6, 1, 7, 2, 2], [5, 0, 6, 7, 8, 9, 1]])
    special = {0, 1, 2}
    for exclude_first in (0, 1, 2):
        expected = torch.zeros_like(ids, dtype=torch.bool)
        for b in range(ids.shape[0]):
            seen = 0
            for t in range(ids.shape[1]):
                if int(ids[b, t]) in special:
                    continue
                seen += 1
                expected[b, t] = seen > exclude_first
        assert torch.equal(row_mask(ids, special, exclude_first), expected)
    assert special_ids(tiny_tokenizer()) == {0, 1, 2}


def test_bad_input_errors_and_leaves_old_output(tmp_path):
    _write_docs(tmp_path / "docs")
    tok = tiny_tokenizer()
    collect_corpus(_cfg(tmp_path / "docs"), tok, 256, tmp_path / "out", seed=0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/a.txt").write_text("")
    cases = [
        (_cfg(tmp_path / "empty"), 256, "no train sequences"),
        (_cfg(tmp_path / "nowhere"), 256, "matches no files"),
        (_cfg(tmp_path / "docs", context_size=512, max_tokens=1024, eval_tokens=1024), 256, "context_size=512 exceeds"),
    ]
    for cfg, max_positions, message in cases:
        with pytest.raises(TokenJourneyError, match=message) as info:
            collect_corpus(cfg, tok, max_positions, tmp_path / "out", seed=0)
        assert "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    with pytest.raises(TokenJourneyError, match="corpus.packing"):
        _cfg(tmp_path, packing="zip")
    with pytest.raises(TokenJourneyError, match="no corpus split"):
        read_sequences(tmp_path / "missing.parquet")


def test_offline_parts_are_real_text():
    from token_journey.data.sources import kjv_chapters, offline_texts

    first = next(iter(kjv_chapters()))
    assert first.startswith("Genesis 1\n\nIn the beginning God created") and "1:1" not in first
    assert sum(1 for _ in kjv_chapters()) == 1189
    assert any("for" in t and "statement" in t for t in offline_texts("python_topics"))


@pytest.mark.slow
def test_offline_corpus_holds_two_million_tokens(smollm2_dir):
    """The default corpus has at least 2M SmolLM2 tokens available."""
    from transformers import AutoTokenizer

    from token_journey.config import build, compose
    from token_journey.data.sources import offline_texts

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    parts = build(CorpusConfig, compose()["corpus"], "corpus").parts
    total = sum(len(ids) for part in parts for ids in tok(list(offline_texts(part)), add_special_tokens=False)["input_ids"])
    assert total >= 2_000_000


def test_norm_outliers_are_judged_within_each_sequence():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(4, 10, 6, generator=g)
    acts[0, 3] *= 40  # an outlier
    acts[2] *= 40  # a whole loud sequence is not an outlier of itself
    rows = torch.ones(4, 10, dtype=torch.bool)
    rows[1, :4] = False
    rows[3] = False  # a sequence with no rows
    kept = drop_norm_outliers(acts, rows, 10.0)
    assert not kept[0, 3] and int(kept[0].sum()) == 9
    assert torch.equal(kept[1:3], rows[1:3]) and not kept[3].any()
    one_by_one = torch.cat([drop_norm_outliers(acts[b : b + 1], rows[b : b + 1], 10.0) for b in range(4)])
    assert torch.equal(kept, one_by_one)  # the same rows however sequences are batched
    assert torch.equal(drop_norm_outliers(acts, rows, 0.0), rows)


def test_offline_documents_have_unique_ids_across_parts():
    """`datasets` runs the offline generator once per part; ids must still name one document each."""
    from token_journey.data.sources import documents

    ds = documents(make(CorpusConfig, name="o", source="offline", parts=("kjv", "python_topics")), seed=0)
    ids = ds["doc_id"]
    assert len(set(ids)) == len(ids) == len(ds) and set(ds["part"]) == {"kjv", "python_topics"}


def test_a_damaged_corpus_split_is_refused_with_one_line(tmp_path):
    """read_sequences checks each split against the sha256 collect_corpus recorded in stats.json."""
    _write_docs(tmp_path / "docs")
    stats = collect_corpus(_cfg(tmp_path / "docs"), tiny_tokenizer(), 256, tmp_path / "out", seed=0)
    path = tmp_path / "out/eval.parquet"
    assert set(stats["sha256"]) == {"train", "eval"}
    clean = read_sequences(path).input_ids
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(TokenJourneyError, match=r"corpus file .*eval.parquet is damaged .*rerun collect_corpus"):
        read_sequences(path)
    assert read_sequences(tmp_path / "out/train.parquet").input_ids.shape[1] == clean.shape[1]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_file_that_is_not_text_is_named(tmp_path, policy):
    """A binary .txt among the corpus files: one line naming it (stop), or a warning and the rest (skip)."""
    _write_docs(tmp_path / "docs")
    (tmp_path / "docs/zz-image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)))
    cfg = _cfg(tmp_path / "docs", bad_files=policy)
    if policy == "stop":
        with pytest.raises(TokenJourneyError, match=r"corpus file .*zz-image.txt is not UTF-8 text .*corpus.bad_files=skip"):
            collect_corpus(cfg, tiny_tokenizer(), 256, tmp_path / "out", seed=0)
        assert not (tmp_path / "out/train.parquet").exists()
    else:
        stats = collect_corpus(cfg, tiny_tokenizer(), 256, tmp_path / "out", seed=0)
        assert stats["sequences"]["train"] > 0
