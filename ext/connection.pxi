# connection.pxi: the frame layer every WebSocket of ours shares: message assembly
# (fragments, size limit, RSV bits), the close handshake and its code checks, the outbox and
# its flush, the slow-reader rule. Subclasses (Session, EchoSession) get whole messages in
# `on_message` and decide what they mean.
#
# Rule: every message frame the server sends (publications, acks, errors, notices) and every
# pong goes through the outbox, so their order is kept and each member gets one write per
# loop pass (an outbox that passes SEND_BUFFER_LIMIT_BYTES within a pass is written at once
# instead). Two control frames bypass it and are written by picows at once: the server's
# pings (the hub's tick, `transport.send_ping`; a ping may overtake frames still queued,
# which RFC 6455 allows between messages) and the close frame (`close` flushes the outbox
# first, then `transport.send_close`, so the close frame is still the last frame sent).
#
# Slow-reader rule: only bytes the kernel has not taken count. After each write, what the
# transport still holds (the kernel took none of it yet) is compared with
# SEND_BUFFER_LIMIT_BYTES; over it, the connection is closed with 4008. A reader that never
# reads so costs at most its kernel socket buffer, the limit, and one outbox of at most the
# limit plus one frame. The frame layer never calls the control plane: a subclass reports
# the close in `slow_reader_event` (Session and EchoSession log a security event).

cdef void shrink(MemoryBuffer buffer) noexcept:
    """Give back a picows write buffer's memory, keeping a few bytes. Its content is
    scratch: picows resizes it (and so grows it) before each frame it writes there."""
    cdef char* data
    if buffer.capacity > 64:
        data = <char*>PyMem_Realloc(buffer.data, 64)
        if data != NULL:
            buffer.data = data
            buffer.capacity = 64
            buffer.size = 0


cdef class _SocketOptions:
    """The socket as picows' `connection_made` uses it (fileno, setsockopt, getsockopt),
    working on the descriptor. uvloop's socket object builds a Python `socket.socket` for
    each such call: six per connection were a tenth of connection set-up."""
    cdef int fd

    def __init__(self, int fd):
        self.fd = fd

    def fileno(self):
        return self.fd

    def setsockopt(self, int level, int option, int value):
        if setsockopt(self.fd, level, option, &value, sizeof(value)) != 0:
            PyErr_SetFromErrno(OSError)

    def getsockopt(self, int level, int option):
        cdef int value = 0
        cdef unsigned int size = sizeof(value)
        if getsockopt(self.fd, level, option, &value, &size) != 0:
            PyErr_SetFromErrno(OSError)
        return value


cdef class _HandOffView:
    """The transport as picows sees it while it takes a socket over: the real one, but for
    the socket (options set on the descriptor) and for its 101 response, which joins the
    outbox so that it leaves with the connect reply in one write."""
    cdef object real
    cdef object sock
    cdef Connection listener
    cdef WSTransport ws
    cdef public object write
    cdef public object get_write_buffer_size

    def __init__(self, object real, int fd, Connection listener):
        self.real = real
        self.sock = _SocketOptions(fd)
        self.listener = listener
        self.write = real.write
        self.get_write_buffer_size = real.get_write_buffer_size

    def get_extra_info(self, name, default=None):
        if name == "socket":
            return self.sock
        return self.real.get_extra_info(name, default)

    def write_response(self, data):
        self.ws.underlying_transport = self.real  # from here on picows has the real one
        if data[:12] == b"HTTP/1.1 101":
            self.listener.enqueue_frame(bytes(data))
        else:  # an error response, followed by a disconnect: written now
            self.real.write(data)

    # anything else picows may do before it has the real transport back (it refuses a
    # request and disconnects) goes to the real one
    def close(self):
        self.real.close()

    def abort(self):
        self.real.abort()

    def is_closing(self):
        return self.real.is_closing()


def hand_over(object protocol, object transport, Connection listener, bytes head, bytes rest):
    """Give the socket behind `transport` to `protocol` (a picows WSProtocol whose listener
    is `listener`) and feed it the upgrade request `head`, then any bytes that came after
    it. picows' `connection_made` sees a view of the transport whose socket options are
    cheap (uvloop's socket object builds a Python `socket.socket` for each of its six
    calls), and its 101 response joins the outbox, to leave with the connect reply in one
    write. Afterwards picows holds the real transport."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        protocol.connection_made(transport)
        feed(protocol, head)
        feed(protocol, rest)
        return
    cdef _HandOffView view = _HandOffView(transport, sock.fileno(), listener)
    try:
        protocol.connection_made(view)
        view.ws = protocol.transport
        view.write = view.write_response
        feed(protocol, head)
        if rest:
            # frames pipelined behind the request: picows may answer one itself (a close
            # for a bad frame), straight to the socket, so the 101 must be out first
            listener.flush_outbox()
            feed(protocol, rest)
    finally:
        if view.ws is not None:
            view.ws.underlying_transport = transport
        view.write = None  # no cycle, nothing kept alive by the view
        view.ws = None
        view.listener = None


cdef void feed(object protocol, bytes data) except *:
    cdef Py_ssize_t pos = 0, n, size = len(data)
    while pos < size:
        buf = protocol.get_buffer(size - pos)
        n = min(len(buf), size - pos)
        buf[:n] = data[pos:pos + n]
        protocol.buffer_updated(n)
        pos += n


cdef inline bint valid_close_code(int code):
    if code >= 3000 and code <= 4999:
        return True
    return (code >= 1000 and code <= 1003) or (code >= 1007 and code <= 1014)


#: An outbox of up to this many frames comes from pymalloc and is freed after each complete
#: send, so an idle connection holds none; larger (busy) ones are kept until the next tick.
cdef Py_ssize_t SMALL_OUTBOX = 16
#: Frames per sendmsg() (below IOV_MAX, 1024 on Linux).
cdef Py_ssize_t IOV_CHUNK = 512


cdef class Connection(WSListener):
    """One accepted WebSocket: frames in, whole messages to `on_message`, frames out."""
    cdef readonly WSTransport transport
    cdef object raw
    cdef Hub hub
    # the outbox: the frames queued this loop pass, as pointers into frames the Hub keeps
    # alive until the pass's flush (no copy per member), written with one sendmsg() per pass
    cdef iovec* iov
    cdef Py_ssize_t niov
    cdef Py_ssize_t iovcap
    cdef Py_ssize_t olen
    cdef int fd               # the socket for direct sends; -1: always through the transport
    cdef bint handed          # the transport holds bytes of ours that are not sent yet
    cdef bint dirty
    cdef bint pacing          # frames wait for the socket to drain: `drained` after writes
    cdef int stall_ticks      # ticks since pacing last queued a frame
    cdef readonly bint closing
    cdef readonly bint connected
    cdef Py_ssize_t max_message
    cdef bytearray frag
    cdef int frag_opcode
    cdef bint frag_overflow
    cdef bint frag_deflated   # the fragmented message being assembled is compressed (RSV1)
    # permessage-deflate, set at the upgrade: 0 = not negotiated; else the server window
    # bits this connection's compressed frames use (8-15; 8: it gets plain frames)
    cdef public int deflate
    cdef unsigned long frames_seen
    cdef bint ping_outstanding
    cdef object close_timer
    cdef public double expires_at
    cdef public bint warned
    cdef public str peer
    cdef public double connected_at
    cdef public int close_code

    def __init__(self, Hub hub, str peer, Py_ssize_t max_message):
        self.hub = hub
        self.iov = NULL
        self.niov = 0
        self.iovcap = 0
        self.olen = 0
        self.fd = -1
        self.handed = False
        self.dirty = False
        self.pacing = False
        self.stall_ticks = 0
        self.closing = False
        self.connected = False
        self.max_message = max_message
        self.frag = None
        self.frag_opcode = 0
        self.frag_overflow = False
        self.frag_deflated = False
        self.deflate = 0
        self.frames_seen = 0
        self.ping_outstanding = False
        self.close_timer = None
        self.expires_at = 0.0
        self.warned = False
        self.peer = peer
        self.connected_at = 0.0
        self.close_code = 0

    def __dealloc__(self):
        if self.iov != NULL:
            PyMem_Free(self.iov)
            self.iov = NULL

    # -- hooks for subclasses ---------------------------------------------------------------

    cdef void opened(self):
        pass

    cdef void closed(self):
        pass

    cdef void on_message(self, int opcode, bytes payload):
        pass

    cdef void too_large(self, Py_ssize_t size):
        self.close(CloseCode.TOO_BIG, "message too big")

    cdef void slow_reader_event(self, str reason) except *:
        """`too_slow` is closing this connection (4008): a subclass may report it (the frame
        layer never calls the control plane)."""
        pass

    cdef void drained(self) except *:
        """With `pacing` set: called after each flush of this connection, when its transport
        has sent everything it held, and on the tick. Queue what waited for room."""
        pass

    cdef void on_ping(self, WSFrame frame) except *:
        """A ping came in: answered here, not by picows, so the pong keeps its place behind
        queued frames (a subclass may charge it to a budget first, or hold the answer)."""
        self.enqueue_frame(frame_bytes(0xA, frame.payload_ptr, frame.payload_size))

    cdef void free_frame(self) except *:
        """A pong or a continuation frame came in: frames that carry no message of their
        own (a subclass may charge some of them to a budget; it may close the connection)."""
        pass

    # -- picows callbacks -------------------------------------------------------------------

    cpdef on_ws_connected(self, WSTransport transport):
        self.transport = transport
        self.raw = transport.underlying_transport
        if self.raw.get_extra_info("sslcontext") is None:
            sock = self.raw.get_extra_info("socket")
            self.fd = sock.fileno() if sock is not None else -1
        # the parsed upgrade request and our response (headers and all) are not needed once
        # we run, nor picows' 1 KiB write buffer (our frames go through the outbox; picows
        # grows it again for a control frame it sends itself): an idle connection should
        # cost as little as possible
        transport.request = None
        transport.response = None
        shrink(transport._write_buffer)
        self.connected = True
        self.connected_at = aether_wall_time()
        self.hub.add_session(self)
        self.opened()

    cpdef on_ws_disconnected(self, WSTransport transport):
        self.connected = False
        self.closing = True
        self.pacing = False
        self.fd = -1
        self.niov = 0
        self.olen = 0
        self.release_buffer()
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self.closed()
        self.hub.remove_session(self)

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType t = frame.msg_type
        self.frames_seen += 1
        if frame.rsv2 or frame.rsv3 or (frame.rsv1 and (
                self.deflate == 0 or (t != WSMsgType.TEXT and t != WSMsgType.BINARY))):
            # RSV1 means "compressed" only on the first frame of a message of a connection
            # that negotiated permessage-deflate (RFC 7692 §6): never on a continuation or
            # a control frame
            if not self.closing:
                self.close(CloseCode.PROTOCOL_ERROR, "reserved bits set without an extension")
            return
        if t == WSMsgType.CLOSE:
            self.on_close_frame(frame)
            return
        if t == WSMsgType.PONG:
            self.ping_outstanding = False
            if not self.closing:
                self.free_frame()
            return
        if self.closing:
            return
        if t == WSMsgType.PING:
            self.on_ping(frame)
            return
        if t == WSMsgType.CONTINUATION:
            if self.frag_opcode == 0:
                self.close(CloseCode.PROTOCOL_ERROR, "continuation without a message")
                return
            self.free_frame()
            if self.closing:
                return
            self.add_fragment(frame)
            if frame.fin:
                self.end_fragments()
            return
        if self.frag_opcode != 0:
            self.close(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
            return
        if not frame.fin:
            self.frag_opcode = <int>t
            self.frag = bytearray()
            self.frag_overflow = False
            self.frag_deflated = frame.rsv1
            self.add_fragment(frame)
            return
        if frame.rsv1:
            self.on_deflated(<int>t, frame.payload_ptr, frame.payload_size)
            return
        if frame.payload_size > self.max_message:
            self.too_large(frame.payload_size)
            return
        self.on_message(<int>t, frame.get_payload_as_bytes())

    cpdef pause_writing(self):
        pass  # the send buffer limit (too_slow) is our backpressure rule, not pausing

    cpdef resume_writing(self):
        # while pacing, the transport's write buffer limits are 0: this comes once it has
        # handed everything it held to the kernel
        if self.pacing:
            self.drained()

    # -- message assembly -------------------------------------------------------------------

    cdef void add_fragment(self, WSFrame frame):
        if self.frag_overflow:
            return
        # compressed fragments are kept as they come, up to what a message of
        # MAX_MESSAGE_BYTES compresses to at worst: past it, it inflates to more
        cdef Py_ssize_t limit = (deflated_limit(self.max_message) if self.frag_deflated
                                 else self.max_message)
        if PyByteArray_GET_SIZE(self.frag) + frame.payload_size > limit:
            self.frag_overflow = True
            self.frag = bytearray()
            return
        self.frag += frame.get_payload_as_memoryview()

    cdef void end_fragments(self):
        cdef int opcode = self.frag_opcode
        cdef bytes payload = bytes(self.frag)
        cdef bint overflow = self.frag_overflow
        cdef bint deflated = self.frag_deflated
        self.frag_opcode = 0
        self.frag = None
        self.frag_deflated = False
        if deflated and not overflow:
            self.on_deflated(opcode, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
            return
        if overflow:
            self.too_large(-1)
            return
        self.on_message(opcode, payload)

    cdef void on_deflated(self, int opcode, const char* data, Py_ssize_t n):
        """A whole compressed message: inflated (by the worker's one inflater), then handled
        as the plain message it inflates to, whose size is what MAX_MESSAGE_BYTES limits:
        over it `too_large` (inflating stops soon after: `inflate_message`), over the frame
        hard limit close 1009 (a zip bomb); not valid deflate data: 1007."""
        cdef int verdict = INFLATE_BAD
        cdef bytes payload = inflate_message(data, n, self.max_message, &verdict)
        if verdict == INFLATED:
            self.on_message(opcode, payload)
        elif verdict == INFLATED_OVER:
            self.too_large(-1)
        elif verdict == INFLATED_BOMB:
            self.close(CloseCode.TOO_BIG, "message too big once inflated")
        else:
            self.close(CloseCode.INVALID_DATA, "invalid compressed data")

    cdef void on_close_frame(self, WSFrame frame):
        cdef int code
        if self.closing:
            self.transport.disconnect()
            return
        if frame.payload_size == 0:
            self.close(CloseCode.NORMAL, "")
            return
        if frame.payload_size == 1:
            self.close(CloseCode.PROTOCOL_ERROR, "close payload of one byte")
            return
        code = <int>frame.get_close_code()
        if not valid_close_code(code):
            self.close(CloseCode.PROTOCOL_ERROR, "invalid close code")
            return
        try:
            frame.get_close_reason()
        except UnicodeDecodeError:
            self.close(CloseCode.INVALID_DATA, "close reason is not UTF-8")
            return
        self.close(code, "")
        self.transport.disconnect()

    # -- sending ----------------------------------------------------------------------------

    cdef inline int enqueue(self, const char* p, Py_ssize_t n) except -1:
        """Queue `n` bytes at `p`, which must point into a frame in `hub.keep`."""
        if self.closing:
            return 0
        cdef Py_ssize_t cap
        cdef iovec* grown
        if self.niov == self.iovcap:
            cap = self.iovcap * 2 if self.iovcap else SMALL_OUTBOX
            grown = <iovec*>PyMem_Realloc(self.iov, cap * sizeof(iovec))
            if grown == NULL:
                raise MemoryError("outbox")
            self.iov = grown
            self.iovcap = cap
        self.iov[self.niov].iov_base = <void*>p
        self.iov[self.niov].iov_len = <size_t>n
        self.niov += 1
        self.olen += n
        if self.olen > self.hub.send_buffer_limit:
            # more than the limit in one pass: the kernel takes what it can now, and only
            # what it does not take counts (flush_outbox closes a reader too slow)
            self.flush_outbox()
            return 0
        if not self.dirty:
            self.dirty = True
            self.hub.mark_dirty(self)
        return 0

    cdef inline int enqueue_frame(self, bytes frame) except -1:
        """Queue one frame of this connection's own (kept alive by the Hub until the flush)."""
        if self.closing:
            return 0
        self.hub.keep.append(frame)
        return self.enqueue(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))

    cdef int flush_outbox(self) except -1:
        """One sendmsg() of everything queued; what the kernel does not take is copied to
        the transport, which sends it when the socket is writable (and keeps order). If
        the transport then holds more than the limit, the reader is too slow: 4008."""
        cdef Py_ssize_t n = self.olen
        cdef Py_ssize_t sent = 0
        cdef Py_ssize_t r, i, done, chunk_bytes, pending
        cdef int chunk
        cdef msghdr msg
        if n == 0:
            return 0
        if not self.connected or self.raw.is_closing():
            self.niov = 0  # is_closing() first: after it the fd may already be closed
            self.olen = 0
            return 0
        if self.handed:
            self.handed = self.raw.get_write_buffer_size() > 0
        if not self.handed and self.fd >= 0:
            memset(&msg, 0, sizeof(msghdr))
            i = 0
            while i < self.niov:
                chunk = <int>(self.niov - i if self.niov - i < IOV_CHUNK else IOV_CHUNK)
                chunk_bytes = 0
                for done in range(i, i + chunk):
                    chunk_bytes += <Py_ssize_t>self.iov[done].iov_len
                msg.msg_iov = self.iov + i
                msg.msg_iovlen = <size_t>chunk
                with nogil:
                    r = sendmsg(self.fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL)
                if r < 0:
                    if errno != EAGAIN and errno != EWOULDBLOCK and errno != EINTR:
                        self.niov = 0  # the socket is broken: the transport's reader will see it
                        self.olen = 0
                        return 0
                    break
                sent += r
                if r < chunk_bytes:
                    break
                i += chunk
            if sent == n:
                self.niov = 0
                self.olen = 0
                if self.iovcap <= SMALL_OUTBOX:
                    self.release_buffer()  # small: pymalloc gives it back at once
                return 0
        self.raw.write(self.rest_after(sent))
        self.niov = 0
        self.olen = 0
        self.handed = True
        # what the kernel has not taken: the slow-reader rule judges this, and only this
        pending = self.raw.get_write_buffer_size()
        if pending > self.hub.send_buffer_limit:
            self.too_slow()
        return 0

    cdef Py_ssize_t unsent(self) except -1:
        """Bytes queued here or in the transport that the kernel has not taken."""
        return self.olen + (self.raw.get_write_buffer_size() if self.handed else 0)

    cdef bytes rest_after(self, Py_ssize_t skip):
        """The queued bytes after the first `skip`, copied into one bytes object."""
        cdef bytes out = PyBytes_FromStringAndSize(NULL, self.olen - skip)
        cdef char* dst = PyBytes_AS_STRING(out)
        cdef Py_ssize_t i, size
        cdef char* src
        for i in range(self.niov):
            src = <char*>self.iov[i].iov_base
            size = <Py_ssize_t>self.iov[i].iov_len
            if skip >= size:
                skip -= size
                continue
            memcpy(dst, src + skip, size - skip)
            dst += size - skip
            skip = 0
        return out

    cdef void release_buffer(self) noexcept:
        """Free an empty outbox (an idle connection should cost little)."""
        if self.niov == 0 and self.iov != NULL:
            PyMem_Free(self.iov)
            self.iov = NULL
            self.iovcap = 0

    cdef void too_slow(self, str reason="send buffer over limit") except *:
        self.hub.slow_reader_closes += 1
        self.niov = 0
        self.olen = 0
        self.slow_reader_event(reason)
        self.close(CloseCode.SLOW_READER, "send buffer over its limit")

    cpdef send_frame(self, bytes frame):
        """Queue one encoded frame; it is written with everything else this loop pass."""
        self.enqueue_frame(frame)

    cpdef send_json(self, object obj):
        """Queue `obj` as a JSON text frame."""
        self.enqueue_frame(json_frame(obj))

    cpdef expire(self):
        """The credentials this connection was admitted with have expired."""
        self.close(CloseCode.AUTH, "token expired")

    cpdef close(self, int code, str reason=""):
        """Flush what is queued, send CLOSE with `code`, and drop the TCP connection once
        the client answers (or after the hub's close timeout)."""
        if self.closing or self.transport is None:
            return
        if self.olen:
            self.flush_outbox()
        self.closing = True
        self.close_code = code
        self.transport.send_close(<WSCloseCode>code, reason.encode()[:120])
        self.close_timer = self.hub.loop.call_later(self.hub.close_timeout, self._drop)

    def _drop(self):
        self.close_timer = None
        if self.transport is not None:
            self.transport.disconnect(False)

    @property
    def outbox_size(self) -> int:
        return self.olen
