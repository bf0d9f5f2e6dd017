"""The built-in multiple-choice set of the embedded default: which phrase translates a colour-animal pair.

Generated from the toy task's vocabulary (stages/lib/data/toy_task.py), so the CPU default shows benchmark
accuracy with no network. Each question offers the right translation and three that share its colour or its
animal, in a seeded order.
"""

from __future__ import annotations

import random

from ..data.toy_task import ANIMALS, COLOURS

LETTERS = "ABCD"


def toy_choice(seed: int, test_size: int = 40, dev_size: int = 5) -> tuple[list[dict], list[dict]]:
    """(dev rows, test rows); each row: question, options (4 strings), answer (a letter)."""
    rng = random.Random(seed)
    pairs = [(c, a) for c in COLOURS for a in ANIMALS]
    rng.shuffle(pairs)
    rows = []
    for colour, animal in pairs[: test_size + dev_size]:
        right = f"{COLOURS[colour]}的{ANIMALS[animal]}"
        near = [f"{COLOURS[c]}的{ANIMALS[animal]}" for c in COLOURS if c != colour]
        near += [f"{COLOURS[colour]}的{ANIMALS[a]}" for a in ANIMALS if a != animal]
        options = [right, *rng.sample(near, 3)]
        rng.shuffle(options)
        rows.append({"question": f"“{colour} {animal}”的中文是哪一个？", "options": options,
                     "answer": LETTERS[options.index(right)]})  # fmt: skip
    return rows[:dev_size], rows[dev_size:]


BUILTIN = {"toy-choice": toy_choice}
