"""Command-line overrides checked before Hydra sees them, for every CLI entry point.

Hydra reports an override it cannot parse with its lexer's words (`LexerNoViableAltException:
run.name=héllo` and a caret), which do not say what to do: an unquoted value with a space, a
non-ASCII letter or a special character must be quoted. `override_problem` names the override
and shows the quoted form.
"""
from __future__ import annotations

import sys


def override_problem(args: list[str]) -> str | None:
    """None when Hydra can parse every `key=value` argument; else the first bad one and the fix."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue  # Hydra's own flags (--multirun, --cfg job ...) and their values
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as e:
            key, _, value = arg.partition("=")
            reason = (str(e).strip().splitlines() or [""])[0]
            quoted = value.replace("\\", "\\\\").replace("'", "\\'")
            return (f"cannot parse the override {arg!r} ({reason}): quote the value as Hydra reads it, "
                    f"{key}='{quoted}' (in a shell: \"{key}='{quoted}'\")")
    return None


def exit_on_bad_override(prefix: str = "error: ", argv: list[str] | None = None) -> None:
    """Print the problem of a bad override and exit 2 (before Hydra prints its own)."""
    problem = override_problem(sys.argv[1:] if argv is None else argv)
    if problem:
        print(f"{prefix}{problem}", file=sys.stderr)
        sys.exit(2)
