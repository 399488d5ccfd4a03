"""Counted nouns for people: `1 instance`, `3 instances`, `2 processes` — one rule for every message, so none
says "1 instances" or hedges with "instance(s)"."""

from __future__ import annotations


def inflected(noun: str, count: int) -> str:
    """`noun` as `count` wants it: singular for exactly one, else plural (`process` → `processes`, `entry` →
    `entries`). A phrase is inflected on its last word (`consecutive failure` → `consecutive failures`)."""
    if count == 1:
        return noun
    if noun.endswith(("s", "x", "sh", "ch")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u"):
        return noun[:-1] + "ies"
    return noun + "s"


def counted(count: int, noun: str) -> str:
    """`1 instance`, `0 instances`, `3 consecutive failures`."""
    return f"{count} {inflected(noun, count)}"
