"""The tools' command lines: absl flags in a fresh ``FlagValues`` per call, user errors without a
traceback.

    def define_flags(fv): flags.DEFINE_string("workdir", None, "...", flag_values=fv)

    def main(argv):  # argv without the program name
        fv, args = cli.parse(define_flags, argv, "python -m dks_jax.tools.x", __doc__)
        ...

    if __name__ == "__main__":
        cli.run(main)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags

from dks_jax import errors


class UsageError(errors.UserError):
    """A command line that cannot work: a missing or malformed flag."""


def parse(define: Callable[[flags.FlagValues], None], argv: Sequence[str], prog: str,
          doc: str | None = None) -> tuple[flags.FlagValues, list[str]]:
    """``(flag values, positional arguments)`` of ``argv`` (without the program name).

    ``--help`` prints ``doc`` and the flags, then exits 0. An unknown or malformed flag is a
    :class:`UsageError`.
    """
    fv = flags.FlagValues()
    define(fv)
    argv = list(argv)
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
        print(f"{doc or ''}\nusage: {prog} [flags]\n\n{fv.get_help()}")
        sys.exit(0)
    try:
        rest = fv([prog, *argv])
    except flags.Error as e:
        raise UsageError(f"{prog}: {e} (--help lists the flags)") from e
    return fv, rest[1:]


def run(main: Callable[[list[str]], int | None]) -> None:
    """Runs ``main(sys.argv[1:])`` and exits with its status; a user error is printed without a
    traceback and exits 2 (``--traceback`` shows it)."""
    argv = sys.argv[1:]
    show = "--traceback" in argv
    argv = [a for a in argv if a != "--traceback"]
    try:
        status = main(argv)
    except errors.UserError as e:
        if show:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(status or 0)
