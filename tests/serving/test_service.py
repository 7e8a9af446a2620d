"""SearchService on embeddings a model should never give: NaN / Inf and all zeros."""

import numpy as np
import pytest

from tfmir.index import ExactIndex
from tfmir.serving.backends import BackendError, RequestError, probe_image
from tfmir.serving.service import SearchService


class FixedBackend:
    """Answers every image with one fixed embedding."""

    backend = "fake"
    description = "the fake backend"
    fingerprint = None

    def __init__(self, embedding):
        self.embedding = np.asarray(embedding, dtype="float32")

    def __call__(self, images):
        return np.tile(self.embedding, (len(images), 1))


def service(metric, embedding):
    index = ExactIndex(metric=metric, dimension=3)
    index.build(np.eye(3, dtype="float32"), ids=["a", "b", "c"], labels=["x", "y", "z"])
    return SearchService(index, FixedBackend(embedding), k=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_are_a_backend_fault(bad):
    with pytest.raises(BackendError, match="the fake backend answered an embedding with NaN or "
                                           "infinite values") as error:
        service("cosine", [0.5, bad, 0.1]).search(probe_image())
    assert error.value.status == 502


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_an_all_zero_embedding_is_refused_where_it_cannot_rank(metric):
    with pytest.raises(RequestError, match="all-zero embedding, which cannot be ranked by "
                                           f"{metric} similarity") as error:
        service(metric, [0.0, -0.0, 0.0]).search(probe_image())
    assert error.value.status == 422


def test_an_all_zero_embedding_still_ranks_by_l2_distance():
    # Every unit vector is at distance 1 from the origin: a tie, broken by index order.
    answer = service("l2", [0.0, 0.0, 0.0]).search(probe_image())
    assert [result["id"] for result in answer["results"]] == ["a", "b"]
    answer = service("cosine", [0.0, 2.0, 0.1]).search(probe_image())
    assert answer["results"][0]["id"] == "b" and answer["predicted_label"] == "y"
