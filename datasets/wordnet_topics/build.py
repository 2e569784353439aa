"""Build wordnet_topics: WordNet 3.0 noun glosses labelled by their lexicographer file.

Real definitions written by WordNet's lexicographers (Miller 1995), four topics: noun.animal,
noun.artifact, noun.food, noun.plant. The label is the file the synset lives in, not a keyword, so
the text rarely names its topic ("a domesticated carnivorous mammal ..."). Usage examples in quotes
are dropped, glosses under 5 words skipped, then a seeded sample of each topic is split into
train and test. Rebuild (Debian's `wordnet-base` package):

    apt-get install wordnet-base && python datasets/wordnet_topics/build.py

WordNet 3.0 license (Princeton University): redistribution permitted with this notice; see
/usr/share/doc/wordnet-base/copyright.
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

TOPICS = {"05": "animal", "06": "artifact", "13": "food", "20": "plant"}
TRAIN_PER_TOPIC, TEST_PER_TOPIC = 100, 50


def glosses(data_noun: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {t: [] for t in TOPICS.values()}
    for line in data_noun.read_text(encoding="utf-8").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue  # the license header
        fields, gloss = line.split(" | ", 1)
        lex = fields.split()[1]
        if lex not in TOPICS:
            continue
        definition = gloss.split('; "')[0].split(' "')[0].strip().rstrip(";").strip()
        if len(definition.split()) >= 5:
            found[TOPICS[lex]].append(definition)
    return found


def main(data_noun: Path = Path("/usr/share/wordnet/data.noun"), out: Path = Path(__file__).parent) -> None:
    rng = random.Random(0)
    train, test = [], []
    for topic, texts in glosses(data_noun).items():
        texts = sorted(set(texts))
        rng.shuffle(texts)
        train += [(t, topic) for t in texts[:TRAIN_PER_TOPIC]]
        test += [(t, topic) for t in texts[TRAIN_PER_TOPIC:TRAIN_PER_TOPIC + TEST_PER_TOPIC]]
    for name, rows in (("train.csv", train), ("test.csv", test)):
        rng.shuffle(rows)
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        print(f"{out / name}: {len(rows)} rows", file=sys.stderr)


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:]))
