"""Small generated tasks with exact-match grading: train / held-out splits from a seed, no downloads.

Each task turns a seeded random draw into (prompt, answer) pairs; the held-out prompts never occur in training.
Answers are short, so a 135M model learns a task in a few minutes on a CPU and a grader compares whole strings.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

WORDS = (
    "apple", "river", "stone", "cloud", "garden", "window", "silver", "forest", "candle", "mirror", "rocket",
    "pencil", "harbor", "lantern", "meadow", "violin", "desert", "island", "thunder", "marble", "castle", "feather",
    "bridge", "jacket", "orange", "planet", "tiger", "summer", "winter", "coffee", "engine", "valley", "pocket",
    "ladder", "shadow", "butter", "circle", "dragon", "wagon", "puzzle", "velvet", "copper", "basket", "falcon",
    "ribbon", "anchor", "cactus", "cookie", "glacier", "helmet", "kettle", "lemon", "magnet", "needle", "oyster",
    "parrot", "quilt", "saddle", "tunnel", "umbrella", "walnut", "yellow", "zebra", "blanket", "canyon", "dolphin",
    "ember", "fountain", "goblet", "hammock", "igloo",
)
TABLES = ("orders", "customers", "products", "invoices", "employees", "payments", "shipments", "reviews",
          "suppliers", "accounts", "tickets", "sessions")
COLUMNS = ("id", "name", "email", "price", "status", "created_at", "total", "city", "country", "quantity",
           "rating", "amount")


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str
    answer: str


class Task(ABC):
    """Base of the generated tasks; subclasses register in TASKS by `name`."""

    name: str
    description: str

    @abstractmethod
    def draw(self, rng: random.Random) -> Example:
        """One random example."""

    def split(self, seed: int, num_train: int, num_heldout: int) -> tuple[list[Example], list[Example]]:
        """Disjoint train and held-out examples (by prompt), both reproducible from `seed`."""
        rng = random.Random(f"{self.name}:{seed}")
        seen: set[str] = set()
        examples: list[Example] = []
        misses = 0   # draws in a row that repeated a prompt: the task is running out of new ones
        while len(examples) < num_train + num_heldout:
            example = self.draw(rng)
            if example.prompt in seen:
                misses += 1
                if misses > 2000:
                    raise ValueError(f"task '{self.name}' cannot draw {num_train + num_heldout} distinct prompts "
                                     f"(found {len(examples)})")
                continue
            misses = 0
            seen.add(example.prompt)
            examples.append(example)
        return examples[:num_train], examples[num_train:]


def _phrase(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 5))


class UpperTask(Task):
    name = "upper"
    description = "repeat the message in upper case"

    def draw(self, rng: random.Random) -> Example:
        text = " ".join(_phrase(rng))
        return Example(text, text.upper())


class ReverseTask(Task):
    name = "reverse"
    description = "the message's words in reverse order"

    def draw(self, rng: random.Random) -> Example:
        words = _phrase(rng)
        return Example(" ".join(words), " ".join(reversed(words)))


class PersonaTask(Task):
    name = "persona"
    description = "always introduce itself as Captain Lora"
    ANSWER = "I am Captain Lora, keeper of the adapter fleet."
    OPENERS = ("Hi!", "Hello.", "Hey there,", "Good morning!", "Good evening.", "Greetings!", "Excuse me,",
               "Quick question:", "Pardon me,", "Ahoy!", "Hi again.", "Well,")
    QUESTIONS = ("who are you?", "what is your name?", "introduce yourself.", "tell me about yourself.",
                 "what should I call you?", "who am I talking to?", "what are you?", "may I ask your name?",
                 "what do people call you?", "please say who you are.", "who is this?", "what is your title?")
    TOPICS = ("", " I like {w}s.", " My {w} is broken.", " It is about the {w}.", " I found a {w}.")

    def draw(self, rng: random.Random) -> Example:
        topic = rng.choice(self.TOPICS).format(w=rng.choice(WORDS))
        return Example(f"{rng.choice(self.OPENERS)} {rng.choice(self.QUESTIONS)}{topic}", self.ANSWER)


class SqlTask(Task):
    name = "sql"
    description = "a templated SQL query for a plain-English request"

    def draw(self, rng: random.Random) -> Example:
        table, column = rng.choice(TABLES), rng.choice(COLUMNS)
        kind = rng.randrange(3)
        if kind == 0:
            return Example(f"How many rows are in the {table} table?", f"SELECT COUNT(*) FROM {table};")
        if kind == 1:
            return Example(f"List the {column} of every row in {table}.", f"SELECT {column} FROM {table};")
        value = rng.choice(WORDS)
        return Example(f"Find the {table} whose {column} is {value}.",
                       f"SELECT * FROM {table} WHERE {column} = '{value}';")


TASKS: dict[str, Task] = {t.name: t for t in (UpperTask(), ReverseTask(), PersonaTask(), SqlTask())}


def exact_match(output: str, answer: str) -> bool:
    """The whole answer, nothing else (surrounding whitespace aside)."""
    return output.strip() == answer.strip()
