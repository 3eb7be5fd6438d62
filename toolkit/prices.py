"""What an instance-second costs on each platform, and so what a million predictions cost at a measured rate.

Every figure carries its source and the date it was read; `tune.prices` in invoke.yaml overrides any of them (same
keys, merged into this table), for a negotiated price, a new list price or another currency's figures.
Re-check the figures at their sources before quoting them: list prices change.
"""

from __future__ import annotations

import copy
from typing import Any

from invoke import Exit

PRICES: dict[str, Any] = {
    "cloudrun": {
        "source": "https://cloud.google.com/run/pricing",
        "as_of": "2026-12-06",
        # USD per vCPU-second, per GiB-second, per million requests, beyond the free tier (not counted here)
        "tiers": {
            "tier1": {
                "request": {"cpu_second": 0.000024, "gib_second": 0.0000025, "per_million_requests": 0.40},
                "instance": {"cpu_second": 0.000018, "gib_second": 0.000002, "per_million_requests": 0.0},
                "verified": "request-based: the pricing page; instance-based vCPU: the pricing page; instance-based "
                            "GiB-second: a secondary source, not confirmed on the pricing page",
            },
            "tier2": {
                # Tier 2 is 1.4x Tier 1 on the pricing page as last seen; these were not confirmed on 2026-12-06
                # (the page's Tier 2 table could not be read here): confirm before quoting.
                "request": {"cpu_second": 0.0000336, "gib_second": 0.0000035, "per_million_requests": 0.40},
                "instance": {"cpu_second": 0.0000252, "gib_second": 0.0000028, "per_million_requests": 0.0},
                "verified": "not confirmed at the source on 2026-12-06: Tier 1 x 1.4, check cloud.google.com/run/pricing",
            },
        },
        # Tier 1 regions as listed on the pricing page (not re-checked on 2026-12-06); any other region is Tier 2.
        "tier1_regions": [
            "asia-east1", "asia-northeast1", "asia-northeast2", "europe-north1", "europe-southwest1", "europe-west1",
            "europe-west4", "europe-west8", "europe-west9", "me-west1", "us-central1", "us-east1", "us-east4",
            "us-east5", "us-south1", "us-west1",
        ],  # fmt: skip
    },
    "fly": {
        "source": "superfly/docs snippets/RegionPricingSelector.jsx (the table on https://fly.io/docs/about/pricing/)",
        "as_of": "2026-12-06",
        # USD per second in Ashburn (iad); each vCPU includes some RAM, RAM above it is billed per GB-second
        "vcpu_second": {"shared": 0.00000075, "performance": 0.00001196},
        "included_gb_per_vcpu": {"shared": 0.25, "performance": 2.0},
        "gb_second": 0.00000193,
        # price relative to Ashburn, as billed (the region classes of the same file)
        "region_markup": {
            "ams": 1.038461538, "iad": 1.0, "ord": 1.25, "dfw": 1.25, "fra": 1.153846154, "jnb": 1.302884615,
            "lhr": 1.134615385, "lax": 1.199519231, "cdg": 1.134615385, "sjc": 1.192307692, "gru": 1.615384615,
            "ewr": 1.0, "sin": 1.269230769, "arn": 1.038461538, "syd": 1.269230769, "nrt": 1.307692308,
            "yyz": 1.115384615,
        },  # fmt: skip
    },
}


def price_table(overrides: Any = None) -> dict[str, Any]:
    """The table above with `tune.prices` merged in (nested keys replace the same keys, nothing else)."""
    table = copy.deepcopy(PRICES)
    if overrides:
        if not isinstance(overrides, dict):
            raise Exit(f"tune.prices is {overrides!r}: give a mapping with the keys of toolkit/prices.py, e.g. "
                       "{cloudrun: {tiers: {tier1: {request: {cpu_second: 0.00002}}}}}")
        _merge(table, dict(overrides), "tune.prices")
    return table


def _merge(into: dict, changes: dict, where: str) -> None:
    for key, value in changes.items():
        if key not in into:
            raise Exit(f"{where}.{key} is not a key of the price table: use one of {', '.join(sorted(into))}")
        if isinstance(into[key], dict) and hasattr(value, "items"):
            _merge(into[key], dict(value), f"{where}.{key}")
        else:
            into[key] = value


def cloudrun_tier(table: dict, region: str) -> str:
    return "tier1" if region in table["cloudrun"]["tier1_regions"] else "tier2"


def cloudrun_per_million(table: dict, tier: str, billing: str, cpu: float, memory_gib: float, rps: float) -> float:
    """USD per million requests for instances of `cpu` vCPU and `memory_gib` GiB, each serving `rps` requests a
    second while it is billed: request-based billing bills an instance while it has a request in flight (all the
    time at a steady load) plus a fee per request; instance-based billing bills it all its life, with no fee."""
    rates = table["cloudrun"]["tiers"][tier][billing]
    per_second = cpu * rates["cpu_second"] + memory_gib * rates["gib_second"]
    return per_second / rps * 1e6 + rates["per_million_requests"]


def fly_per_second(table: dict, cpu_kind: str, cpus: int, memory_gb: float, region: str) -> float:
    """USD per second of a running Machine: its vCPUs, RAM above what they include, the region's markup."""
    fly = table["fly"]
    extra_gb = max(0.0, memory_gb - cpus * fly["included_gb_per_vcpu"][cpu_kind])
    markup = fly["region_markup"].get(region)
    if markup is None:
        raise Exit(f"no Fly price for region {region!r}: add it under tune.prices.fly.region_markup, or use one of "
                   f"{', '.join(sorted(fly['region_markup']))}")
    return (cpus * fly["vcpu_second"][cpu_kind] + extra_gb * fly["gb_second"]) * markup


def fly_per_million(table: dict, cpu_kind: str, cpus: int, memory_gb: float, region: str, rps: float) -> float:
    """USD per million requests for Machines each serving `rps` a second (Fly bills no fee per request)."""
    return fly_per_second(table, cpu_kind, cpus, memory_gb, region) / rps * 1e6


def sources(table: dict) -> dict[str, Any]:
    """Where each platform's figures come from, for the report and the JSON document."""
    cloudrun = table["cloudrun"]
    return {
        "cloudrun": {"source": cloudrun["source"], "as_of": cloudrun["as_of"],
                     "tiers": {name: tier.get("verified", "") for name, tier in cloudrun["tiers"].items()}},
        "fly": {"source": table["fly"]["source"], "as_of": table["fly"]["as_of"]},
    }  # fmt: skip
