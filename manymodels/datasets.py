"""Deterministic sample tables for trying, testing and benchmarking manymodels.

Nothing is downloaded: every table comes from :func:`numpy.random.default_rng` with a
seed, so the same call always returns the same frame, on any machine. Each generator
gives every segment its *own* behaviour (coefficients, levels, seasonality), because
the many-models pattern only pays off when segments truly differ; the tests check that
per-segment models beat one global model on these tables.

- :func:`make_oj`: weekly orange-juice sales per store and brand, shaped like the
  Dominick's Finer Foods data (``store``, ``brand``, ``week``, ``price``, ``feat``,
  store demographics, target ``quantity`` = log units sold).
- :func:`make_churn`: customers per region with a 0/1 ``churned`` target.
- :func:`make_mixed`: segments of which some follow a pattern of their own and the rest
  share one common pattern (:func:`mixed_own_segments` names the first kind), to test
  choosing between an own, a pooled and a global model per segment.
- :func:`write_dataset`: write a frame to Parquet or CSV atomically.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from manymodels.errors import DataError, SpecError

__all__ = [
    "CHURN_REGIONS",
    "OJ_BRANDS",
    "SEGMENT_COLUMNS",
    "make_churn",
    "make_mixed",
    "make_oj",
    "mixed_own_segments",
    "write_dataset",
]

#: Brands of the orange-juice table, in the order used for random draws.
OJ_BRANDS: tuple[str, ...] = ("dominicks", "minute.maid", "tropicana")
#: Shelf price in dollars (per 64 oz) around which each brand's regular price varies.
_OJ_BRAND_PRICE = np.array([1.80, 2.40, 2.90])
#: Mean log-sales of each brand at its regular price, before store effects.
_OJ_BRAND_LEVEL = np.array([9.2, 8.9, 9.0])
#: Mean price elasticity of each brand; the store brand is the most price-sensitive.
_OJ_BRAND_ELASTICITY = np.array([-3.2, -2.7, -2.2])

#: Region names of the churn table (a prefix of these is used when ``regions`` < 8).
CHURN_REGIONS: tuple[str, ...] = (
    "north", "south", "east", "west", "central", "coastal", "mountain", "metro",
    "lakes", "plains", "valley", "delta", "harbor", "uplands", "riverside", "capital",
)
_CHURN_CONTRACTS = np.array(["month-to-month", "one-year", "two-year"], dtype=object)

#: Number of parent groups of :func:`make_mixed` (fewer when there are fewer segments).
_MIXED_GROUPS = 4
#: The segment columns of each generated table, for messages and examples.
SEGMENT_COLUMNS: dict[str, tuple[str, ...]] = {
    "oj": ("store", "brand"),
    "churn": ("region",),
    "mixed": ("segment",),
}
#: Weeks in a (simulated) year; seasonality repeats with this period.
_WEEKS_PER_YEAR = 52


def _check_int(name: str, value: int, minimum: int, caller: str) -> None:
    """Raise :class:`SpecError` naming the option unless ``value`` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SpecError(f"{caller}: option '{name}' must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(f"{caller}: option '{name}' must be at least {minimum}, got {value}")


def _check_seed(seed: int, caller: str) -> None:
    _check_int("seed", seed, 0, caller)


# --------------------------------------------------------------------------- orange juice


def make_oj(stores: int = 100, weeks: int = 120, seed: int = 0) -> pd.DataFrame:
    """Weekly orange-juice sales per store and brand, like Dominick's ``oj`` table.

    Every (store, brand) segment has its own base level, price elasticity, promotion
    lift and yearly seasonality (amplitude and phase). Store demographics shift these
    only partly, so a global model that sees ``store``, ``brand`` and the demographics
    still has to learn hundreds of interactions, while one small model per segment only
    has to learn three or four numbers: the situation the many-models pattern is for.

    Parameters
    ----------
    stores : int
        Number of stores (ids ``1..stores``); each sells the three brands of
        :data:`OJ_BRANDS`.
    weeks : int
        Number of weeks per segment (``week`` = ``1..weeks``, in time order).
    seed : int
        Seed of :func:`numpy.random.default_rng`; the same arguments give the same frame.

    Returns
    -------
    pandas.DataFrame
        ``stores * 3 * weeks`` rows sorted by ``store``, ``brand``, ``week`` with columns
        ``store`` (int64), ``brand`` (str), ``week`` (int64), ``week_of_year`` (int64,
        1..52), ``price`` (float64, dollars), ``feat`` (int64 0/1, featured in the
        weekly ad), ``income`` (log median income), ``age60`` (share of people over
        60), ``ethnic`` (share of minorities), ``hh_size`` (mean household size): these
        four are constant per store; and ``quantity`` (float64, log units sold).

    Raises
    ------
    SpecError
        If an option is not an integer in range.
    """
    caller = "make_oj"
    _check_int("stores", stores, 1, caller)
    _check_int("weeks", weeks, 2, caller)
    _check_seed(seed, caller)
    rng = np.random.default_rng(seed)
    n_brands = len(OJ_BRANDS)
    n_seg = stores * n_brands

    demo = _oj_demographics(rng, stores)
    coef = _oj_segment_coefficients(rng, demo, stores)
    seg_store = np.repeat(np.arange(stores), n_brands)
    seg_brand = np.tile(np.arange(n_brands), stores)

    week = np.arange(1, weeks + 1)
    week_of_year = (week - 1) % _WEEKS_PER_YEAR + 1
    price, feat = _oj_prices(rng, seg_brand, weeks)
    noise = rng.normal(0.0, 0.25, size=(n_seg, weeks))

    # Semi-log demand: log sales fall linearly in the price relative to the brand's
    # list price, so ``elasticity`` is the elasticity at that price.
    rel_price = price / _OJ_BRAND_PRICE[seg_brand][:, None] - 1.0
    season = coef["amplitude"][:, None] * np.sin(
        2 * np.pi * (week_of_year[None, :] - coef["phase"][:, None]) / _WEEKS_PER_YEAR
    )
    quantity = (
        coef["level"][:, None]
        + coef["elasticity"][:, None] * rel_price
        + coef["lift"][:, None] * feat
        + season
        + noise
    )

    rows = n_seg * weeks
    frame = pd.DataFrame(
        {
            "store": np.repeat(seg_store + 1, weeks).astype(np.int64),
            "brand": pd.Series(np.repeat(np.array(OJ_BRANDS, dtype=object)[seg_brand], weeks),
                               dtype="str"),
            "week": np.tile(week, n_seg).astype(np.int64),
            "week_of_year": np.tile(week_of_year, n_seg).astype(np.int64),
            "price": price.reshape(rows),
            "feat": feat.reshape(rows).astype(np.int64),
        }
    )
    for name, values in demo.items():
        frame[name] = np.repeat(values[seg_store], weeks)
    frame["quantity"] = np.round(quantity.reshape(rows), 4)
    return frame


def _oj_demographics(rng: np.random.Generator, stores: int) -> dict[str, np.ndarray]:
    """Store demographics in the ranges of Dominick's (rounded as published there)."""
    return {
        "income": np.round(rng.normal(10.6, 0.28, stores), 4),
        "age60": np.round(rng.beta(4.0, 18.0, stores), 4),
        "ethnic": np.round(rng.beta(1.2, 6.0, stores), 4),
        "hh_size": np.round(rng.uniform(2.0, 3.3, stores), 4),
    }


def _oj_segment_coefficients(
    rng: np.random.Generator, demo: dict[str, np.ndarray], stores: int
) -> dict[str, np.ndarray]:
    """Per (store, brand) level, elasticity, lift and seasonality.

    Demographics explain part of each coefficient (richer stores are less
    price-sensitive, larger households buy more); a larger idiosyncratic part is drawn
    per segment, which is what a per-segment model can learn and a global one cannot.
    """
    n_brands = len(OJ_BRANDS)
    n_seg = stores * n_brands
    seg_store = np.repeat(np.arange(stores), n_brands)
    seg_brand = np.tile(np.arange(n_brands), stores)
    income = demo["income"][seg_store] - 10.6
    ethnic = demo["ethnic"][seg_store] - 0.17
    hh_size = demo["hh_size"][seg_store] - 2.65
    age60 = demo["age60"][seg_store] - 0.18

    level = (_OJ_BRAND_LEVEL[seg_brand] + 0.6 * hh_size + 0.8 * age60
             + np.where(seg_brand == 2, 0.5, -0.2) * income + rng.normal(0.0, 0.35, n_seg))
    elasticity = (_OJ_BRAND_ELASTICITY[seg_brand] + 1.2 * income - 1.5 * ethnic
                  + rng.normal(0.0, 1.4, n_seg))
    lift = np.exp(rng.normal(np.log(0.4), 0.9, n_seg))
    amplitude = rng.uniform(0.02, 0.2, n_seg)
    phase = rng.uniform(0.0, _WEEKS_PER_YEAR, n_seg)
    return {
        "level": level,
        "elasticity": np.clip(elasticity, -6.0, -0.3),
        "lift": np.clip(lift, 0.02, 2.0),
        "amplitude": amplitude,
        "phase": phase,
    }


def _oj_prices(
    rng: np.random.Generator, seg_brand: np.ndarray, weeks: int
) -> tuple[np.ndarray, np.ndarray]:
    """Weekly shelf prices (dollars, rounded to cents) and ad flags per segment.

    A featured week comes with a deep discount, and unadvertised price cuts happen
    too, so ``price`` and ``feat`` are correlated but not collinear: a model can tell
    the price effect from the promotion lift.
    """
    n_seg = seg_brand.size
    regular = _OJ_BRAND_PRICE[seg_brand] * np.exp(rng.normal(0.0, 0.06, n_seg))
    feat_rate = rng.uniform(0.08, 0.30, n_seg)
    feat = rng.random((n_seg, weeks)) < feat_rate[:, None]
    cut = rng.random((n_seg, weeks)) < 0.15
    discount = np.where(feat, rng.uniform(0.15, 0.45, (n_seg, weeks)),
                        np.where(cut, rng.uniform(0.05, 0.30, (n_seg, weeks)), 0.0))
    price = np.round(regular[:, None] * (1.0 - discount) * _oj_price_drift(rng, n_seg, weeks), 2)
    return price, feat.astype(np.int64)


def _oj_price_drift(rng: np.random.Generator, n_seg: int, weeks: int) -> np.ndarray:
    """Slow multiplicative drift of the regular price: a mean-reverting AR(1) in logs.

    Shelf prices wander between promotions, so a segment sees many price levels and
    its demand curve can be estimated from more than the two or three discount depths.
    """
    rho, sd = 0.9, 0.15
    shocks = rng.normal(0.0, sd * np.sqrt(1.0 - rho**2), (n_seg, weeks))
    log_drift = np.empty((n_seg, weeks))
    log_drift[:, 0] = rng.normal(0.0, sd, n_seg)
    for t in range(1, weeks):
        log_drift[:, t] = rho * log_drift[:, t - 1] + shocks[:, t]
    return np.exp(log_drift)


# --------------------------------------------------------------------------- churn


def make_churn(regions: int = 8, customers_per_region: int = 400, seed: int = 0) -> pd.DataFrame:
    """Customers of a telecom-like service per region, with a 0/1 ``churned`` target.

    Each region has its own churn drivers: in some, high monthly charges push customers
    away strongly, in others support calls or short tenure dominate, and the effect of a
    long contract differs too. One model per region therefore beats one global model.

    Parameters
    ----------
    regions : int
        Number of regions, 1..16 (names from :data:`CHURN_REGIONS`).
    customers_per_region : int
        Rows per region.
    seed : int
        Seed of :func:`numpy.random.default_rng`.

    Returns
    -------
    pandas.DataFrame
        Columns ``region`` (str), ``customer_id`` (int64, unique), ``tenure`` (int64,
        months), ``monthly_charges`` (float64, dollars), ``contract`` (str:
        month-to-month, one-year, two-year), ``support_calls`` (int64) and ``churned``
        (int64 0/1), sorted by ``region`` order then ``customer_id``.

    Raises
    ------
    SpecError
        If an option is not an integer in range.
    """
    caller = "make_churn"
    _check_int("regions", regions, 1, caller)
    if regions > len(CHURN_REGIONS):
        raise SpecError(f"{caller}: option 'regions' must be at most {len(CHURN_REGIONS)}, "
                        f"got {regions}")
    _check_int("customers_per_region", customers_per_region, 1, caller)
    _check_seed(seed, caller)
    rng = np.random.default_rng(seed)
    n = regions * customers_per_region
    reg = np.repeat(np.arange(regions), customers_per_region)

    # Region-specific drivers: intercept and slopes on standardised features.
    intercept = rng.normal(-1.2, 0.6, regions)
    w_charges = rng.normal(0.0, 1.2, regions)
    w_calls = rng.normal(0.6, 0.7, regions)
    w_tenure = rng.normal(-0.6, 0.8, regions)
    w_contract = rng.normal(-0.8, 0.9, regions)
    charge_level = rng.uniform(45.0, 85.0, regions)

    tenure = rng.integers(1, 73, n)
    contract_idx = np.minimum(rng.poisson(tenure / 30.0), 2)
    charges = np.round(np.clip(rng.normal(charge_level[reg], 20.0), 18.0, 120.0), 2)
    calls = rng.poisson(np.exp(rng.normal(0.3, 0.5, n)))
    logit = (intercept[reg]
             + w_charges[reg] * (charges - 65.0) / 20.0
             + w_calls[reg] * (calls - 1.5)
             + w_tenure[reg] * (tenure - 36.0) / 20.0
             + w_contract[reg] * contract_idx)
    churned = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    return pd.DataFrame(
        {
            "region": pd.Series(np.array(CHURN_REGIONS, dtype=object)[reg], dtype="str"),
            "customer_id": np.arange(1, n + 1, dtype=np.int64),
            "tenure": tenure.astype(np.int64),
            "monthly_charges": charges,
            "contract": pd.Series(_CHURN_CONTRACTS[contract_idx], dtype="str"),
            "support_calls": calls.astype(np.int64),
            "churned": churned.astype(np.int64),
        }
    )


# --------------------------------------------------------------------------- mixed


def mixed_own_segments(segments: int = 40, own_fraction: float = 0.5) -> list[str]:
    """Names of the segments of :func:`make_mixed` that follow a pattern of their own.

    They are the first ``round(segments * own_fraction)`` segments; the others share one
    common pattern. Kept out of the frame itself so that no model can read the answer.
    """
    _check_int("segments", segments, 1, "mixed_own_segments")
    _check_fraction(own_fraction, "mixed_own_segments")
    n_own = int(round(segments * own_fraction))
    return [_segment_name(i, segments) for i in range(n_own)]


def _check_fraction(own_fraction: float, caller: str) -> None:
    if not isinstance(own_fraction, (int, float)) or not 0.0 <= float(own_fraction) <= 1.0:
        raise SpecError(f"{caller}: option 'own_fraction' must be a number in [0, 1], "
                        f"got {own_fraction!r}")


def _segment_name(i: int, segments: int) -> str:
    return f"s{i:0{max(3, len(str(segments - 1)))}d}"


def make_mixed(
    segments: int = 40, rows_per_segment: int = 120, own_fraction: float = 0.5, seed: int = 0
) -> pd.DataFrame:
    """Segments that need their own model mixed with segments that should be pooled.

    The first ``own_fraction`` of the segments (:func:`mixed_own_segments`) follow a
    linear pattern with strongly different coefficients each: only their own model
    fits them. The rest share ONE nonlinear pattern with more noise: each has too few
    rows to learn it alone, so a model fitted on the pooled rows of all of them beats
    their own models. Segments fall in contiguous blocks into four parent groups
    (``g0``..``g3``); with ``own_fraction=0.5`` the groups ``g0``, ``g1`` hold the own
    segments and ``g2``, ``g3`` the shared ones, so a model pooled over a shared
    segment's group sees only its common pattern, while a global model also sees the
    conflicting own segments.

    Parameters
    ----------
    segments : int
        Number of segments (``s000``, ``s001``, ...).
    rows_per_segment : int
        Rows per segment; ``week`` runs ``1..rows_per_segment`` in time order.
    own_fraction : float
        Share of segments, in [0, 1], with a pattern of their own.
    seed : int
        Seed of :func:`numpy.random.default_rng`.

    Returns
    -------
    pandas.DataFrame
        Columns ``segment`` (str), ``group`` (str), ``week`` (int64), ``x1``, ``x2``
        (float64), ``promo`` (int64 0/1) and target ``y`` (float64).

    Raises
    ------
    SpecError
        If an option is out of range.
    """
    caller = "make_mixed"
    _check_int("segments", segments, 1, caller)
    _check_int("rows_per_segment", rows_per_segment, 2, caller)
    _check_fraction(own_fraction, caller)
    _check_seed(seed, caller)
    rng = np.random.default_rng(seed)
    n_own = len(mixed_own_segments(segments, own_fraction))
    shape = (segments, rows_per_segment)

    x1 = rng.normal(0.0, 1.0, shape)
    x2 = rng.normal(0.0, 1.0, shape)
    promo = (rng.random(shape) < 0.25).astype(np.int64)
    noise = rng.normal(0.0, 1.0, shape)

    # Own segments: linear, with coefficients far apart from segment to segment.
    a = rng.uniform(-6.0, 6.0, segments)
    b1 = rng.uniform(-4.0, 4.0, segments)
    b2 = rng.uniform(-4.0, 4.0, segments)
    c = rng.uniform(-3.0, 3.0, segments)
    own = (a[:, None] + b1[:, None] * x1 + b2[:, None] * x2 + c[:, None] * promo
           + 0.5 * noise)
    # Shared segments: one nonlinear pattern (a wave, a kink, an interaction), noisier.
    shared = (1.0 + 1.5 * np.sin(2.0 * x1) + 1.2 * np.maximum(x2, 0.0) - 0.8 * x1 * x2
              + 1.5 * promo * (x1 > 0) + 1.0 * noise)
    is_own = (np.arange(segments) < n_own)[:, None]
    y = np.where(is_own, own, shared)

    names = np.array([_segment_name(i, segments) for i in range(segments)], dtype=object)
    groups = np.array([f"g{i * _MIXED_GROUPS // segments}" for i in range(segments)],
                      dtype=object)
    rows = segments * rows_per_segment
    return pd.DataFrame(
        {
            "segment": pd.Series(np.repeat(names, rows_per_segment), dtype="str"),
            "group": pd.Series(np.repeat(groups, rows_per_segment), dtype="str"),
            "week": np.tile(np.arange(1, rows_per_segment + 1, dtype=np.int64), segments),
            "x1": np.round(x1.reshape(rows), 4),
            "x2": np.round(x2.reshape(rows), 4),
            "promo": promo.reshape(rows),
            "y": np.round(y.reshape(rows), 4),
        }
    )


# --------------------------------------------------------------------------- writing


def write_dataset(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``frame`` to ``path`` as Parquet or CSV (chosen by suffix), atomically.

    The frame goes to a temporary file in the same directory first and is then moved
    into place with :func:`os.replace`, so a reader never sees half a file and a failed
    write leaves any older file untouched.

    Parameters
    ----------
    frame : pandas.DataFrame
        The table to write; its index is not written.
    path : str or os.PathLike
        Target file ending in ``.parquet``, ``.pq`` or ``.csv``; missing parent
        directories are created.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    SpecError
        If the suffix is not one of the supported ones.
    DataError
        If the file cannot be written (the message names it).
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in {".parquet", ".pq", ".csv"}:
        raise SpecError(f"cannot write '{target}': the suffix must be .parquet, .pq or .csv "
                        f"(got '{target.suffix or 'none'}')")
    # A fresh name in the same directory (not mkstemp, whose 0600 mode would survive the
    # rename): the file is created by the writer with the usual umask-based mode.
    tmp_name = str(target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot write '{target}': {exc.strerror or exc}; "
                        "choose a writable directory") from exc
    try:
        if suffix == ".csv":
            frame.to_csv(tmp_name, index=False)
        else:
            frame.to_parquet(tmp_name, engine="pyarrow", index=False)
        os.replace(tmp_name, target)
    except (OSError, ValueError, TypeError) as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise DataError(f"cannot write '{target}': {exc}") from exc
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target
