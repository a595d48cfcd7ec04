# Declarations Cython reads beside mapping.py when setup.py compiles it; plain Python never
# reads them. The classes every event passes through become extension types: their attributes
# are C fields instead of instance dicts, and their per-event methods (cpdef) call each other as
# C functions. The .py stays the source of truth: a declaration must match its definition there
# (the build fails otherwise), and changing either makes the module stale until rebuilt.
# Attributes are public, so the rest of the code (and the tests) read them as before.

cdef class CompiledRule:
    cdef public object key, name, ignore, silent, consent, settings, raw
    cdef public object _condition, _policy, _data, _include, _remove

cdef class MappingResult:
    cdef public dict event
    cdef public CompiledRule rule
    cdef public bint ignored
    cdef public object data

cdef class DestinationMapping:
    cdef public object _config, _path, _on_error, _functions, _log, _policy
    cdef public object _data_node, _data_literal, _include, rules
    cdef public object _plain_event, _plain_data, _simple_rules
    cdef public dict _candidates
    cpdef tuple _rule_for(self, dict event, dict collector)
    cpdef MappingResult process(self, dict event, dict collector=*, bint with_data=*)
    cpdef _include_sections(self, CompiledRule rule, dict event, data)
    cpdef MappingResult _result(self, dict event, CompiledRule rule, bint ignored, data)

cpdef _event_context(dict event, dict collector)
cpdef dict _map_object(tuple steps, dict value, ctx)
cpdef _get_or_undefined(dict section, str key)
