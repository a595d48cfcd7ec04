# Compiled only (setup.py): CallBuilder as an extension type, its per-event methods and the
# helpers build calls as C calls. calls.py stays the source of truth; see mapping.pxd.

cimport cython

from decide.mapping cimport CompiledRule
from decide.identity cimport canonical_json, state_key

cdef class EventCalls:
    cdef public dict event
    cdef public object key, timestamp_ms, identify, identify_signature, group, group_signature, others

cdef class CallBuilder:
    cdef public object _arguments, _identify, _group, _integrations, _namespace
    cdef public dict _plans
    cpdef build(self, dict event, CompiledRule rule, data, tuple identity, dict consent_context, dict context, dict received)
    cpdef _plan_for(self, CompiledRule rule)
    cpdef _page_like(self, str call_type, setting, dict event, dict context, dict common)
    cpdef str _message_id(self, str event_id, str call_type)

@cython.locals(ms=cython.longlong, minute=cython.longlong, millis_of_minute=cython.longlong,
               second=cython.longlong, millis=cython.longlong)
cpdef str format_timestamp(timestamp_ms)
cpdef _identify_candidate(identify_value, dict event, dict context, str user_id)
cpdef _group_candidate(group_value, dict event, dict context)
cpdef tuple _identify_signature(tuple candidate)
cpdef tuple _group_signature(tuple candidate)
