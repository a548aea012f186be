"""The prepare stage's writer: one pass over (split, document) pairs gives each split exactly the
tokens of encoding its documents alone, with EOS after each, in corpus order, across shards."""

import numpy as np

from pipeline.data.shards import ShardWriter
from pipeline.model.tokenizer import EOS, train_bpe
from pipeline.stages.prepare import tokenize_corpus
from tests.conftest import make_documents


def test_one_pass_writes_both_splits_with_the_tokens_of_each_document(tmp_path):
    docs = make_documents(50)
    tok = train_bpe(docs, 300)
    eos = tok.token_to_id(EOS)
    labelled = [(i % 4 == 0, d) for i, d in enumerate(docs)]
    writers = {s: ShardWriter(tmp_path, s, np.dtype(np.uint16), 500) for s in ("train", "val")}
    counts = tokenize_corpus(tok, iter(labelled), writers, eos)  # an iterator: it can be read once only
    for split, is_val in (("train", False), ("val", True)):
        expected = [t for v, d in labelled if v == is_val for t in tok.encode(d, add_special_tokens=False).ids + [eos]]
        got = np.concatenate([np.fromfile(tmp_path / s["file"], dtype=np.uint16) for s in writers[split].shards])
        assert got.tolist() == expected
        assert counts[split]["docs"] == sum(v == is_val for v, _ in labelled) and counts[split]["tokens"] == len(got)
    assert len(writers["train"].shards) > 1  # 500-token shards roll over
