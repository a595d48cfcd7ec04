"""Load a walkerOS flow file: pick flow and destination, resolve references, validate.

Everything here happens once, at start-up, and every problem is reported with the JSON path
where it sits. Unlike walkerOS, a missing ``$env`` variable without a default is an error,
not a silent ``undefined``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import jsonschema
from referencing import Registry, Resource

import schemas
from transforms.secrets import WriteKey
from transforms.settings import SegmentSettings, coerce_settings

SEGMENT_PACKAGE = "@walkeros/server-destination-segment"

_ENV_REF = re.compile(r"\$env\.([A-Za-z_][A-Za-z0-9_]*)(?::([^\s\"'}]*))?")
_VAR_WHOLE = re.compile(r"^\$var\.([A-Za-z_][A-Za-z0-9_]*)((?:\.[^.\s]+)*)$")
_VAR_INLINE = re.compile(r"\$var\.([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z0-9_]+)*)")
_SECRET_WHOLE = re.compile(r"^\$secret\.([A-Za-z_][A-Za-z0-9_]*)$")
_FUNCTION_PREFIXES = ("$code:", "$py:")  # function source is never reference-resolved


class FlowError(Exception):
    """Start-up errors in a flow file; ``errors`` holds one "path: what was expected" each."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Flow:
    name: str                 # the flow's name in the file
    destination_id: str       # the destination's id in the flow
    settings: SegmentSettings
    config: dict              # the destination config (mapping, data, policy, include, consent), resolved
    collector: dict           # {"globals": {...}, "consent": {...}, "user": {...}}
    config_path: str          # JSON path of `config`, for messages from later compilation

    def __repr__(self) -> str:  # the config holds the write key: never print it whole
        return f"Flow(name={self.name!r}, destination_id={self.destination_id!r})"


def load_flow(path: str, flow_name: str | None = None, destination_id: str | None = None,
              env: Mapping[str, str] | None = None) -> Flow:
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as exc:
        raise FlowError([f"{path}: cannot read the flow file: {exc.strerror}"]) from None
    except json.JSONDecodeError as exc:
        raise FlowError([f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]) from None
    return flow_from_document(document, flow_name, destination_id, env)


def flow_from_document(document: Any, flow_name: str | None = None, destination_id: str | None = None,
                       env: Mapping[str, str] | None = None) -> Flow:
    env = os.environ if env is None else env
    errors = _schema_errors(document, "flow.schema.json", "$")
    if errors:
        raise FlowError(errors)

    name = _choose_flow(document["flows"], flow_name)
    flow_doc = document["flows"][name]
    dest_id = _choose_destination(flow_doc.get("destinations") or {}, destination_id, name)
    step = flow_doc["destinations"][dest_id]
    variables = {**document.get("variables", {}), **flow_doc.get("variables", {}), **step.get("variables", {})}

    config_path = f"$.flows.{name}.destinations.{dest_id}.config"
    resolver = _References(variables, env)
    raw_config, deferred_key = _defer_secret_write_key(step.get("config") or {}, env)
    config = resolver.resolve(raw_config, config_path)
    collector = resolver.resolve(flow_doc.get("collector") or {}, f"$.flows.{name}.collector")
    if resolver.errors:
        raise FlowError(resolver.errors)

    if isinstance(config.get("settings"), dict):
        config["settings"], coerce_errors = coerce_settings(config["settings"], f"{config_path}.settings")
        if coerce_errors:
            raise FlowError(coerce_errors)
    errors = _schema_errors(config, "flow.schema.json#/$defs/segmentDestinationConfig", config_path)
    errors += _schema_errors(collector, "flow.schema.json#/$defs/collector", f"$.flows.{name}.collector")
    if errors:
        raise FlowError(_redact(errors, config))

    write_key = deferred_key or _write_key(step, config["settings"]["writeKey"])
    settings = SegmentSettings.from_config(config["settings"], write_key)
    # The resolved key stays in `settings` (which pickles it as a reference); the plain config,
    # which travels to every worker, does not keep a copy.
    config["settings"] = {k: v for k, v in config["settings"].items() if k != "writeKey"}
    try:
        settings.sdk_host()
    except ValueError as exc:
        raise FlowError([f"{config_path}.settings.path: {exc}"]) from None
    collector = {
        "globals": collector.get("globals") or {},
        "consent": collector.get("consent") or {},
        "user": collector.get("user") or {},
    }
    return Flow(name=name, destination_id=dest_id, settings=settings, config=config,
                collector=collector, config_path=config_path)


_KEY_REFERENCE = re.compile(r"^\$(?:env\.([A-Za-z_][A-Za-z0-9_]*)(?::([^\s\"'}]*))?|secret\.([A-Za-z_][A-Za-z0-9_]*))$")


def _defer_secret_write_key(config: dict, env: Mapping[str, str]) -> tuple[dict, WriteKey | None]:
    """A ``"$secret.NAME"`` write key that this process cannot see is left to the workers.

    A Flex Template launcher has no way to receive a secret; Dataflow workers read it from
    Secret Manager in ``setup()``. A local run checks it can be resolved before starting.
    """
    settings = config.get("settings")
    raw = settings.get("writeKey") if isinstance(settings, dict) else None
    match = _KEY_REFERENCE.match(raw) if isinstance(raw, str) else None
    if match is None or match.group(3) is None or match.group(3) in env:
        return config, None
    placeholder = {**config, "settings": {**settings, "writeKey": "deferred-to-workers"}}
    return placeholder, WriteKey(None, match.group(3))


def _write_key(step: dict, resolved: str) -> WriteKey:
    """The key, with the reference it came from when it was ``$env.NAME`` or ``$secret.NAME``."""
    raw = ((step.get("config") or {}).get("settings") or {}).get("writeKey")
    match = _KEY_REFERENCE.match(raw) if isinstance(raw, str) else None
    if match is None:
        return WriteKey(resolved)
    env_name, default, secret_name = match.groups()
    return WriteKey(resolved, env_name or secret_name, default)


def _redact(errors: list[str], config: dict) -> list[str]:
    """Schema messages quote offending values; make sure none of them is the write key.

    Only quoted occurrences are replaced: a short key must not blank out ordinary words.
    """
    settings = config.get("settings")
    key = settings.get("writeKey") if isinstance(settings, dict) else None
    if not isinstance(key, str) or not key:
        return errors
    quoted = (repr(key), json.dumps(key))
    out = []
    for error in errors:
        for q in quoted:
            error = error.replace(q, "'***'")
        out.append(error)
    return out


def _choose_flow(flows: dict, wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in flows:
            raise FlowError([f"$.flows: no flow named {wanted!r} (the file has: {', '.join(sorted(flows))})"])
        return wanted
    if len(flows) == 1:
        return next(iter(flows))
    if "default" in flows:
        return "default"
    raise FlowError([f"$.flows: the file has several flows ({', '.join(sorted(flows))}) and none is named "
                     "'default': choose one with --flow_name"])


def _choose_destination(destinations: dict, wanted: str | None, flow_name: str) -> str:
    where = f"$.flows.{flow_name}.destinations"
    if wanted is not None:
        if wanted not in destinations:
            raise FlowError([f"{where}: no destination {wanted!r} (the flow has: {', '.join(sorted(destinations)) or 'none'})"])
        return wanted
    segment = [d for d, step in destinations.items() if _is_segment_package(step.get("package"))]
    if len(segment) == 1:
        return segment[0]
    if not segment:
        raise FlowError([f"{where}: no destination with package {SEGMENT_PACKAGE!r}; name one with --destination_id"])
    raise FlowError([f"{where}: several Segment destinations ({', '.join(sorted(segment))}); choose one with --destination_id"])


def _is_segment_package(package: Any) -> bool:
    if not isinstance(package, str):
        return False
    # "@scope/name@1.2.3" -> "@scope/name"
    base = package if package.count("@") <= 1 else package[: package.rindex("@")]
    return base == SEGMENT_PACKAGE


class _References:
    """Resolves $env / $var / $secret in a JSON value, collecting every error with its path."""

    def __init__(self, variables: dict, env: Mapping[str, str]):
        self.variables = variables
        self.env = env
        self.errors: list[str] = []

    def resolve(self, value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {k: self.resolve(v, _child(path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str) and "$" in value and not value.startswith(_FUNCTION_PREFIXES):
            return self._resolve_string(value, path)
        return value

    def _resolve_string(self, text: str, path: str) -> Any:
        whole_var = _VAR_WHOLE.match(text)
        if whole_var:
            return self._variable(whole_var.group(1), whole_var.group(2), path)
        whole_secret = _SECRET_WHOLE.match(text)
        if whole_secret:
            name = whole_secret.group(1)
            if name not in self.env:
                self.errors.append(f"{path}: $secret.{name} is not set (expected environment variable {name})")
                return text
            return self.env[name]
        text = _ENV_REF.sub(lambda m: self._env(m, path), text)
        return _VAR_INLINE.sub(lambda m: self._inline_variable(m, path), text)

    def _env(self, match: re.Match, path: str) -> str:
        name, default = match.group(1), match.group(2)
        if name in self.env:
            return self.env[name]
        if default is not None:
            return default
        self.errors.append(f"{path}: environment variable {name} is not set and $env.{name} has no default "
                           f"(write $env.{name}:default to give one)")
        return match.group(0)

    def _variable(self, name: str, sub_path: str, path: str) -> Any:
        if name not in self.variables:
            known = ", ".join(sorted(self.variables)) or "none"
            self.errors.append(f"{path}: variable $var.{name} is not defined (defined: {known})")
            return None
        value = self.variables[name]
        for key in filter(None, sub_path.split(".")):
            if isinstance(value, dict) and key in value:
                value = value[key]
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                self.errors.append(f"{path}: $var.{name}{sub_path} does not exist")
                return None
        return value

    def _inline_variable(self, match: re.Match, path: str) -> str:
        # Inside a longer string the path ends where the variable's keys end, so
        # "https://$var.region.example.com" reads $var.region and keeps ".example.com".
        name, keys = match.group(1), [k for k in match.group(2).split(".") if k]
        if name not in self.variables:
            return str(self._variable(name, "", path) or match.group(0))
        value, used = self.variables[name], 0
        for key in keys:
            if isinstance(value, dict) and key in value:
                value, used = value[key], used + 1
            else:
                break
        if isinstance(value, (dict, list)):
            self.errors.append(f"{path}: $var.{name} is an object or list and cannot sit inside a longer string")
            return match.group(0)
        rest = "".join(f".{k}" for k in keys[used:])
        return (json.dumps(value) if isinstance(value, bool) or value is None else str(value)) + rest


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"{path}[{json.dumps(key)}]"


def _registry() -> Registry:
    return Registry().with_resources(
        (name, Resource.from_contents(schemas.load(name))) for name in ("flow.schema.json", "mapping.schema.json")
    )


def _schema_errors(instance: Any, ref: str, base_path: str) -> list[str]:
    validator = jsonschema.Draft202012Validator({"$ref": ref}, registry=_registry())
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{_join(base_path, e.absolute_path)}: {_describe(e)}" for e in errors]


def _join(base: str, parts) -> str:
    path = base
    for part in parts:
        path = f"{path}[{part}]" if isinstance(part, int) else _child(path, part)
    return path


def _describe(error: jsonschema.ValidationError) -> str:
    """Say what was expected; for anyOf/oneOf, the closest branch's complaint is the useful one."""
    if error.context:
        best = jsonschema.exceptions.best_match(error.context)
        return f"{best.message} (in {_join('', best.relative_path) or 'the value'})" if best.relative_path else best.message
    if error.validator == "additionalProperties":
        return f"{error.message}; allowed keys: {', '.join(sorted(error.schema.get('properties', {})))}"
    return error.message
