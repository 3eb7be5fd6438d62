"""The price arithmetic and the sizing rules of `invoke tune`, against figures worked out by hand from the table."""

from __future__ import annotations

import pytest
from invoke import Exit

from toolkit import prices, sizing
from toolkit.sizing import GIB, MIB, Shape, Step


@pytest.fixture
def table():
    return prices.price_table()


def test_cloudrun_request_based_per_million_by_hand(table):
    # 1 vCPU x $0.000024 + 2 GiB x $0.0000025 = $0.000029 per instance-second; at 100 rps that is
    # $0.00000029 a request, $0.29 a million, plus the $0.40 per million request fee: $0.69.
    assert prices.cloudrun_per_million(table, "tier1", "request", 1, 2, 100) == pytest.approx(0.69)


def test_cloudrun_instance_based_has_no_request_fee(table):
    # 2 vCPU x $0.000018 + 1 GiB x $0.000002 = $0.000038 a second; at 50 rps: $0.76 a million.
    assert prices.cloudrun_per_million(table, "tier1", "instance", 2, 1, 50) == pytest.approx(0.76)


def test_cloudrun_tier2_costs_more(table):
    # 1 x $0.0000336 + 0.5 x $0.0000035 = $0.00003535 a second; at 10 rps: $3.535 + $0.40 = $3.935 a million.
    assert prices.cloudrun_per_million(table, "tier2", "request", 1, 0.5, 10) == pytest.approx(3.935)
    assert prices.cloudrun_tier(table, "us-central1") == "tier1"
    assert prices.cloudrun_tier(table, "southamerica-east1") == "tier2"


def test_fly_shared_machine_per_second_and_per_million(table):
    # shared-cpu-2x with 2 GB in iad: 2 x $0.00000075 + (2 - 2 x 0.25) GB x $0.00000193 = $0.000004395 a second;
    # at 50 rps: $0.0879 a million.
    assert prices.fly_per_second(table, "shared", 2, 2.0, "iad") == pytest.approx(0.000004395)
    assert prices.fly_per_million(table, "shared", 2, 2.0, "iad", 50) == pytest.approx(0.0879)


def test_fly_performance_machine_in_a_dearer_region(table):
    # performance-1x with its included 2 GB in fra: $0.00001196 x 1.153846154 = $0.0000138 a second;
    # at 200 rps: $0.069 a million.
    assert prices.fly_per_million(table, "performance", 1, 2.0, "fra", 200) == pytest.approx(0.069, rel=1e-6)


def test_tune_prices_override_one_figure_and_keep_the_rest():
    table = prices.price_table({"cloudrun": {"tiers": {"tier1": {"request": {"cpu_second": 0.00001}}}}})
    # 1 x $0.00001 + 2 x $0.0000025 = $0.000015 a second; at 100 rps: $0.15 + $0.40.
    assert prices.cloudrun_per_million(table, "tier1", "request", 1, 2, 100) == pytest.approx(0.55)
    assert table["fly"] == prices.PRICES["fly"]


def test_a_misspelt_override_is_refused_with_the_keys():
    with pytest.raises(Exit, match=r"tune.prices.cloudrun.tier1 is not a key.*tiers"):
        prices.price_table({"cloudrun": {"tier1": {}}})


def test_an_unknown_fly_region_names_the_fix(table):
    with pytest.raises(Exit, match="region_markup"):
        prices.fly_per_second(table, "shared", 1, 1, "xyz")


def test_every_price_says_where_it_comes_from(table):
    sources = prices.sources(table)
    for platform in ("cloudrun", "fly"):
        assert sources[platform]["source"] and sources[platform]["as_of"]


# ---------------------------------------------------------------------------------------------------------------
# Shapes


def test_cloudrun_shapes_parse_and_refuse_what_cloud_run_does_not_offer():
    shapes = sizing.parse_shapes("cloudrun", "1:2Gi, 2:4Gi,4:8Gi")
    assert [(s.vcpus, s.memory_bytes) for s in shapes] == [(1, 2 * GIB), (2, 4 * GIB), (4, 8 * GIB)]
    with pytest.raises(Exit, match="1 vCPU Cloud Run allows 512Mi to 4Gi"):
        sizing.parse_shapes("cloudrun", "1:8Gi")
    with pytest.raises(Exit, match="offers 1, 2, 4, 6 or 8 vCPU"):
        sizing.parse_shapes("cloudrun", "3:4Gi")
    with pytest.raises(Exit, match="CPU:MEMORY"):
        sizing.parse_shapes("cloudrun", "2")


def test_fly_shapes_parse_and_refuse_unknown_sizes():
    shared, performance = sizing.parse_shapes("fly", "shared-cpu-2x:2gb,performance-1x")
    assert (shared.vcpus, shared.cpu_kind, shared.memory_bytes) == (2, "shared", 2 * GIB)
    # 5 ms of each 80 ms period per shared vCPU: 2 x 6.25%
    assert shared.quota_cpus == pytest.approx(0.125)
    assert (performance.quota_cpus, performance.memory_bytes, performance.name) == (1.0, 2 * GIB, "performance-1x:2gb")
    with pytest.raises(Exit, match="not a Fly VM size; use one of shared-cpu-1x"):
        sizing.parse_shapes("fly", "shared-cpu-3x:1gb")
    with pytest.raises(Exit, match="256mb to 2048mb"):
        sizing.parse_shapes("fly", "shared-cpu-1x:4gb")


# ---------------------------------------------------------------------------------------------------------------
# From a sweep to settings


def steps(*rows: tuple[int, float, float, float]) -> list[Step]:
    """(concurrency, rps, p99_ms, cpu_util) rows; 300 MiB peak."""
    return [Step(c, rps, p99 / 2, p99, 0, cpu, 300 * MIB) for c, rps, p99, cpu in rows]


def test_the_best_point_is_the_most_rps_within_the_objective_and_ties_go_to_less_concurrency():
    sweep = steps((1, 100, 10, 0.3), (2, 190, 12, 0.5), (4, 300, 20, 0.8), (8, 305, 40, 0.95), (16, 310, 400, 1.0))
    best = sizing.best_step(sweep, 250)
    assert best.concurrency == 4  # 8 is within 3% of 8's 305 rps and 16 misses the objective
    assert sizing.best_step(sweep, 5) is None


def test_cloudrun_sustained_rate_is_read_at_60_percent_of_concurrency_and_of_cpu():
    sweep = steps((1, 100, 10, 0.3), (2, 190, 12, 0.5), (4, 300, 20, 0.8))
    # concurrency 0.6 x 4 = 2.4: 190 + (300 - 190) x 0.4 / 2 = 212; CPU 60% lies between 0.5 (190) and 0.8 (300):
    # 190 + 110 x (0.1 / 0.3) = 226.7; the lower, 212, is what the autoscaler leaves an instance.
    assert sizing.sustained_cloudrun(sweep, 4) == pytest.approx(212)
    shape = Shape("cloudrun", "2:4Gi", 2, 4 * GIB)
    rec = sizing.recommend(shape, sweep, 250)
    # 300 MiB x 1.25 < 300 + 128 MiB = 428 MiB, rounded up to 512 MiB, which 2 vCPU allows
    assert rec["settings"] == {"concurrency": 4, "cpu": "2", "memory": "512Mi"}
    assert rec["service"] == {"WEB_CONCURRENCY": 1, "ORT_INTRA_OP_THREADS": 2}
    assert rec["point"]["sustained_rps"] == pytest.approx(212)
    assert rec["point"]["billed_rps"] == pytest.approx(212)  # 2.4 in flight on average: always billed


def test_request_based_billing_at_concurrency_1_counts_only_the_busy_time():
    sweep = steps((1, 30, 40, 0.95), (2, 31, 80, 1.0))
    rec = sizing.recommend(Shape("cloudrun", "1:2Gi", 1, 2 * GIB), sweep, 60)
    # held at 0.6 in flight, the instance serves 0.6 x 30 = 18 rps over its life and 30 rps while billed by request;
    # the CPU rule (60%, between 0 and 0.95 at 30 rps) gives 18.9, above 18
    assert (rec["point"]["sustained_rps"], rec["point"]["billed_rps"]) == (18.0, 30.0)


def test_fly_soft_limit_is_the_knee_and_hard_limit_the_best_point():
    sweep = steps((1, 100, 10, None), (2, 280, 12, None), (4, 300, 20, None), (8, 330, 40, None))
    rec = sizing.recommend(sizing.parse_shapes("fly", "performance-1x:2gb")[0], sweep, 250)
    # 90% of 330 is 297: concurrency 4 is the first to reach it
    assert rec["settings"] == {"soft_limit": 4, "hard_limit": 8, "size": "performance-1x", "memory": "2gb"}
    assert rec["point"]["sustained_rps"] == 300


def test_memory_over_what_the_cpu_allows_is_said():
    memory, note = sizing.recommended_memory("cloudrun", 1, 4 * GIB, 2 * GIB)
    assert memory == 4 * GIB and "larger shape" in note
