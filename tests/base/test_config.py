"""gateway.toml validation: one clear error naming the file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.base.config import ConfigError, load_config, parse_config
from gateway.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_default_config_is_valid():
    config = load_config(ROOT / "gateway.toml")
    assert config.models["minilm"].backend == "torch"
    assert Path(config.models["minilm"].path, "tokenizer.json").exists()  # pkg: path resolved


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[server]\nprot = 1\n", "unknown field `prot` - at `$.server`"),
        ("[server]\nport = 'eighty'\n", "Expected `int`, got `str` - at `$.server.port`"),
        ("[server]\nport = 70000\n", "Expected `int` <= 65535 - at `$.server.port`"),
        ("[models.m]\nbackend = 'torch'\npath = '.'\nalias = ['x']\n", "unknown field `alias` - at `$.models.m`"),
        ("[models.m]\nbackend = 'torch'\npath = '.'\nmax_input_tokens = 0\n", "`$.models.m.max_input_tokens`"),
        ("[models.m]\nbackend = 'torch'\npath = '.'\nmatryoshka_dimensions = [0]\n", "matryoshka_dimensions"),
        (
            "[models.m]\nbackend = 'torch'\npath = '.'\n[models.m.batching]\nmax_batch = 3\n",
            "unknown field `max_batch` - at `$.models.m.batching`",
        ),
        (
            "[models.a]\nbackend = 'torch'\npath = '.'\naliases = ['b']\n[models.b]\nbackend = 'torch'\npath = '.'\n",
            "name 'b' at `$.models.b` is already used by model 'a'",
        ),
        ("[models.m]\nbackend = 'torch'\npath = 'pkg:no_such_pkg_abc/model'\n", "'no_such_pkg_abc'"),
        ("not = [valid", "not valid TOML"),
    ],
)
def test_invalid_config(toml, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(toml, "gw.toml")
    assert str(info.value).startswith("gw.toml: ")
    assert needle in str(info.value)


def test_relative_paths_resolve_beside_the_config(tmp_path):
    cfg = tmp_path / "g.toml"
    cfg.write_text("[models.m]\nbackend = 'torch'\npath = 'models/m'\n")
    assert load_config(cfg).models["m"].path == str(tmp_path / "models" / "m")


def _check(tmp_path, body, capsys):
    cfg = tmp_path / "g.toml"
    cfg.write_text(body)
    rc = main(["check-config", str(cfg)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_check_config_reports_unknown_backend(tmp_path, capsys):
    rc, out = _check(tmp_path, "[models.m]\nbackend = 'tensorflow'\npath = '.'\n", capsys)
    assert rc == 2
    assert "`$.models.m.backend`: unknown backend 'tensorflow' (available: " in out and "torch" in out


def test_check_config_reports_missing_model_file(tmp_path, capsys):
    rc, out = _check(tmp_path, "[models.m]\nbackend = 'torch'\npath = 'nowhere'\n", capsys)
    assert rc == 2
    assert f"`$.models.m.path`: {tmp_path / 'nowhere'} does not exist" in out


def test_check_config_reports_bad_key(tmp_path, capsys):
    rc, out = _check(tmp_path, "[serverr]\n", capsys)
    assert rc == 2 and "unknown field `serverr` - at `$`" in out and "Traceback" not in out


def test_check_config_ok(capsys):
    rc = main(["check-config", str(ROOT / "gateway.toml")])
    assert rc == 0 and "OK" in capsys.readouterr().out


def test_missing_config_file(tmp_path, capsys):
    rc = main(["check-config", str(tmp_path / "nope.toml")])
    assert rc == 2 and "cannot read config" in capsys.readouterr().err
