"""Value checks shared by the config validators (wetok.config, wetok.quantize, wetok.data)."""


def is_int_at_least(value, least: int) -> bool:
    """An int (a bool is not one, though Python says so) that is >= least."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least
