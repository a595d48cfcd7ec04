# Compiled only (setup.py): Destination as an extension type whose per-event steps call each
# other, the mapping, the identity resolver and the call builder as C calls. See mapping.pxd.

from decide.mapping cimport CompiledRule, DestinationMapping, MappingResult
from decide.calls cimport CallBuilder
from decide.identity cimport IdentityResolver, decide, state_key
from decide.consent cimport ConsentContexts, any_granted, is_granted

cdef class Destination:
    cdef public object spec, _collector, function_errors
    cdef public tuple _required_keys
    cdef public ConsentContexts _consent_contexts
    cdef public DestinationMapping mapping
    cdef public list _rules
    cdef public dict _rule_index
    cdef public IdentityResolver identity
    cdef public CallBuilder calls
    cdef public object needs_identity_state, decisions_need_data
    cpdef consent_granted(self, dict event)
    cpdef tuple _mapping_and_granted(self, dict event, bint with_data=*)
    cpdef rule_consent_granted(self, MappingResult result)
    cpdef tuple _planning(self, dict event, CompiledRule rule, granted=*, bint own=*)
    cpdef _plan(self, dict received, dict mapped, CompiledRule rule, data, granted=*, bint own=*)
    cpdef tuple deduplicate(self, calls, state)
    cpdef before_deduplication(self, dict event)

cpdef _granted_only(consent)
