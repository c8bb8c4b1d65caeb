# hub.pxi: channels, their members, fan-out and the per-loop-pass flush.
#
# Rule: a publication reaches a member only through `Hub.deliver` (or `Session.send_frame`),
# which appends the already-encoded frame to the member's outbox; the outboxes are written in
# `Hub.flush`, once per loop pass, one write per member. Nothing here waits on a member.
#
# Busy poll: after a flush the loop keeps polling without sleeping for `busy_poll_s` (a
# callback that re-queues itself keeps uvloop's poll timeout at 0, and yields the CPU to any
# other runnable task each pass). A client that answers within that window finds the worker
# awake: no wake-up, no context switch. Idle workers never spin; 0 turns it off.

cdef class Connection
cdef class Session
cdef class Hub

cdef extern from "<sched.h>" nogil:
    int sched_yield()

# a pass that wrote to more members than this was busy: the next pass finds more work ready
# if the loop sleeps in between (batching), so only light passes start (or extend) a busy
# poll, and a busy pass ends it
cdef enum:
    SPIN_MAX_WRITES = 4

# a replay that could not queue a frame for this many ticks (seconds: the reader has not
# taken what was already written) closes the connection with 4008
cdef enum:
    REPLAY_STALL_TICKS = 10


cdef class Channel:
    """One channel's live state on this worker: members, rate bucket, limits."""
    cdef readonly str name
    cdef list members
    cdef Bucket bucket
    cdef public object config
    cdef public bint presence
    cdef public Py_ssize_t max_connections
    cdef readonly Py_ssize_t history_size
    cdef readonly unsigned long long published
    cdef readonly unsigned long long delivered
    # members that negotiated permessage-deflate, by the server window bits they use (9-15;
    # one that asked for 8 counts as plain), and in all: what `Hub.deliver` compresses for
    cdef int by_bits[16]
    cdef readonly int deflate_members
    cdef public bint compression    # the channel config's `compression` switch

    def __init__(self, str name, object config):
        self.name = name
        self.members = []
        self.published = 0
        self.delivered = 0
        memset(self.by_bits, 0, sizeof(self.by_bits))
        self.deflate_members = 0
        self.configure(config)

    cpdef configure(self, object config):
        """Apply a ChannelConfig (limits take effect for the next message or join)."""
        self.config = config
        self.presence = bool(config.presence)
        self.max_connections = int(config.max_connections)
        self.history_size = int(config.history_size)
        self.compression = bool(getattr(config, "compression", True))
        cdef double rate = float(config.message_rate_limit)
        # a burst of at least one message, refilled at `rate` per second (a rate below 1
        # still lets one message through every 1/rate seconds)
        cdef double burst = rate if rate >= 1.0 else 1.0
        if rate > 0:
            bucket_init(&self.bucket, burst, burst / rate, aether_monotonic())
        else:
            bucket_init(&self.bucket, 0.0, 1.0, aether_monotonic())

    @property
    def member_count(self) -> int:
        return PyList_GET_SIZE(self.members)

    def member_list(self) -> list:
        """A copy of the members (the control plane's removals iterate it)."""
        return list(self.members)


cdef class Hub:
    """Every session and channel of this worker, the fan-out and the counters metrics read."""
    cdef dict channels
    cdef set sessions
    cdef list dirty
    cdef list keep            # frames queued this pass: outboxes point into them
    cdef bint flush_scheduled
    cdef object loop
    cdef object _flush_cb
    cdef object _spin_cb
    cdef readonly bint spinning
    cdef double spin_until
    cdef public double busy_poll_s
    cdef Bucket global_bucket
    cdef public object node
    cdef public object broker
    cdef public Py_ssize_t send_buffer_limit
    cdef public Py_ssize_t max_message_bytes
    cdef public double conn_capacity
    cdef public double conn_window
    cdef public double refresh_notice
    cdef public double close_timeout
    cdef public dict error_counts
    # counters kept in C, read by metrics at scrape time
    cdef readonly unsigned long long connections_total
    cdef readonly unsigned long long messages_in
    cdef readonly unsigned long long messages_published
    cdef readonly unsigned long long deliveries
    cdef readonly unsigned long long bytes_out
    cdef readonly unsigned long long bytes_out_plain  # bytes_out had nothing been compressed
    cdef readonly unsigned long long deliveries_compressed
    # permessage-deflate: COMPRESSION, COMPRESSION_MIN_BYTES (the frame's payload)
    cdef public bint compression
    cdef public Py_ssize_t compression_min_bytes
    cdef readonly unsigned long long slow_reader_closes
    cdef readonly unsigned long long rate_limited
    cdef readonly unsigned long long errors_total

    def __init__(self, object loop, *, Py_ssize_t send_buffer_limit, Py_ssize_t max_message_bytes,
                 double conn_capacity, double conn_window, double global_rate,
                 double refresh_notice, double close_timeout=2.0, double busy_poll_s=0.0):
        self.channels = {}
        self.sessions = set()
        self.dirty = []
        self.keep = []
        self.flush_scheduled = False
        self.loop = loop
        self._flush_cb = self.flush
        self._spin_cb = self.spin
        self.spinning = False
        self.spin_until = 0.0
        self.busy_poll_s = busy_poll_s
        self.node = None
        self.broker = None
        self.send_buffer_limit = send_buffer_limit
        self.max_message_bytes = max_message_bytes
        self.conn_capacity = conn_capacity
        self.conn_window = conn_window
        self.refresh_notice = refresh_notice
        self.close_timeout = close_timeout
        self.error_counts = {}
        self.compression = True
        self.compression_min_bytes = 512
        bucket_init(&self.global_bucket, global_rate, 1.0, aether_monotonic())

    # -- channels ---------------------------------------------------------------------------

    def channel(self, str name):
        """The live Channel called `name`, or None."""
        return self.channels.get(name)

    def add_channel(self, str name, object config) -> Channel:
        cdef Channel ch = self.channels.get(name)
        if ch is None:
            ch = Channel(name, config)
            self.channels[name] = ch
        else:
            ch.configure(config)
        return ch

    def channel_names(self) -> list:
        return list(self.channels)

    @property
    def channel_count(self) -> int:
        """Live channels on this worker (MAX_CHANNELS bounds it)."""
        return len(self.channels)

    def drop_channel(self, str name) -> list:
        """Forget a channel; returns its former members (already removed from it)."""
        cdef Channel ch = self.channels.pop(name, None)
        if ch is None:
            return []
        members = ch.members
        ch.members = []
        memset(ch.by_bits, 0, sizeof(ch.by_bits))
        ch.deflate_members = 0
        for s in members:
            (<Session>s).channels.pop(name, None)
        return members

    cpdef bint join(self, Session s, Channel ch):
        """Add `s` to `ch`; False when it was already a member."""
        if ch.name in s.channels:
            return False
        if s.deflate < 0 or s.deflate > DEFLATE_MAX_BITS:
            # `deliver` indexes its per-window arrays by it (set once, at the upgrade)
            raise ValueError("deflate window bits must be 0 or 8..15")
        ch.members.append(s)
        s.channels[ch.name] = ch
        if s.deflate >= DEFLATE_MIN_BITS:
            ch.by_bits[s.deflate] += 1
            ch.deflate_members += 1
        return True

    cpdef bint leave(self, Session s, str name):
        """Remove `s` from channel `name`; False when it was not a member."""
        cdef Channel ch = s.channels.pop(name, None)
        if ch is None:
            return False
        ch.members.remove(s)
        if s.deflate >= DEFLATE_MIN_BITS:
            ch.by_bits[s.deflate] -= 1
            ch.deflate_members -= 1
        return True

    def drop_empty(self) -> int:
        """Forget the live state of channels without members (their configs and history
        stay with the store and the broker); returns how many were dropped."""
        empty = [name for name, ch in self.channels.items()
                 if PyList_GET_SIZE((<Channel>ch).members) == 0]
        for name in empty:
            del self.channels[name]
        return len(empty)

    # -- sessions ---------------------------------------------------------------------------

    cdef void add_session(self, Connection s):
        self.sessions.add(s)
        self.connections_total += 1

    cdef void remove_session(self, Connection c):
        self.sessions.discard(c)
        if isinstance(c, Session):
            for name in list((<Session>c).channels):
                self.leave(<Session>c, name)

    @property
    def active_connections(self) -> int:
        return len(self.sessions)

    def session_list(self) -> list:
        return list(self.sessions)

    # -- fan-out ----------------------------------------------------------------------------

    cpdef object deliver(self, Channel ch, bytes frame, Session exclude, long long offset=-1):
        """Append `frame` to every member's outbox but `exclude` (may be None). `offset` is
        the publication's offset (-1 for other frames): a member still recovering this
        channel holds the frame until its replay is sent (`Session.release`).
        A publication of at least COMPRESSION_MIN_BYTES whose channel has deflate members is
        compressed here once per window size they use, and each of them gets those bytes:
        the `Packed` is returned (for history and recovery), else None."""
        cdef list members = ch.members
        cdef Py_ssize_t i, n = PyList_GET_SIZE(members), sent = 0, out = 0
        cdef const char* p = PyBytes_AS_STRING(frame)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
        cdef Session s
        cdef Packed packed = None
        cdef bytes variant
        cdef int b
        # the frame each member gets, by its server window bits (0: no deflate)
        cdef const char* ptr[16]
        cdef Py_ssize_t sz[16]
        if (ch.deflate_members > 0 and offset >= 0 and self.compression and ch.compression
                and size - frame_header_size(<const uint8_t*>p) >= self.compression_min_bytes):
            packed = Packed(frame)
            self.keep.append(packed)
        else:
            # every member gets the plain frame: the loop as it was before deflate (no
            # per-member choice of frame: bench-compare, docs/performance.md)
            self.keep.append(frame)
            for i in range(n):
                s = <Session>PyList_GET_ITEM(members, i)
                if s is exclude:
                    continue
                if s.holding is not None and s.hold_frame(ch.name, offset, frame):
                    continue
                s.enqueue(p, size)
                sent += 1
            out = sent * size
        if packed is not None:
            for b in range(16):
                ptr[b] = p
                sz[b] = size
            for b in range(DEFLATE_MIN_BITS, DEFLATE_MAX_BITS + 1):
                if ch.by_bits[b] > 0:
                    variant = packed.make(b)
                    ptr[b] = PyBytes_AS_STRING(variant)
                    sz[b] = PyBytes_GET_SIZE(variant)
            for i in range(n):
                s = <Session>PyList_GET_ITEM(members, i)
                if s is exclude:
                    continue
                b = s.deflate
                if s.holding is not None and s.hold_frame(ch.name, offset, packed.pick(b)):
                    continue
                s.enqueue(ptr[b], sz[b])
                sent += 1
                out += sz[b]
                if sz[b] != size:
                    self.deliveries_compressed += 1
        if offset >= 0:  # a publication, not a presence notice or a broadcast
            ch.published += 1
            self.messages_published += 1
        ch.delivered += sent
        self.deliveries += sent
        self.bytes_out += out
        self.bytes_out_plain += sent * size
        return packed

    def deliver_all(self, bytes frame) -> int:
        """Append `frame` to every session's outbox (system broadcasts)."""
        cdef const char* p = PyBytes_AS_STRING(frame)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
        cdef Py_ssize_t n = 0
        self.keep.append(frame)
        for s in self.sessions:
            (<Connection>s).enqueue(p, size)
            n += 1
        self.deliveries += n
        self.bytes_out += n * size
        self.bytes_out_plain += n * size
        return n

    cdef inline void mark_dirty(self, Connection s):
        self.dirty.append(s)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush_cb)

    def flush(self):
        """Write each dirty outbox: one write per member for everything queued this pass."""
        cdef list dirty = self.dirty
        cdef Py_ssize_t i, n = PyList_GET_SIZE(dirty)
        cdef Connection s
        # frames queued while this runs go to a new list, and stay alive for the next flush
        cdef list keep = self.keep
        self.keep = []
        self.dirty = []
        self.flush_scheduled = False
        for i in range(n):
            s = <Connection>PyList_GET_ITEM(dirty, i)
            s.dirty = False
            s.flush_outbox()
            if s.pacing:  # a replay waits for room: the kernel may have taken everything
                s.drained()
        if self.busy_poll_s > 0.0:
            if n > SPIN_MAX_WRITES:
                self.spin_until = 0.0  # a busy pass: stop polling, let the next one batch
            else:
                self.spin_until = aether_monotonic() + self.busy_poll_s
                if not self.spinning:
                    self.spinning = True
                    self.loop.call_soon(self._spin_cb)

    def spin(self):
        """One pass of the busy poll: queue itself again until `spin_until`."""
        if aether_monotonic() < self.spin_until:
            sched_yield()
            self.loop.call_soon(self._spin_cb)
        else:
            self.spinning = False

    cdef void count_error(self, str code):
        self.errors_total += 1
        self.error_counts[code] = self.error_counts.get(code, 0) + 1

    # -- timers -----------------------------------------------------------------------------

    def tick(self, double wall_now, bint ping_round):
        """Once a second: token expiry (warning, then close 4001) and, on a ping round,
        pings to silent sessions and closing of those that did not answer the last one."""
        cdef Connection s
        cdef list expired = []
        cdef list warn = []
        cdef list dead = []
        cdef list pacing = []
        for o in self.sessions:
            s = <Connection>o
            s.release_buffer()  # an outbox emptied by the last flush is given back
            if s.closing:
                continue
            if s.pacing:
                pacing.append(s)
            if s.expires_at > 0.0:
                if wall_now >= s.expires_at:
                    expired.append(s)
                    continue
                if not s.warned and wall_now >= s.expires_at - self.refresh_notice:
                    warn.append(s)
            if ping_round:
                if s.frames_seen == 0:
                    if s.ping_outstanding:
                        dead.append(s)
                        continue
                    s.ping_outstanding = True
                    s.transport.send_ping()
                s.frames_seen = 0
        for o in warn:
            s = <Connection>o
            s.warned = True
            s.send_json(status_message(
                "token expires soon; send connection/refresh with a new token", "warning",
                expires_at=s.expires_at))
        for o in expired:
            (<Connection>o).expire()
        for o in dead:
            (<Connection>o).close(CloseCode.GOING_AWAY, "ping timeout")
        for o in pacing:  # a fallback: writes and resume_writing normally wake them
            s = <Connection>o
            s.stall_ticks += 1
            s.drained()
            if s.pacing and not s.closing and s.stall_ticks > REPLAY_STALL_TICKS:
                s.too_slow("replay stalled: the reader takes nothing")
        return len(expired), len(dead)

    def error_counts_snapshot(self) -> dict:
        return dict(self.error_counts)
