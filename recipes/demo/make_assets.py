#!/usr/bin/env python3
"""Regenerate tunec's offline demo assets.

    python recipes/demo/make_assets.py

writes, relative to this file's folder:

  data/reviews/{train,test}.jsonl     {"id", "review", "sentiment"}
  data/arithmetic/{train,test}.jsonl  {"id", "question", "answer"}
  data/plurals/{train,test}.jsonl     {"id", "word", "plural"}
  tokenizer/tokenizer.json            byte-level BPE, vocab 1024
  tokenizer/tokenizer_config.json     transformers AutoTokenizer config

Everything is generated here from word lists in this file with a fixed seed;
nothing is downloaded or copied. The data part depends only on this script,
so it is byte-identical on every run.

NOTE ON THE TOKENIZER: its training text is the generated data plus every
``*.md`` and ``*.py`` file committed in git at HEAD when the script runs
(listed with ``git ls-tree``, sorted by path, contents read from the commit,
not from the working tree). That text changes whenever the repository does,
so **the committed files under tokenizer/ are the artifact** and this script
is the record of how they were made. Re-running it at the same commit gives
byte-identical files (training on a fixed input order is deterministic);
re-running it at a later commit gives a different, equally valid tokenizer
that should only be committed on purpose. Without git (or outside a git
checkout) it falls back to training on the data alone.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
DATA_DIR = HERE / "data"
TOKENIZER_DIR = HERE / "tokenizer"

SEED = 20240611

# Sizes per task: (train, test). Labels/classes are balanced where they exist.
N_TRAIN = 400
N_TEST = 100

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 2048

# ChatML: <|im_start|>{role}\n{content}<|im_end|>\n per message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------

def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    # Keys keep the insertion order of each dict (the fixed column order).
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    write_text(path, "".join(line + "\n" for line in lines))


def split_rows(task: str, items: list[dict], n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Give each item an id (first key) and split into train/test."""
    assert len(items) == n_train + n_test, (task, len(items))
    train, test = items[:n_train], items[n_train:]

    def with_ids(split: str, part: list[dict]) -> list[dict]:
        return [{"id": f"{task}-{split}-{i:04d}", **item} for i, item in enumerate(part)]

    return with_ids("train", train), with_ids("test", test)


def balanced_split(rng: random.Random, groups: list[list[dict]], n_train: int, n_test: int) -> list[dict]:
    """Take n_train/len(groups) + n_test/len(groups) items from each group.

    Returns train items (shuffled) followed by test items (shuffled), so the
    result can be cut at n_train.
    """
    k = len(groups)
    assert n_train % k == 0 and n_test % k == 0
    train: list[dict] = []
    test: list[dict] = []
    for group in groups:
        assert len(group) >= (n_train + n_test) // k, len(group)
        train.extend(group[: n_train // k])
        test.extend(group[n_train // k : (n_train + n_test) // k])
    rng.shuffle(train)
    rng.shuffle(test)
    return train + test


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --------------------------------------------------------------------------
# Task 1: reviews (sentiment)
# --------------------------------------------------------------------------

# Each domain: nouns, aspects (singular or mass nouns, so "was" agrees),
# and domain-specific closing sentences.
REVIEW_DOMAINS = {
    "product": {
        "nouns": [
            "blender", "toaster", "backpack", "laptop", "kettle", "desk lamp",
            "keyboard", "umbrella", "coffee grinder", "tent", "wristwatch",
            "vacuum cleaner", "phone charger", "office chair", "water bottle",
            "rice cooker",
        ],
        "aspects": [
            "build quality", "design", "price", "packaging", "battery life",
            "instruction manual", "customer service", "finish", "delivery",
        ],
        "pos_closers": [
            "I would buy it again.", "Worth every penny.", "Highly recommended.",
            "Five stars.", "I already ordered a second one.",
        ],
        "neg_closers": [
            "I want my money back.", "Not worth the money.", "Avoid it.",
            "One star.", "It is going back to the shop.",
        ],
    },
    "film": {
        "nouns": [
            "film", "movie", "thriller", "comedy", "documentary", "drama",
            "sequel", "western", "cartoon", "musical", "mystery", "romance",
        ],
        "aspects": [
            "plot", "acting", "soundtrack", "ending", "dialogue", "pacing",
            "camera work", "script", "lead performance",
        ],
        "pos_closers": [
            "I would watch it again.", "A must-see.", "Highly recommended.",
            "Five stars.", "I stayed for the credits.",
        ],
        "neg_closers": [
            "I walked out halfway.", "A waste of an evening.", "Avoid it.",
            "One star.", "I checked my watch the whole time.",
        ],
    },
}

POS_ADJ = [
    "excellent", "wonderful", "superb", "great", "fantastic", "brilliant",
    "impressive", "lovely", "solid", "outstanding", "delightful", "pleasant",
]
NEG_ADJ = [
    "terrible", "awful", "dreadful", "disappointing", "poor", "weak",
    "mediocre", "clumsy", "frustrating", "dull", "sloppy", "annoying",
]

POS_OPENERS = [
    "I loved this {noun}.",
    "This {noun} is {adj}.",
    "What {a_adj} {adj} {noun}!",
    "The {noun} exceeded my expectations.",
    "Honestly, this {noun} was {adj}.",
    "I am very happy with this {noun}.",
]
NEG_OPENERS = [
    "I hated this {noun}.",
    "This {noun} is {adj}.",
    "What {a_adj} {adj} {noun}.",
    "The {noun} fell far short of my expectations.",
    "Honestly, this {noun} was {adj}.",
    "I am very unhappy with this {noun}.",
]
ASPECT_SENTENCES = [
    "The {aspect} was {adj}.",
    "Its {aspect} is {adj} too.",
    "I found the {aspect} {adj}.",
    "Even the {aspect} was {adj}.",
]
# Mixed reviews: one aspect goes against the overall verdict, which decides the label.
MIXED_SENTENCES = [
    "The {aspect} was {other_adj}, but overall the {noun} is {adj}.",
    "Apart from the {other_adj} {aspect}, this {noun} is {adj}.",
]


def make_review(rng: random.Random, label: str) -> str:
    domain = REVIEW_DOMAINS[rng.choice(sorted(REVIEW_DOMAINS))]
    noun = rng.choice(domain["nouns"])
    adjs, other_adjs = (POS_ADJ, NEG_ADJ) if label == "positive" else (NEG_ADJ, POS_ADJ)
    openers = POS_OPENERS if label == "positive" else NEG_OPENERS
    closers = domain["pos_closers"] if label == "positive" else domain["neg_closers"]

    if rng.random() < 0.2:
        adj = rng.choice(adjs)
        sentences = [
            rng.choice(MIXED_SENTENCES).format(
                aspect=rng.choice(domain["aspects"]), other_adj=rng.choice(other_adjs), noun=noun, adj=adj
            )
        ]
    else:
        adj = rng.choice(adjs)
        sentences = [rng.choice(openers).format(noun=noun, adj=adj, a_adj=article(adj))]
        aspect_adj = rng.choice([a for a in adjs if a != adj])
        sentences.append(rng.choice(ASPECT_SENTENCES).format(aspect=rng.choice(domain["aspects"]), adj=aspect_adj))
    if rng.random() < 0.6:
        sentences.append(rng.choice(closers))
    return " ".join(sentences)


def make_reviews(rng: random.Random) -> tuple[list[dict], list[dict]]:
    per_label = (N_TRAIN + N_TEST) // 2
    seen: dict[str, None] = {}  # dict, not set: deterministic iteration order
    groups = []
    for label in ("positive", "negative"):
        group: list[dict] = []
        while len(group) < per_label:
            text = make_review(rng, label)
            if text in seen:
                continue
            seen[text] = None
            group.append({"review": text, "sentiment": label})
        groups.append(group)
    items = balanced_split(rng, groups, N_TRAIN, N_TEST)
    return split_rows("reviews", items, N_TRAIN, N_TEST)


# --------------------------------------------------------------------------
# Task 2: arithmetic
# --------------------------------------------------------------------------

def make_arithmetic(rng: random.Random) -> tuple[list[dict], list[dict]]:
    # Operands 0..49; subtraction never goes below zero. Half plus, half minus.
    plus = [(a, b) for a in range(50) for b in range(50)]
    minus = [(a, b) for a in range(50) for b in range(a + 1)]
    per_op = (N_TRAIN + N_TEST) // 2
    groups = [
        [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in rng.sample(plus, per_op)],
        [{"question": f"What is {a} minus {b}?", "answer": str(a - b)} for a, b in rng.sample(minus, per_op)],
    ]
    items = balanced_split(rng, groups, N_TRAIN, N_TEST)
    return split_rows("arithmetic", items, N_TRAIN, N_TEST)


# --------------------------------------------------------------------------
# Task 3: plurals of made-up nouns (a "wug test")
# --------------------------------------------------------------------------
# Invented words built from syllables; the plural follows regular English
# spelling rules, so a model can learn it from the word's ending alone:
#   -s, -ss, -x, -zz, -ch, -sh, -tch   -> add "es"   (blatch -> blatches)
#   consonant + y                      -> "y" to "ies" (plondy -> plondies)
#   vowel + y                          -> add "s"    (dremay -> dremays)
#   anything else                      -> add "s"    (frump -> frumps)

ONSETS = [
    "b", "bl", "br", "d", "dr", "f", "fl", "fr", "g", "gl", "gr", "j", "k",
    "l", "m", "n", "p", "pl", "pr", "r", "s", "sk", "sl", "sn", "sp", "st",
    "t", "tr", "v", "w", "z",
]
VOWELS = ["a", "e", "i", "o", "u"]
CODAS_S = ["b", "d", "g", "k", "l", "m", "n", "p", "t", "ck",
           "mp", "nd", "nt", "lk", "rk", "rt", "st", "ft", "ng", "rn"]
CODAS_ES = ["ss", "x", "zz", "ch", "sh", "tch"]
MIDDLE_CONSONANTS = ["b", "d", "g", "k", "l", "m", "n", "p", "r", "t", "nd", "mp", "st", "rl"]
VOWEL_Y = ["ay", "ey", "oy"]
# Real nouns with irregular plurals that the generator could hit by chance.
IRREGULAR = ("man", "men", "foot", "goose", "mouse", "ox", "child", "fish", "sheep", "deer", "moose", "louse")


def pluralize(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def make_nonce_word(rng: random.Random, kind: str) -> str:
    stem = rng.choice(ONSETS) + rng.choice(VOWELS)
    if rng.random() < 0.5:  # two syllables
        stem += rng.choice(MIDDLE_CONSONANTS) + rng.choice(VOWELS)
    if kind == "s":
        return stem + rng.choice(CODAS_S)
    if kind == "es":
        return stem + rng.choice(CODAS_ES)
    if kind == "consonant_y":
        return stem + rng.choice(MIDDLE_CONSONANTS) + "y"
    if kind == "vowel_y":
        return stem[:-1] + rng.choice(VOWEL_Y)
    raise ValueError(kind)


def make_plurals(rng: random.Random) -> tuple[list[dict], list[dict]]:
    kinds = ["s", "es", "consonant_y", "vowel_y"]
    per_kind = (N_TRAIN + N_TEST) // len(kinds)
    seen: dict[str, None] = {}
    groups = []
    for kind in kinds:
        group: list[dict] = []
        while len(group) < per_kind:
            word = make_nonce_word(rng, kind)
            if word in seen or word in IRREGULAR:
                continue
            seen[word] = None
            group.append({"word": word, "plural": pluralize(word)})
        groups.append(group)
    items = balanced_split(rng, groups, N_TRAIN, N_TEST)
    return split_rows("plurals", items, N_TRAIN, N_TEST)


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def committed_text_files() -> tuple[str | None, list[tuple[str, str]]]:
    """(commit, [(path, text)]) for every *.md / *.py committed at HEAD, sorted by path.

    Returns (None, []) when git or a commit is unavailable.
    """
    def git(*args: str) -> bytes:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], check=True, capture_output=True
        ).stdout

    try:
        commit = git("rev-parse", "--verify", "HEAD").decode().strip()
        names = git("ls-tree", "-r", "-z", "--name-only", commit).decode("utf-8").split("\0")
    except (OSError, subprocess.CalledProcessError):
        return None, []
    paths = sorted(n for n in names if n.endswith((".md", ".py")))
    files = []
    for path in paths:
        try:
            blob = git("show", f"{commit}:{path}")
        except subprocess.CalledProcessError:
            continue  # e.g. a submodule entry
        files.append((path, blob.decode("utf-8", errors="replace")))
    return commit, files


def training_texts(tasks: dict[str, tuple[list[dict], list[dict]]], files: list[tuple[str, str]]) -> list[str]:
    texts = []
    for train, test in tasks.values():
        for row in train + test:
            texts.extend(str(v) for k, v in row.items() if k != "id")
    texts.extend(text for _, text in files)
    return texts


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # GPT-2 style: adds no special tokens (no BOS/EOS); keep offsets untrimmed.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,  # ids 0..3, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(tok) == i, (tok, tokenizer.token_to_id(tok))
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": None,
        "pad_token": "<|pad|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }


# --------------------------------------------------------------------------

def main() -> int:
    rng = random.Random(SEED)
    tasks = {
        "reviews": make_reviews(rng),
        "arithmetic": make_arithmetic(rng),
        "plurals": make_plurals(rng),
    }
    for name, (train, test) in tasks.items():
        key = lambda row: tuple(v for k, v in row.items() if k != "id")  # noqa: E731
        train_keys = {key(r) for r in train}
        assert len(train_keys) == len(train), f"{name}: duplicate in train"
        assert not train_keys & {key(r) for r in test}, f"{name}: train/test overlap"
        write_jsonl(DATA_DIR / name / "train.jsonl", train)
        write_jsonl(DATA_DIR / name / "test.jsonl", test)
        print(f"data/{name}: {len(train)} train, {len(test)} test")

    commit, files = committed_text_files()
    if commit is None:
        print("tokenizer: git unavailable, training on the demo data only", file=sys.stderr)
    else:
        print(f"tokenizer: training on the demo data + {len(files)} *.md/*.py files committed at {commit}")
    tokenizer = train_tokenizer(training_texts(tasks, files))
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(TOKENIZER_DIR / "tokenizer.json"), pretty=True)
    write_text(
        TOKENIZER_DIR / "tokenizer_config.json",
        json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
    )
    print(f"tokenizer: vocab {tokenizer.get_vocab_size()} -> {TOKENIZER_DIR.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
