"""Build the tiny byte-level BPE tokenizer shipped with kvprof's tiny_llama model.

Runs fully offline: the training corpus (Python-like code plus English prose) is
generated here from a fixed seed, so no hub download is ever needed and the
result is reproducible.  Writes ``tokenizer.json`` and ``tokenizer_config.json``
into ``src/kvprof/models/tiny_llama`` beside the existing ``config.json``.

Usage: python scripts/build_tokenizer.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 4000  # config.json says 4096; the spare rows stay unused.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 (trainer keeps this order)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "kvprof" / "models" / "tiny_llama"

_ENGLISH = (
    "the a an of to and in is it that for on with as this be are by from or at "
    "function returns value list string number request cache memory block token "
    "model prompt prefix batch queue time profile kernel attention layer result "
    "error bug fix test case input output example simple fast slow large small "
    "first last next each every when while because before after should must can "
    "will would may use used using call called write read open close update check "
    "sort search tree graph node edge path array index key map set dictionary "
    "class method object instance argument parameter variable loop condition "
    "explain implement complete describe improve handle raise return yield import"
).split()
_IDENT_PARTS = (
    "get set make build load save parse read write find count sum max min total "
    "user item data node value key name path file line word text size len idx "
    "buf tmp cache block token seq batch req resp config state result left right"
).split()
_SYLLABLES = "ka lo mi ne ru sa te vo zu pe an or el is ur ion ing er ed ly".split()


def _ident(rng: random.Random) -> str:
    parts = rng.sample(_IDENT_PARTS, rng.randint(1, 3))
    if rng.random() < 0.2:
        parts.append("".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))))
    name = "_".join(parts)
    return name.title().replace("_", "") if rng.random() < 0.15 else name


def _code(rng: random.Random) -> str:
    fn, a, b, c = (_ident(rng) for _ in range(4))
    n = rng.randint(0, 1000)
    templates = [
        f"def {fn}({a}, {b}=None):\n    \"\"\"Return the {a} of {b}.\"\"\"\n"
        f"    if {b} is None:\n        {b} = []\n    return [{c} for {c} in {a} if {c} > {n}]\n",
        f"class {fn.title().replace('_', '')}:\n    def __init__(self, {a}: int = {n}) -> None:\n"
        f"        self.{a} = {a}\n        self.{b}: dict[str, int] = {{}}\n",
        f"for {c} in range(len({a})):\n    {b}[{c}] += {a}[{c}] * {n}\n",
        f"import {a}\nfrom {b} import {fn}\n\n{c} = {fn}({a}.{b}, key=lambda x: x[{n % 7}])\n",
        f"try:\n    {a} = {fn}({b})\nexcept (ValueError, KeyError) as exc:\n"
        f"    raise RuntimeError(f\"bad {{{b}!r}}\") from exc\n",
        f"while {a} < {n}:\n    {a}, {b} = {b}, {a} + {b}  # {rng.choice(_ENGLISH)} {rng.choice(_ENGLISH)}\n",
        f"assert {fn}({a}) == {n}, \"expected {n}\"\n",
    ]
    return rng.choice(templates)


def _prose(rng: random.Random) -> str:
    words = rng.choices(_ENGLISH, k=rng.randint(6, 24))
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), f"`{_ident(rng)}()`")
    sentence = " ".join(words)
    return sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "?", ":"]) + "\n"


def corpus(n_docs: int = 20000, seed: int = 0) -> list[str]:
    """Deterministic mix of code and prose (roughly 2:1)."""
    rng = random.Random(seed)
    return [_code(rng) if rng.random() < 0.65 else _prose(rng) for _ in range(n_docs)]


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # Llama convention: prepend <s> when encoding text (kvprof workloads pass ids directly).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)

    tok = build()
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2], ids
    assert tok.get_vocab_size() <= 4096, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
