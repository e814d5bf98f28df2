"""fsspec storage options of a store URL: an allowlist of non-secret options, checked in depth.

Options are logged, kept in Prefect's run history (flow-run parameters) and saved in
checkpoints, so they must never carry credentials; those come from the environment
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE for s3fs, GOOGLE_APPLICATION_CREDENTIALS
for gcsfs, AZURE_STORAGE_KEY for adlfs). A filter on names alone lets `{"headers":
{"Authorization": "Bearer ..."}}` or `"endpoint_url": "https://user:pass@host"` through, so
only the options below are accepted, and every string value is checked too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from cli.errors import UserError

_NUMBER = (int, float)

ALLOWED_OPTIONS: dict[str, Any] = {
    # s3fs (AWS S3, MinIO, Ceph)
    "endpoint_url": str,
    "anon": bool,
    "use_ssl": bool,
    "requester_pays": bool,
    "version_aware": bool,
    "profile": str,  # the name of an AWS profile, whose secrets stay in ~/.aws
    "default_block_size": int,
    "default_fill_cache": bool,
    "default_cache_type": str,
    "cache_regions": bool,
    "max_concurrency": int,
    "fixed_upload_size": bool,
    "client_kwargs": {"region_name": str, "endpoint_url": str, "verify": (bool, str),
                      "use_ssl": bool, "api_version": str},
    "config_kwargs": {"connect_timeout": _NUMBER, "read_timeout": _NUMBER,
                      "max_pool_connections": int, "region_name": str, "signature_version": str,
                      "retries": {"max_attempts": int, "total_max_attempts": int, "mode": str},
                      "s3": {"addressing_style": str, "use_accelerate_endpoint": bool,
                             "payload_signing_enabled": bool},
                      "request_checksum_calculation": str, "response_checksum_validation": str,
                      "tcp_keepalive": bool, "user_agent_extra": str},
    "s3_additional_kwargs": {"ServerSideEncryption": str, "SSEKMSKeyId": str, "ACL": str,
                             "StorageClass": str, "RequestPayer": str},
    # gcsfs
    "project": str,
    "access": str,
    "consistency": str,
    "default_location": str,
    # adlfs (Azure): the account's name only, its key comes from the environment
    "account_name": str,
    # fsspec's local file system (file:// URLs)
    "auto_mkdir": bool,
    # fsspec's listings cache, any protocol
    "use_listings_cache": bool,
    "listings_expiry_time": _NUMBER,
    "max_paths": int,
    "skip_instance_cache": bool,
}
"""Option name -> the type of its value, or a dict: the options allowed inside it."""

_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "auth",
                 "connection_string", "sas", "header", "cookie", "session")
"""Parts of option names that say the option is, or may carry, a credential."""

_SECRET_VALUES = (
    (re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#\s]*@", re.IGNORECASE),
     "a user name or password in a URL"),
    (re.compile(r"^\s*(bearer|basic|token|digest|aws4-hmac-sha256)\s", re.IGNORECASE),
     "an Authorization header value"),
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
)
"""What a credential looks like inside a value, and how the error names it."""

_FROM_ENVIRONMENT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
                     "environment of every process that opens the store")


def check_storage_options(storage_options: dict[str, Any] | None) -> None:
    """Raise a one-line UserError unless every option (at any depth) is allowlisted, of its
    type, and no string value holds a credential. The message names the option, never its
    value: the value may be a secret, and messages are logged."""
    if not storage_options:
        return
    if not isinstance(storage_options, dict):
        raise UserError("storage options must be a JSON object, such as "
                        '{"endpoint_url": "http://minio:9000"}')
    secret_names, unknown, wrong_type, secret_values = [], [], [], []
    for dotted, value, allowed in _walk(storage_options, ALLOWED_OPTIONS):
        name = dotted.rsplit(".", 1)[-1].lower()
        if allowed is None:
            (secret_names if any(w in name for w in _SECRET_WORDS) else unknown).append(dotted)
        elif isinstance(allowed, dict) and not isinstance(value, dict):
            wrong_type.append(f"{dotted} (an object)")
        elif not isinstance(allowed, dict) and not _of_type(value, allowed):
            wrong_type.append(f"{dotted} ({_type_name(allowed)})")
        what = _secret_in(value)
        if what and allowed is not None:
            secret_values.append(f"{dotted} holds {what}")
    if secret_names:
        raise UserError(f"storage options {', '.join(secret_names)} look like credentials, which "
                        "must not be passed as options (they would be logged): "
                        f"{_FROM_ENVIRONMENT}")
    if secret_values:
        raise UserError(f"storage option {'; '.join(secret_values)}, which must not be passed as "
                        f"an option (it would be logged): {_FROM_ENVIRONMENT}")
    if unknown:
        hint = (" (the region goes in client_kwargs.region_name)"
                if any(u.endswith("region_name") for u in unknown) else "")
        raise UserError(f"storage options {', '.join(unknown)} are not among the non-secret fsspec "
                        f"options this project passes on{hint}: use {', '.join(ALLOWED_OPTIONS)}")
    if wrong_type:
        raise UserError(f"storage options of the wrong type: {', '.join(wrong_type)} expected")


def _walk(options: dict[str, Any], allowed: dict[str, Any], prefix: str = ""):
    """(dotted name, value, what is allowed there or None) of every entry, depth first; the
    entries of an unknown object are walked too, so a secret deep inside one is named."""
    for name, value in options.items():
        dotted = f"{prefix}{name}"
        rule = allowed.get(name) if isinstance(allowed, dict) else None
        yield dotted, value, rule
        if isinstance(value, dict):
            yield from _walk(value, rule if isinstance(rule, dict) else {}, dotted + ".")
        elif isinstance(value, list):
            yield from _walk({str(i): item for i, item in enumerate(value)}, {}, dotted + ".")


def _secret_in(value: Any) -> str:
    """What kind of credential a string value holds, or ""."""
    if not isinstance(value, str):
        return ""
    return next((what for pattern, what in _SECRET_VALUES if pattern.search(value)), "")


def _of_type(value: Any, kind: Any) -> bool:
    if value is None:
        return True
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # JSON true is not a number
    return isinstance(value, kinds)


def _type_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({bool: "true/false", int: "an integer", float: "a number",
                        str: "a string"}[k] for k in kinds)


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """A --storage-options value: a JSON object of allowed options, or None when not given."""
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"--storage-options is not JSON ({error}): pass an object such as "
                        '\'{"endpoint_url": "http://minio:9000"}\'') from None
    if not isinstance(options, dict):
        raise UserError("--storage-options must be a JSON object, such as "
                        '\'{"endpoint_url": "http://minio:9000"}\'')
    check_storage_options(options)
    return options
