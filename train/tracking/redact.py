"""Secret redaction for everything the run writes about its own config.

RUN_DIR/config.yaml, the W&B config and the recorded command line all pass through here.
A value is hidden when its key looks secret (`hf_token`, `api_key`, `db_password`, ...) or
when it contains the value of a secret-looking environment variable (`WANDB_API_KEY`,
`HF_TOKEN`, `*_TOKEN`, `*_KEY`, `*_SECRET`, `*PASSWORD*`), e.g. one that Hydra resolved
through `${oc.env:HF_TOKEN}`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***REDACTED***"

# The key's last word decides: `hf_token` and `apiKey` are secret, `num_key_value_heads` and
# `max_tokens` are not.
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "pwd", "credential",
                 "credentials", "auth", "passphrase"}
# Tokenizer special tokens are vocabulary, not credentials.
_NOT_SECRET = re.compile(r"^(bos|eos|pad|unk|sep|cls|mask|additional_special|special)_tokens?$")
_MIN_ENV_SECRET = 6  # shorter env values ("1", "true") would redact innocent config values


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_key(name: Any) -> bool:
    """True for keys such as `hf_token`, `WANDB_API_KEY`, `db-password`, `apiKey`, `secret`."""
    if not isinstance(name, str):
        return False
    words = _words(name)
    if not words or _NOT_SECRET.match("_".join(words)):
        return False
    return words[-1] in _SECRET_WORDS or any("password" in w for w in words)


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables, longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if is_secret_key(k) and len(v) >= _MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every occurrence of a secret environment value replaced."""
    for s in env_secrets() if secrets is None else secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


def redact(config: Any, *, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of `config` (nested dicts/lists) with secret values replaced by REDACTED.

    Keys and structure are kept, so the redacted config still shows which settings were set;
    None stays None (nothing to hide).
    """
    return _redact(config, env_secrets(environ))


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_key(k) and v is not None else _redact(v, secrets))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v, secrets) for v in value]
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value


def redact_argv(argv: list[str], *, environ: Mapping[str, str] | None = None) -> list[str]:
    """Command-line arguments with secret overrides (`+x.hf_token=...`, `--api-key=...`) hidden."""
    secrets = env_secrets(environ)
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        key, eq, _ = arg.partition("=")
        if eq and is_secret_key(key.lstrip("+~-").split(".")[-1]):
            out.append(f"{key}={REDACTED}")
            continue
        if arg.startswith("-") and not eq and is_secret_key(arg.lstrip("-")):
            hide_next = True
        out.append(redact_text(arg, secrets))
    return out
