"""Settings: CLI > environment > YAML file > defaults, and the engine's settings forwarded whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model_runtime.config import EngineConfig, EngineOptions
from server.cli import build_parser, parse_settings
from server.settings import Settings, SettingsError, option_order

REPO = Path(__file__).resolve().parents[1]


def write_yaml(tmp_path: Path, values: dict[str, object]) -> Path:
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_defaults() -> None:
    s = Settings()
    assert (s.host, s.port, s.api_keys, s.cors_allow_origins) == ("127.0.0.1", 8000, [], [])
    assert s.allowed_local_media_path is None and s.allowed_media_domains is None
    assert not s.media_allow_private_networks and not s.metrics_require_auth
    assert (s.max_images_per_request, s.max_videos_per_request, s.max_n, s.media_max_redirects) == (
        16,
        2,
        8,
        3,
    )
    assert (s.max_image_bytes, s.max_video_bytes, s.max_body_bytes) == (20 << 20, 200 << 20, 64 << 20)
    assert s.drain_timeout_s == 30


def test_precedence_cli_over_env_over_yaml_over_defaults(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, {"port": 1111, "host": "0.0.0.0", "max_n": 3, "model": "from-yaml"})
    env = {"INTERNVL_CONFIG": str(config), "INTERNVL_PORT": "2222", "INTERNVL_MODEL": "from-env"}
    s = parse_settings(["--model", "from-cli"], env)
    assert s.model == "from-cli"  # CLI beats env and file
    assert s.port == 2222  # env beats file
    assert (s.host, s.max_n) == ("0.0.0.0", 3)  # file beats defaults
    assert s.drain_timeout_s == 30  # defaults
    assert parse_settings(["--config", str(config)], {}).port == 1111


def test_env_lists_bools_and_none() -> None:
    env = {
        "INTERNVL_API_KEY": "k1, k2",
        "INTERNVL_SERVED_MODEL_NAME": "a,b",
        "INTERNVL_METRICS_REQUIRE_AUTH": "true",
        "INTERNVL_ALLOWED_MEDIA_DOMAINS": "none",
        "INTERNVL_MAX_TOKENS_CEILING": "",
        "INTERNVL_MEDIA_FETCH_TIMEOUT_S": "2.5",
        "UNRELATED": "x",
    }
    s = Settings.load(environ=env)
    assert s.api_keys == ["k1", "k2"] and s.served_model_name == ["a", "b"]
    assert s.metrics_require_auth is True
    assert s.allowed_media_domains is None and s.max_tokens_ceiling is None
    assert s.media_fetch_timeout_s == 2.5


def test_cli_lists_and_flags() -> None:
    s = parse_settings(
        ["--api-key", "a", "--api-key", "b,c", "--served-model-name", "x", "y", "--no-allow-pickle",
         "--media-allow-private-networks", "--allowed-media-domains", "img.example.org"],
        {"INTERNVL_ALLOW_PICKLE": "1"},
    )  # fmt: skip
    assert s.api_keys == ["a", "b", "c"] and s.served_model_name == ["x", "y"]
    assert s.allow_pickle is False and s.media_allow_private_networks is True
    assert s.allowed_media_domains == ["img.example.org"]


def test_every_setting_has_a_flag() -> None:
    flags = {a.dest for a in build_parser()._actions}
    assert set(Settings.model_fields) <= flags


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--port", "http"], {}, "port (from command line)"),
        ([], {"INTERNVL_MAX_N": "0"}, "max_n (from environment)"),
    ],
)
def test_invalid_values_name_setting_and_source(
    argv: list[str], env: dict[str, str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(argv, env)
    assert info.value.code == 2 and needle in capsys.readouterr().err


def test_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="max_imgs"):
        Settings.load(config_file=write_yaml(tmp_path, {"max_imgs": 3}))  # a typo is an error, not ignored
    with pytest.raises(SettingsError, match="mapping"):
        Settings.load(config_file=write_yaml(tmp_path, [1, 2]))  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="cannot be read"):
        Settings.load(config_file=tmp_path / "missing.yaml")


def test_engine_config_forwards_every_field() -> None:
    # One definition: Settings inherits the engine's options, defaults and docs included.
    assert issubclass(Settings, EngineOptions)
    assert set(EngineConfig.model_fields) == set(EngineOptions.model_fields) | {"model"}
    assert option_order()[: len(Settings.model_fields) - len(EngineOptions.model_fields)][0] == "model"
    assert sorted(option_order()) == sorted(Settings.model_fields)
    s = Settings(model="demo", max_num_seqs=3, kv_cache_memory_gib=1.5, allow_pickle=True)
    config = s.to_engine_config("/models/tiny")
    assert (config.model, config.max_num_seqs, config.kv_cache_memory_gib, config.allow_pickle) == (
        "/models/tiny", 3, 1.5, True,
    )  # fmt: skip
    with pytest.raises(SettingsError, match="model"):
        Settings().to_engine_config()


def test_shipped_yaml_documents_every_default() -> None:
    shipped = yaml.safe_load((REPO / "configs" / "server.yaml").read_text())
    assert set(shipped) == set(Settings.model_fields)
    assert Settings.load(config_file=REPO / "configs" / "server.yaml") == Settings()


def test_api_keys_not_in_repr() -> None:
    assert "sekrit" not in repr(Settings(api_keys=["sekrit"]))


def test_server_modules_do_not_import_torch() -> None:
    code = (
        "import sys, server.cli, server.app, server.chat, server.media, server.metrics; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
