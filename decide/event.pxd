# Compiled only (setup.py): the validation every event takes, as C calls. See mapping.pxd.

cpdef tuple _validate(dict event)
cpdef bint _plainly_valid(dict event)
cpdef tuple _collector_bases(dict collector)
