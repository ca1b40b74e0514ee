"""A deterministic, learnable synthetic shop in which every signal matters, with its oracle.

``generate_demo(dst, DemoConfig())`` writes a complete kgrank dataset (items, users, interactions,
triples, product images) plus the exact preference function the events were sampled from, so an
evaluator can report the NDCG of an oracle next to the models. Tastes are low-dimensional (users
are drawn from a few dozen *personas*) and every user leaves ~13 distinct clicks, so a user's
preferences can be inferred from their history. Every modality carries signal that the others do
not:

* **collaborative graph** - a hidden cluster id shared by users and items (not derivable from any
  item attribute; a user's cluster follows their persona with prob 0.8) only shows up as
  co-clicks;
* **knowledge graph** - a category tree (``Beauty > Hair Care > Shampoo``), brands tied to
  departments, regional brands popular in one city, complementary leaf categories;
* **text** - titles and descriptions (brand, material, leaf noun, sometimes colour) and search
  queries;
* **image** - a 64x64 PNG per item: department shape, item colour, and the item's *pattern*
  (solid / striped / dotted / checked), which never appears in any text;
* **behaviour** - a complementary-category transition from the previous session's last item;
* **context** - time of day x device (cheaper taste on mobile/app at night), city (regional
  brands) and the search query.

Ground truth
------------
For user ``u``, item ``i``, context ``ctx = (time, device, city)``, previous positive item ``p``
and query ``q`` (None outside search sessions) the preference score is::

    s = w_category * log taste[u, leaf(i)]            # persona leaf taste x individual noise
      + w_brand    * [brand(i) in favourite brands(u)]
      + w_colour   * colour_pref[u, colour(i)]         # persona N(0, 1) + N(0, 0.2) per colour
      + w_pattern  * pattern_pref[u, pattern(i)]       # persona N(0, 1) + N(0, 0.2) per pattern
      + w_price    * price_fit(u, ctx, i)
      + w_cluster  * [cluster(u) == cluster(i)]
      + w_regional * [brand(i) is regional in city(ctx)]
      + w_sequence * T[leaf(p), leaf(i)]               # 0 when there is no previous item
      + w_quality  * quality(i)                        # N(0, 1) per item
      + w_query    * query_match(q, i)

with the default weights

==========  =====  ==========================================================================
term        w      scale of the term
==========  =====  ==========================================================================
category    1.0    log taste in [log(floor / n_leaves), 0]; ~5 leaves hold ~80 % of the taste
brand       2.0    1 for the user's ~2-3 favourite brands
colour      1.0    N(0, 1) (persona) + N(0, 0.2) (user)
pattern     1.0    same (visible only in the image and the ``pattern`` column)
price       1.0    -min(d^2 / (2 sigma^2), 4), d = log(price / leaf base) - band(u) + shift(ctx)
cluster     1.5    1 for the ~5 % of items in the user's hidden cluster
regional    2.0    1 for items of a brand popular in the session's city
sequence    1.5    T = 1 for leaf -> complement (shampoo -> conditioner), 0.5 backwards
quality     0.4    N(0, 1)
query       4.0    share of query tokens found in the item's attribute tokens
==========  =====  ==========================================================================

``price_fit``: the user's preferred band is ``band(u)`` in log-price relative to the leaf's base
price (the persona's band, plus 0.015 per year of age over 42: older users pay more); on a
``mobile`` or ``app`` device between 22:00 and 06:00 UTC the band drops by ``night_price_shift``
(0.7, i.e. half the price). ``query_match``: the share of the query's distinct tokens found in the
item's attribute tokens (leaf noun, colour, material, brand and pattern word - a shopper may ask
for "striped" although no text says so).

Personas
--------
``n_personas`` (30) segments with Dirichlet(5) shares. A persona fixes a leaf taste (departments
~ Dirichlet(0.15), leaves within a department ~ Dirichlet(0.25 x leaf popularity): one or two
departments and a handful of leaves dominate), 2-3 favourite brands of its departments, colour and
pattern preferences (N(0, 1) each), a price band (N(0, 0.35)), a typical age (24-64) and a
collaborative cluster. A user is their persona plus small individual noise: leaf taste x
lognormal(0, 0.3) (renormalised, then mixed with 3 % uniform mass), each favourite brand kept with
prob 0.85 plus an own one with prob 0.3, colour / pattern preferences + N(0, 0.2), age = the
persona's + N(0, 8), band + N(0, 0.1), the persona's cluster with prob 0.8 (else a random one);
home city and device habit are individual. A model that sees ~10 of a user's items can infer the
persona, and everything else (cluster, context, sequence, query, quality) is learnable from the
logs, the catalogue, the images and the knowledge graph.

Sessions
--------
Every user has ``3 + Poisson(sessions_per_user - 3)`` sessions (5 on average) at random times
over ``n_days`` from 2024-01-01 UTC (hours from a daily profile, sessions at least 15 minutes
apart), a device drawn from the user's habit and the home city 85 % of the time. 20 % of sessions
are searches: an intent item is drawn by Gumbel-max over ``s(q=None)`` and the query is 2-4 words
describing it (leaf noun always, plus some of brand, colour, pattern, material). The shop's
imperfect ranker shows the top 6 of ``s + 0.75 Gumbel`` (items the user already clicked are not
re-shown), logged as ``view`` events at the session start. ``2 + Binomial(2, 0.3)`` clicks follow
(2-4, 2.6 on average), click ``j`` in its own 2-minute slot, each drawn among the shown, not yet
clicked items with probability proportional to ``exp(s / tau) / (pos + 1) ** 0.8`` (tau = 1) with
``s`` at the click's own time; a click becomes ``cart`` with prob ``sigmoid(s - a)`` (a = 3) and a
cart a ``purchase`` with prob ``b`` (0.5). A clicked item is never clicked again by that user, so
every user has at least 6 distinct positive items and leave-last-out targets are new items.

The previous item ``p`` of a session - used by the ranker and by every click of the session, so
that exposure and choice follow the same preference - is *the item of the user's last
click/cart/purchase event strictly before the session's first event* (the last click of the
user's previous session; none in the first session). Per clicked item the events are click,
cart, purchase (increasing timestamps), and every event of a click slot precedes the next slot.
:func:`oracle_requests` builds the requests, with that ``p``, from the interactions.

At the default size (5000 users, 3000 items, seed 0) the shop has ~240k events (150k views, 65k
clicks, 17k carts, 8.5k purchases; 13 distinct clicked items per user, at least 6) and is
generated in under 10 s. On the leave-last-out test of ``kgrank run configs/demo.yaml`` the
oracle's NDCG@10 is ~0.38, ItemKNN's ~0.21 and popularity's ~0.015; leaving out any single term
of ``s`` lowers the oracle's NDCG@10 by 0.02 (sequence) to 0.28 (category).

The oracle
----------
The parameters are stored in the dataset as ``oracle/params.safetensors`` (numpy arrays) and
``oracle/config.json`` (weights, vocabularies, context rules, generator config). Item ``i`` is row
``i`` of ``items.parquet`` and user ``u`` row ``u`` of ``users.parquet``; the parameter
``user_persona`` holds each user's persona, for analysis only (the score does not read it).
:class:`DemoOracle` recomputes ``s`` for any request with the same float32 code the generator
sampled from.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from kgrank.data.dataset import Dataset, write_dataset

__all__ = [
    "DemoConfig",
    "DemoOracle",
    "TERMS",
    "click_percentiles",
    "generate_demo",
    "has_oracle",
    "oracle_requests",
]

# ----------------------------------------------------------------------------------------------
# The shop's fixed vocabulary
# ----------------------------------------------------------------------------------------------

# The category tree under the implicit root "Shop": department -> subcategory -> (leaf, base
# price). Leaf names are unique across the tree; category paths omit the root.
TAXONOMY: dict[str, dict[str, tuple[tuple[str, float], ...]]] = {
    "Beauty": {
        "Hair Care": (("Shampoo", 9.0), ("Conditioner", 9.0), ("Hair Oil", 14.0)),
        "Skin Care": (("Moisturizer", 18.0), ("Cleanser", 12.0), ("Serum", 25.0)),
        "Makeup": (("Lipstick", 15.0), ("Mascara", 13.0), ("Foundation", 22.0)),
        "Fragrance": (("Perfume", 55.0), ("Body Mist", 16.0)),
    },
    "Home": {
        "Bedding": (("Pillow", 25.0), ("Duvet", 70.0), ("Bed Sheet", 35.0)),
        "Decor": (("Vase", 30.0), ("Candle", 12.0), ("Picture Frame", 18.0)),
        "Bath": (("Towel", 15.0), ("Bath Mat", 20.0), ("Shower Curtain", 22.0)),
        "Lighting": (("Lamp", 45.0), ("Lampshade", 25.0)),
    },
    "Fashion": {
        "Tops": (("T-Shirt", 18.0), ("Sweater", 45.0), ("Blouse", 35.0)),
        "Bottoms": (("Jeans", 55.0), ("Skirt", 35.0), ("Trousers", 45.0)),
        "Footwear": (("Sneakers", 70.0), ("Boots", 90.0), ("Sandals", 35.0)),
        "Accessories": (("Scarf", 20.0), ("Belt", 25.0), ("Handbag", 60.0)),
    },
    "Electronics": {
        "Phones": (("Smartphone", 400.0), ("Phone Case", 15.0), ("Charger", 20.0)),
        "Audio": (("Headphones", 90.0), ("Speaker", 60.0), ("Earbuds", 70.0)),
        "Computers": (("Laptop", 800.0), ("Keyboard", 50.0), ("Mouse", 25.0)),
    },
    "Sports": {
        "Fitness": (("Yoga Mat", 25.0), ("Dumbbell", 30.0), ("Resistance Band", 12.0)),
        "Running": (("Running Shoes", 90.0), ("Water Bottle", 12.0)),
        "Cycling": (("Bike Helmet", 50.0), ("Bike Light", 20.0), ("Cycling Gloves", 18.0)),
        "Outdoor": (("Tent", 120.0), ("Backpack", 55.0), ("Sleeping Bag", 70.0)),
    },
    "Kitchen": {
        "Cookware": (("Frying Pan", 35.0), ("Saucepan", 30.0), ("Wok", 40.0)),
        "Tableware": (("Plate", 8.0), ("Mug", 9.0), ("Bowl", 8.0)),
        "Utensils": (("Knife", 30.0), ("Spatula", 7.0), ("Cutting Board", 18.0)),
        "Storage": (("Jar", 8.0), ("Lunch Box", 12.0)),
    },
}
DEPARTMENTS: tuple[str, ...] = tuple(TAXONOMY)
# The image shape of each department.
SHAPES: dict[str, str] = {
    "Beauty": "circle",
    "Home": "square",
    "Fashion": "triangle",
    "Electronics": "rectangle",
    "Sports": "hexagon",
    "Kitchen": "diamond",
}
MATERIALS: dict[str, tuple[str, ...]] = {
    "Beauty": ("argan", "aloe", "coconut", "lavender", "charcoal", "shea"),
    "Home": ("cotton", "linen", "ceramic", "glass", "bamboo", "velvet"),
    "Fashion": ("cotton", "denim", "leather", "wool", "silk", "linen"),
    "Electronics": ("aluminium", "plastic", "silicone", "carbon", "steel"),
    "Sports": ("neoprene", "nylon", "rubber", "polyester", "foam", "steel"),
    "Kitchen": ("steel", "iron", "ceramic", "wood", "glass", "copper"),
}
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (35, 35, 38)),
    ("white", (250, 250, 250)),
    ("red", (205, 40, 40)),
    ("orange", (240, 140, 30)),
    ("yellow", (240, 215, 50)),
    ("green", (50, 150, 70)),
    ("blue", (40, 90, 200)),
    ("purple", (125, 60, 165)),
    ("pink", (240, 140, 185)),
    ("brown", (125, 80, 45)),
)
COLOUR_WEIGHTS = (1.6, 1.4, 1.0, 0.7, 0.6, 0.9, 1.2, 0.6, 0.8, 0.8)
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checked")
PATTERN_WEIGHTS = (0.4, 0.2, 0.2, 0.2)
ADJECTIVES: tuple[str, ...] = (
    "Classic", "Premium", "Everyday", "Compact", "Deluxe", "Essential", "Modern", "Soft",
    "Lightweight", "Durable", "Elegant", "Practical",
)
BRANDS: tuple[str, ...] = (
    "Aldea", "Arbor", "Aster", "Bellwood", "Brio", "Calla", "Cedro", "Corvo", "Dunmore", "Elmira",
    "Fenwick", "Fjordia", "Glade", "Halden", "Harborline", "Iona", "Juniper", "Kestrel", "Larkin",
    "Lumera", "Marlow", "Meridian", "Nordia", "Novella", "Oakhurst", "Orla", "Pellham",
    "Pinecrest", "Quill", "Rivana", "Roswell", "Saffra", "Selby", "Solenne", "Tamsin", "Thorne",
    "Ulla", "Valora", "Verdan", "Wexley", "Willowby", "Yarrow", "Zephyra", "Alpinor", "Brisko",
    "Crestal", "Delmar", "Evren", "Fablet", "Gabley", "Hollis", "Ivor", "Jaspen", "Kova", "Lyric",
    "Mistral", "Nimbus", "Opaline", "Prisma", "Ravel", "Sablon", "Tova", "Umbrel", "Vesper",
    "Wrenna", "Xanto", "Yvel", "Zorin", "Aurin", "Belvor",
)
BRAND_TIERS = (-0.45, 0.0, 0.4, 0.8)  # log price multiplier: budget, mid, premium, luxury
BRAND_TIER_WEIGHTS = (0.3, 0.35, 0.25, 0.1)
CITIES: tuple[str, ...] = (
    "Berlin", "Paris", "London", "Madrid", "Rome", "Vienna", "Lisbon", "Warsaw",
    "Prague", "Dublin", "Oslo", "Athens",
)
CITY_WEIGHTS = (3.0, 3.0, 3.0, 2.0, 2.0, 1.5, 1.0, 1.5, 1.0, 1.0, 1.0, 1.0)
DEVICES: tuple[str, ...] = ("mobile", "desktop", "app")
DEVICE_HABIT_ALPHA = (2.0, 1.5, 1.0)  # Dirichlet of each user's device habit
NIGHT_DEVICES: tuple[str, ...] = ("mobile", "app")
NIGHT_HOURS: tuple[int, ...] = (22, 23, 0, 1, 2, 3, 4, 5)  # UTC
# Relative session volume per UTC hour 0..23 (lunch and evening peaks).
HOUR_PROFILE = (
    2.0, 1.5, 1.0, 0.7, 0.5, 0.6, 1.0, 2.0, 3.0, 3.5, 4.0, 4.5,
    5.0, 4.5, 4.0, 4.0, 4.5, 5.0, 6.0, 7.0, 7.5, 7.0, 5.5, 3.5,
)
# Complementary leaves: (from, to) gives T[from, to] = 1 and T[to, from] = 0.5.
COMPLEMENTS: tuple[tuple[str, str], ...] = (
    ("Shampoo", "Conditioner"), ("Conditioner", "Hair Oil"), ("Cleanser", "Moisturizer"),
    ("Moisturizer", "Serum"), ("Foundation", "Mascara"), ("Lipstick", "Perfume"),
    ("Perfume", "Body Mist"), ("Pillow", "Bed Sheet"), ("Duvet", "Pillow"),
    ("Bed Sheet", "Duvet"), ("Vase", "Candle"), ("Candle", "Picture Frame"),
    ("Towel", "Bath Mat"), ("Shower Curtain", "Bath Mat"), ("Lamp", "Lampshade"),
    ("T-Shirt", "Jeans"), ("Jeans", "Belt"), ("Blouse", "Skirt"), ("Sweater", "Scarf"),
    ("Trousers", "Belt"), ("Boots", "Scarf"), ("Sneakers", "T-Shirt"), ("Handbag", "Scarf"),
    ("Sandals", "Skirt"), ("Smartphone", "Phone Case"), ("Smartphone", "Charger"),
    ("Laptop", "Mouse"), ("Laptop", "Keyboard"), ("Headphones", "Charger"),
    ("Earbuds", "Phone Case"), ("Speaker", "Charger"), ("Yoga Mat", "Resistance Band"),
    ("Dumbbell", "Water Bottle"), ("Running Shoes", "Water Bottle"), ("Running Shoes", "Earbuds"),
    ("Bike Helmet", "Bike Light"), ("Bike Light", "Cycling Gloves"), ("Tent", "Sleeping Bag"),
    ("Backpack", "Water Bottle"), ("Backpack", "Lunch Box"), ("Frying Pan", "Spatula"),
    ("Wok", "Spatula"), ("Saucepan", "Spatula"), ("Plate", "Bowl"), ("Bowl", "Mug"),
    ("Knife", "Cutting Board"), ("Jar", "Lunch Box"), ("Lunch Box", "Water Bottle"),
)
# Description sentences (never mention the pattern).
SECOND_SENTENCES: tuple[str, ...] = (
    "Designed for everyday use.",
    "Made to last.",
    "Easy to care for.",
    "A favourite with our customers.",
    "Great value for the price.",
    "Carefully made by {brand}.",
)

TERMS: tuple[str, ...] = (
    "category", "brand", "colour", "pattern", "price", "cluster", "regional", "sequence",
    "quality", "query",
)
"""Names of the score terms (keys of ``weights`` in ``oracle/config.json``)."""

POSITIVE_EVENTS: tuple[str, ...] = ("click", "cart", "purchase")
EPOCH = np.datetime64("2024-01-01T00:00:00", "s")
SESSION_GAP_S = 900  # minimum seconds between two session starts of one user
ITEM_SLOT_S = 120  # seconds between the click slots of one session (click j at start + j slots)
MAX_CLICKS = 6  # most clicks per session: all events of a session end before SESSION_GAP_S
PRICE_FIT_CAP = 4.0  # price_fit is clipped at -PRICE_FIT_CAP
AGE_BAND_SLOPE = 0.015  # a user's price band rises by this per year of age ...
AGE_BAND_CENTRE = 42.0  # ... around this age
ORACLE_FORMAT = "kgrank-demo-oracle"
ORACLE_VERSION = 2  # 2: personas, multi-click sessions, previous item = last before the session
PARAMS_FILE = "oracle/params.safetensors"
CONFIG_FILE = "oracle/config.json"
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens (hyphenated words such as ``t-shirt`` stay whole)."""
    return _TOKEN_RE.findall(text.lower())


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of the demo shop; the defaults give 5k users, 3k items and ~240k events."""

    n_users: int = 5000
    n_items: int = 3000
    n_days: int = 120
    # Mean sessions per user: each user gets 3 + Poisson(sessions_per_user - 3) sessions (>= 3 so
    # that every user has >= 3 * min_clicks distinct positive items).
    sessions_per_user: float = 5.0
    seed: int = 0
    image_size: int = 64
    n_brands: int = 60  # brands, each tied to 1-2 departments and a price tier (<= 70)
    regional_brand_share: float = 0.2  # share of brands popular in one city
    n_cities: int = 8  # cities users live in and shop from (<= 12)
    n_clusters: int = 20  # hidden collaborative clusters shared by users and items
    n_personas: int = 30  # shopper segments; a user is a persona plus small individual noise
    persona_size_alpha: float = 5.0  # Dirichlet concentration of the persona shares
    persona_cluster_prob: float = 0.8  # P(a user is in the persona's cluster); else a random one
    search_share: float = 0.2  # share of sessions that start with a search query
    list_length: int = 6  # items shown per session (logged as views, positions 0..L-1)
    ranker_noise: float = 0.75  # Gumbel scale of the shop's imperfect ranker (top-L of s + noise)
    click_temperature: float = 1.0  # tau in P(click) ~ exp(s / tau) * exam(pos)
    exam_power: float = 0.8  # position bias: exam(pos) = 1 / (pos + 1) ** exam_power
    min_clicks: int = 2  # clicks per session: min_clicks + Binomial(max - min, extra_click_prob)
    max_clicks: int = 4
    extra_click_prob: float = 0.3
    cart_offset: float = 3.0  # a in P(cart | click) = sigmoid(s - a)
    purchase_prob: float = 0.5  # b = P(purchase | cart)
    home_city_prob: float = 0.85  # probability that a session happens in the user's home city
    no_image_share: float = 0.05  # items without image (image None)
    no_description_share: float = 0.10  # items without description (None)
    title_colour_share: float = 0.5  # items whose title names the colour
    taste_floor: float = 0.03  # uniform mass mixed into each user's leaf taste (bounds log taste)
    department_alpha: float = 0.15  # Dirichlet concentration of a persona's department taste
    leaf_alpha: float = 0.25  # Dirichlet concentration of a persona's leaf taste within a department
    taste_noise: float = 0.3  # sd of a user's log-normal deviation from the persona's leaf taste
    pref_noise: float = 0.2  # sd of a user's deviation from the persona's colour/pattern prefs
    price_sigma: float = 0.4  # width of price_fit in log-price units
    night_price_shift: float = 0.7  # drop of the preferred log-price band on mobile/app at night
    w_category: float = 1.0  # weight of log taste[u, leaf(i)]
    w_brand: float = 2.0  # weight of [brand(i) is a favourite of u]
    w_colour: float = 1.0  # weight of colour_pref[u, colour(i)]
    w_pattern: float = 1.0  # weight of pattern_pref[u, pattern(i)]
    w_price: float = 1.0  # weight of price_fit(u, ctx, i)
    w_cluster: float = 1.5  # weight of [cluster(u) == cluster(i)]
    w_regional: float = 2.0  # weight of [brand(i) is regional in the session's city]
    w_sequence: float = 1.5  # weight of T[leaf(prev), leaf(i)]
    w_quality: float = 0.4  # weight of quality(i)
    w_query: float = 4.0  # weight of query_match(q, i)

    def weights(self) -> dict[str, float]:
        """Term name -> weight, in :data:`TERMS` order."""
        return {t: float(getattr(self, f"w_{t}")) for t in TERMS}

    def validate(self) -> None:
        if self.n_users < 1 or self.n_days < 1:
            raise ValueError("n_users and n_days must be >= 1")
        if self.n_items < 3 * self.list_length or self.list_length < 2:
            raise ValueError("need list_length >= 2 and n_items >= 3 * list_length")
        if self.sessions_per_user < 3:
            raise ValueError("sessions_per_user must be >= 3 (every user has >= 3 sessions)")
        if not 1 <= self.min_clicks <= self.max_clicks <= min(self.list_length, MAX_CLICKS):
            raise ValueError(f"need 1 <= min_clicks <= max_clicks <= min(list_length, "
                             f"{MAX_CLICKS})")
        if not 0.0 <= self.extra_click_prob <= 1.0:
            raise ValueError("extra_click_prob must be in [0, 1]")
        if not 1 <= self.n_brands <= len(BRANDS):
            raise ValueError(f"n_brands must be in 1..{len(BRANDS)}")
        if not 2 <= self.n_cities <= len(CITIES):
            raise ValueError(f"n_cities must be in 2..{len(CITIES)}")
        if self.n_clusters < 1 or self.image_size < 16:
            raise ValueError("n_clusters must be >= 1 and image_size >= 16")
        if self.n_personas < 1 or not 0.0 <= self.persona_cluster_prob <= 1.0:
            raise ValueError("need n_personas >= 1 and persona_cluster_prob in [0, 1]")


# ----------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------

_ITEM_KEYS = ("item_leaf", "item_brand", "item_colour", "item_pattern", "item_cluster",
              "item_city", "item_quality", "item_rel_price", "item_tokens")
USER_PREFERENCES = ("user_log_taste", "user_brand", "user_colour", "user_pattern",
                    "user_price_band", "user_cluster")
"""The per-user preference parameters of the oracle (those :meth:`DemoOracle.persona_level`
pools per persona)."""


class DemoOracle:
    """The demo shop's true preference function ``s(u, i, ctx, q)``.

    ``params`` are the arrays of ``oracle/params.safetensors`` and ``meta`` the content of
    ``oracle/config.json``. The generator samples from this very object, so :meth:`score`
    reproduces the generator's scores bit for bit.
    """

    def __init__(self, params: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        if meta.get("format") != ORACLE_FORMAT:
            raise ValueError(f"not a demo oracle config (format {meta.get('format')!r})")
        if meta.get("version") != ORACLE_VERSION:
            raise ValueError(
                f"demo oracle version {meta.get('version')!r}, this code reads version "
                f"{ORACLE_VERSION}: the shop was generated by another kgrank version; delete its "
                "directory and generate it again"
            )
        missing = [k for k in (*_ITEM_KEYS, *USER_PREFERENCES, "leaf_transition") if k not in params]
        if missing:
            raise ValueError(f"oracle params lack {missing}")
        self.params = {k: np.ascontiguousarray(v) for k, v in params.items()}
        self.meta = dict(meta)
        self.weights: dict[str, float] = {t: float(meta["weights"][t]) for t in TERMS}
        self.vocab: list[str] = list(meta["vocab"])
        self._token_id = {t: j for j, t in enumerate(self.vocab)}
        self._city_id = {c: j for j, c in enumerate(meta["cities"])}
        self._night_devices = frozenset(meta["night_devices"])
        self._night_hours = np.zeros(24, dtype=bool)
        self._night_hours[list(meta["night_hours"])] = True
        p = self.params
        self.n_items = int(p["item_leaf"].shape[0])
        self.n_users = int(p["user_log_taste"].shape[0])
        n_leaves = p["leaf_transition"].shape[0]
        # Extra zero row / column so that "no previous item" and "no token" gather zeros.
        self._transition = np.vstack([p["leaf_transition"], np.zeros((1, n_leaves), np.float32)])
        self._tokens_t = np.vstack(
            [p["item_tokens"].T, np.zeros((1, self.n_items), np.uint8)]
        ).astype(np.int16)

    # -- persistence ---------------------------------------------------------------------------

    @classmethod
    def load(cls, dataset_root: str | Path) -> DemoOracle:
        """Load the oracle stored in a demo dataset directory."""
        root = Path(dataset_root)
        if not has_oracle(root):
            raise FileNotFoundError(f"{root} has no {PARAMS_FILE} / {CONFIG_FILE}")
        params = st_load((root / PARAMS_FILE).read_bytes())
        meta = json.loads((root / CONFIG_FILE).read_text())
        return cls(params, meta)

    def to_files(self) -> dict[str, bytes]:
        """The oracle as ``{relative path: bytes}`` for :func:`write_dataset`'s ``files``."""
        meta = json.dumps(self.meta, indent=1, sort_keys=True).encode()
        return {PARAMS_FILE: st_save(dict(sorted(self.params.items()))), CONFIG_FILE: meta}

    def persona_level(self, ages: np.ndarray) -> DemoOracle:
        """The oracle with each user's own preferences replaced by their persona's: what a model
        could reach that knew every item's parameters, the context terms and each user's persona
        exactly, but none of the user's individual deviations.

        Per persona (``user_persona``): the mean leaf taste (in probability space), the share of
        members with each favourite brand (the expected brand term), the mean colour and pattern
        preferences, the most common collaborative cluster, and the mean price band net of the
        age effect, to which each user's own age (``ages``, observed in the users table) is
        added back. An analysis tool (``benchmarks/oracle_gap.py``): a bound for learners that
        pool users into segments.
        """
        table = self._personas(ages)
        persona = self.params["user_persona"].astype(np.int64)
        params = {
            **self.params,
            "user_log_taste": table["log_taste"][persona].astype(np.float32),
            "user_brand": table["brand"][persona].astype(np.float32),
            "user_colour": table["colour"][persona].astype(np.float32),
            "user_pattern": table["pattern"][persona].astype(np.float32),
            "user_price_band": (table["band"][persona] + table["age_effect"]).astype(np.float32),
            "user_cluster": table["cluster"][persona].astype(self.params["user_cluster"].dtype),
        }
        return DemoOracle(params, self.meta)

    def persona_inferred(self, ages: np.ndarray, users: np.ndarray, items: np.ndarray,
                         temperature: float = 1.0, chunk: int = 128) -> DemoOracle:
        """The persona-level oracle with each user's persona *inferred from their history*
        instead of known: what a learner could reach that knew the shop's score function,
        every item parameter and every persona's preferences, and had to tell from a user's
        own positives which persona they belong to.

        ``users`` / ``items``: the (user, item) pairs of the history (e.g. each user's distinct
        positives before the test target). A user's log-likelihood under persona ``k`` is
        ``sum_j log softmax_i(s_k(u, i) / temperature)[item_j]`` with ``s_k`` the persona-level
        score without the context terms (no night shift, city, previous item or query; the
        cluster term as the share of the persona's members in the item's cluster); the
        posterior multiplies in the persona's share of users. The user's parameters are then
        the posterior means of the personas' (log taste, brand shares, colour, pattern, price
        band; plus the user's age effect) and the cluster with the highest posterior mass.
        The posterior itself is kept, for analysis, as ``params["user_persona_posterior"]``
        ([n_users, n_personas]).
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        users = np.asarray(users, np.int64)
        items = np.asarray(items, np.int64)
        if users.shape != items.shape:
            raise ValueError(f"users {users.shape} and items {items.shape} differ in shape")
        if len(users) and (users.min() < 0 or users.max() >= self.n_users
                           or items.min() < 0 or items.max() >= self.n_items):
            raise ValueError("users / items outside the shop")
        p, t = self.params, self._personas(ages)
        w = self.weights
        n_p = len(t["share"])
        n_clusters = int(max(p["user_cluster"].max(), p["item_cluster"].max())) + 1
        # persona x item: every term that does not depend on the user's age or context
        member = np.zeros((n_p, n_clusters))
        np.add.at(member, (p["user_persona"].astype(np.int64), p["user_cluster"]), 1.0)
        member /= np.maximum(member.sum(axis=1, keepdims=True), 1.0)
        fixed = (w["category"] * t["log_taste"][:, p["item_leaf"]]
                 + w["brand"] * t["brand"][:, p["item_brand"]]
                 + w["colour"] * t["colour"][:, p["item_colour"]]
                 + w["pattern"] * t["pattern"][:, p["item_pattern"]]
                 + w["cluster"] * member[:, p["item_cluster"]]
                 + w["quality"] * p["item_quality"][None, :])
        rel = p["item_rel_price"].astype(np.float64)
        cap, inv = float(self.meta["price_fit_cap"]), 0.5 / float(self.meta["price_sigma"]) ** 2
        prior = np.log(np.maximum(t["share"], 1e-12))
        loglik = np.tile(prior, (self.n_users, 1))
        order = np.argsort(users, kind="stable")
        users, items = users[order], items[order]
        for lo in range(0, self.n_users, chunk):
            hi = min(lo + chunk, self.n_users)
            band = t["band"][None, :] + t["age_effect"][lo:hi, None]  # [U, P]
            d = rel[None, None, :] - band[:, :, None]
            s = (fixed[None] - w["price"] * np.minimum(d * d * inv, cap)) / temperature
            norm = np.logaddexp.reduce(s, axis=2)  # [U, P]
            a, b = np.searchsorted(users, [lo, hi])
            u, i = users[a:b] - lo, items[a:b]
            ll = s[u, :, i] - norm[u]  # [pairs, P]
            np.add.at(loglik[lo:hi], u, ll)
        post = np.exp(loglik - np.logaddexp.reduce(loglik, axis=1, keepdims=True))
        params = {
            **p,
            "user_log_taste": (post @ t["log_taste"]).astype(np.float32),
            "user_brand": (post @ t["brand"]).astype(np.float32),
            "user_colour": (post @ t["colour"]).astype(np.float32),
            "user_pattern": (post @ t["pattern"]).astype(np.float32),
            "user_price_band": (post @ t["band"] + t["age_effect"]).astype(np.float32),
            "user_cluster": (post @ member).argmax(axis=1).astype(p["user_cluster"].dtype),
            "user_persona_posterior": post.astype(np.float32),
        }
        return DemoOracle(params, self.meta)

    def _personas(self, ages: np.ndarray) -> dict[str, np.ndarray]:
        """Per-persona pooled preferences (rows = personas; see :meth:`persona_level`), the
        personas' shares of users and each user's age effect on the price band."""
        p = self.params
        persona = p["user_persona"].astype(np.int64)
        ages = np.asarray(ages, dtype=np.float64)
        if ages.shape != persona.shape:
            raise ValueError(f"ages has shape {ages.shape}, expected {persona.shape}")
        n_p = int(persona.max()) + 1
        size = np.bincount(persona, minlength=n_p).astype(np.float64)

        def mean(values: np.ndarray) -> np.ndarray:
            total = np.zeros((n_p, *values.shape[1:]), np.float64)
            np.add.at(total, persona, values)
            return total / np.maximum(size, 1).reshape(-1, *([1] * (values.ndim - 1)))

        age_effect = AGE_BAND_SLOPE * (ages - AGE_BAND_CENTRE)
        cluster = np.array([np.bincount(p["user_cluster"][persona == k]).argmax()
                            if size[k] else 0 for k in range(n_p)])
        taste = mean(np.exp(p["user_log_taste"].astype(np.float64)))
        taste[size == 0] = 1.0  # personas without users (never read): no log(0)
        return {
            "log_taste": np.log(taste),
            "brand": mean(p["user_brand"]),
            "colour": mean(p["user_colour"]),
            "pattern": mean(p["user_pattern"]),
            "band": mean(p["user_price_band"] - age_effect),
            "cluster": cluster,
            "share": size / size.sum(),
            "age_effect": age_effect,
        }

    # -- encoding of requests ------------------------------------------------------------------

    def encode_queries(self, queries: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
        """Distinct token ids per query, padded with the no-token id, and the token counts.

        A query that is None, NaN or has no token gives count 0 (no query term). Tokens outside
        the attribute vocabulary count in the denominator of ``query_match`` but never match.
        """
        pad = len(self.vocab)
        ids: list[list[int]] = []
        for q in queries:
            toks = list(dict.fromkeys(tokenize(q))) if isinstance(q, str) else []
            ids.append([self._token_id.get(t, pad) for t in toks])
        width = max([1, *map(len, ids)])
        qtok = np.full((len(ids), width), pad, dtype=np.int32)
        qlen = np.zeros(len(ids), dtype=np.int32)
        for row, tok in enumerate(ids):
            qtok[row, : len(tok)] = tok
            qlen[row] = len(tok)
        return qtok, qlen

    def encode_context(
        self, timestamps: pd.Series, devices: Sequence[object], locations: Sequence[object]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(night-device flag, city id) per request; unknown cities get id -2 (never regional).

        Hours are read in UTC (tz-naive timestamps are taken as UTC).
        """
        hours = pd.DatetimeIndex(pd.to_datetime(pd.Series(timestamps), utc=True)).hour.to_numpy()
        night = self._night_hours[hours] & np.array(
            [d in self._night_devices for d in devices], dtype=bool
        )
        city = np.array(
            [self._city_id.get(c, -2) if isinstance(c, str) else -2 for c in locations],
            dtype=np.int32,
        )
        return night, city

    # -- scoring -------------------------------------------------------------------------------

    def score(
        self, requests: pd.DataFrame, without: Collection[str] = (), chunk: int = 1024
    ) -> np.ndarray:
        """True preference scores of every item for each request.

        ``requests``: one row per request with columns ``user_idx`` (int), ``timestamp`` (UTC),
        ``device``, ``location``, ``query`` (str or None) and ``prev_item_idx`` (the item of the
        user's last click/cart/purchase strictly before the request, -1 if none; see
        :func:`oracle_requests`). ``without`` names terms (see :data:`TERMS`) to leave out, for
        ablations. Returns float32 ``[n_requests, n_items]``: the deterministic score
        ``s(u, i, ctx, q)`` the generator sampled from (higher = more preferred).
        """
        unknown = set(without) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown terms {sorted(unknown)}; terms are {TERMS}")
        weights = {t: (0.0 if t in without else w) for t, w in self.weights.items()}
        users = requests["user_idx"].to_numpy(dtype=np.int64)
        prev = requests["prev_item_idx"].to_numpy(dtype=np.int64)
        if len(users) and (users.min() < 0 or users.max() >= self.n_users):
            raise ValueError(f"user_idx outside 0..{self.n_users - 1}")
        if len(prev) and (prev.min() < -1 or prev.max() >= self.n_items):
            raise ValueError(f"prev_item_idx outside -1..{self.n_items - 1}")
        night, city = self.encode_context(
            requests["timestamp"], requests["device"].tolist(), requests["location"].tolist()
        )
        qtok, qlen = self.encode_queries(requests["query"].tolist())
        out = np.empty((len(users), self.n_items), dtype=np.float32)
        for lo in range(0, len(users), chunk):
            sl = slice(lo, lo + chunk)
            s = self.base_scores(users[sl], night[sl], city[sl], prev[sl], weights)
            out[sl] = self.add_query(s, qtok[sl], qlen[sl], weights)
        return out

    def base_scores(
        self,
        users: np.ndarray,
        night: np.ndarray,
        city: np.ndarray,
        prev: np.ndarray,
        weights: Mapping[str, float] | None = None,
        items: np.ndarray | None = None,
    ) -> np.ndarray:
        """Scores of every term except the query term.

        ``[len(users), n_items]``, or ``[len(users), K]`` for the items ``items[b, :K]`` of each
        request when given (bit-identical to the matching columns of the full matrix).
        """
        w = {t: np.float32(v) for t, v in (weights or self.weights).items()}
        p = self.params
        users = np.asarray(users, dtype=np.int64)
        cols = np.arange(self.n_items)[None, :] if items is None else np.asarray(items, np.int64)
        rows = users[:, None]
        leaf = p["item_leaf"][cols]
        s = w["category"] * p["user_log_taste"][rows, leaf]
        s += w["brand"] * p["user_brand"][rows, p["item_brand"][cols]]
        s += w["colour"] * p["user_colour"][rows, p["item_colour"][cols]]
        s += w["pattern"] * p["user_pattern"][rows, p["item_pattern"][cols]]
        band = p["user_price_band"][users] - np.float32(self.meta["night_price_shift"]) * night
        d = p["item_rel_price"][cols] - band.astype(np.float32)[:, None]
        fit = np.minimum(d * d * np.float32(0.5 / self.meta["price_sigma"] ** 2),
                         np.float32(self.meta["price_fit_cap"]))
        s -= w["price"] * fit
        same = p["user_cluster"][rows] == p["item_cluster"][cols]
        s += w["cluster"] * same.astype(np.float32)
        regional = p["item_city"][cols] == city.astype(np.int32)[:, None]
        s += w["regional"] * regional.astype(np.float32)
        n_leaves = p["leaf_transition"].shape[0]
        prev_leaf = np.where(prev >= 0, p["item_leaf"][np.maximum(prev, 0)], n_leaves)
        s += w["sequence"] * self._transition[prev_leaf[:, None], leaf]
        s += w["quality"] * p["item_quality"][cols]
        return s

    def add_query(
        self,
        base: np.ndarray,
        qtok: np.ndarray,
        qlen: np.ndarray,
        weights: Mapping[str, float] | None = None,
        items: np.ndarray | None = None,
    ) -> np.ndarray:
        """``base + w_query * query_match`` (rows with ``qlen == 0`` get 0 added); ``items`` as
        in :meth:`base_scores`."""
        if items is None:
            hits = self._tokens_t[qtok].sum(axis=1, dtype=np.int16)  # [B, n_items]
        else:
            cols = np.asarray(items, dtype=np.int64)
            hits = self._tokens_t[qtok[:, :, None], cols[:, None, :]].sum(axis=1, dtype=np.int16)
        match = hits.astype(np.float32) / np.maximum(qlen, 1).astype(np.float32)[:, None]
        w = np.float32((weights or self.weights)["query"])
        return base + w * match


def has_oracle(dataset_root: str | Path) -> bool:
    """Whether a dataset directory carries a demo oracle (``oracle/params.safetensors``)."""
    root = Path(dataset_root)
    return (root / PARAMS_FILE).is_file() and (root / CONFIG_FILE).is_file()


def oracle_requests(
    interactions: pd.DataFrame, rows: np.ndarray | pd.Series | None = None
) -> pd.DataFrame:
    """Oracle requests for interaction rows (default: every click).

    ``interactions`` is :attr:`Dataset.interactions` (with ``user_idx`` / ``item_idx`` and
    ``session_id``); ``rows`` selects rows by position (int array) or by a boolean mask.
    ``prev_item_idx`` is the item of the user's last click/cart/purchase strictly before the
    start of the row's session (its first event), which is exactly the previous item the
    generator used. The result is in the order of the selected rows.
    """
    inter = interactions.reset_index(drop=True)
    if rows is None:
        sel = np.flatnonzero(inter["event"].to_numpy() == "click")
    else:
        arr = np.asarray(rows)
        sel = np.flatnonzero(arr) if arr.dtype == bool else arr.astype(np.int64)
    start = inter.groupby("session_id", sort=False)["timestamp"].transform("min")
    req = inter.iloc[sel][["user_idx", "timestamp", "device", "location", "query"]].copy()
    req["_start"] = start.iloc[sel].to_numpy()
    req["_order"] = np.arange(len(req))
    positives = inter.loc[inter["event"].isin(POSITIVE_EVENTS), ["user_idx", "timestamp",
                                                                   "item_idx"]]
    positives = positives.rename(columns={"item_idx": "prev_item_idx", "timestamp": "_at"})
    merged = pd.merge_asof(
        req.sort_values("_start", kind="stable"),
        positives.sort_values("_at", kind="stable"),
        left_on="_start",
        right_on="_at",
        by="user_idx",
        allow_exact_matches=False,
        direction="backward",
    ).sort_values("_order")
    merged["prev_item_idx"] = merged["prev_item_idx"].fillna(-1).astype(np.int64)
    merged["query"] = merged["query"].astype(object).where(merged["query"].notna(), None)
    return merged.drop(columns=["_order", "_start", "_at"]).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def _leaves() -> tuple[list[str], list[str], list[int], np.ndarray]:
    """Leaf paths, leaf names, department index and base price of every leaf."""
    paths, names, depts, prices = [], [], [], []
    for d, (dept, subs) in enumerate(TAXONOMY.items()):
        for sub, leaves in subs.items():
            for leaf, price in leaves:
                paths.append(f"{dept} > {sub} > {leaf}")
                names.append(leaf)
                depts.append(d)
                prices.append(price)
    if len(set(names)) != len(names):
        raise AssertionError("leaf names must be unique")
    return paths, names, depts, np.array(prices)


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of a [n, k] probability matrix (inverse CDF, vectorized)."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(len(probs)) * cdf[:, -1]
    return np.minimum((u[:, None] > cdf).sum(axis=1), probs.shape[1] - 1)


def _ids(prefix: str, n: int) -> list[str]:
    width = max(5, len(str(n)))
    return [f"{prefix}{j + 1:0{width}d}" for j in range(n)]


@dataclass
class _Catalog:
    items: pd.DataFrame
    params: dict[str, np.ndarray]
    brand_depts: list[list[int]]
    brand_city: np.ndarray  # city index of a regional brand, -1 otherwise
    item_dept: np.ndarray
    vocab: list[str]


def _make_catalog(cfg: DemoConfig, rng: np.random.Generator) -> _Catalog:
    paths, names, leaf_dept, base_price = _leaves()
    n_leaves, n_dept = len(paths), len(DEPARTMENTS)
    # Brands: a primary department (round robin), sometimes a second one, a tier, a city.
    brands = list(BRANDS[: cfg.n_brands])
    primary = rng.permutation(np.arange(cfg.n_brands) % n_dept)
    second = (primary + rng.integers(1, n_dept, cfg.n_brands)) % n_dept
    has_second = rng.random(cfg.n_brands) < 0.35
    brand_depts = [
        [int(primary[b])] + ([int(second[b])] if has_second[b] else []) for b in range(cfg.n_brands)
    ]
    tier = rng.choice(len(BRAND_TIERS), size=cfg.n_brands, p=BRAND_TIER_WEIGHTS)
    brand_city = np.full(cfg.n_brands, -1, dtype=np.int32)
    n_regional = int(round(cfg.regional_brand_share * cfg.n_brands))
    regional = rng.choice(cfg.n_brands, size=n_regional, replace=False)
    brand_city[regional] = rng.integers(0, cfg.n_cities, n_regional)

    # Items: every leaf at least once (when there is room), then leaves by popularity.
    n = cfg.n_items
    leaf_pop = rng.lognormal(0.0, 0.5, n_leaves)
    first = rng.permutation(n_leaves)[: min(n, n_leaves)]
    rest = rng.choice(n_leaves, size=n - len(first), p=leaf_pop / leaf_pop.sum())
    item_leaf = rng.permutation(np.concatenate([first, rest])).astype(np.int32)
    dept_arr = np.array(leaf_dept)
    item_dept = dept_arr[item_leaf]
    dept_brands = [[b for b in range(cfg.n_brands) if d in brand_depts[b]] for d in range(n_dept)]
    for d in range(n_dept):  # with few brands, a department may have none: lend it one
        if not dept_brands[d]:
            dept_brands[d] = [d % cfg.n_brands]
    pick = rng.random(n)
    item_brand = np.array(
        [dept_brands[d][int(u * len(dept_brands[d]))] for d, u in zip(item_dept, pick, strict=True)],
        dtype=np.int32,
    )
    cw = np.array(COLOUR_WEIGHTS)
    item_colour = rng.choice(len(COLOURS), size=n, p=cw / cw.sum()).astype(np.int32)
    item_pattern = rng.choice(len(PATTERNS), size=n, p=PATTERN_WEIGHTS).astype(np.int32)
    mat_pick = rng.random(n)
    item_material = [MATERIALS[DEPARTMENTS[d]][int(u * len(MATERIALS[DEPARTMENTS[d]]))]
                     for d, u in zip(item_dept, mat_pick, strict=True)]
    tiers = np.array(BRAND_TIERS)[tier]
    raw_price = base_price[item_leaf] * np.exp(tiers[item_brand] + rng.normal(0.0, 0.25, n))
    price = np.maximum(np.round(raw_price, 2), 0.5)
    rel_price = np.log(price / base_price[item_leaf]).astype(np.float32)
    item_cluster = rng.integers(0, cfg.n_clusters, n).astype(np.int32)
    quality = rng.normal(0.0, 1.0, n).astype(np.float32)
    adjective = rng.integers(0, len(ADJECTIVES), n)
    colour_in_title = rng.random(n) < cfg.title_colour_share
    has_desc = rng.random(n) >= cfg.no_description_share
    second_sentence = rng.integers(-2, len(SECOND_SENTENCES), n)  # < 0: one sentence only
    has_image = rng.random(n) >= cfg.no_image_share

    item_ids = _ids("i", n)
    titles: list[str] = []
    descriptions: list[str | None] = []
    images: list[str | None] = []
    for i in range(n):
        leaf_name, brand = names[item_leaf[i]], brands[item_brand[i]]
        adj, mat = ADJECTIVES[adjective[i]], item_material[i]
        colour = COLOURS[item_colour[i]][0].capitalize() + " " if colour_in_title[i] else ""
        titles.append(f"{brand} {adj} {colour}{mat.capitalize()} {leaf_name}")
        if has_desc[i]:
            article = "An" if adj[0] in "AEIOU" else "A"
            text = (f"{article} {adj.lower()} {leaf_name.lower()} made from {mat}, from the "
                    f"{paths[item_leaf[i]]} range.")
            if second_sentence[i] >= 0:
                text += " " + SECOND_SENTENCES[second_sentence[i]].format(brand=brand)
            descriptions.append(text)
        else:
            descriptions.append(None)
        images.append(f"images/{item_ids[i]}.png" if has_image[i] else None)

    # Attribute tokens of every item (what query_match looks for).
    vocab_set: dict[str, None] = {}
    item_toks: list[list[str]] = []
    for i in range(n):
        toks = [*tokenize(names[item_leaf[i]]), COLOURS[item_colour[i]][0], item_material[i],
                *tokenize(brands[item_brand[i]]), PATTERNS[item_pattern[i]]]
        item_toks.append(toks)
        vocab_set.update(dict.fromkeys(toks))
    vocab = sorted(vocab_set)
    tok_id = {t: j for j, t in enumerate(vocab)}
    item_tokens = np.zeros((n, len(vocab)), dtype=np.uint8)
    for i, toks in enumerate(item_toks):
        item_tokens[i, [tok_id[t] for t in toks]] = 1

    items = pd.DataFrame({
        "item_id": item_ids,
        "title": titles,
        "description": pd.Series(descriptions, dtype=object),
        "categories": [[paths[leaf]] for leaf in item_leaf],
        "brand": [brands[b] for b in item_brand],
        "price": price.astype(np.float64),
        "image": pd.Series(images, dtype=object),
        "department": [DEPARTMENTS[d] for d in item_dept],
        "colour": [COLOURS[c][0] for c in item_colour],
        "material": item_material,
        "pattern": [PATTERNS[p] for p in item_pattern],
    })
    transition = np.zeros((n_leaves, n_leaves), dtype=np.float32)
    index = {name: j for j, name in enumerate(names)}
    for a, b in COMPLEMENTS:
        transition[index[a], index[b]] = 1.0
        transition[index[b], index[a]] = max(transition[index[b], index[a]], 0.5)
    params = {
        "item_leaf": item_leaf,
        "item_brand": item_brand,
        "item_colour": item_colour,
        "item_pattern": item_pattern,
        "item_cluster": item_cluster,
        "item_city": brand_city[item_brand].astype(np.int32),
        "item_quality": quality,
        "item_rel_price": rel_price,
        "item_tokens": item_tokens,
        "leaf_transition": transition,
    }
    return _Catalog(items, params, brand_depts, brand_city, item_dept, vocab)


def _make_users(
    cfg: DemoConfig, rng: np.random.Generator, cat: _Catalog
) -> tuple[pd.DataFrame, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Users table, user params, home city and device habit of every user.

    Tastes are low-dimensional: ``n_personas`` segments fix the leaf taste, favourite brands,
    colour and pattern preferences, price band, typical age and collaborative cluster; a user is
    a persona plus small individual noise, with their own home city and device habit.
    """
    _, _, leaf_dept_l, _ = _leaves()
    leaf_dept = np.array(leaf_dept_l)
    n_leaves, n_dept, nu, n_p = len(leaf_dept), len(DEPARTMENTS), cfg.n_users, cfg.n_personas
    dept_brands = [[b for b in range(cfg.n_brands) if d in cat.brand_depts[b]] or [d % cfg.n_brands]
                   for d in range(n_dept)]

    def brand_of(dept: np.ndarray) -> np.ndarray:
        pick = rng.random(len(dept))
        return np.array([dept_brands[d][int(x * len(dept_brands[d]))]
                         for d, x in zip(dept, pick, strict=True)], dtype=np.int64)

    # Personas. Leaf taste: department ~ Dirichlet(department_alpha), leaf within department ~
    # Dirichlet(leaf_alpha * popularity): a few leaves of one or two departments dominate.
    share = rng.dirichlet(np.full(n_p, cfg.persona_size_alpha))
    p_dept = rng.dirichlet(np.full(n_dept, cfg.department_alpha), size=n_p)
    leaf_pop = np.bincount(cat.params["item_leaf"], minlength=n_leaves) + 1.0
    alpha = cfg.leaf_alpha * leaf_pop / leaf_pop.mean()
    g = rng.gamma(np.broadcast_to(alpha, (n_p, n_leaves)))
    within = np.empty_like(g)
    for d in range(n_dept):
        cols = leaf_dept == d
        within[:, cols] = g[:, cols] / np.maximum(g[:, cols].sum(axis=1, keepdims=True), 1e-300)
    p_taste = p_dept[:, leaf_dept] * within
    # 2-3 favourite brands, each a brand of a department drawn from the persona's taste.
    p_n_fav = rng.integers(2, 4, n_p)
    p_brand = np.zeros((n_p, cfg.n_brands), dtype=np.float32)
    for slot in range(3):
        fav = brand_of(_categorical(rng, p_dept))
        on = slot < p_n_fav
        p_brand[np.flatnonzero(on), fav[on]] = 1.0
    p_colour = rng.normal(0.0, 1.0, (n_p, len(COLOURS)))
    p_pattern = rng.normal(0.0, 1.0, (n_p, len(PATTERNS)))
    p_band = rng.normal(0.0, 0.35, n_p)
    p_age = rng.uniform(24.0, 64.0, n_p)
    p_cluster = rng.permutation(np.arange(n_p) % cfg.n_clusters)

    # Users: a persona plus small individual noise.
    persona = rng.choice(n_p, size=nu, p=share).astype(np.int32)
    taste = p_taste[persona] * np.exp(rng.normal(0.0, cfg.taste_noise, (nu, n_leaves)))
    taste /= taste.sum(axis=1, keepdims=True)
    taste = (1.0 - cfg.taste_floor) * taste + cfg.taste_floor / n_leaves
    log_taste = np.log(taste).astype(np.float32)
    # The persona's favourite brands, each kept with prob 0.85, plus an own one with prob 0.3.
    user_brand = p_brand[persona] * (rng.random((nu, cfg.n_brands)) < 0.85)
    own = rng.random(nu) < 0.3
    fav = brand_of(_categorical(rng, p_dept[persona]))
    user_brand[np.flatnonzero(own), fav[own]] = 1.0
    colour_pref = (p_colour[persona]
                   + rng.normal(0.0, cfg.pref_noise, (nu, len(COLOURS)))).astype(np.float32)
    pattern_pref = (p_pattern[persona]
                    + rng.normal(0.0, cfg.pref_noise, (nu, len(PATTERNS)))).astype(np.float32)
    age = np.clip(np.round(p_age[persona] + rng.normal(0.0, 8.0, nu)), 18, 75)
    band = (p_band[persona] + AGE_BAND_SLOPE * (age - AGE_BAND_CENTRE)
            + rng.normal(0.0, 0.1, nu)).astype(np.float32)
    city_w = np.array(CITY_WEIGHTS[: cfg.n_cities])
    home = rng.choice(cfg.n_cities, size=nu, p=city_w / city_w.sum()).astype(np.int32)
    in_persona_cluster = rng.random(nu) < cfg.persona_cluster_prob
    cluster = np.where(in_persona_cluster, p_cluster[persona],
                       rng.integers(0, cfg.n_clusters, nu)).astype(np.int32)
    habit = rng.dirichlet(np.array(DEVICE_HABIT_ALPHA), size=nu)
    users = pd.DataFrame({
        "user_id": _ids("u", nu),
        "age": age.astype(np.float64),
        "region": [CITIES[c] for c in home],
    })
    params = {
        "user_log_taste": log_taste,
        "user_brand": user_brand.astype(np.float32),
        "user_colour": colour_pref,
        "user_pattern": pattern_pref,
        "user_price_band": band,
        "user_cluster": cluster,
        "user_persona": persona,
    }
    return users, params, home, habit


def _compose_query(
    rng: np.random.Generator, item: int, items: pd.DataFrame, leaf_names: list[str]
) -> str:
    """2-4 words describing an item: the leaf noun plus 1-3 of brand/colour/pattern/material."""
    row = items.iloc[item]
    extras = {"brand": row["brand"].lower(), "colour": row["colour"],
              "material": row["material"]}
    if row["pattern"] != "solid":
        extras["pattern"] = row["pattern"]
    keys = list(extras)
    chosen = set(rng.permutation(keys)[: int(rng.integers(1, 4))].tolist())
    order = ("brand", "colour", "pattern", "material")
    words = [extras[k] for k in order if k in chosen]
    return " ".join([*words, leaf_names[item].lower()])


def _simulate(
    cfg: DemoConfig,
    rng: np.random.Generator,
    oracle: DemoOracle,
    items: pd.DataFrame,
    home: np.ndarray,
    habit: np.ndarray,
) -> pd.DataFrame:
    nu, ni, L = cfg.n_users, cfg.n_items, cfg.list_length
    _, leaf_names_l, _, _ = _leaves()
    leaf_of_item = oracle.params["item_leaf"]
    item_leaf_name = [leaf_names_l[j] for j in leaf_of_item]

    # Sessions, sorted by user then time, at least SESSION_GAP_S apart.
    n_sess = 3 + rng.poisson(max(cfg.sessions_per_user - 3.0, 0.0), nu)
    s_user = np.repeat(np.arange(nu), n_sess)
    n_s = len(s_user)
    hp = np.array(HOUR_PROFILE)
    t = (rng.integers(0, cfg.n_days, n_s) * 86400
         + rng.choice(24, size=n_s, p=hp / hp.sum()) * 3600 + rng.integers(0, 3600, n_s))
    t = t[np.lexsort((t, s_user))]
    rank = np.arange(n_s) - np.repeat(np.cumsum(n_sess) - n_sess, n_sess)
    t = pd.Series(t - SESSION_GAP_S * rank).groupby(s_user).cummax().to_numpy()
    t = t + SESSION_GAP_S * rank
    device = _categorical(rng, habit[s_user])
    away = rng.random(n_s) >= cfg.home_city_prob
    city = np.where(away, (home[s_user] + rng.integers(1, cfg.n_cities, n_s)) % cfg.n_cities,
                    home[s_user]).astype(np.int32)
    search = rng.random(n_s) < cfg.search_share
    n_clicks = cfg.min_clicks + rng.binomial(cfg.max_clicks - cfg.min_clicks,
                                             cfg.extra_click_prob, n_s)
    night_device = np.isin(np.arange(len(DEVICES)), [DEVICES.index(d) for d in NIGHT_DEVICES])

    def is_night(ts: np.ndarray, sessions: np.ndarray) -> np.ndarray:
        """The oracle's night flag for events at ``ts`` (UTC) in the given sessions."""
        return np.isin((ts // 3600) % 24, NIGHT_HOURS) & night_device[device[sessions]]

    queries: list[str | None] = [None] * n_s
    clicked = np.zeros((nu, ni), dtype=bool)
    prev = np.full(nu, -1, dtype=np.int64)
    log_exam = (-cfg.exam_power * np.log(np.arange(L) + 1.0))[None, :]
    tau = cfg.click_temperature
    ev: dict[str, list[np.ndarray]] = {k: [] for k in ("sess", "item", "ts", "code", "pos")}

    def emit(sess: np.ndarray, item: np.ndarray, ts: np.ndarray, code: int, pos: np.ndarray) -> None:
        ev["sess"].append(sess)
        ev["item"].append(item)
        ev["ts"].append(ts)
        ev["code"].append(np.full(len(sess), code, dtype=np.int8))
        ev["pos"].append(pos)

    def funnel(sess: np.ndarray, item: np.ndarray, pos: np.ndarray, s_click: np.ndarray,
               t_click: np.ndarray) -> None:
        """Click, then cart with prob sigmoid(s - a), then purchase with prob b."""
        t_cart = t_click + 10 + rng.integers(0, 20, len(sess))
        t_buy = t_cart + 20 + rng.integers(0, 30, len(sess))
        p_cart = 1.0 / (1.0 + np.exp(-(s_click.astype(np.float64) - cfg.cart_offset)))
        cart = rng.random(len(sess)) < p_cart
        buy = cart & (rng.random(len(sess)) < cfg.purchase_prob)
        emit(sess, item, t_click, 1, pos)
        emit(sess[cart], item[cart], t_cart[cart], 2, pos[cart])
        emit(sess[buy], item[buy], t_buy[buy], 3, pos[buy])

    chunk = 1024
    for k in range(int(n_sess.max())):
        in_round = np.flatnonzero(rank == k)
        for lo in range(0, len(in_round), chunk):
            c = in_round[lo: lo + chunk]
            u, b = s_user[c], len(c)
            seen = clicked[u]
            base = oracle.base_scores(u, is_night(t[c], c), city[c], prev[u])  # at the start
            # Search sessions: an intent item by Gumbel-max over s(q=None), then its query.
            srch = np.flatnonzero(search[c])
            z = base[srch] + rng.gumbel(size=(len(srch), ni)).astype(np.float32)
            z[seen[srch]] = -np.inf
            for r, item in zip(srch, z.argmax(axis=1), strict=True):
                queries[c[r]] = _compose_query(rng, int(item), items, item_leaf_name)
            qtok, qlen = oracle.encode_queries([queries[j] for j in c])
            s = oracle.add_query(base, qtok, qlen)
            # The shop's ranker: top-L of s + noise among items not clicked before.
            noisy = s + np.float32(cfg.ranker_noise) * rng.gumbel(size=s.shape).astype(np.float32)
            noisy[seen] = -np.inf
            top = np.argpartition(-noisy, L - 1, axis=1)[:, :L]
            shown = np.take_along_axis(
                top, np.argsort(-np.take_along_axis(noisy, top, 1), axis=1, kind="stable"), 1)
            emit(np.repeat(c, L), shown.ravel(), np.repeat(t[c], L), 0, np.tile(np.arange(L), b))
            # Clicks j = 0, 1, ... among the shown, not yet clicked items, with position bias.
            # Click j happens in slot j; its score uses the context at its own time (which may
            # have crossed into the night) and the session's previous item (the one the list was
            # ranked with), so that exposure and choice follow the same preference.
            blocked = np.take_along_axis(seen, shown, 1)
            last = prev[u]  # the previous item of every click of the session
            for j in range(int(n_clicks[c].max())):
                act = np.flatnonzero(n_clicks[c] > j)
                act = act[~blocked[act].all(axis=1)]
                ca = c[act]
                tj = t[ca] + j * ITEM_SLOT_S + 5 + rng.integers(0, 20, len(act))
                sj = oracle.add_query(
                    oracle.base_scores(u[act], is_night(tj, ca), city[ca], prev[u[act]],
                                       items=shown[act]),
                    qtok[act], qlen[act], items=shown[act])
                logit = sj / tau + log_exam + rng.gumbel(size=(len(act), L))
                logit[blocked[act]] = -np.inf
                pick = logit.argmax(axis=1)
                item = shown[act, pick]
                funnel(ca, item, pick, sj[np.arange(len(act)), pick], tj)
                blocked[act, pick] = True
                clicked[u[act], item] = True
                last[act] = item
            prev[u] = last

    sess = np.concatenate(ev["sess"])
    item = np.concatenate(ev["item"]).astype(np.int64)
    ts = np.concatenate(ev["ts"]).astype(np.int64)
    code = np.concatenate(ev["code"])
    pos = np.concatenate(ev["pos"]).astype(np.int64)
    order = np.lexsort((pos, code, sess, ts))
    sess, item, ts, code, pos = sess[order], item[order], ts[order], code[order], pos[order]
    user_ids = np.array(_ids("u", nu), dtype=object)
    item_ids = items["item_id"].to_numpy(dtype=object)
    session_ids = np.array(_ids("s", n_s), dtype=object)
    event_names = np.array(["view", "click", "cart", "purchase"], dtype=object)
    stamps = pd.DatetimeIndex(EPOCH + ts.astype("timedelta64[s]")).tz_localize("UTC")
    return pd.DataFrame({
        "user_id": user_ids[s_user[sess]],
        "item_id": item_ids[item],
        "timestamp": stamps,
        "event": event_names[code],
        "weight": np.ones(len(sess), dtype=np.float64),
        "query": pd.Series(np.array(queries, dtype=object)[sess], dtype=object),
        "device": np.array(DEVICES, dtype=object)[device[sess]],
        "location": np.array(CITIES, dtype=object)[city[sess]],
        "session_id": session_ids[sess],
        "position": pos,
    })


# -- images ------------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "rectangle":  # tall, like a device
        w = 0.62 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (math.pi / 6 + j * math.pi / 3 for j in range(6))]
    raise ValueError(shape)


def _pattern_mask(pattern: str, size: int, phase: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + phase
    period = max(4, size // 8)
    if pattern == "striped":
        return ((x + y) // max(2, period // 2)) % 2 == 0
    if pattern == "dotted":
        period = max(5, size // 6)
        h = period / 2.0
        return ((x % period) - h + 0.5) ** 2 + ((y % period) - h + 0.5) ** 2 <= (period * 0.3) ** 2
    if pattern == "checked":
        return ((x // period) + (y // period)) % 2 == 0
    return np.zeros((size, size), dtype=bool)


def _render_images(cfg: DemoConfig, rng: np.random.Generator, items: pd.DataFrame) -> dict[
        str, bytes]:
    size = cfg.image_size
    n = len(items)
    jitter = rng.uniform(-0.06, 0.06, (n, 2)) * size
    radius = rng.uniform(0.32, 0.40, n) * size
    phase = rng.integers(0, max(4, size // 8), n)
    colours = dict(COLOURS)
    files: dict[str, bytes] = {}
    for i, (rel, dept, colour, pattern) in enumerate(
        zip(items["image"], items["department"], items["colour"], items["pattern"], strict=True)
    ):
        if rel is None:
            continue
        fill = np.array(colours[colour], dtype=np.float64)
        lum = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
        ink = fill * 0.5 if lum > 140 else fill + (255.0 - fill) * 0.6
        cx, cy = size / 2 + jitter[i, 0], size / 2 + jitter[i, 1]
        mask_img = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask_img)
        shape = SHAPES[dept]
        r = float(radius[i])
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon(_shape_polygon(shape, cx, cy, r), fill=255)
        mask = np.asarray(mask_img) > 0
        arr = np.full((size, size, 3), 232, dtype=np.uint8)
        arr[mask] = fill.astype(np.uint8)
        arr[mask & _pattern_mask(pattern, size, int(phase[i]))] = ink.astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        outline = ImageDraw.Draw(img)
        if shape == "circle":
            outline.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(90, 90, 90))
        else:
            outline.polygon(_shape_polygon(shape, cx, cy, r), outline=(90, 90, 90))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        files[rel] = buf.getvalue()
    return files


def _triples(cfg: DemoConfig, cat: _Catalog) -> pd.DataFrame:
    paths, names, _, _ = _leaves()
    index = {name: j for j, name in enumerate(names)}
    rows: list[tuple[str, str, str]] = []
    rows += [(i, "made_of", m) for i, m in zip(cat.items["item_id"], cat.items["material"],
                                                strict=True)]
    for b in range(cfg.n_brands):
        rows += [(BRANDS[b], "belongs_to", DEPARTMENTS[d]) for d in cat.brand_depts[b]]
        if cat.brand_city[b] >= 0:
            rows.append((BRANDS[b], "popular_in", CITIES[cat.brand_city[b]]))
    rows += [(paths[index[a]], "complements", paths[index[b]]) for a, b in COMPLEMENTS]
    return pd.DataFrame(rows, columns=["head", "relation", "tail"])


def _readme(cfg: DemoConfig, interactions: pd.DataFrame) -> str:
    doc = __doc__ or ""
    counts = interactions["event"].value_counts()
    per_event = ", ".join(f"{int(counts.get(e, 0))} {e}" for e in ("view", *POSITIVE_EVENTS))
    clicks = interactions.loc[interactions["event"] == "click", "user_id"]
    per_user = clicks.value_counts()
    return (
        "# kgrank demo shop\n\n"
        f"Synthetic data from `kgrank.data.demo.generate_demo` with `{cfg!r}`: {cfg.n_users} "
        f"users ({cfg.n_personas} personas), {cfg.n_items} items, {len(interactions)} events "
        f"({per_event}); {per_user.mean():.1f} distinct clicked items per user on average "
        f"(at least {per_user.min()}).\n\n"
        "Tables: `items.parquet` (title, description, categories, brand, price, image, department, "
        "colour, material, pattern), `users.parquet` (age, region = home city), "
        "`interactions.parquet` (view / click / cart / purchase with query, device, location, "
        "session_id, position), `triples.parquet` (made_of, belongs_to, popular_in, "
        "complements); product images under `images/`.\n\n"
        "The ground-truth preference function is stored in `oracle/` and loaded with "
        "`kgrank.data.demo.DemoOracle.load(<this directory>)`; `oracle_requests()` builds its "
        "requests from the interactions.\n\n"
        "## Generative model\n\n" + doc
    )


def generate_demo(
    dst: str | Path, config: DemoConfig = DemoConfig(), overwrite: bool = False  # noqa: B008
) -> Dataset:
    """Generate the demo shop at ``dst`` (deterministic in ``config``) and return it loaded."""
    config.validate()
    streams = [np.random.Generator(np.random.PCG64(s))
               for s in np.random.SeedSequence(config.seed).spawn(4)]
    cat = _make_catalog(config, streams[0])
    users, user_params, home, habit = _make_users(config, streams[1], cat)
    paths, _, _, _ = _leaves()
    meta: dict[str, Any] = {
        "format": ORACLE_FORMAT,
        "version": ORACLE_VERSION,
        "weights": config.weights(),
        "terms": list(TERMS),
        "vocab": cat.vocab,
        "cities": list(CITIES[: config.n_cities]),
        "devices": list(DEVICES),
        "night_devices": list(NIGHT_DEVICES),
        "night_hours": list(NIGHT_HOURS),
        "night_price_shift": config.night_price_shift,
        "price_sigma": config.price_sigma,
        "price_fit_cap": PRICE_FIT_CAP,
        "leaves": paths,
        "brands": list(BRANDS[: config.n_brands]),
        "colours": [c for c, _ in COLOURS],
        "patterns": list(PATTERNS),
        "n_users": config.n_users,
        "n_items": config.n_items,
        "generator": asdict(config),
        "score": "s = sum_t weights[t] * term_t; see kgrank.data.demo",
    }
    oracle = DemoOracle({**cat.params, **user_params}, meta)
    interactions = _simulate(config, streams[2], oracle, cat.items, home, habit)
    files = {**_render_images(config, streams[3], cat.items), **oracle.to_files()}
    return write_dataset(
        dst,
        cat.items,
        interactions,
        users=users,
        triples=_triples(config, cat),
        files=files,
        overwrite=overwrite,
        readme=_readme(config, interactions),
    )


def _percentile_ranks(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Share of items scored above the target (ties count half), per row."""
    t = scores[np.arange(len(target)), target][:, None]
    above = (scores > t).sum(axis=1)
    ties = (scores == t).sum(axis=1) - 1
    return (above + 0.5 * ties) / scores.shape[1]


def click_percentiles(
    dataset: Dataset, oracle: DemoOracle, without: Iterable[str] = (), chunk: int = 2048
) -> np.ndarray:
    """Percentile rank (0 = top) of each clicked item under the oracle score."""
    req = oracle_requests(dataset.interactions)
    target = dataset.interactions.loc[dataset.interactions["event"] == "click",
                                      "item_idx"].to_numpy()
    out = np.empty(len(req))
    for lo in range(0, len(req), chunk):
        sl = slice(lo, lo + chunk)
        out[sl] = _percentile_ranks(oracle.score(req.iloc[sl], without=tuple(without)), target[sl])
    return out
