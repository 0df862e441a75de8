"""The embedded benchmark's data: a synthetic four-choice MCQA suite generated from a seed.

Examples are :class:`pyro_moe.data.MCQAExample`; prompts come from :data:`pyro_moe.data.DEFAULT_TEMPLATE`.

Five in-distribution task families give the ``train``, ``calibration`` and ``test`` splits,
disjoint in their questions: ``addition`` (two numbers up to 59), ``largest`` (of four numbers up
to 99), ``counting`` (how often an animal occurs in a list), ``parity`` (the even number among odd
ones) and ``category`` (which word is an animal or a colour, facts of a small word table).
``near_ood`` asks the same five tasks shifted: larger operands, four numbers close together,
colours counted in longer lists, numbers from 100 to 199, animals and colours the training never
names. ``far_ood`` asks four task families the training never shows (the odd word out, the word
of a named category, the letter after or before a given one), in words the in-distribution splits
never use. Every word there is the answer to about a quarter of the questions it occurs in, so a
model's leanings towards particular unlearned words do not, on average, move its far-OoD accuracy
away from chance.

Every question's text determines its answer; a question appears in at most one split. The
correct answer's position is exactly balanced over the four letters in every split whose size is
a multiple of four. Only ``random.Random(seed)`` draws; nothing depends on Python's hash seed.

``extend_to`` enlarges the evaluation splits (``test``, ``near_ood``, ``far_ood``) to any size
(the added part a multiple of the split's families) without changing anything else: the five
splits are generated exactly as without it (the shipped model's train and calibration questions
stay the same), then the same generator draws the added questions, fresh (in no split) and appended
after the split's own, so the first questions of an enlarged split are the split as it was. The
added part's answer positions are balanced on their own (exactly when its size is a multiple of four).

Example::

    from pyro_moe.experiments.benchmark_data import generate_benchmark

    benchmark = generate_benchmark(seed=0)
    example = benchmark.splits["test"][0]
    example.question  # 'which number is the largest : 15 21 16 0 ?'
    example.choices, example.answer  # ('15', '21', '16', '0'), 1
    benchmark.families["test"][0]  # 'largest'

    larger = generate_benchmark(seed=0, extend_to={"test": 5000})  # 1000 test questions + 4000 fresh ones
    larger.splits["test"][:1000] == benchmark.splits["test"]  # True; train and calibration unchanged
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pyro_moe.data import MCQAExample
from pyro_moe.errors import ConfigurationError

__all__ = [
    "DEFAULT_SIZES",
    "EXTENDABLE_SPLITS",
    "FAR_OOD_FAMILIES",
    "IN_DISTRIBUTION_FAMILIES",
    "NEAR_OOD_FAMILIES",
    "NUM_CHOICES",
    "SPLITS",
    "VOCABULARY",
    "Benchmark",
    "TaskFamily",
    "generate_benchmark",
]

NUM_CHOICES = 4
"""Choices per question."""

SPLITS = ("train", "calibration", "test", "near_ood", "far_ood")
"""Split names, in-distribution first."""

DEFAULT_SIZES = {"train": 8000, "calibration": 1000, "test": 1000, "near_ood": 1000, "far_ood": 1000}
"""Split sizes when ``sizes`` does not say (the shipped model's)."""

EXTENDABLE_SPLITS = ("test", "near_ood", "far_ood")
"""The splits ``extend_to`` may enlarge (never ``train`` or ``calibration``)."""

_MAX_MISSES = 100_000
"""Draws in a row that may repeat taken questions before a family counts as exhausted."""

_MAX_NUMBER = 203
"""The numbers 0 to this one are words of the vocabulary (a near-OoD sum's distractors reach 99 + 99 + 5)."""

_ANIMALS = ("cat", "dog", "fish", "bird", "cow", "horse", "pig", "hen")
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown")
_NEW_ANIMALS = ("duck", "mouse", "sheep", "goat")
_NEW_COLOURS = ("purple", "orange", "grey", "gold")
_NAMES = ("blim", "zorp", "quib", "frell", "grum", "snark", "tove", "wug", "plonk", "dax", "fep", "kiki")
_FAR_CATEGORIES = {
    "fruit": ("apple", "pear", "plum", "lemon", "mango", "grape"),
    "tool": ("hammer", "saw", "drill", "wrench", "chisel", "axe"),
    "vehicle": ("car", "bus", "train", "boat", "plane", "truck"),
    "clothing": ("shirt", "hat", "sock", "coat", "scarf", "glove"),
}
_FAR_WORDS = tuple(word for category in sorted(_FAR_CATEGORIES) for word in _FAR_CATEGORIES[category])
_LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")


Draw = tuple[str, str, tuple[str, ...]]
"""A family's draw: question text, correct answer, three distinct wrong answers."""


@dataclass(frozen=True)
class TaskFamily:
    """A task family: ``draw(rng)`` returns a question, its answer and three distractors."""

    name: str
    draw: Callable[[random.Random], Draw]


@dataclass(frozen=True)
class Benchmark:
    """The generated suite: ``splits[name]`` the examples, ``families[name]`` each one's family."""

    seed: int
    splits: dict[str, list[MCQAExample]]
    families: dict[str, list[str]]


def _near_numbers(rng: random.Random, answer: int, spread: int) -> tuple[str, ...]:
    """Three distinct non-negative numbers within ``spread`` of ``answer``, never ``answer``."""
    offsets = [offset for offset in range(-spread, spread + 1) if offset != 0 and answer + offset >= 0]
    return tuple(str(answer + offset) for offset in rng.sample(offsets, 3))


def _listed(words: list[str]) -> str:
    return " ".join(words)


def _addition(low: int, high: int) -> Callable[[random.Random], Draw]:
    """``a plus b`` with operands in ``[low, high]``; distractors within 5 of the sum."""

    def draw(rng: random.Random) -> Draw:
        a, b = rng.randint(low, high), rng.randint(low, high)
        return f"what is {a} plus {b} ?", str(a + b), _near_numbers(rng, a + b, 5)

    return draw


def _largest(low: int, high: int, window: int) -> Callable[[random.Random], Draw]:
    """The largest of four distinct numbers of ``[low, high]`` within ``window`` consecutive ones."""

    def draw(rng: random.Random) -> Draw:
        first = rng.randint(low, high - window + 1)
        numbers = [str(number) for number in rng.sample(range(first, first + window), 4)]
        largest = max(numbers, key=int)
        question = f"which number is the largest : {_listed(numbers)} ?"
        return question, largest, tuple(number for number in numbers if number != largest)

    return draw


def _counting(items: tuple[str, ...], min_length: int, max_length: int) -> Callable[[random.Random], Draw]:
    """How often an item occurs in a list of ``items`` of ``min_length`` to ``max_length`` words."""

    def draw(rng: random.Random) -> Draw:
        words = [rng.choice(items) for _ in range(rng.randint(min_length, max_length))]
        target = rng.choice(words)
        count = words.count(target)
        question = f"how many times does {target} appear in : {_listed(words)} ?"
        return question, str(count), _near_numbers(rng, count, 3)

    return draw


def _parity(low: int, high: int) -> Callable[[random.Random], Draw]:
    """The one even number among three odd ones, all in ``[low, high]``."""

    def draw(rng: random.Random) -> Draw:
        even = str(rng.randrange(low + low % 2, high + 1, 2))
        odd = [str(number) for number in rng.sample(range(low + 1 - low % 2, high + 1, 2), 3)]
        numbers = [even, *odd]
        rng.shuffle(numbers)
        return f"which number is even : {_listed(numbers)} ?", even, tuple(odd)

    return draw


def _category(animals: tuple[str, ...], colours: tuple[str, ...]) -> Callable[[random.Random], Draw]:
    """Which of four words is an animal (of ``animals``) or a colour (of ``colours``).

    The three other words are made-up names or words of the other in-distribution category.
    """

    def draw(rng: random.Random) -> Draw:
        if rng.random() < 0.5:
            kind, answer, others = "an animal", rng.choice(animals), _COLOURS + _NAMES
        else:
            kind, answer, others = "a colour", rng.choice(colours), _ANIMALS + _NAMES
        distractors = rng.sample(others, 3)
        words = [answer, *distractors]
        rng.shuffle(words)
        return f"which word is {kind} : {_listed(words)} ?", answer, tuple(distractors)

    return draw


def _odd_one_out(rng: random.Random) -> Draw:
    """Three words of one category and one of another; the odd one is the answer."""
    common, odd = rng.sample(sorted(_FAR_CATEGORIES), 2)
    words = [*rng.sample(_FAR_CATEGORIES[common], 3), rng.choice(_FAR_CATEGORIES[odd])]
    rng.shuffle(words)
    answer = next(word for word in words if word in _FAR_CATEGORIES[odd])
    return f"which word does not belong : {_listed(words)} ?", answer, tuple(w for w in words if w != answer)


def _object_category(rng: random.Random) -> Draw:
    """One word of each far-OoD category; the question names the category of the answer."""
    categories = sorted(_FAR_CATEGORIES)
    words = [rng.choice(_FAR_CATEGORIES[category]) for category in categories]
    asked = rng.randrange(len(categories))
    answer = words[asked]
    rng.shuffle(words)
    question = f"which word is a kind of {categories[asked]} : {_listed(words)} ?"
    return question, answer, tuple(word for word in words if word != answer)


def _neighbouring_letter(direction: str, offset: int) -> Callable[[random.Random], Draw]:
    """The letter ``direction`` (``after`` or ``before``) a given one, among four listed letters."""

    def draw(rng: random.Random) -> Draw:
        index = rng.randrange(max(0, -offset), len(_LETTERS) - max(0, offset))
        answer = _LETTERS[index + offset]
        distractors = rng.sample([letter for letter in _LETTERS if letter != answer], 3)
        letters = [answer, *distractors]
        rng.shuffle(letters)
        question = f"which letter comes {direction} {_LETTERS[index]} : {_listed(letters)} ?"
        return question, answer, tuple(distractors)

    return draw


IN_DISTRIBUTION_FAMILIES = (
    TaskFamily("addition", _addition(0, 59)),
    TaskFamily("largest", _largest(0, 99, 100)),
    TaskFamily("counting", _counting(_ANIMALS[:4], 4, 8)),
    TaskFamily("parity", _parity(0, 99)),
    TaskFamily("category", _category(_ANIMALS, _COLOURS)),
)
"""The tasks of ``train``, ``calibration`` and ``test``."""

NEAR_OOD_FAMILIES = (
    TaskFamily("addition", _addition(60, 99)),
    TaskFamily("largest", _largest(0, 99, 6)),
    TaskFamily("counting", _counting(_COLOURS[:4], 9, 12)),
    TaskFamily("parity", _parity(100, 199)),
    TaskFamily("category", _category(_NEW_ANIMALS, _NEW_COLOURS)),
)
"""The in-distribution tasks shifted: larger operands, close numbers, other items and longer lists,
larger numbers, unseen animals and colours."""

FAR_OOD_FAMILIES = (
    TaskFamily("odd_one_out", _odd_one_out),
    TaskFamily("object_category", _object_category),
    TaskFamily("letter_after", _neighbouring_letter("after", 1)),
    TaskFamily("letter_before", _neighbouring_letter("before", -1)),
)
"""Task families the training never shows."""

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {
            *"Question Answer A B C D : ? .".split(),
            *"what is plus which number the largest how many times does appear in even word an a".split(),
            *"animal colour not belong kind of letter comes after before".split(),
            *(str(number) for number in range(_MAX_NUMBER + 1)),
            *_ANIMALS,
            *_COLOURS,
            *_NEW_ANIMALS,
            *_NEW_COLOURS,
            *_NAMES,
            *_FAR_CATEGORIES,
            *_FAR_WORDS,
            *_LETTERS,
        }
    )
)
"""Every word and symbol a prompt of the benchmark contains."""


def _draw_unique(family: TaskFamily, rng: random.Random, count: int, taken: set[str]) -> list[Draw]:
    """``count`` draws of ``family`` whose questions are not in ``taken`` (which they join)."""
    draws: list[Draw] = []
    misses = 0
    while len(draws) < count:
        draw = family.draw(rng)
        if draw[0] in taken:
            misses += 1
            if misses == _MAX_MISSES:
                raise ConfigurationError(
                    f"task family {family.name!r} gave no new question in {_MAX_MISSES} draws after {len(draws)} of "
                    f"the {count} asked for; accepted: fewer questions per family (smaller splits)"
                )
            continue
        misses = 0
        taken.add(draw[0])
        draws.append(draw)
    return draws


def _assemble(rng: random.Random, draws: list[tuple[str, Draw]]) -> tuple[list[MCQAExample], list[str]]:
    """Shuffle ``(family, draw)`` pairs and place each answer; positions exactly balanced over the letters."""
    rng.shuffle(draws)
    positions = [i % NUM_CHOICES for i in range(len(draws))]
    rng.shuffle(positions)
    examples, families = [], []
    for (family, (question, answer, distractors)), position in zip(draws, positions, strict=True):
        wrong = list(distractors)
        rng.shuffle(wrong)
        choices = (*wrong[:position], answer, *wrong[position:])
        examples.append(MCQAExample(question=question, choices=choices, answer=position))
        families.append(family)
    return examples, families


def _per_family(size: int, families: tuple[TaskFamily, ...], split: str) -> int:
    if size <= 0 or size % len(families):
        raise ConfigurationError(
            f"split {split!r} has size {size}; accepted: a positive multiple of its {len(families)} task families"
        )
    return size // len(families)


_EXTENDABLE_FAMILIES = {"test": IN_DISTRIBUTION_FAMILIES, "near_ood": NEAR_OOD_FAMILIES, "far_ood": FAR_OOD_FAMILIES}


def _extensions(sizes: Mapping[str, int], extend_to: Mapping[str, int]) -> dict[str, int]:
    """``{split: questions added per family}`` of ``extend_to``, checked against the generated ``sizes``."""
    unknown = sorted(set(extend_to) - set(EXTENDABLE_SPLITS))
    if unknown:
        raise ConfigurationError(f"extend_to names {unknown}; accepted: {list(EXTENDABLE_SPLITS)}")
    added = {}
    for split, size in extend_to.items():
        count = len(_EXTENDABLE_FAMILIES[split])
        extra = size - sizes[split] if isinstance(size, int) and not isinstance(size, bool) else -1
        if extra < 0 or extra % count:
            raise ConfigurationError(
                f"extend_to[{split!r}] = {size!r}; accepted: an integer at least the split's size {sizes[split]} "
                f"that exceeds it by a multiple of its {count} task families"
            )
        added[split] = extra // count
    return added


def generate_benchmark(
    seed: int, sizes: dict[str, int] | None = None, *, extend_to: Mapping[str, int] | None = None
) -> Benchmark:
    """Generate the five splits from ``seed``.

    ``sizes`` maps split names to sizes (default 8000 train, 1000 in every other split); each size
    is a positive multiple of its number of task families (5 in-distribution, 5 near-OoD, 4 far-OoD),
    and a multiple of 4 balances the answer letters exactly. Every family contributes equally.

    ``extend_to`` maps evaluation splits (:data:`EXTENDABLE_SPLITS`) to larger sizes: the splits are
    generated as without it, then each named one gets fresh questions appended (in no other split,
    every family equally) until it has that size; see the module docstring.
    """
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = sorted(set(sizes) - set(SPLITS))
    if unknown:
        raise ConfigurationError(f"unknown split names {unknown}; accepted: {list(SPLITS)}")
    added = _extensions(sizes, extend_to or {})
    rng = random.Random(seed)
    taken: set[str] = set()
    in_distribution = ("train", "calibration", "test")
    draws: dict[str, list[tuple[str, Draw]]] = {split: [] for split in SPLITS}
    counts = {split: _per_family(sizes[split], IN_DISTRIBUTION_FAMILIES, split) for split in in_distribution}
    for family in IN_DISTRIBUTION_FAMILIES:
        pool = _draw_unique(family, rng, sum(counts.values()), taken)
        start = 0
        for split in in_distribution:
            draws[split] += [(family.name, draw) for draw in pool[start : start + counts[split]]]
            start += counts[split]
    for split, families in (("near_ood", NEAR_OOD_FAMILIES), ("far_ood", FAR_OOD_FAMILIES)):
        count = _per_family(sizes[split], families, split)
        for family in families:
            draws[split] += [(family.name, draw) for draw in _draw_unique(family, rng, count, taken)]
    splits, family_names = {}, {}
    for split in SPLITS:
        splits[split], family_names[split] = _assemble(rng, draws[split])
    for split in EXTENDABLE_SPLITS:  # after every split is drawn: they are as without extend_to
        if added.get(split):
            fresh = [
                (family.name, draw)
                for family in _EXTENDABLE_FAMILIES[split]
                for draw in _draw_unique(family, rng, added[split], taken)
            ]
            examples, names = _assemble(rng, fresh)
            splits[split] += examples
            family_names[split] += names
    return Benchmark(seed=seed, splits=splits, families=family_names)
