"""A script that fails with a chained exception, to compare tracebacks with python's."""


def inner():
    raise KeyError("missing")


def outer():
    try:
        inner()
    except KeyError as exc:
        raise ValueError("boom from the script") from exc


print("before the error")
outer()
