"""The candidate pool in one process: store protocol, reuse of known scores, a lost worker."""


import pytest
import torch.distributed as dist

from longrope2.search.pool import CandidatePool, WorkerLost


@pytest.fixture(scope="module")
def parallel():
    from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelDims(tp=1, pp=1, cp=1, world_size=1))
    yield
    destroy_parallel()


def test_scores_in_order_and_known_scores_are_not_recomputed(parallel, tmp_path):
    calls = []
    pool = CandidatePool(lambda c: calls.append(c) or float(c) * 2, tmp_path / "log.jsonl", store=dist.HashStore())
    scores = pool.score("gen0", [1, 2, 3], ["a", "b", "c"], known={"b": 99.0})
    assert scores == [2.0, 99.0, 6.0]
    assert calls == [1, 3] and pool.scored_here == 2
    logged = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(logged) == 2 and '"key": "c"' in logged[1]


def test_a_missing_worker_stops_the_search_with_a_clear_message(parallel):
    store = dist.HashStore()
    pool = CandidatePool(lambda c: 1.0, store=store, timeout_s=0.5)
    store.set("gen3/score/0", '{"score": 1.0, "worker": 0}')  # candidate 1 never gets a score
    with pytest.raises(WorkerLost, match=r"1 of 2 candidates of gen3 got no score within 0.5 s.*--resume"):
        pool._collect("gen3", 2)
