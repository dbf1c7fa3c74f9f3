"""QType grammar, canonical strings, equality, modifiers and errors (shared/spec/qtype.md)."""

from __future__ import annotations

import random

import pytest

from fakequant import QType
from fakequant.qtype import GRAMMAR

# spec/qtype.md §4: expression -> canonical string.
CANONICAL = [
    (lambda: QType("MXFP4"), "mxfp4"),
    (lambda: QType("e2m1k8b32c"), "mxfp4"),
    (lambda: QType("mxfp4").scale("floor"), "e2m1k8b32"),
    (lambda: QType("e4m3k8b32").scale("rceil").round("even").dim(0), "e4m3k8b32:round=even:scale=rceil:dim=0"),
    (lambda: QType("mxfp4").scale("ceil"), "e2m1k8b32:scale=ceil"),
    (lambda: QType("hif8").saturate(False), "hif8:saturate=false"),
    (lambda: QType("e02m1k8b32"), "e2m1k8b32"),
    (lambda: QType("NF4b8B8"), "nf4B8b8"),
]


@pytest.mark.parametrize("build, text", CANONICAL, ids=[t for _, t in CANONICAL])
def test_canonical_strings_from_spec(build, text):
    q = build()
    assert str(q) == text == q.desc
    assert repr(q) == f"QType({text!r})"
    assert QType(str(q)) == q


ALL_NAMES = [
    "mxfp4", "mxfp6e3m2", "mxfp6e2m3", "mxfp8e4m3", "mxfp8e5m2", "hif8", "hif4", "hifx2_v12", "hifx3_v12",
    "hifx4_v12", "hifx5_v12", "nvf4", "nvfp4", "nf4", "nf4B4b16", "int8sym", "tmx3", "tmx25", "fp16", "bf16",
    "fp32", "e4m3k8b16", "e0m3k8b32c", "e2m1K1k3B2b16off20", "e0m3K1k4B4b16c",
]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_name_round_trips(name):
    q = QType(name)
    assert str(q) == name  # every name above is already canonical
    assert QType(str(q)) == q and hash(QType(str(q))) == hash(q)


@pytest.mark.parametrize(
    "name, family, fields",
    [
        ("mxfp6e3m2", "mx", dict(exp_bits=3, man_bits=2, k_bits=8, blk_size=32, scale_mode="round")),
        ("mxfp8e5m2", "mx", dict(exp_max=15, fp_val_max=57344.0, exp_min=-14)),
        ("mxfp8e4m3", "mx", dict(exp_max=8, fp_val_max=448.0)),
        ("mxfp4", "mx", dict(exp_max=2, fp_val_max=6.0, block_len=32)),
        ("e2m1k8b32", "mx", dict(scale_mode="floor", round_mode="nearest")),
        ("hifx3_v12", "hifx", dict(man_bits=2, block_len=64)),
        ("tmx6", "tmx", dict(man_bits=4, block_len=16)),
        ("nf4B4b16", "nf4_double", dict(blk_outer_size=4, blk_size=16, block_len=64)),
        ("int8sym", "int8sym", dict(block_len=None)),
        ("hif8", "hif8", dict(block_len=1, saturating=True)),
        ("nvfp4", "nvfp4", dict(block_len=16, round_mode="even")),
        ("e2m1K1k3B2b16off20", "mx_hier", dict(k_max=7, exp_offset=14, block_len=32, offset=20)),
        ("e0m3K1k4B4b16c", "mx_hier", dict(k_max=15, exp_offset=2, scale_mode="round")),
    ],
)
def test_fields(name, family, fields):
    q = QType(name)
    assert q.family == family
    for key, value in fields.items():
        assert getattr(q, key) == value, key


def test_modifiers_return_new_values_and_dim_in_place_keeps_hash():
    q = QType("mxfp4")
    q0 = q.dim(0)
    assert q.q_dim == -1 and q0.q_dim == 0 and q0 != q
    assert QType("mxfp4").dim(-1) != QType("mxfp4").dim(1)  # axes compare as given (§5)
    s = {q}
    h = hash(q)
    assert q.dim_(1) is q and q.q_dim == 1 and hash(q) == h and q in s
    c = q.copy()
    assert c == q and c is not q
    c.dim_(0)
    assert q.q_dim == 1  # the copy is independent


def test_equality_ignores_spelling():
    assert QType("e2m1k8b32").scale("round") == QType("e2m1k8b32c") == QType("mxfp4") == QType("MxFp4")
    assert QType("mxfp4") != "mxfp4"  # never equal to a string (§5)
    assert QType("hif8:saturate=false") == QType("hif8").saturate(False)
    assert QType(QType("tmx5").dim(0)) == QType("tmx5").dim(0)


def test_immutable():
    with pytest.raises(AttributeError):
        QType("mxfp4").q_dim = 0


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("e2m1k8b32C", "the carry suffix is lower-case c"),
        ("e1m1k8b32", "exponent bits E=1 must be 0 or 2..8 (E1Mx is E0M(x+1))"),
        ("e2m1k9b32", "scale bits k=9 must be 1..8"),
        ("hifx6_v12", "hifx<N>_v12 needs N in 2..5, got 6"),
        ("e2m1k8b0", "block sizes must be >= 1"),
        ("e2m0k8b32", "mantissa bits m=0 must be 1..23"),
        ("tmx2", "tmx<N> needs N in 3..25, got 2"),
        ("hifx4", "unrecognised"),  # ambiguous between HiF4 v14 and hifx v12 (§7)
        ("dhif8", "unrecognised"),
        ("E2m1k8b32", "unrecognised"),  # block forms are case-sensitive
        ("mxfp4 ", "unrecognised"),  # no whitespace anywhere
        ("", "unrecognised"),
    ],
)
def test_bad_format_messages(text, fragment):
    with pytest.raises(ValueError) as info:
        QType(text)
    message = str(info.value)
    assert message.startswith(f"invalid quantization format {text!r}: ")
    assert fragment in message
    assert GRAMMAR in message  # the grammar and alias list, always


def test_bad_modifiers():
    with pytest.raises(ValueError, match=r"unknown modifier 'foo=1'.*round, scale, saturate, dim"):
        QType("mxfp4:foo=1")
    with pytest.raises(ValueError, match=r"round mode 'half' is not one of nearest, even, floor"):
        QType("mxfp4").round("half")
    with pytest.raises(ValueError, match=r"scale mode 'max' is not one of floor, round, ceil, rceil"):
        QType("mxfp4:scale=max")
    with pytest.raises(ValueError, match=r"family 'hif8' has a fixed rule"):
        QType("hif8").round("even")
    with pytest.raises(ValueError, match=r"family 'nvfp4' has a fixed rule"):
        QType("nvfp4").scale("ceil")
    with pytest.raises(ValueError, match=r"only allowed for hif8"):
        QType("mxfp4").saturate(False)
    assert QType("mxfp4").saturate(True) == QType("mxfp4")  # True is accepted everywhere (no-op)
    with pytest.raises(TypeError, match=r"saturate flag must be a bool, got str"):
        QType("hif8").saturate("no")
    with pytest.raises(TypeError, match=r"quantization axis must be an int, got float"):
        QType("mxfp4").dim(1.0)
    with pytest.raises(ValueError, match=r"dim='\+1' must be an integer"):
        QType("mxfp4:dim=+1")
    with pytest.raises(TypeError, match=r"quantization format must be a str, got int"):
        QType(4)


# ------------------------------------------------------------------------------------------------ fuzzing
_ATOMS = [
    "e", "m", "k", "K", "b", "B", "c", "C", "off", "mxfp", "hifx", "_v12", "tmx", "nf4", "hif", "nvf", "nvfp",
    "fp", "int8sym", ":", "=", "dim", "round", "scale", "saturate", "true", "false", "even", "floor", "ceil",
    "rceil", "nearest", "-", "0", "1", "2", "3", "4", "5", "8", "16", "32", "64", "99", "007", " ", "x", "é",
]


def _random_strings(rng: random.Random, n: int) -> list[str]:
    seeds = ALL_NAMES + [text for _, text in CANONICAL] + ["e4m3k8b32:round=even:scale=rceil:dim=0"]
    out = []
    for _ in range(n):
        choice = rng.random()
        if choice < 0.4:  # mutate a valid string: delete, insert, replace, or swap case of one position
            s = list(rng.choice(seeds))
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(s) + 1)
                op = rng.randrange(4)
                if op == 0 and i < len(s):
                    del s[i]
                elif op == 1:
                    s.insert(i, rng.choice(_ATOMS))
                elif op == 2 and i < len(s):
                    s[i] = rng.choice(_ATOMS)
                elif i < len(s):
                    s[i] = s[i].swapcase()
            out.append("".join(s))
        elif choice < 0.8:  # assemble from grammar atoms
            out.append("".join(rng.choice(_ATOMS) for _ in range(rng.randint(1, 9))))
        else:  # well-formed shape with random numbers, including out-of-range fields and modifiers
            n1, n2, n3, n4 = (rng.randint(0, 40) for _ in range(4))
            base = rng.choice([f"e{n1}m{n2}k{n3}b{n4}", f"e{n1}m{n2}K{n3 % 10}k{n4 % 10}B{n2}b{n3}c",
                               f"hifx{n1 % 8}_v12", f"tmx{n1}", f"nf4B{n1}b{n2}", f"e{n1 % 9}m{n2 % 24}k8b32c"])
            mods = rng.sample([f"dim={rng.randint(-5, 5)}", "round=even", "scale=ceil", "saturate=false",
                               "ROUND=Floor", "scale=rceil"], rng.randint(0, 3))
            out.append(":".join([base] + mods))
    return out


def test_fuzz_parse_or_value_error():
    """2,500 random and mutated strings: each parses to a QType that round-trips, or raises ValueError."""
    rng = random.Random(20261121)
    parsed = rejected = 0
    for text in _random_strings(rng, 2500):
        try:
            q = QType(text)
        except ValueError:
            rejected += 1
            continue
        parsed += 1
        again = QType(str(q))
        assert again == q and hash(again) == hash(q) and str(again) == str(q), text
    # Both outcomes must be exercised, or the fuzzer has degenerated.
    assert parsed > 200 and rejected > 200, (parsed, rejected)
