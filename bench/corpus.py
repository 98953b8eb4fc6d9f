"""The benchmark corpus: ~500 varied English sentences shaped like STS-B (captions, headlines, forum
lines), 5 to 40 words, generated deterministically from templates so nothing is downloaded.

    python bench/corpus.py > bench/corpus.txt     # regenerate the committed file (same output every time)
"""

from __future__ import annotations

import random
import sys

PEOPLE = [
    "A man",
    "A woman",
    "A young boy",
    "A little girl",
    "Two men",
    "Three women",
    "An old man",
    "A teenager",
    "A group of children",
    "The chef",
    "A police officer",
    "A firefighter",
    "A musician",
    "Two dogs",
    "A cat",
    "A soccer player",
    "The driver",
    "A nurse",
    "A student",
    "Several tourists",
    "A farmer",
    "The teacher",
    "A climber",
    "A baby",
    "A couple",
]
PLURAL = {"Two", "Three", "Several"}
ACTIONS = [
    "playing a guitar",
    "slicing an onion",
    "riding a bicycle",
    "reading a newspaper",
    "cutting a tomato",
    "playing the piano",
    "running along the beach",
    "swimming in a pool",
    "cooking pasta in a large pot",
    "talking on the phone",
    "dancing on a stage",
    "climbing a steep rock wall",
    "throwing a ball to a dog",
    "painting a fence",
    "peeling potatoes",
    "jumping over a puddle",
    "walking through a crowded market",
    "feeding the ducks",
    "driving a red truck",
    "typing on a laptop",
    "singing into a microphone",
    "chasing a ball across the grass",
    "sleeping on a couch",
    "washing a car",
    "sitting on a bench",
    "loading boxes into a van",
    "fixing a flat tire",
    "pouring milk into a bowl",
]
PLACES = [
    "in the park",
    "on a busy street",
    "in a small kitchen",
    "near the river",
    "at the train station",
    "in front of a crowd",
    "on the snowy mountain",
    "inside a shopping mall",
    "by the lake",
    "in the rain",
    "at night",
    "on a sunny afternoon",
    "in an empty classroom",
    "behind the old church",
    "on the beach",
]
ORGS = [
    "The government",
    "The central bank",
    "The city council",
    "Officials",
    "The company",
    "Researchers",
    "The United Nations",
    "Local police",
    "The health ministry",
    "Investors",
    "The union",
    "The court",
    "Scientists",
    "The airline",
    "Lawmakers",
]
NEWS_VERBS = [
    "announced new measures to",
    "said on Tuesday it would",
    "plans to",
    "voted to",
    "has agreed to",
    "warned that it may",
    "confirmed it will",
    "refused to",
    "is expected to",
    "declined to say whether it would",
]
NEWS_GOALS = [
    "raise interest rates by a quarter point",
    "cut thousands of jobs next year",
    "investigate the cause of the fire",
    "reduce carbon emissions by 2030",
    "build a new bridge across the river",
    "release the report next month",
    "lower the price of public transport",
    "hire more teachers",
    "close two factories in the north",
    "expand access to clean drinking water",
    "delay the election",
    "increase funding for cancer research",
    "ban plastic bags in supermarkets",
    "reopen the border crossing",
]
NEWS_TAILS = [
    "",
    "",
    "after weeks of protests",
    "despite strong opposition from business groups",
    "according to a statement released late on Friday",
    "amid growing concern about inflation",
    "following a sharp drop in sales",
    "in response to the flooding that hit the region last month",
    "a spokesman told reporters",
    "as part of a broader reform package",
]
COUNTRIES = [
    "Syria",
    "Brazil",
    "Japan",
    "Kenya",
    "France",
    "India",
    "Mexico",
    "Canada",
    "Egypt",
    "Germany",
    "Chile",
    "Nigeria",
    "Vietnam",
    "Poland",
    "Australia",
]
EVENTS = [
    "Earthquake strikes",
    "Floods hit",
    "Protests spread across",
    "Election results delayed in",
    "Wildfires force evacuations in",
    "Stocks fall sharply in",
    "Heavy snow disrupts travel in",
    "Talks resume between rebels and government in",
    "New president sworn in in",
    "Train derails in",
]
FORUM_OPENERS = [
    "I think",
    "In my experience,",
    "Honestly,",
    "As far as I know,",
    "To be fair,",
    "I'm pretty sure",
    "If you ask me,",
    "From what I have read,",
]
FORUM_CLAIMS = [
    "the best way to learn a language is to speak it every day",
    "you should let the dough rest for at least an hour before baking",
    "most people underestimate how much sleep they actually need",
    "the battery drains faster when the screen brightness is high",
    "it is cheaper to cook at home than to eat out every night",
    "the film was much better than the book",
    "a good pair of shoes makes a big difference on long hikes",
    "you can't really judge a city until you have lived there for a year",
    "the update fixed the crash but made the app noticeably slower",
    "running in the morning helps me focus for the rest of the day",
    "the tax changes will hit small businesses the hardest",
    "there is no single answer because it depends on your budget",
]
FORUM_TAILS = [
    "",
    "",
    "but others may disagree.",
    "and it worked for me.",
    "at least that has been my experience.",
    "so I would try that first.",
    "although the evidence is mixed.",
    "which surprised me at first.",
]
ANIMALS = ["A dog", "A black cat", "A horse", "A brown bear", "A small bird", "A monkey", "A goat"]
ANIMAL_ACTIONS = [
    "is running through the snow",
    "is eating from a bowl",
    "jumps over a fence",
    "is playing with a toy",
    "is drinking water from a stream",
    "is lying in the sun",
    "is sniffing the ground",
    "is carrying a stick",
]
WHY = [
    "because it was getting late",
    "while the others watched",
    "before the storm arrived",
    "after finishing lunch",
    "so that everyone could see",
    "even though nobody asked",
]


def _caption(rng: random.Random) -> str:
    who = rng.choice(PEOPLE)
    verb = "are" if who.split()[0] in PLURAL else "is"
    s = f"{who} {verb} {rng.choice(ACTIONS)}"
    if rng.random() < 0.6:
        s += f" {rng.choice(PLACES)}"
    if rng.random() < 0.25:
        s += f" {rng.choice(WHY)}"
    return s + "."


def _animal(rng: random.Random) -> str:
    s = f"{rng.choice(ANIMALS)} {rng.choice(ANIMAL_ACTIONS)}"
    if rng.random() < 0.5:
        s += f" {rng.choice(PLACES)}"
    return s + "."


def _headline(rng: random.Random) -> str:
    if rng.random() < 0.4:
        s = f"{rng.choice(EVENTS)} {rng.choice(COUNTRIES)}"
        if rng.random() < 0.5:
            s += f", {rng.randint(2, 90)} {rng.choice(['dead', 'injured', 'missing', 'arrested'])}"
        return s
    s = f"{rng.choice(ORGS)} in {rng.choice(COUNTRIES)} {rng.choice(NEWS_VERBS)} {rng.choice(NEWS_GOALS)}"
    tail = rng.choice(NEWS_TAILS)
    return s + (f", {tail}." if tail else ".")


def _forum(rng: random.Random) -> str:
    s = f"{rng.choice(FORUM_OPENERS)} {rng.choice(FORUM_CLAIMS)}"
    tail = rng.choice(FORUM_TAILS)
    s = s + (f", {tail}" if tail else ".")
    if rng.random() < 0.2:  # a second sentence: the long end of STS-B
        s += f" {rng.choice(FORUM_OPENERS)} {rng.choice(FORUM_CLAIMS)}."
    return s


def sentences(n: int = 500, seed: int = 7) -> list[str]:
    """`n` distinct sentences of 5 to 40 words, the same for a given seed."""
    rng = random.Random(seed)
    makers = [_caption] * 4 + [_animal, _headline, _headline, _forum, _forum]
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        s = rng.choice(makers)(rng)
        s = s[0].upper() + s[1:]
        if s in seen or not 5 <= len(s.split()) <= 40:
            continue
        seen.add(s)
        out.append(s)
    return out


if __name__ == "__main__":
    sys.stdout.write("\n".join(sentences()) + "\n")
