"""Calculate: a table of arithmetic in MOSS's output format, and math errors that become ToolErrors."""

import pytest

from moss_jax.tools import ToolError, calculate


@pytest.mark.parametrize(
    "expression, expected",
    [
        # The released data's own example.
        ("(6000-4800)/6000*100", "20.0"),
        # Integers stay exact; / is true division; Python's precedence and floor semantics.
        ("2+3", "5"),
        ("7/2", "3.5"),
        ("7//2", "3"),
        ("-7//2", "-4"),
        ("7%3", "1"),
        ("-(2+3)*4", "-20"),
        ("2**10", "1024"),
        ("2^10", "1024"),
        ("2^3^2", "512"),
        ("-3**2", "-9"),
        ("(-3)**2", "9"),
        ("2**-1", "0.5"),
        ("12345678901234567890*98765432109876543210", "1219326311370217952237463801111263526900"),
        ("factorial(20)", "2432902008176640000"),
        ("comb(52,5)", "2598960"),
        ("perm(5,2)", "20"),
        ("gcd(84,36)", "12"),
        ("lcm(4,6)", "12"),
        # Fractions and floats, printed the way Python prints them.
        ("1/3", "0.3333333333333333"),
        ("0.1+0.2", "0.30000000000000004"),
        ("3.5*2", "7.0"),
        ("1e3+1", "1001.0"),
        ("1_000*2", "2000"),
        ("100*1.05**2", "110.25"),
        ("-0.5*-4", "2.0"),
        # Functions and constants.
        ("sqrt(16)", "4.0"),
        ("sqrt(2)", "1.4142135623730951"),
        ("cbrt(-8)", "-2.0"),
        ("abs(-7.5)", "7.5"),
        ("round(3.14159, 2)", "3.14"),
        ("round(2.5)", "2"),
        ("floor(-2.5)", "-3"),
        ("ceil(2.1)", "3"),
        ("log(100, 10)", "2.0"),
        ("log10(1000)", "3.0"),
        ("log2(1024)", "10.0"),
        ("ln(e)", "1.0"),
        ("exp(0)", "1.0"),
        ("sin(0)", "0.0"),
        ("cos(pi)", "-1.0"),
        ("degrees(pi/2)", "90.0"),
        ("atan2(1, 1)*4", "3.141592653589793"),
        ("hypot(3, 4)", "5.0"),
        ("max(3, 9.5, 4)", "9.5"),
        ("min(3, -9, 4)", "-9"),
        # Implicit multiplication.
        ("2pi", "6.283185307179586"),
        ("2(3+4)", "14"),
        ("(1+2)(3+4)", "21"),
        # Full-width digits and operators, as written for Chinese questions.
        ("１２＋３×４", "24"),
        ("（１００－２０）÷４", "20.0"),
        ("−5+2", "-3"),
        ("２＾３", "8"),
        ("3×π", "9.42477796076938"),
        ("５０％７", "1"),
        ("　１＋１　", "2"),
    ],
)
def test_table(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    "expression, reason",
    [
        ("1/0", "division by zero"),
        ("5%0", "division by zero"),
        ("0**-1", "division by zero"),
        ("sqrt(-1)", "math error"),
        ("log(0)", "math error"),
        ("asin(2)", "math error"),
        ("(-8)**(1/3)", "not a real number"),
        ("1e308*10", "not finite"),
        ("1e999", "not finite"),
        ("2.0**5000", "too large"),
        ("exp(1000)", "too large"),
        ("factorial(-1)", "factorial"),
        ("factorial(2.5)", "factorial"),
        ("factorial(1001)", "factorial"),
        ("comb(10000, 5000)", "bits"),
        ("gcd(2.5, 5)", "integers"),
        ("round(1, 1000)", "digits"),
        ("x+1", "unknown name"),
        ("1j", "unknown name"),  # no complex literals: 1j reads as 1*j
        ("sqrt", "without calling"),
        ("sqrt(1, 2)", "arguments"),
        ("", "empty"),
        ("1+", "not a valid expression"),
        ("()", "Tuple is not allowed"),
        ("1=1", "not allowed"),
        ("1;2", "not allowed"),
    ],
)
def test_errors_are_tool_errors(expression, reason):
    with pytest.raises(ToolError, match=reason):
        calculate(expression)


def test_big_but_bounded_integers_are_exact():
    assert calculate("2**8000") == str(2**8000)
    assert calculate("factorial(900) // factorial(898)") == "809100"


def test_tool_error_is_a_value_error():
    # Callers that already handle ValueError keep working.
    assert issubclass(ToolError, ValueError)


def _frames() -> int:
    frame, count = __import__("sys")._getframe(), 0
    while frame is not None:
        frame, count = frame.f_back, count + 1
    return count


@pytest.mark.parametrize(
    "expression, expected",
    [
        # A chain of same-precedence operators is one level of nesting, however long.
        ("+".join(["1"] * 41), "41"),
        ("+".join(["19.99"] * 45), str(sum([19.99] * 45, 0.0))),  # a bill of 45 prices
        ("+".join(["1"] * 200), "200"),  # 399 nodes: the longest sum under the node cap
        ("*".join(["2"] * 200), str(2**200)),
        ("-".join(["1"] * 100) + "/" + "/".join(["4"] * 99), str(1 - 98 - 1 / 4**98)),
        ("100*3/4//2%7*" + "*".join(["3"] * 100), str(100 * 3 / 4 // 2 % 7 * 3**100)),
        ("+".join(["(1+2*3)"] * 57), "399"),  # chains inside a chain: 3 levels
    ],
)
def test_long_flat_chains_are_one_level(expression, expected):
    assert calculate(expression) == expected


def test_long_chains_are_folded_in_a_loop_not_by_recursion():
    import sys

    # 40 levels cost two frames each; a chain of 200 folded by recursion would need over 400.
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(_frames() + 150)
    try:
        assert calculate("+".join(["1"] * 200)) == "200"
        assert calculate("*".join(["1"] * 100) + "+" + "-".join(["1"] * 99)) == "-96"
    finally:
        sys.setrecursionlimit(old)


@pytest.mark.parametrize(
    "expression, reason",
    [
        # Still real limits: nodes counted one per number and operator, nesting counted per level.
        ("+".join(["1"] * 201), "more than 400 parts"),
        ("1+(" * 40 + "1" + ")" * 40, "nested deeper than 40 levels"),
        ("2**" * 40 + "1", "nested deeper than 40 levels"),  # a power tower is right-nested
        ("-" * 40 + "1", "nested deeper than 40 levels"),
        ("sqrt(" * 40 + "1" + ")" * 40, "nested deeper than 40 levels"),
        # Every intermediate value of a chain is checked, not only its result.
        ("1e308+1e308-1e308", "not finite"),
        ("2**8000*2**8000/2**8000", "bits"),
        ("1+1/0+1", "division by zero"),
    ],
)
def test_chains_keep_the_limits(expression, reason):
    with pytest.raises(ToolError, match=reason):
        calculate(expression)
    assert calculate("1+(" * 39 + "1" + ")" * 39) == "40"  # 40 levels is within the limit
    assert calculate("-" * 39 + "1") == "-1"


def test_factorial_limit_is_the_largest_that_fits_the_integer_cap():
    import math

    from moss_jax.tools.calculator import MAX_FACTORIAL_ARG, MAX_INT_BITS

    assert math.factorial(MAX_FACTORIAL_ARG).bit_length() <= MAX_INT_BITS
    assert math.factorial(MAX_FACTORIAL_ARG + 1).bit_length() > MAX_INT_BITS
    assert calculate("factorial(966)") == str(math.factorial(966))
    with pytest.raises(ToolError, match=r"factorial\(\) needs an integer between 0 and 966"):
        calculate("factorial(967)")
