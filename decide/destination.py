"""The Segment destination, compiled once from a flow: each step of what happens to one event.

The Beam DoFns call these steps one by one (so each step is its own named transform with its
own counters); ``explain`` calls :meth:`Destination.process`, which runs the same steps in
the same order. Nothing here talks to the network or to Beam.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from decide import dead_letter as dl
from decide.calls import CallBuilder, EventCalls
from decide.consent import ConsentContexts, any_granted, is_granted, required_keys
from decide.dead_letter import DeadLetter, payload_text
from decide.functions import FunctionPolicy, Functions, describe_failure
from decide.identity import IdentityResolver, IdentityState, decide, state_key
from decide.mapping import UNDEFINED, CompiledRule, DestinationMapping, MappingResult
from decide.settings import SegmentSettings

log = logging.getLogger(__name__)

DELIVERED = "delivered"
IGNORED = "ignored"
CONSENT_DENIED = "consent_denied"
DEAD_LETTER = "dead_letter"

DEFAULT_STATE_TTL_MS = 24 * 3600 * 1000
# Makes the same tuple as calling a NamedTuple class, without its Python-level __new__.
_new_tuple = tuple.__new__


@dataclass(frozen=True)
class DestinationSpec:
    """Everything the destination is built from: plain, picklable data (no compiled code)."""

    flow_name: str
    settings: SegmentSettings
    config: dict
    collector: dict
    config_path: str = "$.config"
    namespace: str = ""
    state_ttl_ms: int | None = DEFAULT_STATE_TTL_MS
    functions: FunctionPolicy = FunctionPolicy()

    @classmethod
    def from_flow(
        cls,
        flow,
        namespace: str | None = None,
        state_ttl_ms: int | None = DEFAULT_STATE_TTL_MS,
        functions: FunctionPolicy | None = None,
    ):
        return cls(
            flow_name=flow.name,
            settings=flow.settings,
            config=flow.config,
            collector=flow.collector,
            config_path=flow.config_path,
            namespace=namespace or default_namespace(flow.name),
            state_ttl_ms=state_ttl_ms,
            functions=functions or FunctionPolicy(),
        )

    def __repr__(self) -> str:  # config holds the write key
        return f"DestinationSpec(flow_name={self.flow_name!r}, namespace={self.namespace!r})"


def default_namespace(flow_name: str) -> str:
    return f"walkeros-{flow_name}"


class Mapped(NamedTuple):
    """A mapped event as it travels between pipeline steps: plain data only (compiled rules
    hold closures and cannot be encoded), the rule named by its position in the mapping."""

    event: dict  # as the mapping left it (rule name, policies)
    rule_index: int | None
    data: Any  # the mapped data; None when it resolved to nothing
    received: dict  # the normalised event as received: the dead-letter payload, which replays


class DecisionInputs(NamedTuple):
    """One event as identify/group deduplication sees it (the fields of EventCalls it uses)."""

    key: str
    timestamp_ms: int
    event_id: str
    identify_signature: tuple | None
    group_signature: tuple | None


@dataclass
class Outcome:
    outcome: str
    reason: str | None = None
    calls: list[dict] = field(default_factory=list)
    dead_letter: DeadLetter | None = None


class FunctionErrors:
    """User functions (``$code:``, ``$py:``) that threw, ran out of time or memory: the value
    became undefined, as in walkerOS.

    Counted per place (the JSON path of the function) and logged the first time per place only,
    never once per event; ``hook`` lets the pipeline count them as a Beam counter too. A
    ``quiet`` one neither counts nor logs: batch deduplication runs every event through the
    steps a second time to decide, and the same error must not be reported twice.
    """

    def __init__(self, quiet: bool = False):
        self.counts: dict[str, int] = {}
        self.hook = None
        self.quiet = quiet

    def __call__(self, place: str, exc: BaseException) -> None:
        if self.quiet:
            return
        count = self.counts[place] = self.counts.get(place, 0) + 1
        if count == 1:
            log.warning(
                "the function at %s failed: %s (its value is undefined; later errors there are only counted)",
                place,
                describe_failure(exc),
            )
        if self.hook is not None:
            self.hook(place)


class Destination:
    """Compiled from a :class:`DestinationSpec`; building it is the start-up validation."""

    def __init__(self, spec: DestinationSpec, quiet: bool = False):
        self.spec = spec
        settings = spec.settings
        settings_path = f"{spec.config_path}.settings"
        self._required_keys = required_keys(spec.config.get("consent"))
        self._consent_contexts = ConsentContexts(settings.consent) if settings.consent else None
        self._collector = spec.collector
        self.function_errors = FunctionErrors(quiet)
        # One set of functions for the whole destination: each worker thread compiles them
        # all into one sandbox on its first call.
        functions = Functions(spec.functions)
        self.mapping = DestinationMapping(
            spec.config, spec.config_path, on_error=self.function_errors, functions=functions
        )
        # Compilation follows the config's key order, so these positions are the same in every
        # process that compiles the same flow.
        self._rules: list[CompiledRule] = self.mapping.all_rules()
        self._rule_index: dict[CompiledRule | None, int | None] = {rule: i for i, rule in enumerate(self._rules)}
        self._rule_index[None] = None  # no rule: no index
        self.identity = IdentityResolver(
            settings.user_id, settings.anonymous_id, settings_path, self.function_errors, functions
        )
        self.calls = CallBuilder(
            settings.identify,
            settings.group,
            settings.integrations,
            spec.namespace,
            settings_path,
            self.function_errors,
            functions,
        )
        # With no identify or group anywhere in the flow there is nothing to deduplicate, and
        # the keyed stateful step can be left out of the pipeline.
        self.needs_identity_state = (
            settings.identify is not None
            or settings.group is not None
            or _rules_set(spec.config.get("mapping"), ("identify", "group"))
        )
        # What identify/group deduplication decides on never reads the mapped data, so its
        # planning skips the data mapping, unless a `$py:` function could change the event
        # in place while mapping it (JavaScript functions work on a copy of their own).
        self.decisions_need_data = functions.any_python

    def __reduce__(self) -> tuple:
        # Compiled again from its spec where it is unpickled (compiled values hold closures).
        return (Destination, (self.spec, self.function_errors.quiet))

    # -- the steps, in pipeline order -------------------------------------------------------
    def consent_granted(self, event: dict) -> bool:
        return any_granted(self._required_keys, event.get("consent") or {})

    def mapping_result(self, event: dict, with_data: bool = True) -> MappingResult:
        """The flow's mapping, on the event as walkerOS's collector hands it to a destination:
        its consent reduced to the granted keys. The result's event keeps the full consent for
        Segment's categoryPreferences (true and false); policies that rewrote consent win.
        Without ``with_data``, the data is not mapped (see ``decisions_need_data``)."""
        return self._mapping_and_granted(event, with_data)[0]

    def _mapping_and_granted(self, event: dict, with_data: bool = True) -> tuple[MappingResult, Any]:
        """:meth:`mapping_result`, and the granted consent the mapping saw: what planning
        reads too, or None when a policy rewrote the consent (planning works it out again)."""
        consent = event.get("consent")
        granted = _granted_only(consent)
        if granted is consent:
            result = self.mapping.process(event, self._collector, with_data)
        else:
            result = self.mapping.process({**event, "consent": granted}, self._collector, with_data)
        if result.event.get("consent") is not granted:
            return result, None
        if granted is not consent:
            result.event["consent"] = consent
        return result, granted

    def rule_consent_granted(self, result: MappingResult) -> bool:
        if result.rule is None or not result.rule.consent:
            return True
        return is_granted(result.rule.consent, result.event.get("consent") or {})

    def to_mapped(self, result: MappingResult, received: dict) -> Mapped:
        """The mapping's result for the normalised event ``received``, as it travels between
        steps (plain data, the rule by position)."""
        data = result.data
        return _new_tuple(
            Mapped, (result.event, self._rule_index[result.rule], None if data is UNDEFINED else data, received)
        )

    def _planning(self, event: dict, rule: CompiledRule | None, granted: Any = None, own: bool = False):
        """``(event, context, identity)`` as plan and decision_inputs both see them: the event
        with its consent reduced to the granted keys (what the settings' mappings read, as in
        walkerOS) and what user functions get as their context argument. ``granted``: that
        consent when the caller already has it; ``own``: the event is the caller's own copy
        (the mapping's result), which nothing else holds."""
        if granted is None:
            granted = _granted_only(event.get("consent") or {})
        # A new top level, unless the caller's event is its own and already holds the granted
        # consent: the functions planning the calls get the event as mapped, never what a
        # mapping function did to its own copy, so planning decides the same whether or not
        # the data was mapped before it.
        if not own or event.get("consent") is not granted:
            event = {**event, "consent": granted}
        context = {
            "event": event,
            "mapping": rule.raw if rule else None,
            "collector": self._collector,
            "consent": granted,
        }
        return event, context, self.identity.resolve(event, context)

    def decision_inputs(self, mapped: Mapped) -> DecisionInputs | None:
        """What deduplication decides on for one mapped event, as :meth:`plan` would give it,
        without building its calls; None where plan gives a dead letter (no identity)."""
        index = mapped[1]
        rule = None if index is None else self._rules[index]
        event, context, identity = self._planning(mapped[0], rule)
        key = state_key(identity[0], identity[1])
        if key is None:
            return None
        identify_signature, group_signature = self.calls.signatures(event, rule, identity, context)
        return _new_tuple(
            DecisionInputs, (key, int(event["timestamp"]), event["id"], identify_signature, group_signature)
        )

    def plan(self, mapped: Mapped) -> EventCalls | DeadLetter:
        """Identity and the calls of one mapped event, or a ``no_identity`` dead letter."""
        index = mapped[1]
        return self._plan(mapped[3], mapped[0], None if index is None else self._rules[index], mapped[2])

    def _plan(
        self,
        received: dict,
        mapped: dict,
        rule: CompiledRule | None,
        data: Any,
        granted: Any = None,
        own: bool = False,
    ):
        """``received``: the normalised event, which dead letters carry (it replays as it came,
        not as the mapping renamed it or planning reduced its consent); ``mapped``: the event as
        the mapping left it, which the calls are made of."""
        event, context, identity = self._planning(mapped, rule, granted, own)
        if state_key(identity[0], identity[1]) is None:
            return DeadLetter(
                payload=payload_text(received),
                stage=dl.IDENTITY,
                reason=dl.NO_IDENTITY,
                error="neither userId nor anonymousId resolved to a non-empty string "
                f"(userId from {self.spec.settings.user_id!r}, anonymousId from "
                f"{self.spec.settings.anonymous_id!r})",
                flow=self.spec.flow_name,
                event_id=event.get("id"),
            )
        # Segment's categoryPreferences carry true and false: from the event's whole consent.
        consent_context = (
            self._consent_contexts.context_for(mapped.get("consent") or {})
            if self._consent_contexts is not None
            else None
        )
        return self.calls.build(event, rule, data, identity, consent_context, context, received)

    def deduplicate(
        self, calls: EventCalls, state: IdentityState | None
    ) -> tuple[list[dict], IdentityState, list[str]]:
        """The messages to send and the new state; ``suppressed`` names identify/group held back."""
        fire_identify, fire_group, new_state = decide(
            state, calls.timestamp_ms, calls.identify_signature, calls.group_signature, self.spec.state_ttl_ms
        )
        suppressed = []
        if calls.identify is not None and not fire_identify:
            suppressed.append("identify")
        if calls.group is not None and not fire_group:
            suppressed.append("group")
        return calls.messages(identify=fire_identify, group=fire_group), new_state, suppressed

    # -- all steps at once, for explain -----------------------------------------------------
    def mapped_or_outcome(self, event: dict, with_data: bool = True) -> Mapped | Outcome:
        """One normalised event through consent and mapping: mapped, or the policy outcome
        that dropped it."""
        if not self.consent_granted(event):
            return Outcome(CONSENT_DENIED, "destination_consent")
        result = self.mapping_result(event, with_data)
        if result.ignored:
            return Outcome(IGNORED, "ignore_rule")
        if not self.rule_consent_granted(result):
            return Outcome(CONSENT_DENIED, "rule_consent")
        return self.to_mapped(result, event)

    def before_deduplication(self, event: dict) -> Outcome | EventCalls:
        """One normalised event through every step up to identify/group deduplication: its
        calls, or the outcome that stopped it. The steps of :meth:`mapped_or_outcome` and
        :meth:`plan` in one go, for batch runs and explain: the granted consent is worked out
        once, and nothing is packed into a :class:`Mapped` to be unpacked again."""
        if not self.consent_granted(event):
            return Outcome(CONSENT_DENIED, "destination_consent")
        result, granted = self._mapping_and_granted(event)
        if result.ignored:
            return Outcome(IGNORED, "ignore_rule")
        if not self.rule_consent_granted(result):
            return Outcome(CONSENT_DENIED, "rule_consent")
        data = result.data
        planned = self._plan(event, result.event, result.rule, None if data is UNDEFINED else data, granted, True)
        if type(planned) is DeadLetter:
            return Outcome(DEAD_LETTER, planned.reason, dead_letter=planned)
        return planned

    def process(self, event: dict, states: dict[str, IdentityState]) -> Outcome:
        """One normalised event through every step; ``states`` is the per-key memory."""
        planned = self.before_deduplication(event)
        if isinstance(planned, Outcome):
            return planned
        messages, states[planned.key], _ = self.deduplicate(planned, states.get(planned.key))
        return Outcome(DELIVERED, None, messages)


def _granted_only(consent: Any) -> Any:
    """walkerOS's collector hands a destination only the granted consent keys; the same object
    when nothing is denied (no copy per event in the common case)."""
    if type(consent) is not dict:
        return consent
    for value in consent.values():
        if value is not True:
            return {key: True for key, state in consent.items() if state is True}
    return consent


def _rules_set(mapping: Any, keys: tuple[str, ...]) -> bool:
    """Whether any rule of a mapping has one of ``keys`` in its ``settings``."""
    if not isinstance(mapping, dict):
        return False
    for actions in mapping.values():
        for rules in actions.values() if isinstance(actions, dict) else ():
            for rule in rules if isinstance(rules, list) else [rules]:
                settings = rule.get("settings") if isinstance(rule, dict) else None
                if isinstance(settings, dict) and any(k in settings for k in keys):
                    return True
    return False


# -- a compiled destination per process and flow ---------------------------------------------
# Compiling the mapping costs far more than a bundle of events on the streaming DirectRunner,
# which rebuilds every DoFn per bundle; compile once per process and flow instead.
_COMPILED: dict[str, Destination] = {}
_COMPILED_LOCK = threading.Lock()


def compiled(spec: DestinationSpec, quiet: bool = False) -> Destination:
    """The process's one :class:`Destination` for ``spec``. ``quiet``: one whose user-function
    errors are neither counted nor logged (for a second pass over events the pipeline's steps
    already report on)."""
    key = _spec_key(spec) + (":quiet" if quiet else "")
    with _COMPILED_LOCK:
        destination = _COMPILED.get(key)
        if destination is None:
            destination = _COMPILED[key] = Destination(spec, quiet)
        return destination


def _spec_key(spec: DestinationSpec) -> str:
    text = orjson.dumps(
        [
            spec.flow_name,
            spec.config,
            spec.collector,
            spec.namespace,
            spec.state_ttl_ms,
            spec.config_path,
            spec.functions,
        ],
        option=orjson.OPT_SORT_KEYS,
        default=repr,
    )
    return hashlib.sha256(text).hexdigest()
