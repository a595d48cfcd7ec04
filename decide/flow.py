"""Load a walkerOS flow file: pick flow and destination, resolve references, validate.

Everything here happens once, at start-up, and every problem is reported with the JSON path
where it sits. Unlike walkerOS, a missing ``$env`` variable without a default is an error,
not a silent ``undefined``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema
from referencing import Registry, Resource

import schemas
from decide.secrets import SECRET_VERSION, WriteKey, WriteKeyProblem, checked_key
from decide.settings import SDK_PATH, SegmentSettings, coerce_settings

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
    name: str  # the flow's name in the file
    destination_id: str  # the destination's id in the flow
    settings: SegmentSettings
    config: dict  # the destination config (mapping, data, policy, include, consent), resolved
    collector: dict  # {"globals": {...}, "consent": {...}, "user": {...}}
    config_path: str  # JSON path of `config`, for messages from later compilation
    notices: tuple[str, ...] = ()  # things fixed on the way that the user should hear about (stderr)

    def __repr__(self) -> str:  # the config holds the write key: never print it whole
        return f"Flow(name={self.name!r}, destination_id={self.destination_id!r})"


def load_flow(
    path: str,
    flow_name: str | None = None,
    destination_id: str | None = None,
    env: Mapping[str, str] | None = None,
    **key_options,
) -> Flow:
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as exc:
        raise FlowError([f"{path}: cannot read the flow file: {exc.strerror}"]) from None
    except json.JSONDecodeError as exc:
        raise FlowError([f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]) from None
    return flow_from_document(document, flow_name, destination_id, env, **key_options)


def flow_from_document(
    document: Any,
    flow_name: str | None = None,
    destination_id: str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    defer_write_key: bool = False,
    write_key_secret: str | None = None,
) -> Flow:
    """``defer_write_key``: the key is resolved on the workers, never here (a Flex Template
    launcher has no secrets): a ``$env.NAME`` or ``$secret.NAME`` write key is kept as that
    reference even when this process cannot see it. ``write_key_secret``: the key is that
    Secret Manager version (``projects/P/secrets/S/versions/V``), read on the workers."""
    env = os.environ if env is None else env
    key_options = {"defer_write_key": defer_write_key, "write_key_secret": write_key_secret}
    errors = _schema_errors(document, "flow.schema.json", "$")
    if errors:
        raise FlowError(errors + _later_errors(document, flow_name, destination_id, env, errors, key_options))
    return _flow_from_checked_document(
        document, flow_name, destination_id, env, defer_write_key=defer_write_key, write_key_secret=write_key_secret
    )


def _later_errors(
    document: Any,
    flow_name: str | None,
    destination_id: str | None,
    env: Mapping[str, str],
    reported: list[str],
    key_options: dict,
) -> list[str]:
    """What the destination's own checks say about a file whose outline is already faulty, so
    that one run of ``validate`` lists every error; nothing when the outline is too broken to
    find the destination."""
    try:
        _flow_from_checked_document(document, flow_name, destination_id, env, **key_options)
    except FlowError as exc:
        return [e for e in exc.errors if e not in reported]
    except Exception:  # noqa: BLE001 - the outline's errors already say why
        return []
    return []


def _flow_from_checked_document(
    document: Any,
    flow_name: str | None,
    destination_id: str | None,
    env: Mapping[str, str],
    *,
    defer_write_key: bool = False,
    write_key_secret: str | None = None,
) -> Flow:
    name = _choose_flow(document["flows"], flow_name)
    flow_doc = document["flows"][name]
    dest_id = _choose_destination(flow_doc.get("destinations") or {}, destination_id, name)
    step = flow_doc["destinations"][dest_id]
    variables = {**document.get("variables", {}), **flow_doc.get("variables", {}), **step.get("variables", {})}

    config_path = f"$.flows.{name}.destinations.{dest_id}.config"
    resolver = _References(variables, env)
    key_path = f"{config_path}.settings.writeKey"
    raw_config, deferred_key = _defer_write_key(
        step.get("config") or {}, env, resolver, key_path, defer_write_key, write_key_secret
    )
    config = resolver.resolve(raw_config, config_path)
    collector = resolver.resolve(flow_doc.get("collector") or {}, f"$.flows.{name}.collector")
    # Every error of the file at once (a user fixes them in one go): each check runs even when
    # an earlier one failed, and a value already reported is not reported again by a later one.
    errors = list(resolver.errors)
    if isinstance(config.get("settings"), dict):
        config["settings"], coerce_errors = coerce_settings(config["settings"], f"{config_path}.settings")
        errors += coerce_errors
    value_errors = list(errors)  # values that could not be resolved or coerced: not checked again
    schema_errors = _schema_errors(config, "flow.schema.json#/$defs/segmentDestinationConfig", config_path)
    schema_errors += _schema_errors(collector, "flow.schema.json#/$defs/collector", f"$.flows.{name}.collector")
    errors += [e for e in schema_errors if not _already_reported(e, value_errors)]
    if isinstance(config.get("settings"), dict):
        errors += [
            e
            for e in _endpoint_errors(config["settings"], f"{config_path}.settings")
            if not _already_reported(e, value_errors)
        ]
    if errors:
        raise FlowError(_redact(errors, config))

    notices: list[str] = []
    write_key = deferred_key or _write_key(
        _key_reference(step, resolver), config["settings"]["writeKey"], key_path, notices
    )
    settings = SegmentSettings.from_config(config["settings"], write_key)
    # The resolved key stays in `settings` (which pickles it as a reference); the plain config,
    # which travels to every worker, does not keep a copy.
    config["settings"] = {k: v for k, v in config["settings"].items() if k != "writeKey"}
    collector = {
        "globals": collector.get("globals") or {},
        "consent": collector.get("consent") or {},
        "user": collector.get("user") or {},
    }
    return Flow(
        name=name,
        destination_id=dest_id,
        settings=settings,
        config=config,
        collector=collector,
        config_path=config_path,
        notices=tuple(notices),
    )


_KEY_REFERENCE = re.compile(r"^\$(?:env\.([A-Za-z_][A-Za-z0-9_]*)(?::([^\s\"'}]*))?|secret\.([A-Za-z_][A-Za-z0-9_]*))$")
DEFERRED = "deferred-to-workers"  # stands in for the key while the config is validated


def _already_reported(error: str, reported: list[str]) -> bool:
    """A schema error about a value that resolving or coercing already reported (the same JSON
    path, or inside it)."""
    where = error.split(": ", 1)[0]
    return any(where == r.split(": ", 1)[0] or where.startswith(r.split(": ", 1)[0] + ".") for r in reported)


def _endpoint_errors(settings: dict, path: str) -> list[str]:
    """``host`` and ``path`` as the SDK will combine them: it always posts to ``<host>/v1/batch``."""
    errors = []
    host, api_path = settings.get("host"), settings.get("path", SDK_PATH)
    if isinstance(host, str) and host.rstrip("/").endswith(SDK_PATH):
        base = host.rstrip("/")[: -len(SDK_PATH)] or "https://api.segment.io"
        errors.append(
            f"{path}.host: {host!r} already ends in {SDK_PATH}, and the SDK adds {SDK_PATH} itself "
            f"(it would post to {host.rstrip('/')}{SDK_PATH}): give the base URL only, {base!r}"
        )
    if isinstance(api_path, str) and not api_path.endswith(SDK_PATH):
        errors.append(
            f"{path}.path: settings.path {api_path!r}: segment-analytics-python always posts to "
            f"<host>{SDK_PATH}, so the path must end with {SDK_PATH} (a prefix before it is fine)"
        )
    return errors


class _References:
    """Resolves $env / $var / $secret in a JSON value, collecting every error with its path."""

    def __init__(self, variables: dict, env: Mapping[str, str]):
        self.variables = variables
        self.env = env
        self.errors: list[str] = []
        self._visiting: list[str] = []  # variables being resolved, to catch cycles

    def follow_variables(self, value: Any) -> Any:
        """A whole-string ``$var.name`` followed to what it names, unresolved otherwise."""
        seen = set()
        while isinstance(value, str):
            match = _VAR_WHOLE.match(value)
            if not match or match.group(2) or match.group(1) in seen or match.group(1) not in self.variables:
                break
            seen.add(match.group(1))
            value = self.variables[match.group(1)]
        return value

    def _variable_value(self, name: str, path: str) -> Any:
        """A variable's value with its own references resolved (variables may use $env, $secret
        and other variables, as in walkerOS), or None after recording a cycle."""
        if name in self._visiting:
            chain = " -> ".join(f"$var.{n}" for n in [*self._visiting, name])
            self.errors.append(f"{path}: variables reference each other in a cycle: {chain}")
            return None
        self._visiting.append(name)
        try:
            return self.resolve(self.variables[name], path)
        finally:
            self._visiting.pop()

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
        self.errors.append(
            f"{path}: environment variable {name} is not set and $env.{name} has no default "
            f"(write $env.{name}:default to give one)"
        )
        return match.group(0)

    def _variable(self, name: str, sub_path: str, path: str) -> Any:
        if name not in self.variables:
            known = ", ".join(sorted(self.variables)) or "none"
            self.errors.append(f"{path}: variable $var.{name} is not defined (defined: {known})")
            return None
        value = self._variable_value(name, path)
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
        value, used = self._variable_value(name, path), 0
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


def _key_reference(step: dict, resolver: _References) -> Any:
    """The write key as written, with whole-string ``$var`` references followed (so that
    ``$var.wk`` whose value is ``"$env.SEGMENT_WRITE_KEY"`` is that reference, not its value)."""
    raw = ((step.get("config") or {}).get("settings") or {}).get("writeKey")
    return resolver.follow_variables(raw)


def _defer_write_key(
    config: dict, env: Mapping[str, str], resolver: _References, key_path: str, defer: bool, secret_version: str | None
) -> tuple[dict, WriteKey | None]:
    """The write key that is left to the workers, if any, and the config to validate meanwhile.

    ``--write_key_secret`` names the key's secret version: the flow's own writeKey is then not
    resolved at all (it must not be a literal key: one key, one place). Otherwise a
    ``"$secret.NAME"`` key this process cannot see, and with ``defer`` any ``$env``/``$secret``
    key without a default, is kept as its reference: Dataflow workers resolve it in ``setup()``.
    """
    settings = config.get("settings")
    if not isinstance(settings, dict):
        return config, None
    raw = resolver.follow_variables(settings.get("writeKey"))
    match = _KEY_REFERENCE.match(raw) if isinstance(raw, str) else None
    placeholder = {**config, "settings": {**settings, "writeKey": DEFERRED}}
    if secret_version is not None:
        if not SECRET_VERSION.match(secret_version):
            raise FlowError(
                [
                    f"--write_key_secret {secret_version!r}: expected a Secret Manager version name, "
                    "projects/PROJECT/secrets/NAME/versions/VERSION (a number or latest)"
                ]
            )
        if raw is not None and match is None:
            raise FlowError(
                [
                    f"{key_path}: the flow file holds a literal write key and --write_key_secret names "
                    'a secret: give the key in one place (write "$secret.SEGMENT_WRITE_KEY" in the '
                    "flow, or drop writeKey's literal value)"
                ]
            )
        return placeholder, WriteKey(secret_version=secret_version)
    if match is None:
        return config, None
    env_name, default, secret_name = match.groups()
    if secret_name is not None and (defer or secret_name not in env):
        return placeholder, WriteKey(None, secret_name)
    if defer and env_name is not None and default is None:
        return placeholder, WriteKey(None, env_name)
    return config, None


def _write_key(reference: Any, resolved: str, key_path: str, notices: list[str]) -> WriteKey:
    """The key, checked, with the reference it came from when it was ``$env.NAME`` or
    ``$secret.NAME`` (then only the reference travels to the workers)."""
    match = _KEY_REFERENCE.match(reference) if isinstance(reference, str) else None
    source = f"{reference}" if match else "the flow file"
    try:
        key, notice = checked_key(resolved, source)
    except WriteKeyProblem as exc:
        raise FlowError([f"{key_path}: {exc}"]) from None
    if notice:
        notices.append(f"{key_path}: {notice}")
    if match is None:
        return WriteKey(key)
    env_name, default, secret_name = match.groups()
    return WriteKey(key, env_name or secret_name, default)


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
    raise FlowError(
        [
            f"$.flows: the file has several flows ({', '.join(sorted(flows))}) and none is named "
            "'default': choose one with --flow_name"
        ]
    )


def _choose_destination(destinations: dict, wanted: str | None, flow_name: str) -> str:
    where = f"$.flows.{flow_name}.destinations"
    if wanted is not None:
        if wanted not in destinations:
            raise FlowError(
                [f"{where}: no destination {wanted!r} (the flow has: {', '.join(sorted(destinations)) or 'none'})"]
            )
        return wanted
    segment = [d for d, step in destinations.items() if _is_segment_package(step.get("package"))]
    if len(segment) == 1:
        return segment[0]
    if not segment:
        raise FlowError([f"{where}: no destination with package {SEGMENT_PACKAGE!r}; name one with --destination_id"])
    raise FlowError(
        [f"{where}: several Segment destinations ({', '.join(sorted(segment))}); choose one with --destination_id"]
    )


def _is_segment_package(package: Any) -> bool:
    if not isinstance(package, str):
        return False
    # "@scope/name@1.2.3" -> "@scope/name"
    base = package if package.count("@") <= 1 else package[: package.rindex("@")]
    return base == SEGMENT_PACKAGE


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
        return (
            f"{best.message} (in {_join('', best.relative_path) or 'the value'})"
            if best.relative_path
            else best.message
        )
    if error.validator == "additionalProperties":
        return f"{error.message}; allowed keys: {', '.join(sorted(error.schema.get('properties', {})))}"
    return error.message
