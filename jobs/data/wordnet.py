"""WordNet noun glosses (Debian's wordnet-base, file data.noun): supersense
classification and a "what does X mean" instruction set.

    apt-get install wordnet-base   # /usr/share/wordnet/data.noun
"""

from __future__ import annotations

from pathlib import Path

from conf.schema import ConfigError

# lex_filenum -> supersense, for nouns (WordNet's lexnames file, 03..28).
SUPERSENSES = {
    3: "Tops",
    4: "act",
    5: "animal",
    6: "artifact",
    7: "attribute",
    8: "body",
    9: "cognition",
    10: "communication",
    11: "event",
    12: "feeling",
    13: "food",
    14: "group",
    15: "location",
    16: "motive",
    17: "object",
    18: "person",
    19: "phenomenon",
    20: "plant",
    21: "possession",
    22: "process",
    23: "quantity",
    24: "relation",
    25: "shape",
    26: "state",
    27: "substance",
    28: "time",
}


def synsets(path: str | None) -> list[tuple[list[str], str, str]]:
    """[(words, supersense, definition)] for every noun synset in data.noun."""
    file = Path(path or "/usr/share/wordnet/data.noun")
    if not file.is_file():
        raise ConfigError(
            "data.path",
            f"{file} not found: install Debian's wordnet-base (apt-get install wordnet-base) "
            "or point data.path at a WordNet data.noun file",
        )
    out = []
    with file.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if line.startswith("  ") or not line.strip():
                continue  # license header
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            try:
                lex = int(fields[1])
                num_words = int(fields[3], 16)
                words = [fields[4 + 2 * i].replace("_", " ") for i in range(num_words)]
            except (IndexError, ValueError):
                raise ConfigError(
                    "data.path", f"{file}:{lineno}: not a WordNet data line"
                ) from None
            definition = gloss.split(";")[0].strip().strip('"').strip()
            if definition and lex in SUPERSENSES:
                out.append((words, f"noun.{SUPERSENSES[lex]}", definition))
    return out


def supersense_examples(path: str | None) -> list[dict[str, str]]:
    return [{"text": definition, "label": sense} for _, sense, definition in synsets(path)]


def instruction_examples(path: str | None) -> list[dict[str, str]]:
    return [
        {
            "prompt": f'What does the word "{words[0]}" mean?',
            "response": definition[0].upper() + definition[1:] + ".",
        }
        for words, _, definition in synsets(path)
    ]
