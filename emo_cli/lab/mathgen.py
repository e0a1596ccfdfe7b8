"""Generated arithmetic and algebra worksheets with worked solutions (part of the math corpus).

Every number comes from one seeded `random.Random`, so the text is identical on every machine.
The problems are elementary but the solutions are always correct: they are computed, not templated.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from fractions import Fraction


def _signed(c: int, first: bool = False) -> str:
    if first:
        return f"{c}" if c >= 0 else f"-{-c}"
    return f"+ {c}" if c >= 0 else f"- {-c}"


def _poly(coeffs: list[int]) -> str:
    """coeffs[i] is the coefficient of x^(n-i); zero terms are skipped."""
    n = len(coeffs) - 1
    terms = []
    for i, c in enumerate(coeffs):
        p = n - i
        if c == 0:
            continue
        mag = abs(c)
        body = ("" if mag == 1 and p > 0 else str(mag)) + ("x" if p >= 1 else "") + (f"^{p}" if p > 1 else "")
        sign = ("-" if c < 0 else "") if not terms else ("- " if c < 0 else "+ ")
        terms.append(sign + body)
    return " ".join(terms) if terms else "0"


def addition(r: random.Random) -> str:
    a, b = r.randint(10, 9999), r.randint(10, 9999)
    if r.random() < 0.5:
        return f"Compute {a} + {b}.\nSolution. {a} + {b} = {a + b}."
    a, b = max(a, b), min(a, b)
    return f"Compute {a} - {b}.\nSolution. {a} - {b} = {a - b}."


def multiplication(r: random.Random) -> str:
    a, b = r.randint(12, 99), r.randint(12, 99)
    tens, ones = b // 10 * 10, b % 10
    return (f"Multiply {a} by {b}.\nSolution. {a} × {b} = {a} × {tens} + {a} × {ones} = "
            f"{a * tens} + {a * ones} = {a * b}.")


def division(r: random.Random) -> str:
    d = r.randint(3, 19)
    n = r.randint(50, 2000)
    q, m = divmod(n, d)
    tail = "so the division is exact" if m == 0 else f"so the quotient is {q} and the remainder is {m}"
    return f"Divide {n} by {d}.\nSolution. {n} = {d} × {q} + {m}, {tail}."


def linear(r: random.Random) -> str:
    a = r.choice([k for k in range(-9, 10) if k not in (0, 1)])
    x = r.randint(-12, 12)
    b = r.randint(-30, 30)
    c = a * x + b
    lhs = f"{a}x {_signed(b)}" if b else f"{a}x"
    step = f"{'Subtract' if b > 0 else 'Add'} {abs(b)} {'from' if b > 0 else 'to'} both sides: {a}x = {c - b}. " if b else ""
    return (f"Solve {lhs} = {c}.\nSolution. {step}Divide both sides by {a}: x = {x}. "
            f"Check: {a} × ({x}) {_signed(b)} = {c}.")


def expand(r: random.Random) -> str:
    p, q = r.randint(-9, 9), r.randint(-9, 9)
    return (f"Expand (x {_signed(p)})(x {_signed(q)}).\nSolution. (x {_signed(p)})(x {_signed(q)}) = "
            f"x^2 {_signed(q)}x {_signed(p)}x {_signed(p * q)} = {_poly([1, p + q, p * q])}.")


def quadratic(r: random.Random) -> str:
    s, t = r.randint(-9, 9), r.randint(-9, 9)
    poly = _poly([1, -(s + t), s * t])
    roots = f"x = {s}" if s == t else f"x = {min(s, t)} or x = {max(s, t)}"
    return (f"Solve {poly} = 0.\nSolution. The roots multiply to {s * t} and add to {s + t}, so "
            f"{poly} = (x {_signed(-s)})(x {_signed(-t)}) and {roots}.")


def gcd_lcm(r: random.Random) -> str:
    g = r.randint(2, 15)
    a, b = g * r.randint(2, 20), g * r.randint(2, 20)
    a, b = max(a, b), min(a, b)
    steps, x, y = [], a, b
    while y:
        steps.append(f"{x} = {x // y} × {y} + {x % y}")
        x, y = y, x % y
    return (f"Find gcd({a}, {b}) and lcm({a}, {b}).\nSolution. By Euclid's algorithm: " + "; ".join(steps)
            + f". So gcd({a}, {b}) = {x} and lcm({a}, {b}) = {a} × {b} / {x} = {a * b // x}.")


def fractions(r: random.Random) -> str:
    f1 = Fraction(r.randint(1, 9), r.randint(2, 12))
    f2 = Fraction(r.randint(1, 9), r.randint(2, 12))
    den = f1.denominator * f2.denominator // math.gcd(f1.denominator, f2.denominator)
    n1, n2 = f1.numerator * den // f1.denominator, f2.numerator * den // f2.denominator
    total = f1 + f2
    return (f"Add {f1} and {f2}.\nSolution. The common denominator is {den}: {f1} = {n1}/{den} and "
            f"{f2} = {n2}/{den}, so {f1} + {f2} = {n1 + n2}/{den}"
            + ("." if total.denominator == den else f" = {total}."))


def derivative(r: random.Random) -> str:
    n = r.randint(2, 5)
    coeffs = [r.randint(-9, 9) for _ in range(n + 1)]
    coeffs[0] = coeffs[0] or 1
    deriv = [c * (n - i) for i, c in enumerate(coeffs[:-1])]
    return f"Differentiate f(x) = {_poly(coeffs)}.\nSolution. Term by term, f'(x) = {_poly(deriv)}."


def primality(r: random.Random) -> str:
    n = r.randint(20, 400)
    f = next((p for p in range(2, int(math.isqrt(n)) + 1) if n % p == 0), None)
    if f is None:
        return f"Is {n} prime?\nSolution. No prime up to √{n} ≈ {math.sqrt(n):.1f} divides {n}, so {n} is prime."
    return f"Is {n} prime?\nSolution. {n} = {f} × {n // f}, so {n} is composite."


def powers(r: random.Random) -> str:
    b, e = r.randint(2, 9), r.randint(2, 6)
    chain = " × ".join([str(b)] * e)
    return f"Evaluate {b}^{e}.\nSolution. {b}^{e} = {chain} = {b ** e}."


TOPICS = {"arithmetic": (addition, multiplication, division, powers),
          "number theory": (gcd_lcm, primality, division),
          "fractions": (fractions, addition),
          "linear equations": (linear,),
          "polynomials": (expand, quadratic, derivative)}


def worksheets(seed: int) -> Iterator[tuple[str, list[str]]]:
    """Endless worksheets of worked problems, (header, problems) each; deterministic in `seed`
    (corpus.worksheet_docs packs them into documents)."""
    r = random.Random(seed)
    names = sorted(TOPICS)
    n = 0
    while True:
        n += 1
        topic = r.choice(names)
        problems = [f"Problem {i + 1}. " + r.choice(TOPICS[topic])(r) for i in range(r.randint(6, 14))]
        yield f"Worksheet {n}: {topic}\n\n", problems
