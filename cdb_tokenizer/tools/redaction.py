"""Keeping secrets and private paths out of what a run writes and what publishing uploads (training-side code).

- `redact_secrets` drops every secret-named key (`hub_token`, `*_token`, `*secret*`, `*password*`, `*api_key*`, ...)
  at any depth of dicts and lists, and blanks Hugging Face tokens (`hf_...`) inside any string. It is applied to
  `training_config.json` and to the trackers' configuration (TensorBoard hparams, W&B config).
- `scrub_local_paths` cuts every local path to its last part: a value that is one (POSIX, `~/`, `./` and `../`,
  `file://`, Windows `C:\\` or `C:/`, UNC `\\\\server\\share`, with spaces, after a `kind:` prefix such as
  `text:/home/me/labels.txt`, nested in lists and dicts), and absolute, `~/`, Windows and UNC paths inside free text
  (relative ones there cannot be told from prose, except under keys that name files: `PATH_KEYS`).
- `hide_secret_arguments` blanks `--hub_token`'s value in `sys.argv` once it is parsed (W&B uploads the command line).
"""

from __future__ import annotations

import re
from typing import Any


REDACTED = "[redacted]"
# A Hugging Face user access token, wherever it appears in a string.
HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{16,}")
# Parts of key names that mark a secret; matched case-insensitively anywhere in the key.
SECRET_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey", "credential", "private_key",
                "authorization", "cookie")  # fmt: skip
# Keys that name image tokens, not secrets, whatever they hold (a prior's training_config.json lost `tokens_dir` and
# `tokenizer`). Named one by one: a rule on the word "token" let `github_tokens` or `accessTokenValue` through.
TOKEN_DATA_KEYS = frozenset({"tokens_dir", "tokenizer", "tokenize_batch_size", "image_tokens", "num_image_tokens"})


def is_secret_key(key: Any, value: Any) -> bool:
    """A key that names a secret, holding something that can be one.

    Numbers and booleans under such keys are hyperparameters, not secrets (`token_alignment_weight: 0.5`), so they
    stay; any string, list or mapping under a secret-named key goes.
    """
    name = str(key).lower().replace("-", "_")
    if name in TOKEN_DATA_KEYS or not any(word in name for word in SECRET_WORDS):
        return False
    return value is not None and not isinstance(value, (bool, int, float))


def blank_tokens(value: Any) -> Any:
    """`value` with `hf_...` tokens blanked inside every string, at any depth; every key kept."""
    if isinstance(value, dict):
        return {key: blank_tokens(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [blank_tokens(item) for item in value]
    return HF_TOKEN.sub(REDACTED, value) if isinstance(value, str) else value


# Mappings whose keys are names the user chose, not settings: a code role named `text_tokens` is data, and dropping
# it would record another model than the one trained.
NAMED_DATA_KEYS = frozenset({"code_roles"})


def redact_secrets(value: Any) -> Any:
    """`value` without secret-named keys or bare `hf_...` token values (at any depth), and with `hf_...` tokens
    blanked inside every other string (only those inside `NAMED_DATA_KEYS` mappings, whose keys are names)."""
    if isinstance(value, dict):
        return {
            key: blank_tokens(item) if key in NAMED_DATA_KEYS else redact_secrets(item) for key, item in value.items()
            if not is_secret_key(key, item) and not (isinstance(item, str) and HF_TOKEN.fullmatch(item.strip()))
        }  # fmt: skip
    if isinstance(value, (list, tuple)):
        return [redact_secrets(item) for item in value]
    if isinstance(value, str):
        return HF_TOKEN.sub(REDACTED, value)
    return value


# A whole value that is a local path: POSIX absolute, home-relative, relative from `.` or `..`, a `file://` URL,
# Windows drive (either slash) or UNC; optionally after a short "kind:" prefix (--prototypes text:/home/me/labels.txt).
# Spaces are allowed inside.
_WHOLE_PATH = re.compile(
    r"^(?P<prefix>[A-Za-z][\w-]{1,15}:)?(?P<path>(?:file://)?~?/(?!/).+|\.{1,2}[\\/].+|[A-Za-z]:[\\/].*|\\\\[^\\]+\\.*)$",
    re.DOTALL,
)
# A path inside free text (no spaces, as they end it): /a/b, ~/a, C:\a\b, C:/a/b, \\server\share\a.
_EMBEDDED_PATH = re.compile(
    r"(?<![\w/.:\\])(?:~?/(?!/)(?:[^\s/,;'\"]+/)+|[A-Za-z]:[\\/](?:[^\s\\/,;'\"]+[\\/])*|\\\\(?:[^\s\\,;'\"]+\\)+)"
    r"(?P<last>[^\s/\\,;'\"]*)"
)


# Keys whose values name local files or folders (or something else with no path part: an open_clip tag, `kmeans:64`):
# there a relative path (`clients/acme/photos`) is cut too, which in free text cannot be told from prose. Hub ids
# (`hf-hub:org/name`) and URLs stay.
PATH_KEYS = frozenset(
    {"config", "model_config", "train_data_dir", "clip_model", "clip_pretrained", "prototypes", "fid_weights",
     "output_dir", "logging_dir", "cache_dir", "resume_from_checkpoint",
     "source"}  # fmt: skip  (`source`: where a prototypes file's labels came from, in its safetensors metadata)
)
_RELATIVE_PATH = re.compile(r"^(?P<prefix>[A-Za-z][\w-]{1,15}:)?(?P<path>[^:]*[\\/][^:]*)$", re.DOTALL)


def cut_path_value(value: str) -> str:
    """A value of a `PATH_KEYS` key as it may leave the machine: any local path in it, relative ones too, cut to its
    last part (a `kind:` prefix kept); Hub ids (`hf-hub:org/name`) and URLs as they are."""
    relative = _RELATIVE_PATH.match(value.strip())
    if relative is None or relative.group("prefix") == "hf-hub:" or "://" in value:
        return scrub_local_paths(value)
    return (relative.group("prefix") or "") + _last_part(relative.group("path"))


def _last_part(path: str) -> str:
    parts = [part for part in re.split(r"[\\/]+", path.strip()) if part and part != "~"]
    return parts[-1] if parts else ""


def scrub_local_paths(value: Any) -> Any:
    """`value` with every local path cut to its last part (`/home/me/My Photos/cats` -> `cats`), at any depth."""
    if isinstance(value, dict):
        return {
            key: cut_path_value(item) if key in PATH_KEYS and isinstance(item, str) else scrub_local_paths(item)
            for key, item in value.items()
        }  # fmt: skip
    if isinstance(value, (list, tuple)):
        return [scrub_local_paths(item) for item in value]
    if isinstance(value, str):
        whole = _WHOLE_PATH.match(value.strip())
        if whole and ("://" not in value or whole.group("path").startswith("file://")):
            return (whole.group("prefix") or "") + _last_part(whole.group("path"))
        return _EMBEDDED_PATH.sub(lambda match: match.group("last"), value)
    return value


def public_value(value: Any) -> Any:
    """`value` as it may leave the machine (a tracker, the Hub): `redact_secrets`, then `scrub_local_paths`."""
    return scrub_local_paths(redact_secrets(value))


def collect_strings(value: Any) -> list[str]:
    """Every string in a nested value (keys excluded)."""
    if isinstance(value, dict):
        return [text for item in value.values() for text in collect_strings(item)]
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in collect_strings(item)]
    return [value] if isinstance(value, str) else []


def hide_secret_arguments(argv: list[str], options: tuple[str, ...] = ("--hub_token",), shortest: int = 7) -> None:
    """Blank the values of secret options in `argv` (sys.argv) once parsed: trackers and crash reports copy it.
    argparse takes an option by any unambiguous prefix (`--hub_tok`), so prefixes of at least `shortest`
    characters count too."""
    for index, argument in enumerate(argv):
        name, equals, _ = argument.partition("=")
        if not any(len(name) >= shortest and option.startswith(name) for option in options):
            continue
        if equals:
            argv[index] = f"{name}={REDACTED}"
        elif index + 1 < len(argv):
            argv[index + 1] = REDACTED


__all__ = ["HF_TOKEN", "REDACTED", "blank_tokens", "collect_strings", "cut_path_value", "hide_secret_arguments", "is_secret_key", "public_value", "redact_secrets", "scrub_local_paths"]
