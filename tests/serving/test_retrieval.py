"""`tfmir.serving.retrieval` on small hand-made indexes: loading checks and Hamming queries."""

import numpy as np
import pytest

from tfmir.index import ExactIndex, HammingIndex
from tfmir.serving.retrieval import SearchError, load_index, search_sources


def test_a_fingerprint_mismatch_is_reported_as_the_wrong_model(tmp_path):
    path = ExactIndex(dimension=2, model_fingerprint="model-a").build(
        np.eye(2), ids=["a", "b"]).save(tmp_path / "index")
    with pytest.raises(SearchError, match="the model does not match the index") as refused:
        load_index(path, fingerprint="model-b")
    assert "'model-a'" in str(refused.value) and "'model-b'" in str(refused.value)
    assert len(load_index(path, fingerprint="model-a")) == 2


def test_other_load_errors_are_not_taken_for_a_fingerprint_mismatch(tmp_path):
    # The message of this error holds the words a substring match on the text used to look for.
    missing = tmp_path / "model fingerprint mismatch"
    with pytest.raises(SearchError, match="cannot load the index") as refused:
        load_index(missing, fingerprint="model-a")
    assert "does not match" not in str(refused.value)


@pytest.mark.parametrize("source", [None, "even"])
def test_hamming_queries_are_the_signs_of_the_embeddings(source):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(40, 16)).astype(np.float32)
    sources = ["even" if row % 2 == 0 else "odd" for row in range(40)]
    index = HammingIndex(dimension=16).build(embeddings > 0, ids=list(range(40)), sources=sources)
    queries = rng.normal(size=(3, 16)).astype(np.float32)

    results = search_sources(index, queries, k=5, source=source)

    # Oracle: count the components whose signs differ, item by item.
    for query, rows in zip(queries, results):
        distances = {item: int(np.sum((embeddings[item] > 0) != (query > 0)))
                     for item in range(40) if source is None or sources[item] == source}
        assert [row["score"] for row in rows] == sorted(distances.values())[:5]
        assert all(distances[row["id"]] == row["score"] for row in rows)
        assert [row["rank"] for row in rows] == [1, 2, 3, 4, 5]
