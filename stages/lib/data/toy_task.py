"""The built-in dataset of the embedded default: a small bilingual phrase-translation task.

Every (colour, animal) pair is translated English → Chinese and Chinese → English, in alpaca format. It is
generated, not downloaded, so the default pipeline needs no network; a tiny model learns the word mapping in
a few hundred CPU steps and then translates pairs it never saw in training.
"""

from __future__ import annotations

import random

COLOURS = {
    "red": "红色", "blue": "蓝色", "green": "绿色", "yellow": "黄色", "black": "黑色",
    "white": "白色", "purple": "紫色", "orange": "橙色", "grey": "灰色", "pink": "粉色",
}  # fmt: skip
ANIMALS = {
    "cat": "猫", "dog": "狗", "bird": "鸟", "fish": "鱼", "horse": "马", "tiger": "老虎",
    "rabbit": "兔子", "panda": "熊猫", "sheep": "羊", "monkey": "猴子", "duck": "鸭子", "bear": "熊",
}  # fmt: skip


def toy_zh_en(seed: int) -> list[dict]:
    records = []
    for colour, colour_zh in COLOURS.items():
        for animal, animal_zh in ANIMALS.items():
            english, chinese = f"{colour} {animal}", f"{colour_zh}的{animal_zh}"
            records.append({"instruction": "Translate into Chinese.", "input": english, "output": chinese})
            records.append({"instruction": "翻译成英文。", "input": chinese, "output": english})
    random.Random(seed).shuffle(records)
    return records


BUILTIN = {"toy-zh-en": toy_zh_en}
