"""A builtin task for a real chat model (``builtin:smollm2``): answer in a new format.

``builtin_task("capitals")`` asks for the capital of a country in six phrasings and answers in one
line of JSON, a format SmolLM2-135M-Instruct never uses on its own::

    "Which city is the capital of France?"  ->  '{"capital": "Paris"}'

The base model answers in a sentence ("The capital of France is Paris."), so it follows the format
on 0% of prompts; a LoRA of a few dozen steps teaches the format to held-out countries (measured on
``builtin:smollm2``, r=8 on all linear layers, 30 steps of 8 rows at lr 1e-3: 15/15 held-out prompts
in the format).  The *knowledge* comes from the base model and stays as good or as bad as it was
(135 M parameters know Paris and Rome but not every capital), so :func:`follows_format` measures
what LoRA taught, and exact match measures format and knowledge together.

Split: a country belongs to ``"test"`` when ``crc32(country) % 5 == 0`` (15 of the 81), so held-out
prompts name countries that training never mentions, in any phrasing.
"""

from __future__ import annotations

import json
import random
import zlib

__all__ = ["CHAT_TASKS", "CAPITALS", "TEMPLATES", "capitals_examples", "follows_format"]

# Capitals as the countries themselves name them (Kyiv, not Kiev; Brasilia without the accent).
CAPITALS = {
 "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
 "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
 "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czech Republic": "Prague",
 "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo",
 "Denmark": "Copenhagen", "Finland": "Helsinki", "Iceland": "Reykjavik", "Russia": "Moscow",
 "Ukraine": "Kyiv", "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja",
 "South Africa": "Pretoria", "Morocco": "Rabat", "Ethiopia": "Addis Ababa", "Ghana": "Accra",
 "China": "Beijing", "Japan": "Tokyo", "South Korea": "Seoul", "India": "New Delhi",
 "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Thailand": "Bangkok", "Vietnam": "Hanoi",
 "Indonesia": "Jakarta", "Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Iran": "Tehran",
 "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Australia": "Canberra",
 "New Zealand": "Wellington", "Canada": "Ottawa", "United States": "Washington, D.C.",
 "Mexico": "Mexico City", "Cuba": "Havana", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
 "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogota", "Venezuela": "Caracas",
 "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
 "Afghanistan": "Kabul", "Nepal": "Kathmandu", "Singapore": "Singapore", "Qatar": "Doha",
 "Jordan": "Amman", "Lebanon": "Beirut", "Syria": "Damascus", "Algeria": "Algiers",
 "Tunisia": "Tunis", "Senegal": "Dakar", "Uganda": "Kampala", "Tanzania": "Dodoma",
 "Mongolia": "Ulaanbaatar", "Sri Lanka": "Colombo", "Estonia": "Tallinn", "Latvia": "Riga",
 "Lithuania": "Vilnius", "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "Jamaica": "Kingston",
}
TEMPLATES = ("What is the capital of {c}?", "Which city is the capital of {c}?",
             "Name the capital city of {c}.", "Tell me the capital of {c}.",
             "What city serves as the capital of {c}?", "{c}: what is its capital?")
CHAT_TASKS = ("capitals",)


def country_split(country: str) -> str:
    """``"test"`` for held-out countries (``crc32 % 5 == 0``), else ``"train"``."""
    return "test" if zlib.crc32(country.encode()) % 5 == 0 else "train"


def reply(country: str) -> str:
    """The answer in the taught format: ``{"capital": "<city>"}``."""
    return json.dumps({"capital": CAPITALS[country]})


def capitals_examples(n: int, seed: int = 0, split: str = "train") -> list[tuple[str, str]]:
    """``n`` (prompt, response) pairs from ``split``.  Every (country, phrasing) pair appears once,
    shuffled by ``seed``, before any repeats; the test split cycles through its 15 countries with
    one phrasing each first, so ``n=15`` covers every held-out country once."""
    countries = [c for c in CAPITALS if country_split(c) == split]
    rng = random.Random(f"capitals/{split}/{seed}")
    if split == "test":
        pairs = [(TEMPLATES[(i + k) % len(TEMPLATES)].format(c=c), reply(c))
                 for k in range(len(TEMPLATES)) for i, c in enumerate(countries)]
    else:
        pairs = [(t.format(c=c), reply(c)) for c in countries for t in TEMPLATES]
        rng.shuffle(pairs)
    return [pairs[i % len(pairs)] for i in range(n)]


def follows_format(text: str) -> bool:
    """True when ``text`` is one JSON object with a string ``"capital"`` (right or wrong city)."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("capital"), str)
