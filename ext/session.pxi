# session.pxi: one WebSocket connection: frames in (fragments, UTF-8, size), messages
# decoded and validated, `message/send` published from here, everything else handed to the
# Python Node. Every frame the server sends goes through the outbox, so order is kept.
#
# Rule: a bad message gets an error frame and the connection stays open; only an RFC 6455
# violation, an auth failure or a policy (slow reader, replaced, limits) closes it.

cdef Py_ssize_t MAX_FRAGMENTS = 1 << 20


cdef inline bint valid_channel_name(object name):
    if type(name) is not str:
        return False
    cdef str s = <str>name
    cdef Py_ssize_t n = len(s)
    if n < 1 or n > 128:
        return False
    cdef Py_UCS4 c
    for c in s:
        if not ((c >= u'a' and c <= u'z') or (c >= u'A' and c <= u'Z')
                or (c >= u'0' and c <= u'9') or c == u'_' or c == u'.' or c == u':'
                or c == u'-'):
            return False
    return True


cdef inline bint valid_close_code(int code):
    if code >= 3000 and code <= 4999:
        return True
    return (code >= 1000 and code <= 1003) or (code >= 1007 and code <= 1014)


cdef class Session(WSListener):
    """One client connection. Created by the HTTP front at the upgrade, with the outcome of
    authentication already filled in; registered with the Hub once the handshake is done."""
    cdef readonly WSTransport transport
    cdef object raw
    cdef Hub hub
    cdef bytearray outbox
    cdef Py_ssize_t kernel_pending
    cdef bint dirty
    cdef readonly bint closing
    cdef readonly bint connected
    cdef Bucket bucket
    cdef readonly dict channels
    cdef bytearray frag
    cdef int frag_opcode
    cdef Py_ssize_t frag_count
    cdef bint frag_overflow
    cdef unsigned long frames_seen
    cdef bint ping_outstanding
    cdef object close_timer
    cdef public str client_id
    cdef public object user_id
    cdef public object claims
    cdef public double expires_at
    cdef public bint warned
    cdef public bint echo
    cdef public object auth_error
    cdef public object initial
    cdef public str peer
    cdef public str limit_key
    cdef public double connected_at
    cdef public int close_code

    def __init__(self, Hub hub, str client_id, object claims, str peer):
        self.hub = hub
        self.outbox = bytearray()
        self.kernel_pending = 0
        self.dirty = False
        self.closing = False
        self.connected = False
        self.channels = {}
        self.frag = None
        self.frag_opcode = 0
        self.frag_count = 0
        self.frag_overflow = False
        self.frames_seen = 0
        self.ping_outstanding = False
        self.close_timer = None
        self.client_id = client_id
        self.claims = claims
        self.user_id = claims.user_id if claims is not None else None
        self.expires_at = float(claims.expires_at) if claims is not None else 0.0
        self.warned = False
        self.echo = False
        self.auth_error = None
        self.initial = None
        self.peer = peer
        self.limit_key = None
        self.connected_at = 0.0
        self.close_code = 0
        bucket_init(&self.bucket, hub.conn_capacity, hub.conn_window, aether_monotonic())

    # -- picows callbacks -------------------------------------------------------------------

    cpdef on_ws_connected(self, WSTransport transport):
        self.transport = transport
        self.raw = transport.underlying_transport
        self.connected = True
        self.connected_at = aether_wall_time()
        self.hub.add_session(self)
        self.hub.node.on_open(self)

    cpdef on_ws_disconnected(self, WSTransport transport):
        self.connected = False
        self.closing = True
        self.outbox = None
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self.hub.node.on_close(self)
        self.hub.remove_session(self)

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType t = frame.msg_type
        self.frames_seen += 1
        if t == WSMsgType.PONG:
            self.ping_outstanding = False
            return
        if t == WSMsgType.CLOSE:
            self.on_close_frame(frame)
            return
        if t == WSMsgType.PING:
            return  # picows answers pings itself (enable_auto_pong)
        if self.closing:
            return
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self.close(CloseCode.PROTOCOL_ERROR, "reserved bits set without an extension")
            return
        if t == WSMsgType.CONTINUATION:
            if self.frag_opcode == 0:
                self.close(CloseCode.PROTOCOL_ERROR, "continuation without a message")
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
            self.frag_count = 0
            self.frag_overflow = False
            self.add_fragment(frame)
            return
        if frame.payload_size > self.hub.max_message_bytes:
            self.too_large(frame.payload_size)
            return
        self.on_message(<int>t, frame.get_payload_as_bytes())

    # -- message assembly -------------------------------------------------------------------

    cdef void add_fragment(self, WSFrame frame):
        self.frag_count += 1
        if self.frag_overflow:
            return
        if PyByteArray_GET_SIZE(self.frag) + frame.payload_size > self.hub.max_message_bytes:
            self.frag_overflow = True
            self.frag = bytearray()
            return
        self.frag += frame.get_payload_as_memoryview()

    cdef void end_fragments(self):
        cdef int opcode = self.frag_opcode
        cdef bytes payload = bytes(self.frag)
        cdef bint overflow = self.frag_overflow
        self.frag_opcode = 0
        self.frag = None
        if overflow:
            self.too_large(-1)
            return
        self.on_message(opcode, payload)

    cdef void too_large(self, Py_ssize_t size):
        self.hub.messages_in += 1
        self.send_error(ErrorCode.MESSAGE_TOO_LARGE,
                        "message is larger than MAX_MESSAGE_BYTES", "protocol",
                        "message over %d bytes" % self.hub.max_message_bytes,
                        {"limit": self.hub.max_message_bytes})

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

    # -- messages ---------------------------------------------------------------------------

    cdef void on_message(self, int opcode, bytes payload):
        self.hub.messages_in += 1
        if opcode == WSMsgType.BINARY:
            self.send_error(ErrorCode.INVALID_MESSAGE, "binary frames are not accepted",
                            "protocol", "send JSON text frames", None)
            return
        try:
            msg = _loads(payload)
        except JSONDecodeError:
            try:
                PyUnicode_DecodeUTF8(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                                     NULL)
            except UnicodeDecodeError:
                self.close(CloseCode.INVALID_DATA, "text frame is not valid UTF-8")
                return
            self.send_error(ErrorCode.INVALID_JSON, "message is not valid JSON", "protocol",
                            "could not parse JSON", None)
            return
        if type(msg) is not dict:
            self.invalid("message", "message must be a JSON object", None, None)
            return
        if self.expires_at > 0.0 and aether_wall_time() >= self.expires_at:
            self.expire()
            return
        mtype = (<dict>msg).get("type")
        action = (<dict>msg).get("action")
        data = (<dict>msg).get("data")
        if data is None:
            data = {}
        elif type(data) is not dict:
            self.invalid("data", "data must be an object", None, None)
            return
        if mtype == "message" and (action == "send" or action == "retry"):
            self.publish(<dict>data)
        else:
            self.hub.node.on_control(self, mtype, action, data)

    cdef void publish(self, dict data):
        channel = data.get("channel")
        if not valid_channel_name(channel):
            self.invalid("channel", "channel must be 1-128 characters of A-Z a-z 0-9 _ . : -",
                         None, None)
            return
        content = data.get("content")
        meta = data.get("metadata")
        if type(meta) is not dict:
            self.invalid("metadata", "metadata must be an object with a sequence", channel, None)
            return
        seq = (<dict>meta).get("sequence")
        if type(seq) is not int or seq < 0:
            self.invalid("metadata.sequence", "sequence must be a non-negative integer",
                         channel, None)
            return
        if type(content) is not str:
            self.invalid("content", "content must be a string", channel, seq)
            return
        ts = (<dict>meta).get("timestamp")
        if ts is not None and type(ts) is not str:
            self.invalid("metadata.timestamp", "timestamp must be a string", channel, seq)
            return
        cdef Channel ch = self.channels.get(channel)
        if ch is None:
            self.send_error(ErrorCode.NOT_A_MEMBER, "join the channel before publishing",
                            "channel", "not a member", {"channel": channel, "sequence": seq})
            return
        cdef double now = aether_monotonic()
        cdef double wait = bucket_wait(&self.bucket, now)
        cdef str which = "connection"
        if wait == 0.0:
            wait = bucket_wait(&ch.bucket, now)
            which = "channel"
        if wait == 0.0:
            wait = bucket_wait(&self.hub.global_bucket, now)
            which = "global"
        if wait > 0.0:
            self.limited(which, wait, channel, seq)
            return
        bucket_take(&self.bucket)
        bucket_take(&ch.bucket)
        bucket_take(&self.hub.global_bucket)
        result = self.hub.broker.publish(ch, self, seq, content)
        if type(result) is tuple:
            self.ack(channel, seq, result)
        else:
            asyncio.ensure_future(self._ack_later(channel, seq, result))

    async def _ack_later(self, str channel, object seq, object pending):
        try:
            result = await pending
        except Exception as exc:
            self.send_error(ErrorCode.INTERNAL_ERROR, "message could not be stored",
                            "broker", str(exc), {"channel": channel, "sequence": seq})
            return
        self.ack(channel, seq, result)

    cdef void ack(self, str channel, object seq, tuple result):
        self.send_json({"type": "message", "action": "ack", "data": {
            "channel": channel,
            "metadata": {"sequence": seq, "offset": result[0], "timestamp": result[1]}}})

    cdef void limited(self, str which, double wait, object channel, object seq):
        cdef str code = ErrorCode.SERVER_BUSY if which == "global" else ErrorCode.RATE_LIMITED
        self.hub.rate_limited += 1
        self.send_error(code, "rate limit exceeded (%s)" % which, "ratelimit", which,
                        {"channel": channel, "sequence": seq,
                         "retry_after_ms": int(wait * 1000.0) + 1})
        self.hub.node.security_event(self, "rate_limited", which)

    cdef void invalid(self, str field, str reason, object channel, object seq):
        cdef dict details = {"field": field}
        if channel is not None:
            details["channel"] = channel
        if seq is not None:
            details["sequence"] = seq
        self.send_error(ErrorCode.INVALID_MESSAGE, "invalid message", "protocol", reason,
                        details)

    # -- sending ----------------------------------------------------------------------------

    cdef inline void enqueue(self, const char* p, Py_ssize_t n):
        if self.closing:
            return
        cdef bytearray out = self.outbox
        cdef Py_ssize_t old = PyByteArray_GET_SIZE(out)
        PyByteArray_Resize(out, old + n)
        memcpy(PyByteArray_AS_STRING(out) + old, p, n)
        if old + n + self.kernel_pending > self.hub.send_buffer_limit:
            self.too_slow()
            return
        if not self.dirty:
            self.dirty = True
            self.hub.mark_dirty(self)

    cdef void flush_outbox(self):
        cdef bytearray out = self.outbox
        if out is None or PyByteArray_GET_SIZE(out) == 0 or not self.connected:
            return
        if self.raw.is_closing():
            self.outbox = bytearray()
            return
        self.raw.write(out)
        self.kernel_pending = self.raw.get_write_buffer_size()
        if self.kernel_pending:
            # the transport may keep a reference to `out` until it is sent: start a new one
            self.outbox = bytearray()
            if self.kernel_pending > self.hub.send_buffer_limit:
                self.too_slow()
        else:
            PyByteArray_Resize(out, 0)

    cdef void too_slow(self):
        self.hub.slow_reader_closes += 1
        self.outbox = bytearray()
        self.hub.node.security_event(self, "slow_reader", "send buffer over limit")
        self.close(CloseCode.SLOW_READER, "send buffer over its limit")

    cpdef send_frame(self, bytes frame):
        """Queue one encoded frame; it is written with everything else this loop pass."""
        self.enqueue(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))

    cpdef send_json(self, object obj):
        """Queue `obj` as a JSON text frame."""
        cdef bytes frame = json_frame(obj)
        self.enqueue(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))

    cpdef send_error(self, str code, str message, str component, str reason, dict details):
        """Queue an error message of SPEC §4's shape."""
        self.hub.count_error(code)
        if details is None:
            self.send_json(error_body(code, message, component, reason))
        else:
            self.send_json(error_body(code, message, component, reason, **details))

    cpdef expire(self):
        """The token has expired: say so and close 4001."""
        self.send_error(ErrorCode.TOKEN_EXPIRED, "token has expired", "auth", "token expired",
                        None)
        self.close(CloseCode.AUTH, "token expired")

    cpdef close(self, int code, str reason=""):
        """Flush what is queued, send CLOSE with `code`, and drop the TCP connection once
        the client answers (or after the hub's close timeout)."""
        if self.closing or self.transport is None:
            return
        if self.outbox is not None and PyByteArray_GET_SIZE(self.outbox):
            self.flush_outbox()
        self.closing = True
        self.close_code = code
        self.transport.send_close(<WSCloseCode>code, reason.encode()[:120])
        self.close_timer = self.hub.loop.call_later(self.hub.close_timeout, self._drop)

    def _drop(self):
        self.close_timer = None
        if self.transport is not None:
            self.transport.disconnect(False)

    def joined(self) -> list:
        return list(self.channels)

    def is_member(self, str name) -> bool:
        return name in self.channels

    @property
    def outbox_size(self) -> int:
        return 0 if self.outbox is None else PyByteArray_GET_SIZE(self.outbox)
