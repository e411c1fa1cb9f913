# pack_plain(): MessagePack of a plain object in one pass, the walk and the encode at
# once. Included by _ring.pyx after _plain.pxi (whose type declarations it uses);
# twin: pack_plain in fanout/native/_plain_py.py.
#
# It writes what msgpack and msgspec both write for what plain() accepts with no
# leaf types (tests/test_codec_parity.py compares the three), and gives up (-1) on
# anything else: another type, a container deeper than ``depth``, an int past
# 64 bits, a str that is not valid UTF-8, no memory. The caller then runs the
# walk and msgspec, which encode it or raise the error a user should see. Nothing
# here runs Python code, so nothing can change a container under it.

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport uint16_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    PyObject* _true "Py_True"
    Py_ssize_t _dict_size "PyDict_GET_SIZE"(PyObject*)
    int _compact_ascii "PyUnicode_IS_COMPACT_ASCII"(PyObject*)
    void* _str_data "PyUnicode_DATA"(PyObject*)
    Py_ssize_t _str_length "PyUnicode_GET_LENGTH"(PyObject*)
    const char* _str_utf8 "PyUnicode_AsUTF8AndSize"(PyObject*, Py_ssize_t*)
    char* _bytes_data "PyBytes_AS_STRING"(PyObject*)
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE"(PyObject*)
    double _float_value "PyFloat_AS_DOUBLE"(PyObject*)
    long long _long_value "PyLong_AsLongLongAndOverflow"(PyObject*, int*)
    unsigned long long _ulong_value "PyLong_AsUnsignedLongLong"(PyObject*)
    PyObject* _err_occurred "PyErr_Occurred"()
    void _err_clear "PyErr_Clear"()
    # MessagePack is big endian; these compile to one instruction each.
    uint64_t _be64 "__builtin_bswap64"(uint64_t)
    uint32_t _be32 "__builtin_bswap32"(uint32_t)
    uint16_t _be16 "__builtin_bswap16"(uint16_t)


# What an output buffer starts with (a Pod's notification is about 4.6 KB).
cdef Py_ssize_t _OUT_BYTES = 4096


cdef struct _wbuf:
    unsigned char* p
    Py_ssize_t n  # bytes written
    Py_ssize_t cap  # bytes allocated


cdef int _wbuf_init(_wbuf* b, Py_ssize_t cap) noexcept:
    b.p = <unsigned char*>PyMem_Malloc(cap)
    b.n = 0
    b.cap = cap if b.p != NULL else 0
    return 0 if b.p != NULL else -1


cdef int _wgrow(_wbuf* b, Py_ssize_t need) noexcept:
    cdef Py_ssize_t cap = b.cap * 2 if b.cap else 256
    cdef unsigned char* p
    while cap < b.n + need:
        if cap > (<Py_ssize_t>1 << 60):
            return -1
        cap *= 2
    p = <unsigned char*>PyMem_Realloc(b.p, cap)
    if p == NULL:
        return -1
    b.p = p
    b.cap = cap
    return 0


cdef inline unsigned char* _room(_wbuf* b, Py_ssize_t need) noexcept:
    # Where the next ``need`` bytes go (the caller adds them to b.n), or NULL.
    if b.n + need > b.cap and _wgrow(b, need) < 0:
        return NULL
    return b.p + b.n


cdef inline int _put_be16(unsigned char* p, uint16_t v) noexcept:
    v = _be16(v)
    memcpy(p, &v, 2)
    return 0


cdef inline int _put_be32(unsigned char* p, uint32_t v) noexcept:
    v = _be32(v)
    memcpy(p, &v, 4)
    return 0


cdef inline int _put_be64(unsigned char* p, uint64_t v) noexcept:
    v = _be64(v)
    memcpy(p, &v, 8)
    return 0


cdef inline int _head(_wbuf* b, unsigned fix, Py_ssize_t fix_max, unsigned c8,
                      unsigned c16, unsigned c32, Py_ssize_t n) noexcept:
    # The header of a str, bin, array or map of ``n``: the smallest form that holds
    # it (``fix | n`` up to ``fix_max``; no 8-bit form where ``c8`` is 0).
    cdef unsigned char* p = _room(b, 5)
    if p == NULL:
        return -1
    if n <= fix_max:
        p[0] = <unsigned char>(fix | n)
        b.n += 1
    elif c8 and n <= 0xFF:
        p[0] = <unsigned char>c8
        p[1] = <unsigned char>n
        b.n += 2
    elif n <= 0xFFFF:
        p[0] = <unsigned char>c16
        _put_be16(p + 1, <uint16_t>n)
        b.n += 3
    elif n <= 0xFFFFFFFF:
        p[0] = <unsigned char>c32
        _put_be32(p + 1, <uint32_t>n)
        b.n += 5
    else:
        return -1
    return 0


cdef inline int _head_small(_wbuf* b, unsigned fix, unsigned c16, unsigned c32,
                            Py_ssize_t n) noexcept:
    # An array's or a map's header: most hold up to 15 items, one byte written here.
    cdef unsigned char* p
    if n > 15:
        return _head(b, fix, 15, 0, c16, c32, n)
    p = _room(b, 1)
    if p == NULL:
        return -1
    p[0] = <unsigned char>(fix | n)
    b.n += 1
    return 0


cdef inline int _raw(_wbuf* b, const void* data, Py_ssize_t n) noexcept:
    cdef unsigned char* p = _room(b, n)
    cdef const unsigned char* s = <const unsigned char*>data
    cdef Py_ssize_t i
    if p == NULL:
        return -1
    # Most strings here are short: two overlapping fixed-size copies, which the
    # compiler makes into plain moves, instead of a call to memcpy.
    if n > 32:
        memcpy(p, s, n)
    elif n >= 16:
        memcpy(p, s, 16)
        memcpy(p + n - 16, s + n - 16, 16)
    elif n >= 8:
        memcpy(p, s, 8)
        memcpy(p + n - 8, s + n - 8, 8)
    elif n >= 4:
        memcpy(p, s, 4)
        memcpy(p + n - 4, s + n - 4, 4)
    else:
        for i in range(n):
            p[i] = s[i]
    b.n += n
    return 0


cdef inline int _pack_str(_wbuf* b, PyObject* o) noexcept:
    cdef Py_ssize_t n
    cdef const char* s
    if _compact_ascii(o):  # the common case: its characters are its UTF-8
        s = <const char*>_str_data(o)
        n = _str_length(o)
    else:
        s = _str_utf8(o, &n)  # cached on the str by Python
        if s == NULL:  # a lone surrogate: msgspec raises the error the user sees
            _err_clear()
            return -1
    if n <= 31:  # most keys and values: a one-byte header, written here
        if _room(b, 1) == NULL:
            return -1
        b.p[b.n] = <unsigned char>(0xA0 | n)
        b.n += 1
    elif _head(b, 0xA0, 31, 0xD9, 0xDA, 0xDB, n) < 0:
        return -1
    return _raw(b, s, n)


cdef int _pack_int(_wbuf* b, PyObject* o) noexcept:
    cdef int overflow = 0
    cdef long long v = _long_value(o, &overflow)
    cdef unsigned long long u
    cdef unsigned char* p = _room(b, 9)
    if p == NULL:
        return -1
    if overflow:
        if overflow < 0:
            return -1  # below -2**63: msgspec raises the error the user sees
        u = _ulong_value(o)
        if u == <unsigned long long>-1 and _err_occurred() != NULL:
            _err_clear()
            return -1  # past 2**64 - 1
        p[0] = 0xCF
        _put_be64(p + 1, u)
        b.n += 9
        return 0
    if v >= 0:
        if v <= 0x7F:
            p[0] = <unsigned char>v
            b.n += 1
        elif v <= 0xFF:
            p[0] = 0xCC
            p[1] = <unsigned char>v
            b.n += 2
        elif v <= 0xFFFF:
            p[0] = 0xCD
            _put_be16(p + 1, <uint16_t>v)
            b.n += 3
        elif v <= 0xFFFFFFFF:
            p[0] = 0xCE
            _put_be32(p + 1, <uint32_t>v)
            b.n += 5
        else:
            p[0] = 0xCF
            _put_be64(p + 1, <uint64_t>v)
            b.n += 9
    elif v >= -32:
        p[0] = <unsigned char>(<int>v & 0xFF)
        b.n += 1
    elif v >= -128:
        p[0] = 0xD0
        p[1] = <unsigned char>(<int>v & 0xFF)
        b.n += 2
    elif v >= -32768:
        p[0] = 0xD1
        _put_be16(p + 1, <uint16_t>(<int>v & 0xFFFF))
        b.n += 3
    elif v >= -2147483648:
        p[0] = 0xD2
        _put_be32(p + 1, <uint32_t>(v & 0xFFFFFFFF))
        b.n += 5
    else:
        p[0] = 0xD3
        _put_be64(p + 1, <uint64_t>v)
        b.n += 9
    return 0


cdef inline int _pack_one(_wbuf* b, unsigned char code) noexcept:
    cdef unsigned char* p = _room(b, 1)
    if p == NULL:
        return -1
    p[0] = code
    b.n += 1
    return 0


cdef int _pack(_wbuf* b, PyObject* o, int depth) noexcept:
    # The order of the tests is the frequency of the types in Kubernetes objects.
    cdef PyTypeObject* t = _type_of(o)
    cdef PyTypeObject* kt
    cdef Py_ssize_t i, n, pos = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef double d
    cdef uint64_t bits
    cdef unsigned char* p
    if t == &_str_t:
        return _pack_str(b, o)
    if t == &_dict_t:
        if depth == 0 or _head_small(b, 0x80, 0xDE, 0xDF, _dict_size(o)) < 0:
            return -1
        while _dict_next(o, &pos, &k, &v):
            kt = _type_of(k)
            if kt == &_str_t:
                if _pack_str(b, k) < 0:
                    return -1
            elif (kt != &_int_t and kt != &_bytes_t) or _pack(b, k, depth) < 0:
                return -1
            if _pack(b, v, depth - 1) < 0:
                return -1
        return 0
    if t == &_int_t:
        return _pack_int(b, o)
    if o == _none:
        return _pack_one(b, 0xC0)
    if t == &_list_t or t == &_tuple_t:
        n = _seq_size(o)
        if depth == 0 or _head_small(b, 0x90, 0xDC, 0xDD, n) < 0:
            return -1
        for i in range(n):
            if _pack(b, _seq_item(o, i), depth - 1) < 0:
                return -1
        return 0
    if t == &_bool_t:
        return _pack_one(b, 0xC3 if o == _true else 0xC2)
    if t == &_float_t:
        p = _room(b, 9)
        if p == NULL:
            return -1
        d = _float_value(o)
        memcpy(&bits, &d, 8)
        p[0] = 0xCB
        _put_be64(p + 1, bits)
        b.n += 9
        return 0
    if t == &_bytes_t:
        n = _bytes_size(o)
        if _head(b, 0, -1, 0xC4, 0xC5, 0xC6, n) < 0:
            return -1
        return _raw(b, _bytes_data(o), n)
    return -1


cdef object _pack_bytes(object obj, int depth):
    # pack_plain's work: bytes, or None.
    cdef _wbuf b
    if _wbuf_init(&b, _OUT_BYTES) < 0:
        raise MemoryError()
    try:
        if _pack(&b, <PyObject*>obj, depth) < 0:
            return None
        return PyBytes_FromStringAndSize(<char*>b.p, b.n)
    finally:
        PyMem_Free(b.p)


def pack_plain(obj, int depth):
    """MessagePack of ``obj`` when ``plain(obj, depth, ())`` holds, in one pass; else None.

    The bytes msgpack and msgspec both write. None also for what they would
    refuse or write apart: an int outside -2**63 .. 2**64 - 1, a str with a
    lone surrogate, a container with more than 2**32 - 1 items.
    """
    return _pack_bytes(obj, depth)
