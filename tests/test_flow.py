"""The flow file: references, types, schema; every error names its JSON path."""

import copy
import json

import pytest

from decide.flow import FlowError, flow_from_document, load_flow
from pipeline.cli import main as cli_main

SECRET = "wk-very-secret-123"
DEST = "$.flows.default.destinations.segment.config"


def document(settings=None, **config):
    return {
        "version": 4,
        "variables": {"segmentHost": "https://events.eu1.segmentapis.com", "retries": 5, "nested": {"a": {"b": 7}}},
        "flows": {
            "default": {
                "destinations": {
                    "segment": {
                        "package": "@walkeros/server-destination-segment",
                        "config": {"settings": {"writeKey": "$env.SEGMENT_WRITE_KEY", **(settings or {})}, **config},
                    }
                },
                "collector": {"globals": {"environment": "production"}, "consent": {"functional": True}},
            }
        },
    }


def load(doc, env=None, **kw):
    return flow_from_document(doc, env={"SEGMENT_WRITE_KEY": SECRET, **(env or {})}, **kw)


def errors_of(doc, env=None, **kw):
    with pytest.raises(FlowError) as caught:
        load(doc, env, **kw)
    for error in caught.value.errors:
        assert SECRET not in error
    return caught.value.errors


def test_defaults_and_references():
    flow = load(
        document(
            {
                "host": "$var.segmentHost",
                "maxRetries": "$var.retries",
                "flushAt": "$env.FLUSH_AT:20",
                "path": "/proxy/$env.REGION/v1/batch",
            }
        ),
        env={"REGION": "eu"},
    )
    s = flow.settings
    assert s.write_key.reveal() == SECRET and s.host == "https://events.eu1.segmentapis.com"
    assert s.max_retries == 5 and s.flush_at == 20  # $var keeps JSON type; $env coerced
    assert s.path == "/proxy/eu/v1/batch" and s.sdk_host() == "https://events.eu1.segmentapis.com/proxy/eu"
    assert (s.user_id, s.anonymous_id, s.flush_interval_ms, s.http_request_timeout_ms, s.disable) == (
        "user.id",
        "user.session",
        10000,
        10000,
        False,
    )
    assert flow.collector == {"globals": {"environment": "production"}, "consent": {"functional": True}, "user": {}}
    assert SECRET not in repr(flow) and SECRET not in repr(s)


def test_var_with_a_path_and_inline_var():
    flow = load(document({"host": "https://$var.nested.a.b.example.com"}))
    assert flow.settings.host == "https://7.example.com"


def test_secret_is_read_from_the_environment():
    doc = document()
    doc["flows"]["default"]["destinations"]["segment"]["config"]["settings"]["writeKey"] = "$secret.SEG_KEY"
    assert load(doc, env={"SEG_KEY": "from-secret"}).settings.write_key.reveal() == "from-secret"


def test_missing_env_variable_names_variable_and_path():
    doc = document({"host": "$env.SEGMENT_HOST"})
    with pytest.raises(FlowError) as caught:
        flow_from_document(doc, env={"SEGMENT_WRITE_KEY": SECRET})
    [error] = caught.value.errors
    assert error.startswith(f"{DEST}.settings.host: ") and "SEGMENT_HOST" in error


def test_missing_var_names_variable_and_path():
    [error] = errors_of(document({"host": "$var.nope"}))
    assert error.startswith(f"{DEST}.settings.host: ") and "$var.nope" in error


def test_every_missing_variable_is_reported_at_once():
    errors = errors_of(document({"host": "$env.A", "path": "$env.B"}))
    assert len(errors) == 2


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("flushAt", "abc", "expected an integer"),
        ("disable", "maybe", "expected a boolean"),
        ("flushAt", 0, "less than the minimum"),
        ("maxRetries", -1, "less than the minimum"),
        ("host", "api.segment.io", "does not match"),
        ("consent", {"analytics": 5}, "is not of type 'string'"),
        ("integrations", [1], "is not of type 'object'"),
    ],
)
def test_bad_setting_types(key, value, expected):
    [error] = errors_of(document({key: value}))
    assert error.startswith(f"{DEST}.settings.{key}") and expected in error


def test_boolean_and_integer_strings_from_env_are_coerced():
    flow = load(document({"disable": "$env.D", "flushInterval": "$env.FI"}), env={"D": "true", "FI": " 500 "})
    assert flow.settings.disable is True and flow.settings.flush_interval_ms == 500


def test_unknown_keys_are_rejected_with_their_path():
    [error] = errors_of(document({"writekey": "typo"}))
    assert error.startswith(f"{DEST}.settings: ") and "'writekey' was unexpected" in error
    [error] = errors_of(document(mappings={}))
    assert error.startswith(f"{DEST}: ") and "'mappings' was unexpected" in error
    doc = document()
    doc["flows"]["default"]["destination"] = {}
    [error] = errors_of(doc)
    assert error.startswith("$.flows.default: ") and "'destination' was unexpected" in error


def test_unknown_rule_key_in_the_mapping_is_rejected():
    errors = errors_of(document(mapping={"page": {"view": {"nmae": "Page Viewed"}}}))
    assert any(e.startswith(f"{DEST}.mapping.page.view") for e in errors), errors


def test_write_key_required_and_not_empty():
    doc = document()
    del doc["flows"]["default"]["destinations"]["segment"]["config"]["settings"]["writeKey"]
    [error] = errors_of(doc)
    assert "'writeKey' is a required property" in error
    [error] = errors_of(document(), env={"SEGMENT_WRITE_KEY": ""})
    assert error.startswith(f"{DEST}.settings.writeKey: ")


def test_version_must_be_4():
    doc = document()
    doc["version"] = 3
    [error] = errors_of(doc)
    assert error.startswith("$.version: ")


def test_choosing_flow_and_destination():
    doc = document()
    doc["flows"]["staging"] = copy.deepcopy(doc["flows"]["default"])
    assert load(doc).name == "default"
    assert load(doc, flow_name="staging").name == "staging"
    [error] = errors_of(doc, flow_name="prod")
    assert "no flow named 'prod'" in error
    del doc["flows"]["default"]
    doc["flows"]["other"] = copy.deepcopy(doc["flows"]["staging"])
    [error] = errors_of(doc)
    assert "several flows" in error
    dests = doc["flows"]["staging"]["destinations"]
    dests["mixpanel"] = {"package": "@walkeros/server-destination-mixpanel", "config": {}}
    assert load(doc, flow_name="staging").destination_id == "segment"
    dests["segment"]["package"] = "@walkeros/server-destination-segment@4.4.0"
    assert load(doc, flow_name="staging").destination_id == "segment"


def test_other_flows_with_unset_variables_do_not_matter():
    doc = document()
    doc["flows"]["prod"] = {
        "destinations": {
            "segment": {
                "package": "@walkeros/server-destination-segment",
                "config": {"settings": {"writeKey": "$env.PROD_KEY"}},
            }
        }
    }
    assert load(doc).name == "default"


def test_path_must_be_reachable_by_the_sdk():
    [error] = errors_of(document({"path": "/v2/import"}))
    assert error.startswith(f"{DEST}.settings.path: ") and "/v1/batch" in error


def test_file_errors(tmp_path):
    bad = tmp_path / "flow.json"
    bad.write_text("{ not json")
    with pytest.raises(FlowError, match="not valid JSON"):
        load_flow(str(bad))
    with pytest.raises(FlowError, match="cannot read"):
        load_flow(str(tmp_path / "missing.json"))


# -- the validate command ------------------------------------------------------------------
def test_validate_prints_ok(tmp_path, monkeypatch, capsys):
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(document()))
    monkeypatch.setenv("SEGMENT_WRITE_KEY", SECRET)
    assert cli_main(["validate", "--flow", str(path)]) == 0
    assert capsys.readouterr().out == "ok\n"


def test_validate_prints_each_error_and_exits_2(tmp_path, monkeypatch, capsys):
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(document({"flushAt": "abc", "maxRetries": "x"})))
    monkeypatch.setenv("SEGMENT_WRITE_KEY", SECRET)
    assert cli_main(["validate", "--flow", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2 and all(l.startswith(f"{DEST}.settings.") for l in lines)
    assert SECRET not in captured.err + captured.out


def test_validate_reports_code_syntax_errors_with_their_path(tmp_path, monkeypatch, capsys):
    doc = document(mapping={"page": {"view": {"data": {"fn": "$code:(value) => value +"}}}})
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setenv("SEGMENT_WRITE_KEY", SECRET)
    assert cli_main(["validate", "--flow", str(path)]) == 2
    assert f"{DEST}.mapping.page.view.data.fn" in capsys.readouterr().err


def test_bundled_example_flow_is_valid(monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", SECRET)
    assert cli_main(["validate", "--flow", "examples/flow.json"]) == 0


def test_a_short_write_key_does_not_blank_out_messages():
    doc = document({"flushAt": 0})
    [error] = errors_of(doc, env={"SEGMENT_WRITE_KEY": "e"})
    assert "less than the minimum" in error


def test_the_write_key_never_appears_even_when_it_is_the_bad_value():
    doc = document()
    doc["flows"]["default"]["destinations"]["segment"]["config"]["settings"]["userId"] = {
        "nope": "$env.SEGMENT_WRITE_KEY"
    }
    errors = errors_of(doc)
    assert errors and all(SECRET not in e for e in errors)


def test_a_referenced_write_key_pickles_as_its_reference_only(monkeypatch):
    import pickle

    doc = document()
    doc["flows"]["default"]["destinations"]["segment"]["config"]["settings"]["writeKey"] = "$secret.SEG_KEY"
    flow = load(doc, env={"SEG_KEY": SECRET})
    assert flow.settings.write_key.reveal() == SECRET
    assert "writeKey" not in flow.config["settings"]
    shipped = pickle.dumps((flow.settings, flow.config))
    assert SECRET.encode() not in shipped
    monkeypatch.setenv("SEG_KEY", "rotated-key")
    settings, _ = pickle.loads(shipped)
    assert settings.write_key.reveal() == "rotated-key"  # a worker reads its own environment


def test_a_literal_write_key_travels_as_written():
    import pickle

    flow = load(document({"writeKey": "literal-key"}))
    assert pickle.loads(pickle.dumps(flow.settings)).write_key.reveal() == "literal-key"


def test_a_secret_write_key_missing_at_launch_is_left_to_the_workers(monkeypatch, tmp_path, capsys):
    doc = document()
    doc["flows"]["default"]["destinations"]["segment"]["config"]["settings"]["writeKey"] = "$secret.SEG_KEY"
    flow = flow_from_document(doc, env={})  # a Flex Template launcher has no secrets
    assert flow.settings.write_key.env_name == "SEG_KEY" and not flow.settings.write_key.resolvable_here()
    # ...but a local run says at once that the key is missing
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(doc))
    monkeypatch.delenv("SEG_KEY", raising=False)
    assert cli_main(["run", "--flow", str(path), "--input", "x.jsonl", "--dead_letter", str(tmp_path / "d")]) == 2
    assert "SEG_KEY" in capsys.readouterr().err


def test_other_missing_secrets_are_still_start_up_errors():
    doc = document({"host": "$secret.HOST_SECRET"})
    [error] = errors_of(doc)
    assert "HOST_SECRET" in error
