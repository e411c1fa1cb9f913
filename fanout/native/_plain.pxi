# plain(): which objects the two MessagePack packages encode alike (fanout.wire.codec).
# Included by _ring.pyx: part of the one module fanout.native._ring (the producer's
# hot path imports it with the rings). Twin: fanout/native/_plain_py.py.
#
# On the producer's hot path: C-level type checks on borrowed references. Nothing in
# the walk runs Python code (leaves are matched by identity), so nothing can change
# a container under it.

from cpython.object cimport PyObject, PyTypeObject

cdef extern from "Python.h":
    PyTypeObject _str_t "PyUnicode_Type"
    PyTypeObject _int_t "PyLong_Type"
    PyTypeObject _float_t "PyFloat_Type"
    PyTypeObject _bool_t "PyBool_Type"
    PyTypeObject _bytes_t "PyBytes_Type"
    PyTypeObject _dict_t "PyDict_Type"
    PyTypeObject _list_t "PyList_Type"
    PyTypeObject _tuple_t "PyTuple_Type"
    PyObject* _none "Py_None"
    PyTypeObject* _type_of "Py_TYPE"(PyObject*)
    int _dict_next "PyDict_Next"(PyObject*, Py_ssize_t*, PyObject**, PyObject**)
    # (a list or a tuple, exactly)
    Py_ssize_t _seq_size "PySequence_Fast_GET_SIZE"(PyObject*)
    PyObject* _seq_item "PySequence_Fast_GET_ITEM"(PyObject*, Py_ssize_t)
    Py_ssize_t _tuple_size "PyTuple_GET_SIZE"(PyObject*)
    PyObject* _tuple_item "PyTuple_GET_ITEM"(PyObject*, Py_ssize_t)


cdef inline bint _scalar(PyObject* o) noexcept:
    cdef PyTypeObject* t = _type_of(o)
    return (
        t == &_str_t or t == &_int_t or t == &_float_t or o == _none
        or t == &_bool_t or t == &_bytes_t
    )


cdef bint _plain(PyObject* o, int depth, PyObject* leaves) noexcept:
    cdef PyTypeObject* t = _type_of(o)
    cdef PyTypeObject* kt
    cdef Py_ssize_t i, n, pos = 0
    cdef PyObject* k
    cdef PyObject* v
    if t == &_dict_t:
        if depth == 0:
            return False
        while _dict_next(o, &pos, &k, &v):
            kt = _type_of(k)
            if not (kt == &_str_t or kt == &_int_t or kt == &_bytes_t):
                return False
            if not _scalar(v) and not _plain(v, depth - 1, leaves):
                return False
        return True
    if t == &_list_t or t == &_tuple_t:
        if depth == 0:
            return False
        n = _seq_size(o)
        for i in range(n):
            v = _seq_item(o, i)
            if not _scalar(v) and not _plain(v, depth - 1, leaves):
                return False
        return True
    if _scalar(o):
        return True
    n = _tuple_size(leaves)
    for i in range(n):
        if <PyObject*>t == _tuple_item(leaves, i):
            return True
    return False


def plain(obj, int depth, tuple leaves):
    """Whether ``obj`` holds only what msgspec and msgpack encode to the same bytes.

    Exactly dicts (keyed by str, int or bytes), lists, tuples, str, bytes, int,
    float, bool and None, nested at most ``depth`` levels, and instances of the
    types in ``leaves`` (a tuple) anywhere. Anything else (a datetime, a set, a
    subclass) answers False.
    """
    return _plain(<PyObject*>obj, depth, <PyObject*>leaves)
