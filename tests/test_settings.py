"""Settings: one tree from file, environment and flags; every setting is
documented in config/pdg.example.toml with its real default."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from config.settings import ENVIRONMENT, ConfigurationError, Settings, load_settings

EXAMPLE = Path(__file__).parents[1] / "config" / "pdg.example.toml"


def _leaves(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.update(_leaves(annotation, f"{prefix}{name}."))
        elif field.default_factory is dict:
            out[f"{prefix}{name}"] = {}  # a table of named entries, none by default
        elif _entries(annotation) is not None:
            out[f"{prefix}{name}"] = []  # an array of tables, none by default
        else:
            out[f"{prefix}{name}"] = field.default
    return out


def _entries(annotation: Any) -> type[BaseModel] | None:
    """The model of ``tuple[Model, ...]`` (an array of TOML tables)."""
    args = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) is tuple and args and isinstance(args[0], type):
        return args[0] if issubclass(args[0], BaseModel) else None
    return None


def _field(model: type[BaseModel], dotted: str) -> Any:
    head, _, rest = dotted.partition(".")
    field = model.model_fields[head]
    return _field(field.annotation, rest) if rest else field  # type: ignore[arg-type]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_example_file_documents_every_setting_with_its_default() -> None:
    documented = _flatten(tomllib.loads(EXAMPLE.read_text()))
    leaves = _leaves(Settings)
    tables = {name for name, default in leaves.items() if default == {}}
    arrays = {name for name, default in leaves.items() if default == []}
    assert set(documented) == set(leaves) - tables - arrays
    for name in tables:
        # Shown as a commented example table: [section.name.<entry>].
        assert f"# [{name}." in EXAMPLE.read_text(), f"{name} is not documented"
    for name in arrays:
        # Shown as a commented example entry, every field of it.
        assert f"# [[{name}]]" in EXAMPLE.read_text(), f"{name} is not documented"
        model = _entries(_field(Settings, name).annotation)
        assert model is not None
        for member in model.model_fields:
            assert f"# {member} = " in EXAMPLE.read_text(), f"{name}.{member} is not documented"
    for name, default in leaves.items():
        if name in tables or name in arrays:
            continue
        value = documented[name]
        if isinstance(default, tuple):
            default = list(default)
        if isinstance(default, Path):
            default = str(default)
        assert value == default, name
    text = EXAMPLE.read_text()
    for variable in ENVIRONMENT:
        assert variable in text or variable == "PDG_CONFIG", f"{variable} is not documented"


def test_sources_in_order_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "pdg.toml"
    config.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[proxy]\nmax_body_bytes = 5\n')
    env = {"PDG_PORT": "9100", "PDG_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1"}
    settings = load_settings(config, env=env, overrides={"server.port": 9200, "server.host": None})
    assert settings.server.port == 9200
    assert settings.server.host == "0.0.0.0"  # noqa: S104 - the value from the file
    assert settings.proxy.max_body_bytes == 5
    assert settings.server.trusted_proxies == ("10.0.0.0/8", "127.0.0.1")
    assert load_settings(config, env=env).server.port == 9100
    # PDG_CONFIG names the file when --config does not.
    assert load_settings(env={"PDG_CONFIG": str(config)}).server.port == 9000


def test_derived_values() -> None:
    everywhere = "0.0.0.0"  # noqa: S104 - only a value under test
    settings = load_settings(env={"PDG_DATA_DIR": "/srv/pdg", "PDG_HOST": everywhere, "PDG_PORT": "9000"})
    assert settings.database_url == "sqlite+aiosqlite:////srv/pdg/pdg.sqlite3"
    assert settings.embedded_redis
    assert settings.public_url == "http://127.0.0.1:9000"
    assert settings.audience == "http://127.0.0.1:9000/data"
    assert settings.signing_key_path == Path("/srv/pdg/keys/signing-key.pem")
    public = load_settings(
        env={"PDG_PUBLIC_URL": "https://data.example.gov.cn/", "PDG_REDIS_URL": "redis://r"}
    )
    assert public.issuer == "https://data.example.gov.cn"
    assert not public.embedded_redis


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("[server]\nport = 'many'\n", {}, "invalid setting server.port"),
        ("[server]\nport = 70000\n", {}, "invalid setting server.port"),
        ("[server\n", {}, "cannot read config file"),
        ("[nonsense]\nx = 1\n", {}, "invalid setting nonsense"),
        ("", {"PDG_WORKERS": "0"}, "invalid setting server.workers"),
        ("", {"PDG_TOKEN_ALGORITHM": "HS256"}, "invalid setting tokens.algorithm"),
        ("data_dir = 3\nserver = 1\n", {}, "invalid setting"),
    ],
)
def test_bad_settings_are_one_clear_line(
    tmp_path: Path, content: str, env: dict[str, str], message: str
) -> None:
    config = tmp_path / "pdg.toml"
    config.write_text(content)
    with pytest.raises(ConfigurationError) as caught:
        load_settings(config, env=env)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="config file not found"):
        load_settings(tmp_path / "absent.toml", env={})


def test_settings_are_frozen() -> None:
    settings = load_settings(env={})
    with pytest.raises(ValueError, match="frozen"):
        settings.server.port = 1  # type: ignore[misc]


def test_a_setting_can_come_from_a_file(tmp_path: Path) -> None:
    """``PDG_…_FILE``: a mounted secret, its trailing newline dropped."""
    secret = tmp_path / "db-url"
    secret.write_text("postgresql+asyncpg://pdg:s3cret@db:5432/pdg\n")
    settings = load_settings(env={"PDG_DATABASE_URL_FILE": str(secret)})
    assert settings.storage.database_url == "postgresql+asyncpg://pdg:s3cret@db:5432/pdg"
    with pytest.raises(ConfigurationError, match="not both"):
        load_settings(env={"PDG_DATABASE_URL_FILE": str(secret), "PDG_DATABASE_URL": "sqlite+aiosqlite://"})
    with pytest.raises(ConfigurationError, match="cannot read PDG_METRICS_TOKEN_FILE"):
        load_settings(env={"PDG_METRICS_TOKEN_FILE": str(tmp_path / "missing")})


def test_config_show_masks_every_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import os
    from unittest import mock

    from cli.main import main

    token = tmp_path / "metrics-token"
    token.write_text("m3tr1cs-t0ken")
    env = {
        "PDG_DATABASE_URL": "postgresql+asyncpg://pdg:db-pa55@db:5432/pdg",
        "PDG_REDIS_URL": "redis://:r3dis-pa55@cache:6379/0",
        "PDG_KEY_PASSPHRASE": "k3y-pa55phrase",
        "PDG_METRICS_TOKEN_FILE": str(token),
        "PDG_PORT": "9000",
    }
    with mock.patch.dict(os.environ, env):
        assert main(["config", "show", "--json"]) == 0
    out = capsys.readouterr().out
    for secret in ("db-pa55", "r3dis-pa55", "k3y-pa55phrase", "m3tr1cs-t0ken"):
        assert secret not in out
    shown = json.loads(out)
    assert shown["server"]["port"] == 9000
    assert shown["storage"]["database_url"] == "postgresql+asyncpg://pdg:***@db:5432/pdg"
    assert shown["storage"]["redis_url"] == "redis://:***@cache:6379/0"
    assert shown["tokens"]["key_passphrase"] == "***"
    assert shown["server"]["metrics_token"] == "***"


def test_an_unknown_variable_is_refused_naming_the_setting_meant() -> None:
    for wrong, meant in (
        ("PDG_DATABSE_URL", "PDG_DATABASE_URL"),
        ("PDG_WORKER", "PDG_WORKERS"),
        ("PDG_REDISURL", "PDG_REDIS_URL"),
        ("PDG_METRICS_TOKEN_FIEL", "PDG_METRICS_TOKEN_FILE"),
    ):
        with pytest.raises(ConfigurationError, match=f"unknown variable {wrong}: did you mean {meant}"):
            load_settings(env={wrong: "x"})
    # A name like none is refused too.
    with pytest.raises(ConfigurationError, match="PDG_SOMETHING_ELSE: no setting has that name"):
        load_settings(env={"PDG_SOMETHING_ELSE": "1"})
    # The names of the tools around pdg pass.
    settings = load_settings(env={"PDG_TEST_DATABASE_URL": "x", "PDG_BIN": "pdg"})
    assert settings.server.port == 8080
