"""The story domain of the generated corpus (see ``workbench.data.corpus``)."""

from __future__ import annotations

import random

# fmt: off
_CHARACTERS = (
    ("Mira", "she"), ("Tomas", "he"), ("Ines", "she"), ("Ravi", "he"), ("Ada", "she"), ("Kofi", "he"),
    ("Lena", "she"), ("Omar", "he"), ("Yuki", "she"), ("Pablo", "he"), ("Sofia", "she"), ("Elias", "he"),
    ("Nadia", "she"), ("Felix", "he"), ("Hana", "she"), ("Bruno", "he"),
)
# fmt: on
_TRADES = (
    ("baker", "baked bread before dawn"),
    ("fisher", "mended nets by the water"),
    ("painter", "painted the houses in bright colours"),
    ("carpenter", "built chairs and tables"),
    ("teacher", "taught the children to read"),
    ("shepherd", "watched the sheep on the hill"),
    ("clockmaker", "repaired every clock in the square"),
    ("gardener", "grew roses along the wall"),
    ("sailor", "sailed the little boat along the coast"),
    ("librarian", "kept the old library in order"),
    ("potter", "shaped bowls from red clay"),
    ("weaver", "wove warm blankets for winter"),
)
_PLACE_KINDS = ("village", "harbour town", "mountain town", "river city", "market town", "valley")
# fmt: off
_TOWN_NAMES = (
    "Elmsworth", "Stonebridge", "Marrow Bay", "Ashford", "Willowmere",
    "Kestrel Point", "Dunmore", "Larkhill", "Fernwick", "Greyhaven",
)
# fmt: on
_OBJECTS = ("lantern", "map", "key", "letter", "compass", "bell", "rope", "ladder", "kite", "wheelbarrow")
_TIMES = ("One cold morning", "One windy evening", "Late one night", "On the first day of spring", "One day")
_PROBLEMS = (
    ("a storm broke the old bridge", "the bridge stood again"),
    ("the well ran dry", "clear water filled the well again"),
    ("a goat ran off into the forest", "the goat was safe in its pen"),
    ("the lighthouse lamp went dark", "the lighthouse shone over the sea again"),
    ("the festival tent blew away", "the festival began under a new tent"),
    ("the river flooded the lower road", "the road was dry and open"),
    ("a lost child wandered into the square", "the child was home with the family"),
    ("the mill wheel stopped turning", "the mill wheel turned once more"),
)
_ENDINGS = (
    "From then on, {name} kept a {obj} by the door, just in case.",
    "That night the whole {kind} sang, and {name} slept better than ever.",
    "{Pronoun} learned that no problem is too big when friends work together.",
    "Years later, people in {place} still told the story of that {time_noun}.",
    "{Friend} smiled, and the two of them shared supper by the fire.",
)


def story_document(rng: random.Random) -> str:
    """A short story: who and where, a problem, a friend's help, a resolution and an ending."""
    (name, pronoun), (friend, _) = rng.sample(_CHARACTERS, 2)
    trade, habit = rng.choice(_TRADES)
    friend_trade, _ = rng.choice([t for t in _TRADES if t[0] != trade])
    kind, place = rng.choice(_PLACE_KINDS), rng.choice(_TOWN_NAMES)
    obj = rng.choice(_OBJECTS)
    time = rng.choice(_TIMES)
    problem, solved = rng.choice(_PROBLEMS)
    possessive = "her" if pronoun == "she" else "his"
    opening = rng.choice(
        (
            f"Once upon a time, in the {kind} of {place}, there lived a {trade} named {name}.",
            f"In the {kind} of {place} there was a {trade} called {name}.",
            f"Long ago, {name} the {trade} lived at the edge of {place}, a quiet {kind}.",
        )
    )
    habit_line = rng.choice(
        (
            f"Every day {pronoun} {habit}.",
            f"{pronoun.capitalize()} {habit}, and everyone knew {possessive} name.",
            f"Each morning {pronoun} {habit} and hummed an old song.",
        )
    )
    trouble = rng.choice(
        (
            f"{time}, {problem}, and nobody knew what to do.",
            f"{time}, {problem}. The people of {place} were worried.",
            f"{time}, {name} saw that {problem}.",
        )
    )
    help_line = rng.choice(
        (
            f"{name} went to {possessive} friend {friend}, a {friend_trade}, and asked for help.",
            f"{friend} the {friend_trade} heard the news and came running.",
            f"{name} took {possessive} {obj} and knocked on the door of {friend}, the {friend_trade}.",
        )
    )
    work = rng.choice(
        (
            "Together they worked until sunrise.",
            "They made a plan, and then they worked without rest.",
            f"With the {obj} and a lot of patience, they found a way.",
            "It was hard work, but neither of them gave up.",
        )
    )
    resolution = rng.choice((f"By the next day, {solved}.", f"Soon {solved}, and everyone cheered."))
    ending = rng.choice(_ENDINGS).format(
        name=name,
        obj=obj,
        kind=kind,
        place=place,
        Pronoun=pronoun.capitalize(),
        Friend=friend,
        time_noun=time.split()[-1].lower(),
    )
    first = " ".join((opening, habit_line, trouble))
    second = " ".join((help_line, work, resolution, ending))
    return f"{first}\n\n{second}"
