# session.pxi: the aether protocol on a Connection: JSON messages decoded and validated,
# `message/send` published from here (rate checks, membership, broker), everything else
# handed to the Python Node. A join's replay is written as the socket drains (`replay`, `pump`).
#
# Rule: a bad message gets an error frame and the connection stays open; only an RFC 6455
# violation, an auth failure or a policy (slow reader, replaced, limits) closes it.
#
# Budget: every inbound message and ping takes a token from the sender's `Budget` (per user,
# per peer address when anonymous: RATE_LIMIT_MESSAGES per RATE_LIMIT_WINDOW_S) before
# anything else is done with it. A refused message gets one RATE_LIMITED error (a refused
# ping: no pong; a refused message over MAX_MESSAGE_BYTES: its MESSAGE_TOO_LARGE); each
# refusal takes a strike from the session's `strikes` bucket (capacity
# max(REFUSALS_BEFORE_CLOSE, the budget's), refilled at STRIKES_PER_TOKEN times the budget's
# rate), and the refusal that takes the last one closes the connection with 1008
# (`flood_close`): refusals are bounded to a few budgets per window however many of the
# frames get a token.
# Pongs and continuation frames carry no message of their own: every FREE_FRAMES_PER_TOKEN-th
# of them takes a token (refused: a refusal, no error), so that no frame is free for ever.
#
# Answers in the order sent across a join (docs/protocol.md §2): while a join of this
# connection waits for an asynchronous broker (`hold_messages`, by the Node), what the client
# sends is held in `inbound` — messages, over-size messages and pings, each having taken its
# budget token as it came — and handled in order once every join then waiting is answered
# (`release_messages`); so the join of the upgrade's `channel` is the first frame, and a
# publication sent right after a join comes after its reply. A join that comes while
# nothing is held starts at once, beside the others waiting (not after the initial one):
# once something is held nothing new starts, so the joins it waits for only get fewer.
# At most HELD_MESSAGES held and HELD_MESSAGE_SIZES x MAX_MESSAGE_BYTES of their bytes: one
# more closes the connection with 1008. Otherwise `inbound` is None: one test of it on the
# message path, nothing held.

#: The least strikes a session has (the `strikes` bucket holds the budget's capacity when
#: that is more: a client may have sent one budget's worth of frames before it heard the
#: first refusal): a client that merely runs over gets errors, a flood a close after a
#: bounded number of them.
cdef int REFUSALS_BEFORE_CLOSE = 10
#: Strikes given back per token the budget refills: a client that paces itself after each
#: refusal (the bundled ones get up to two refusals per accepted frame while the budget is
#: spent) is never closed, a flood is (290k refusals a second against a few thousand).
cdef double STRIKES_PER_TOKEN = 3.0
#: Pongs and continuation frames (together) per token taken from the budget.
cdef int FREE_FRAMES_PER_TOKEN = 64
#: The replay bytes a connection may have waiting to be written, in SEND_BUFFER_LIMIT_BYTES:
#: a join whose replay would pass it is answered `recovered: false` (`Session.replay_fits`).
cdef Py_ssize_t REPLAY_LIMITS = 16

#: Messages (and pings) a connection may have held while its joins wait for the broker, and
#: their bytes, in MAX_MESSAGE_BYTES: one more closes it (1008, `hold_limit_close`). A
#: well-behaved client keeps fewer than 10 frames unanswered (the bundled ones 8), or sends
#: less than its budget (50 by default).
cdef Py_ssize_t HELD_MESSAGES = 64
cdef Py_ssize_t HELD_MESSAGE_SIZES = 4
#: What a held entry is when it is not a message (whose kind is its opcode).
cdef int HELD_PING = -1
cdef int HELD_TOO_LARGE = -2

#: The reason a bad channel name gets (aether_fast.protocol's words for the rule).
cdef str CHANNEL_NAME_ERROR = name_error("channel")


cdef inline bint valid_channel_name(object name):
    """aether_fast.protocol.CHANNEL_NAME_RE, in C (tests hold the two to one answer)."""
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


def channel_name_ok(object name) -> bool:
    """`valid_channel_name` (for tests: it must agree with protocol.CHANNEL_NAME_RE)."""
    return valid_channel_name(name)


cdef object decode(int opcode, bytes payload):
    """The JSON value of a text message; None when binary or not JSON (neither is a dict, so
    `is_join` and `refuse_message` take them as JSON null)."""
    if opcode != WSMsgType.TEXT:
        return None
    try:
        return _loads(payload)
    except JSONDecodeError:
        return None


cdef inline bint is_join(object msg):
    """Whether a decoded message is a `connection/connect` (a join; valid or not, its budget
    token taken or not): what may start while other joins wait for the broker."""
    return (type(msg) is dict and (<dict>msg).get("type") == "connection"
            and (<dict>msg).get("action") == "connect")


cdef class Replay:
    """A join's replay of one channel that is still being written (`Session.pump`)."""
    cdef str channel
    cdef list frames
    cdef Py_ssize_t next
    cdef Py_ssize_t size      # bytes in `frames`
    cdef Py_ssize_t left      # bytes in `frames` not queued yet
    cdef long long up_to

    def __cinit__(self, str channel, list frames, long long up_to):
        self.channel = channel
        self.up_to = up_to
        self.set_frames(frames)

    cdef void set_frames(self, list frames) except *:
        cdef bytes frame
        self.frames = frames
        self.next = 0
        self.size = 0
        for frame in frames:
            self.size += PyBytes_GET_SIZE(frame)
        self.left = self.size


cdef class Session(Connection):
    """One client of the protocol. Created by the HTTP front at the upgrade, with the outcome
    of authentication already filled in; registered with the Hub once the handshake is done."""
    cdef public Budget budget   # set by the Node at open; None: no message limit
    cdef int refusals           # refused frames, for the log line of the close
    cdef Bucket strikes         # refusals left before the close (capacity 0: not set yet)
    cdef int free_frames        # pongs and continuations since the last one charged
    cdef readonly dict channels
    cdef public str client_id
    cdef public object user_id
    # who this connection is for replacement (4009) and dedupe: the user id, or for an
    # anonymous connection a random per-connection id the Node gives it at open
    cdef public str identity
    cdef public object claims
    cdef public bint echo
    cdef public object auth_error
    cdef public object initial
    cdef public str limit_key
    cdef dict holding         # channel -> [(offset, frame)] held while its replay is out
    cdef Py_ssize_t held_bytes
    cdef list replays         # Replay entries still being written, oldest first, or None
    cdef bint pumping
    # (kind, payload, budget wait) of what came while joins wait for the broker, or None
    cdef list inbound
    cdef Py_ssize_t inbound_bytes
    cdef int joins_waiting    # joins that hold messages (`hold_messages`) not answered yet
    cdef bint welcoming       # one of them is the initial join: no other join starts

    def __init__(self, Hub hub, str client_id, object claims, str peer):
        Connection.__init__(self, hub, peer, hub.max_message_bytes)
        self.channels = {}
        self.client_id = client_id
        self.claims = claims
        self.user_id = claims.user_id if claims is not None else None
        self.identity = self.user_id
        self.echo = False
        self.auth_error = None
        self.initial = None
        self.limit_key = None
        self.holding = None
        self.held_bytes = 0
        self.replays = None
        self.pumping = False
        self.inbound = None
        self.inbound_bytes = 0
        self.joins_waiting = 0
        self.welcoming = False
        self.budget = None
        self.refusals = 0
        self.strikes.capacity = 0.0
        self.free_frames = 0

    cdef void opened(self):
        self.hub.node.on_open(self)

    cdef void closed(self):
        self.replays = None
        self.holding = None
        self.held_bytes = 0
        self.inbound = None
        self.inbound_bytes = 0
        self.joins_waiting = 0
        self.hub.node.on_close(self)

    cdef void slow_reader_event(self, str reason) except *:
        self.hub.node.security_event(self, "slow_reader", reason)

    cdef void too_large(self, Py_ssize_t size):
        self.hub.messages_in += 1
        cdef double wait = self.take()
        if self.inbound is not None:
            self.hold_message(HELD_TOO_LARGE, None, wait)
            return
        self.answer_too_large(wait)

    cdef void answer_too_large(self, double wait) except *:
        """A message over MAX_MESSAGE_BYTES: MESSAGE_TOO_LARGE whether or not the budget had
        a token for it (`wait` > 0: none; a client matches it by `limit`); a refusal all the
        same when not."""
        cdef bint refused = wait > 0.0
        if refused:
            self.hub.rate_limited += 1
        self.send_error(ErrorCode.MESSAGE_TOO_LARGE,
                        "message is larger than MAX_MESSAGE_BYTES", "protocol",
                        "message over %d bytes" % self.max_message,
                        {"limit": self.max_message})
        if refused:
            self.strike()

    # -- the budget ---------------------------------------------------------------------------

    cdef inline double take(self):
        """One token from the budget: 0.0 when taken, else the seconds until one is there."""
        if self.budget is None:
            return 0.0
        return self.budget.take(aether_monotonic())

    cdef void on_ping(self, WSFrame frame) except *:
        cdef double wait = self.take()
        if self.inbound is not None:
            self.hold_message(HELD_PING, frame_bytes(0xA, frame.payload_ptr, frame.payload_size),
                              wait)
        elif wait == 0.0:
            self.enqueue_frame(frame_bytes(0xA, frame.payload_ptr, frame.payload_size))
        else:
            self.refuse_frame()  # a refused ping: no pong

    cdef void free_frame(self) except *:
        self.free_frames += 1
        if self.free_frames >= FREE_FRAMES_PER_TOKEN:
            self.free_frames = 0
            self.charge()

    cdef bint charge(self) except *:
        """A token for a frame that gets no error when refused (a ping: no pong either):
        False when refused, which counts towards the close of a flood."""
        if self.take() == 0.0:
            return True
        self.refuse_frame()
        return False

    cdef void refuse_frame(self) except *:
        """A frame the budget refused that gets no error: a strike."""
        self.hub.rate_limited += 1
        self.strike()

    cdef void refuse(self, double wait, object channel, object seq):
        """A message the budget refused: one RATE_LIMITED error, or the close of a flood."""
        self.limited("user", wait, channel, seq)
        self.strike()

    cdef void strike(self):
        """A refusal takes a strike; the one that takes the last closes the connection
        (1008). The strikes refill at STRIKES_PER_TOKEN times the budget's rate, so a client
        that runs over now and then is never closed, and a flood is however many of its
        frames get a token."""
        cdef Budget budget = self.budget
        cdef double now = aether_monotonic()
        cdef double capacity, rate
        if budget is None:
            return
        self.refusals += 1
        if self.strikes.capacity <= 0.0:
            capacity = budget.b.capacity
            if capacity < REFUSALS_BEFORE_CLOSE:
                capacity = REFUSALS_BEFORE_CLOSE
            rate = budget.b.rate * STRIKES_PER_TOKEN
            bucket_init(&self.strikes, capacity, capacity / rate if rate > 0.0 else 0.0, now)
        bucket_wait(&self.strikes, now)
        bucket_take(&self.strikes)
        if self.strikes.tokens < 1.0 - 1e-9:
            self.flood_close()

    cdef void flood_close(self):
        """The strikes are spent: close the connection (1008)."""
        self.hub.node.security_event(self, "rate_limit_close",
                                     "%d refused frames" % self.refusals)
        self.close(CloseCode.POLICY, "rate limit exceeded")

    cdef void refuse_message(self, double wait, object msg):
        """`refuse`, naming the message's channel (a join, a leave, a publication...) and a
        publication's sequence, so that a client knows what to send again after
        `retry_after_ms`. `msg`: the message decoded (`decode`)."""
        channel = None
        seq = None
        data = (<dict>msg).get("data") if type(msg) is dict else None
        if type(data) is dict:
            channel = (<dict>data).get("channel")
            if not valid_channel_name(channel):
                channel = None
            if (<dict>msg).get("type") == "message":
                meta = (<dict>data).get("metadata")
                if type(meta) is dict:
                    seq = (<dict>meta).get("sequence")
                    if type(seq) is not int:
                        seq = None
        self.refuse(wait, channel, seq)

    # -- messages ---------------------------------------------------------------------------

    cdef void on_message(self, int opcode, bytes payload):
        self.hub.messages_in += 1
        cdef double wait = self.take()
        if self.inbound is None:
            self.handle_message(opcode, payload, wait)
            return
        msg = self.join_now(opcode, payload)
        if msg is None:
            self.hold_message(opcode, payload, wait)
        else:
            self.handle_join(<dict>msg, wait)

    cdef void handle_message(self, int opcode, bytes payload, double wait) except *:
        """A whole message whose budget token was taken (`wait` > 0: refused)."""
        if wait > 0.0:
            self.refuse_message(wait, decode(opcode, payload))
            return
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
        self.handle_decoded(msg)

    cdef void handle_join(self, dict msg, double wait) except *:
        """A join already decoded (`join_now`, `release_messages`): `handle_message` without
        decoding it again."""
        if wait > 0.0:
            self.refuse_message(wait, msg)
            return
        self.handle_decoded(msg)

    cdef void handle_decoded(self, object msg) except *:
        """A message decoded from a text frame whose budget token was taken."""
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
            self.invalid("channel", CHANNEL_NAME_ERROR, None, None)
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
        # the sender's budget was charged when the frame came in (on_message)
        cdef double now = aether_monotonic()
        cdef double wait = bucket_wait(&ch.bucket, now)
        cdef str which = "channel"
        if wait == 0.0:
            wait = bucket_wait(&self.hub.global_bucket, now)
            which = "global"
        if wait > 0.0:
            self.limited(which, wait, channel, seq)
            return
        bucket_take(&ch.bucket)
        bucket_take(&self.hub.global_bucket)
        result = self.hub.broker.publish(ch, self, seq, content)
        if type(result) is tuple:
            self.ack(channel, seq, result)
        elif isinstance(result, asyncio.Future):
            # the Redis broker's publishes: answered from a done-callback, no task
            result.add_done_callback(AckWhenDone(self, channel, seq))
        else:
            asyncio.ensure_future(self._ack_later(channel, seq, result))

    async def _ack_later(self, str channel, object seq, object pending):
        try:
            result = await pending
        except Exception as exc:
            self.publish_failed(channel, seq, exc)
            return
        self.ack(channel, seq, result)

    cdef void publish_failed(self, str channel, object seq, object exc):
        self.send_error(ErrorCode.INTERNAL_ERROR, "message could not be stored",
                        "broker", str(exc), {"channel": channel, "sequence": seq})

    cdef void ack(self, str channel, object seq, tuple result):
        self.enqueue_frame(ack_frame(channel, seq, result[0], result[1]))

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

    cpdef send_error(self, str code, str message, str component, str reason, dict details):
        """Queue an error message of the shape of docs/protocol.md §11."""
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

    # -- joins waiting for the broker: what the client sends meanwhile waits for them ------

    def hold_messages(self, bint first=False):
        """Hold what this connection sends (messages, over-size messages, the answers to its
        pings) until this join, and every other one holding, is answered: each calls
        `release_messages` once. `first`: the initial join, whose reply must be the first
        frame (no other join starts meanwhile). Each held message still takes its budget
        token as it comes; past HELD_MESSAGES entries or HELD_MESSAGE_SIZES x
        MAX_MESSAGE_BYTES bytes the connection is closed (1008)."""
        self.joins_waiting += 1
        if first:
            self.welcoming = True
        if self.inbound is None and not self.closing:
            self.inbound = []
            self.inbound_bytes = 0

    cdef object join_now(self, int opcode, bytes payload):
        """A message that comes while joins wait, decoded, when it is handled at once: a
        join, when nothing is held before it and the initial join is answered (it starts
        beside the others; what comes after it waits for all of them). Else None: held."""
        if self.welcoming or PyList_GET_SIZE(self.inbound) > 0:
            return None
        msg = decode(opcode, payload)
        return msg if is_join(msg) else None

    cdef void hold_message(self, int kind, bytes payload, double wait) except *:
        cdef Py_ssize_t size = PyBytes_GET_SIZE(payload) if payload is not None else 0
        if self.closing:
            return
        if (PyList_GET_SIZE(self.inbound) >= HELD_MESSAGES
                or self.inbound_bytes + size > HELD_MESSAGE_SIZES * self.max_message):
            self.inbound = None
            self.inbound_bytes = 0
            self.hub.node.security_event(self, "hold_limit_close",
                                         "more than %d messages or %d bytes held for a join"
                                         % (HELD_MESSAGES, HELD_MESSAGE_SIZES * self.max_message))
            self.close(CloseCode.POLICY, "too much sent while a join waits")
            return
        self.inbound.append((kind, payload, wait))
        self.inbound_bytes += size

    def release_messages(self):
        """A join that holds messages is answered, or failed. Once none is left waiting,
        handle what was held, in the order it came and as it would have been handled then
        (its budget tokens were taken then: a refused one gets its RATE_LIMITED now). A held
        join that waits for the broker in turn holds what follows it again (joins right
        behind it start with it)."""
        cdef list held
        cdef tuple entry
        cdef int kind
        cdef Py_ssize_t i, n, size
        if self.joins_waiting > 0:
            self.joins_waiting -= 1
        if self.joins_waiting > 0:
            return
        self.welcoming = False
        held = self.inbound
        self.inbound = None
        self.inbound_bytes = 0
        if held is None:
            return
        n = PyList_GET_SIZE(held)
        for i in range(n):
            if self.closing:  # one of them closed the connection (1007, 1008, 4001...)
                return
            entry = <tuple>held[i]
            kind = entry[0]
            if self.inbound is not None:
                msg = decode(kind, <bytes>entry[1]) if kind >= 0 else None
                if is_join(msg):  # starts beside the held join that waits for the broker
                    self.handle_join(<dict>msg, <double>entry[2])
                    continue
                # a held join waits for the broker: the rest waits for it (and those with it)
                self.inbound = held[i:]
                size = 0
                for entry in self.inbound:
                    if entry[1] is not None:
                        size += PyBytes_GET_SIZE(<bytes>entry[1])
                self.inbound_bytes = size
                return
            if kind == HELD_PING:
                if <double>entry[2] == 0.0:
                    self.enqueue_frame(<bytes>entry[1])
                else:
                    self.refuse_frame()
            elif kind == HELD_TOO_LARGE:
                self.answer_too_large(<double>entry[2])
            else:
                self.handle_message(kind, <bytes>entry[1], <double>entry[2])

    @property
    def holds_messages(self) -> bool:
        """Whether messages are being held (`hold_messages`) until `release_messages`."""
        return self.inbound is not None

    # -- recovery: the replay, paced by the socket, and live frames held meanwhile --------

    cdef bint hold_frame(self, str channel, long long offset, bytes frame) except -1:
        cdef list held = self.holding.get(channel)
        if held is None:
            return False
        if self.closing:
            return True
        held.append((offset, frame))
        self.held_bytes += PyBytes_GET_SIZE(frame)
        if (self.held_bytes > self.hub.send_buffer_limit
                and self.held_bytes - self.hub.send_buffer_limit > self.replaying_bytes()):
            # more live bytes came during the replays than they hold, and the limit on top:
            # the channel is faster than the reader, which would never catch up
            self.too_slow("live frames held during a replay over the limit")
        return True

    cdef Py_ssize_t replaying_bytes(self) except -1:
        """The bytes of the replays being written; unbounded while one is still being read
        from the broker (its size is not known yet, and the broker's timeout bounds it)."""
        cdef Py_ssize_t total = 0
        cdef set replaying = set()
        if self.replays is not None:
            for r in self.replays:
                total += (<Replay>r).size
                replaying.add((<Replay>r).channel)
        for channel in self.holding:
            if channel not in replaying:
                return PY_SSIZE_T_MAX  # compared with held - limit: no overflow
        return total

    cdef list take_held(self, str channel, bint stop):
        """The frames held for `channel` (None if it is not held); holding goes on with an
        empty list, or stops if `stop`."""
        cdef list held
        if self.holding is None:
            return None
        held = self.holding.pop(channel, None) if stop else self.holding.get(channel)
        if held is None:
            return None
        if stop:
            if not self.holding:
                self.holding = None
        else:
            self.holding[channel] = []
        for _, frame in held:
            self.held_bytes -= PyBytes_GET_SIZE(frame)
        return held

    def hold(self, str channel):
        """Hold live frames of `channel` until its replay is sent (`replay`) or `release`:
        the replay is still being read from the broker. A join again while an earlier
        replay of `channel` is still being written replaces that replay."""
        self.cancel_replay(channel)
        if self.holding is None:
            self.holding = {}
        if channel not in self.holding:
            self.holding[channel] = []

    def replay_fits(self, str channel, list frames) -> bool:
        """Whether a replay of `frames` for `channel` may be written: the replay bytes this
        connection would then have waiting (its other replays' frames not yet queued, and
        these) stay within REPLAY_LIMITS x SEND_BUFFER_LIMIT_BYTES, or it has none waiting
        (one replay, whatever its size, is always written: HISTORY_SIZE bounds it)."""
        cdef Py_ssize_t waiting = 0, size = 0
        if self.replays is not None:
            for r in self.replays:
                if (<Replay>r).channel != channel:  # one of `channel` would be replaced
                    waiting += (<Replay>r).left
        if waiting == 0:
            return True
        for item in frames:
            size += PyBytes_GET_SIZE(frame_of(item, self.deflate))
        return waiting + size <= REPLAY_LIMITS * self.hub.send_buffer_limit

    def replay(self, str channel, list frames, long long up_to):
        """Send `frames`, a join's replay of `channel` up to offset `up_to`, then the live
        frames of `channel` held meanwhile that it did not carry, in order. Only what fits
        under half of SEND_BUFFER_LIMIT_BYTES beside the bytes the kernel has not taken is
        queued (the other half is room for frames that are not paced);
        the rest follows as the socket drains, and live frames of `channel` wait for it."""
        self.cancel_replay(channel)
        if not frames and (self.holding is None or channel not in self.holding):
            return
        # history keeps a publication's compressed variants beside it (`Packed`): each
        # member gets the one of its window size, as compressed when it was published
        frames = [frame_of(item, self.deflate) for item in frames]
        if self.holding is None:
            self.holding = {}
        if channel not in self.holding:
            self.holding[channel] = []
        if self.replays is None:
            self.replays = []
        self.replays.append(Replay(channel, frames, up_to))
        if not self.pacing:
            self.pacing = True
            self.stall_ticks = 0
            # resume_writing as soon as the transport has handed everything to the kernel
            self.raw.set_write_buffer_limits(0, 0)
        self.pump()

    cdef void cancel_replay(self, str channel) except *:
        cdef Py_ssize_t i
        if self.replays is None:
            return
        for i in range(len(self.replays)):
            if (<Replay>self.replays[i]).channel == channel:
                del self.replays[i]
                return

    cdef void drained(self) except *:
        self.pump()

    cdef void pump(self) except *:
        """Queue replay frames while they fit under half the limit beside what the kernel
        has not taken. Called again after each flush, when the transport has drained
        (resume_writing) and on the tick, until every replay and what it held is out."""
        cdef Replay r
        cdef bytes frame
        cdef Py_ssize_t unsent
        cdef list held
        # replays fill at most half the limit: the other half is room for every frame that
        # is not paced (replies, acks, errors, pongs, other channels' live frames)
        cdef Py_ssize_t share = self.hub.send_buffer_limit // 2
        if self.pumping or self.replays is None:
            return
        if self.closing:
            self.end_pacing()
            return
        self.pumping = True
        try:
            while self.replays:
                r = <Replay>self.replays[0]
                if r.channel not in self.channels:  # left, or the channel was deleted
                    del self.replays[0]
                    self.take_held(r.channel, True)
                    continue
                while r.next < PyList_GET_SIZE(r.frames):
                    frame = r.frames[r.next]
                    unsent = self.unsent()
                    if unsent > 0 and PyBytes_GET_SIZE(frame) > share - unsent:
                        # the rest once the socket has drained: after the flush of what is
                        # queued, or at resume_writing for what the transport holds
                        return
                    r.frames[r.next] = None  # the outbox's pass keeps it alive, not the replay
                    r.next += 1
                    r.left -= PyBytes_GET_SIZE(frame)
                    self.stall_ticks = 0
                    self.enqueue_frame(frame)
                    if self.closing:
                        return
                held = self.take_held(r.channel, False)
                if held:
                    # live frames that came during the replay go next, at the same pace
                    r.set_frames([f for o, f in held if o < 0 or o > r.up_to])
                    continue
                del self.replays[0]
                self.take_held(r.channel, True)
        finally:
            self.pumping = False
            if not self.replays:
                self.end_pacing()

    cdef void end_pacing(self) except *:
        self.replays = None
        if self.pacing:
            self.pacing = False
            if not self.closing:
                self.raw.set_write_buffer_limits()

    def drop_held(self, str channel):
        """Stop holding `channel` and drop what was held: the session has left it."""
        self.cancel_replay(channel)
        self.take_held(channel, True)

    def release(self, str channel, long long replayed_up_to):
        """Send the frames held for `channel`, skipping publications the replay already
        carried (offset <= `replayed_up_to`), and stop holding."""
        held = self.take_held(channel, True)
        if held is None:
            return
        for offset, frame in held:
            if offset < 0 or offset > replayed_up_to:
                self.send_frame(frame)

    def joined(self) -> list:
        return list(self.channels)

    def is_member(self, str name) -> bool:
        return name in self.channels


cdef class AckWhenDone:
    """The done-callback of a publish that a broker answers with a future: the ack, or the
    error, to the sender."""
    cdef Session session
    cdef str channel
    cdef object seq

    def __cinit__(self, Session session, str channel, object seq):
        self.session = session
        self.channel = channel
        self.seq = seq

    def __call__(self, done):
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            self.session.publish_failed(self.channel, self.seq, exc)
        else:
            self.session.ack(self.channel, self.seq, done.result())
