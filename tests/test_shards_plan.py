"""Shard planning: bounded by rows and bytes, deterministic, never an empty shard."""

from echat.pipelines.shards import plan_shards


def test_rows_bound():
    plan = plan_shards([(f"id{i:03d}", 10) for i in range(25)], rows_per_shard=10, max_shard_bytes=10**9)
    assert plan["num_shards"] == 3
    sizes = [list(plan["assignment"].values()).count(s) for s in range(3)]
    assert sizes == [10, 10, 5]


def test_bytes_bound_and_oversized_row_alone():
    sizes = [("a", 40), ("b", 40), ("c", 40), ("d", 500), ("e", 10)]
    plan = plan_shards(sizes, rows_per_shard=100, max_shard_bytes=100)
    per_shard = {}
    for row_id, nbytes in sizes:
        per_shard.setdefault(plan["assignment"][row_id], []).append(nbytes)
    assert all(sum(v) <= 100 or len(v) == 1 for v in per_shard.values())
    assert per_shard[plan["assignment"]["d"]] == [500]
    assert sorted(per_shard) == list(range(plan["num_shards"]))  # no empty shard


def test_deterministic_regardless_of_arrival_order():
    sizes = [(f"id{i}", i) for i in range(30)]
    assert plan_shards(sizes, 7, 1000) == plan_shards(list(reversed(sizes)), 7, 1000)


def test_empty():
    assert plan_shards([], 10, 100) == {"assignment": {}, "num_shards": 0}
