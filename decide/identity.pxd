# Compiled only (setup.py): IdentityResolver as an extension type and the helpers calls.py
# cimports. See mapping.pxd.

cdef class IdentityResolver:
    cdef public object _user_id, _anonymous_id, _read_user_id, _read_anonymous_id, _one_section
    cpdef tuple resolve(self, dict event, dict context)
    cpdef tuple _resolve(self, dict event, dict context)

cpdef state_key(user_id, anonymous_id)
cpdef str canonical_json(value)
cpdef tuple decide(state, timestamp_ms, identify, group, ttl_ms)
