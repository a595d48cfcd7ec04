# Compiled only (setup.py): the consent checks every event takes, as C calls. See mapping.pxd.

cpdef bint any_granted(tuple keys, dict state)
cpdef bint is_granted(dict required, dict state)
cpdef category_preferences(dict consent_map, dict state)

cdef class ConsentContexts:
    cdef public dict _consent_map
    cdef public tuple _keys
    cdef public dict _made
    cpdef context_for(self, dict state)
