"""Configuration loading: the shipped file, clear errors, overrides, model resolution."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvern.config import ConfigError, KvernConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_loads_and_is_valid() -> None:
    config = load_config(ROOT / "config.yaml", env={})
    assert config.proxy.port == 8080
    assert config.eviction.policy == "cost_aware"
    assert config.trie.block_size == 16


def test_shipped_commented_rules_are_valid_once_uncommented(tmp_path: Path) -> None:
    text = (ROOT / "config.yaml").read_text(encoding="utf-8")
    start = text.index("normalization: {}")
    end = text.index("analytics:")
    block = text[start:end].replace("normalization: {}", "normalization:")
    # Uncomment the YAML lines of the examples (quoted keys, nested keys, list items).
    block = re.sub(r"^  # (?=\"|\s)", "  ", block, flags=re.M)
    config = load_config(write(tmp_path, text[:start] + block + text[end:]), env={})
    rules = config.rules_for("llama3.2:3b")
    assert [r.replacement for r in rules] == ["<UUID>", "Today Date: <DATE>"]
    assert rules[1].scope == "prompt"


def test_missing_file_is_all_defaults() -> None:
    assert load_config(None, env={}) == KvernConfig()


def test_unknown_key_is_named_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "trie:\n  max_token: 5\n"), env={})
    assert "trie.max_token: unknown key" in str(err.value)


def test_bad_value_names_path_value_and_expectation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "trie:\n  block_size: 0\n"), env={})
    message = str(err.value)
    assert "trie.block_size: got 0; expected" in message
    assert "greater than or equal to 1" in message


def test_bad_regex_is_reported_at_load(tmp_path: Path) -> None:
    text = 'normalization:\n  "*":\n    - pattern: "([a-z"\n      replacement: X\n'
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env={})
    message = str(err.value)
    assert "normalization.*.0.pattern: got '([a-z'" in message
    assert "invalid regular expression" in message


def test_not_yaml_and_not_a_mapping_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "proxy: [unclosed\n"), env={})
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"), env={})


def test_ttl_policy_requires_ttl_s() -> None:
    with pytest.raises(ConfigError, match="needs ttl_s"):
        parse_config({"eviction": {"policy": "ttl"}})
    assert parse_config({"eviction": {"policy": "ttl", "ttl_s": 60}}).eviction.ttl_s == 60


def test_unknown_policy_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"eviction": {"policy": "lfru"}})
    assert "eviction.policy: got 'lfru'" in str(err.value)
    assert "'cost_aware'" in str(err.value)


def test_environment_overrides_upstream_host_and_port(tmp_path: Path) -> None:
    env = {
        "KVERN_UPSTREAM_URL": "http://10.1.2.3:8000/v1/",
        "KVERN_HOST": "0.0.0.0",
        "KVERN_PORT": "9999",
    }
    config = load_config(write(tmp_path, "proxy:\n  port: 1234\n"), env=env)
    assert config.upstream.base_url == "http://10.1.2.3:8000/v1"
    assert (config.proxy.host, config.proxy.port) == ("0.0.0.0", 9999)


def test_bad_environment_override_is_named() -> None:
    with pytest.raises(ConfigError, match="(?s)environment overrides.*proxy.port: got 'eighty'"):
        load_config(None, env={"KVERN_PORT": "eighty"})


def test_upstream_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match="upstream.base_url"):
        parse_config({"upstream": {"base_url": "localhost:11434"}})


def test_model_map_resolves_exact_before_globs_in_file_order() -> None:
    config = parse_config(
        {
            "tokenizers": {
                "models": {
                    "llama3.2*": "org/generic",
                    "llama3.2:1b": {"source": "org/small"},
                    "*": "org/any",
                }
            }
        }
    )
    models = config.tokenizers
    assert models.entry_for("llama3.2:1b")[1].source == "org/small"  # type: ignore[index]
    assert models.entry_for("llama3.2:3b")[1].source == "org/generic"  # type: ignore[index]
    assert models.entry_for("mistral")[1].source == "org/any"  # type: ignore[index]
    assert parse_config({}).tokenizers.entry_for("mistral") is None


def test_relative_tokenizer_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    text = "tokenizers:\n  models:\n    m:\n      source: ./tok\n      chat_template: ../t.jinja\n"
    entry = load_config(write(tmp_path, text), env={}).tokenizers.models["m"]
    assert entry.source == str((tmp_path / "tok").resolve())
    assert entry.chat_template == str((tmp_path.parent / "t.jinja").resolve())


def test_trie_per_model_overrides() -> None:
    config = parse_config(
        {"trie": {"max_tokens": 100, "block_size": 16, "per_model": {"q*": {"block_size": 32}}}}
    )
    assert config.trie.for_model("qwen") == (100, 32)
    assert config.trie.for_model("llama") == (100, 16)


def test_rules_of_every_matching_key_apply_in_file_order() -> None:
    config = parse_config(
        {
            "normalization": {
                "*": [{"pattern": "a", "replacement": "1"}],
                "llama*": [{"pattern": "b", "replacement": "2"}],
                "qwen*": [{"pattern": "c", "replacement": "3"}],
            }
        }
    )
    assert [r.replacement for r in config.rules_for("llama3")] == ["1", "2"]
    assert [r.replacement for r in config.rules_for("mistral")] == ["1"]


def test_environment_and_flag_overrides_leave_unset_fields_unset_for_auto_detection(
    tmp_path: Path,
) -> None:
    """cache_model.kind auto fills what the operator left unset: an override must not set it all."""
    from kvern.config.loading import with_overrides

    path = tmp_path / "config.yaml"
    path.write_text("upstream:\n  base_url: http://127.0.0.1:9/v1\ntrie:\n  block_size: 4\n")
    env = {"KVERN_PORT": "9999", "KVERN_ADMIN_KEY": "an-admin-key-of-some-length"}
    config = with_overrides(
        load_config(path, env=env), [("proxy", "host", "0.0.0.0")], source="flags"
    )
    assert (config.proxy.port, config.proxy.host) == (9999, "0.0.0.0")
    assert config.proxy.admin_api_key == "an-admin-key-of-some-length"
    assert config.upstream.cache_model.model_fields_set == set()
    assert "block_size" not in config.upstream.model_fields_set - {"base_url"}
    assert config.trie.model_fields_set == {"block_size"}
    assert with_overrides(config, [], source="flags") is config
