"""Reading lowered programs in tests: which products a program holds and their dtypes."""


def dot_generals(lowered: str) -> list[str]:
    """The `stablehlo.dot_general` lines of a lowered program's text (`.lower(...).as_text()`)."""
    return [line for line in lowered.splitlines() if "stablehlo.dot_general" in line]


def takes_float32(dot: str) -> bool:
    """Whether a dot_general line multiplies a float32 operand (either side)."""
    return "xf32>, tensor" in dot or "f32>) ->" in dot
