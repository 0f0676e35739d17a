"""Settings: one typed object read once at start from CLI > environment > YAML file > defaults."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError

from model_runtime.config import EngineConfig, EngineOptions

ENV_PREFIX = "INTERNVL_"
# Environment names kept short and singular where users expect them (INTERNVL_API_KEY=a,b).
ENV_ALIASES: dict[str, str] = {"api_keys": "INTERNVL_API_KEY"}
CONFIG_ENV = "INTERNVL_CONFIG"
MiB = 1024 * 1024

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


class SettingsError(ValueError):
    """The configuration is invalid; the message names the setting and where it came from."""


class Settings(EngineOptions):
    """Every server option; field names are the YAML keys, `--kebab-case` flags and INTERNVL_* names.

    The engine's options come from EngineOptions (model_runtime/config.py) and are forwarded whole.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    # Serving.
    model: str | None = None
    """checkpoint directory, hub id, or 'demo' (a tiny random model; its answers are noise)"""
    served_model_name: list[str] = Field(default_factory=list)
    """names clients may send as 'model'; empty = the engine's default name"""
    host: str = "127.0.0.1"
    """bind address; 0.0.0.0 to listen on every interface (e.g. in a container)"""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port"""
    log_level: LogLevel = "info"
    """critical, error, warning, info, debug or trace"""
    drain_timeout_s: float = Field(30.0, ge=0)
    """on SIGTERM, how long in-flight requests may take to finish before they are cut (with an error
    event, or a 500) and the process exits; new requests get 503 meanwhile"""
    header_timeout_s: float = Field(10.0, gt=0)
    """a connection must send a request's headers within this many seconds (of connecting, or of its
    previous response), or it is closed"""
    body_timeout_s: float = Field(60.0, gt=0)
    """a request's body must arrive within this many seconds of its headers (408 after)"""
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    """an idle keep-alive connection is closed after this many seconds"""
    max_connections: int = Field(1000, ge=1)
    """open connections; one over the limit is closed at once (lowered to fit the process's file limit)"""
    max_event_loop_lag_s: float = Field(2.0, gt=0)
    """/health answers 503 "lagging" while the event loop has woken this much late within 10 s"""
    stream_send_timeout_s: float = Field(60.0, gt=0)
    """a streaming client that reads nothing for this long is disconnected and its request aborted
    (its generation pauses long before: a few dozen tokens ahead of the client)"""

    # Security.
    api_keys: list[str] = Field(default_factory=list, repr=False)
    """Bearer keys accepted on every route but /health (and /metrics); empty = no authentication"""
    cache_isolation: Literal["shared", "api_key"] = "shared"
    """'api_key': the vision and prefix caches are keyed by the request's API key, so one key's
    clients cannot time what another's have sent; 'shared': one cache for all"""
    metrics_require_auth: bool = False
    """also require an API key on /metrics"""
    metrics_names: Literal["internvl", "vllm"] = "internvl"
    """'vllm': /metrics exports vLLM's families under vLLM's exact names and labels (vllm:*,
    finished_reason, engine), so dashboards and alerts built for vLLM work unchanged"""
    cors_allow_origins: list[str] = Field(default_factory=list)
    """origins allowed by CORS; empty = CORS off"""

    # Media fetching.
    allowed_local_media_path: str | None = None
    """directory from which file:// URLs and absolute paths may be read; None = local files off"""
    allowed_media_domains: list[str] | None = None
    """hosts media may be fetched from ('*.example.org' for subdomains); None = any public host"""
    media_allow_private_networks: bool = False
    """UNSAFE: let media URLs reach loopback, private and link-local addresses (tests, closed networks)"""
    media_connect_timeout_s: float = Field(5.0, gt=0)
    """connect timeout of one media fetch"""
    media_read_timeout_s: float = Field(10.0, gt=0)
    """longest wait for the next bytes of a media fetch"""
    media_fetch_timeout_s: float = Field(30.0, gt=0)
    """total deadline of one media fetch, redirects included"""
    media_max_redirects: int = Field(3, ge=0)
    """redirects followed per media URL (each hop re-checked)"""
    max_image_bytes: int = Field(20 * MiB, ge=1)
    """largest image accepted, in bytes (413 above)"""
    max_video_bytes: int = Field(200 * MiB, ge=1)
    """largest video accepted, in bytes (413 above)"""
    max_body_bytes: int = Field(64 * MiB, ge=1)
    """largest request body, in bytes (413 above); bounds data: URIs too"""
    max_images_per_request: int = Field(16, ge=0)
    """images per request (400 above)"""
    max_videos_per_request: int = Field(2, ge=0)
    """videos per request (400 above)"""
    max_messages: int = Field(2048, ge=1)
    """messages per request (400 above)"""
    max_content_parts: int = Field(4096, ge=1)
    """content parts per request, all messages together (400 above)"""
    max_stop_token_ids: int = Field(64, ge=0)
    """stop_token_ids per request (400 above)"""
    max_text_bytes: int = Field(4 * MiB, ge=1)
    """UTF-8 bytes of message text per request, all messages together (400 above)"""
    max_tools: int = Field(128, ge=0)
    """function tools per request (400 above)"""

    # Generation limits.
    max_n: int = Field(8, ge=1)
    """largest 'n' accepted"""
    max_tokens_ceiling: int | None = Field(None, ge=1)
    """largest max_tokens / max_completion_tokens accepted; None = max_model_len"""
    default_max_tokens: int | None = Field(None, ge=1)
    """max_tokens of requests that set none; None = up to the end of the context"""

    # The Responses API's store (store: true, previous_response_id), in memory, per process.
    responses_store_max: int = Field(1000, ge=0)
    """stored responses kept for GET and previous_response_id (oldest dropped first); 0 = store off"""
    responses_store_max_bytes: int = Field(256 * MiB, ge=0)
    """bytes the stored responses may hold, their inputs (images included) counted"""
    responses_store_ttl_s: float = Field(3600.0, gt=0)
    """seconds a stored response is kept"""

    def to_engine_config(self, model_path: str | None = None) -> EngineConfig:
        """The engine's settings; `model_path` replaces `model` once 'demo' or a hub id is resolved."""
        model = model_path or self.model
        if not model:
            raise SettingsError(
                "model: no model given (use --model, INTERNVL_MODEL or 'model:' in the YAML file)"
            )
        return EngineConfig(model=model, **self.model_dump(include=set(EngineOptions.model_fields)))

    @classmethod
    def load(
        cls,
        cli: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        config_file: str | Path | None = None,
    ) -> Settings:
        """Merge the sources, highest first: `cli` values, INTERNVL_* variables, the YAML file."""
        cli = dict(cli or {})
        environ = environ or {}
        path = config_file or cli.pop("config", None) or environ.get(CONFIG_ENV)
        cli.pop("config", None)
        layers: list[tuple[str, dict[str, Any]]] = [("defaults", {})]
        if path:
            layers.append((f"config file {path}", _read_yaml(Path(path))))
        layers.append(("environment", _from_env(environ)))
        layers.append(("command line", {k: _coerce(k, v) for k, v in cli.items()}))
        merged: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for source, values in layers:
            merged.update(values)
            origin.update(dict.fromkeys(values, source))
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = str(err["loc"][0]) if err["loc"] else "?"
            raise SettingsError(f"{key} (from {origin.get(key, 'defaults')}): {err['msg']}") from None


def option_order() -> list[str]:
    """Setting names as --help lists them: the server's own first (serving, security, media,
    limits), then the engine's."""
    own = [name for name in Settings.model_fields if name not in EngineOptions.model_fields]
    return own + list(EngineOptions.model_fields)


def field_kind(name: str) -> str:
    """'list', 'bool' or 'scalar': how a string from the CLI or environment is turned into a value."""
    annotation = Settings.model_fields[name].annotation
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for arg in args:
        if typing.get_origin(arg) is list:
            return "list"
        if arg is bool:
            return "bool"
    return "scalar"


def is_optional(name: str) -> bool:
    annotation = Settings.model_fields[name].annotation
    # `Literal[...] | None` is a typing.Union, not a types.UnionType.
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


def _coerce(name: str, raw: Any) -> Any:
    """Strings (and argparse lists of strings) into the shape pydantic validates; typed values pass."""
    if name not in Settings.model_fields:
        return raw  # pydantic's extra="forbid" reports it by name
    kind = field_kind(name)
    if kind == "list":
        items = raw if isinstance(raw, list | tuple) else [raw]
        if all(isinstance(item, str) for item in items):
            if is_optional(name) and [i.strip().lower() for i in items] in ([""], ["none"], ["null"]):
                return None
            return [part.strip() for item in items for part in item.split(",") if part.strip()]
        return raw
    if isinstance(raw, str) and is_optional(name) and raw.strip().lower() in ("", "none", "null"):
        return None
    return raw


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        for var in (ENV_PREFIX + name.upper(), ENV_ALIASES.get(name)):
            if var and var in environ:
                values[name] = _coerce(name, environ[var])
    return values


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"config file {path}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: expected a mapping of setting names to values")
    return {str(k): _coerce(str(k), v) for k, v in data.items()}
