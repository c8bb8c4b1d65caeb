# cython: language_level=3
"""aether_fast._core: the compiled hot path, one extension module built from included files.

What it owns: the WebSocket session (frames in, messages out), channel membership, fan-out,
rate buckets and the counters that metrics read. Everything that is not per message (config,
auth, stores, REST, the control messages) is plain Python in aether_fast/ and is called from
here only through the `Node` and `Broker` objects the composition root hands in.

Rule: per subscriber per message, nothing here creates a Python object. A publication is
encoded once (JSON + WebSocket frame header, server frames are unmasked), appended to each
member's outbox, and each outbox is written with one write per loop pass.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.exc cimport PyErr_SetFromErrno
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcpy, memset
from libc.stdint cimport uint8_t, uint64_t
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdio cimport snprintf
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.time cimport time_t

from picows.picows cimport WSListener, WSTransport, WSFrame, WSMsgType, WSCloseCode, MemoryBuffer

import asyncio
from collections import deque

from orjson import JSONDecodeError
from orjson import dumps as _dumps
from orjson import loads as _loads

from aether_fast.protocol import CloseCode, ErrorCode, error_body, name_error
from aether_fast.protocol import status as status_message

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void* msg_name
        unsigned int msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    Py_ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    int setsockopt(int fd, int level, int optname, const void* optval, unsigned int optlen)
    int getsockopt(int fd, int level, int optname, void* optval, unsigned int* optlen)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL

cdef extern from "<errno.h>" nogil:
    int EWOULDBLOCK

include "codec.pxi"
include "deflate.pxi"
include "ratelimit.pxi"
include "hub.pxi"
include "connection.pxi"
include "session.pxi"
include "memlog.pxi"
include "echo.pxi"
