"""The dialogue domain of the generated corpus (see ``workbench.data.corpus``)."""

from __future__ import annotations

import random

_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# (big unit, small unit, how many small units in one big unit)
_UNITS = (
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("liters", "milliliters", 1000),
)
# fmt: off
_DIALOGUE_WORDS = (
    "garden", "window", "planet", "bicycle", "orange", "pencil", "thunder",
    "castle", "blanket", "river", "mountain", "teacup", "harbor", "lantern",
)
# fmt: on
_GREETINGS = ("Hi!", "Hello.", "Hey there.", "Good morning!", "Hi, quick question.")
_REPLIES_TO_GREETING = ("Hello! How can I help?", "Hi! What would you like to know?", "Sure, go ahead.")
_THANKS = ("Thanks!", "Great, thank you.", "Perfect, thanks.", "That helps, thanks!")
_WELCOMES = ("You're welcome!", "Happy to help.", "Any time!", "Glad I could help.")


def _dialogue_exchange(rng: random.Random) -> tuple[str, str]:
    """One question with a checkable answer, and that answer."""
    kind = rng.choice(("weekday", "units", "letters", "sort", "clock", "compare"))
    if kind == "weekday":
        start, k = rng.randrange(7), rng.randint(1, 20)
        day, later = _WEEKDAYS[start], _WEEKDAYS[(start + k) % 7]
        return f"What day is it {k} days after {day}?", f"{k} days after {day} it is {later}."
    if kind == "units":
        big, small, factor = rng.choice(_UNITS)
        n = rng.randint(2, 12)
        if rng.random() < 0.5:
            return f"How many {small} are in {n} {big}?", f"{n} {big} is {n * factor} {small}."
        return f"How many {big} is {n * factor} {small}?", f"{n * factor} {small} is {n} {big}."
    if kind == "letters":
        word = rng.choice(_DIALOGUE_WORDS)
        if rng.random() < 0.5:
            return (
                f"How many letters are in the word '{word}'?",
                f"The word '{word}' has {len(word)} letters.",
            )
        return f"Can you spell '{word}' backwards?", f"Backwards, '{word}' is '{word[::-1]}'."
    if kind == "sort":
        xs = rng.sample(range(1, 100), rng.randint(3, 6))
        listed = ", ".join(map(str, xs))
        return (
            f"Can you sort these numbers: {listed}?",
            f"In order they are {', '.join(map(str, sorted(xs)))}.",
        )
    if kind == "clock":
        hour, minute, duration = rng.randint(6, 20), rng.choice(range(0, 60, 5)), rng.randint(10, 180)
        end = hour * 60 + minute + duration
        return (
            f"If I leave at {hour:02d}:{minute:02d} and the trip takes {duration} minutes, when do I arrive?",
            f"You arrive at {end // 60 % 24:02d}:{end % 60:02d}.",
        )
    a, b = rng.sample(range(10, 1000), 2)
    return f"Which is bigger, {a} or {b}?", f"{max(a, b)} is bigger than {min(a, b)}."


def dialogue_document(rng: random.Random) -> str:
    """A short chat: a greeting, two or three questions with their answers, and thanks."""
    lines = [f"User: {rng.choice(_GREETINGS)}", f"Assistant: {rng.choice(_REPLIES_TO_GREETING)}"]
    for _ in range(rng.randint(2, 3)):
        question, answer = _dialogue_exchange(rng)
        lines += [f"User: {question}", f"Assistant: {answer}"]
    lines += [f"User: {rng.choice(_THANKS)}", f"Assistant: {rng.choice(_WELCOMES)}"]
    return "\n".join(lines)
