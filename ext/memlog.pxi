# memlog.pxi: the in-memory broker's per-message state and its publish: each channel's
# offset, epoch and history (`ChannelLog`), each sender's dedupe window (`DedupeWindow`).
#
# Rule: a publish is decided here in one call, without a Python frame: dedupe, offset,
# encode once, history, deliver. What is not per message (recovery, sweeps, forget) stays in
# aether_fast/brokers/memory.py and reads the same objects.

from aether_fast.brokers.base import DEDUP_WINDOW as _DEDUP_WINDOW, new_epoch

#: the sequences remembered per (user, client_id, channel): brokers.base.DEDUP_WINDOW, read
#: once at import (a power of two: the tables double up to it)
cdef Py_ssize_t DEDUP_WINDOW = _DEDUP_WINDOW
if DEDUP_WINDOW < 16 or DEDUP_WINDOW & (DEDUP_WINDOW - 1):
    raise ValueError("brokers.base.DEDUP_WINDOW must be a power of two, at least 16")

cdef enum:
    DEDUP_FIRST = 16      # remembered before the first growth; the table has twice the slots


cdef struct DedupeEntry:
    unsigned long long seq
    long long offset      # 0 = an empty slot (offsets start at 1)
    long long ms          # the publication's timestamp, ms since the Unix epoch


cdef class DedupeWindow:
    """The last DEDUP_WINDOW (1024) sequences one sender had accepted on one channel,
    whatever their pattern: a hash table (open addressing, linear probing, at most half
    full) for the lookup, and a ring in acceptance order that says which one to forget. Both
    start small and double up to DEDUP_WINDOW entries, so memory follows use (56 KiB at most,
    where the Python OrderedDict it replaces took about 150)."""
    cdef DedupeEntry* table
    cdef unsigned long long* ring
    cdef Py_ssize_t cap       # entries the ring holds; the table has 2 * cap slots
    cdef Py_ssize_t count
    cdef Py_ssize_t head      # the oldest entry of a full ring
    cdef int shift            # 64 - log2(table slots), for Fibonacci hashing
    cdef public double touched

    def __dealloc__(self):
        PyMem_Free(self.table)
        PyMem_Free(self.ring)

    cdef inline Py_ssize_t home(self, unsigned long long seq):
        # Fibonacci hashing: counters, strides and clock values all spread over the table
        return <Py_ssize_t>((seq * <unsigned long long>11400714819323198485ULL) >> self.shift)

    cdef int grow(self) except -1:
        cdef Py_ssize_t cap = DEDUP_FIRST if self.cap == 0 else self.cap * 2
        cdef Py_ssize_t slots = cap * 2, mask = cap * 2 - 1, i, j
        cdef DedupeEntry* table = <DedupeEntry*>PyMem_Malloc(slots * sizeof(DedupeEntry))
        cdef unsigned long long* ring = <unsigned long long*>PyMem_Malloc(
            cap * sizeof(unsigned long long))
        if table == NULL or ring == NULL:
            PyMem_Free(table)
            PyMem_Free(ring)
            raise MemoryError()
        memset(table, 0, slots * sizeof(DedupeEntry))
        cdef DedupeEntry* old = self.table
        cdef Py_ssize_t old_slots = self.cap * 2
        self.shift = 64
        while slots > 1:
            slots >>= 1
            self.shift -= 1
        for i in range(old_slots):
            if old[i].offset != 0:
                j = self.home(old[i].seq)
                while table[j].offset != 0:
                    j = (j + 1) & mask
                table[j] = old[i]
        PyMem_Free(old)
        self.table = table
        # growth only happens before the ring is full, so it is in order from index 0
        if self.count:
            memcpy(ring, self.ring, self.count * sizeof(unsigned long long))
        PyMem_Free(self.ring)
        self.ring = ring
        self.cap = cap
        return 0

    cdef DedupeEntry* find(self, unsigned long long seq):
        if self.cap == 0:
            return NULL
        cdef Py_ssize_t mask = self.cap * 2 - 1
        cdef Py_ssize_t i = self.home(seq)
        while self.table[i].offset != 0:
            if self.table[i].seq == seq:
                return &self.table[i]
            i = (i + 1) & mask
        return NULL

    cdef void forget(self, unsigned long long seq):
        """Remove `seq` from the table, shifting later entries of its probe run back."""
        cdef Py_ssize_t mask = self.cap * 2 - 1
        cdef Py_ssize_t i = self.home(seq), j, k
        while self.table[i].seq != seq or self.table[i].offset == 0:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            if self.table[j].offset == 0:
                break
            k = self.home(self.table[j].seq)
            # the entry at j may move to i only if its home is not cyclically in (i, j]
            if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
                continue
            self.table[i] = self.table[j]
            i = j
        self.table[i].offset = 0

    cdef int put(self, unsigned long long seq, long long offset, long long ms) except -1:
        """Remember a sequence that `find` did not know; the oldest goes once DEDUP_WINDOW
        are held."""
        if self.count == self.cap and self.cap < DEDUP_WINDOW:
            self.grow()
        if self.count < self.cap:
            self.ring[self.count] = seq  # not full yet: in order from index 0
            self.count += 1
        else:
            self.forget(self.ring[self.head])
            self.ring[self.head] = seq
            self.head = (self.head + 1) % self.cap
        cdef Py_ssize_t mask = self.cap * 2 - 1
        cdef Py_ssize_t i = self.home(seq)
        while self.table[i].offset != 0:
            i = (i + 1) & mask
        self.table[i].seq = seq
        self.table[i].offset = offset
        self.table[i].ms = ms
        return 0

    @property
    def remembered(self) -> int:
        return self.count

    @property
    def capacity(self) -> int:
        return self.cap


cdef class ChannelLog:
    """One channel's offset, epoch and history: (offset, monotonic time, frame or its
    `Packed`), oldest first. A log made anew has an epoch of its own, so offsets it hands
    out again are never mistaken for old ones."""
    cdef public str epoch
    cdef public long long offset
    cdef public object history

    def __init__(self):
        self.epoch = new_epoch()
        self.offset = 0
        self.history = deque()


cdef class MemoryLogs:
    """Every channel log and dedupe window of the in-memory broker, and its publish."""
    cdef Hub hub
    cdef readonly dict logs
    cdef readonly dict windows

    def __init__(self, Hub hub):
        self.hub = hub
        self.logs = {}
        self.windows = {}

    cpdef ChannelLog log(self, str name):
        cdef ChannelLog log = self.logs.get(name)
        if log is None:
            log = self.logs[name] = ChannelLog()
        return log

    cpdef tuple publish(self, Channel channel, Session sender, object sequence, str content):
        """Publish `content` from `sender` as its `sequence`: (offset, timestamp, duplicate).
        A sequence already accepted from this sender on this channel is answered with its
        first offset and timestamp and not published again."""
        cdef str name = channel.name
        cdef double now = aether_monotonic()
        cdef unsigned long long seq = sequence
        key = (sender.identity, sender.client_id, name)
        cdef DedupeWindow window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = DedupeWindow()
        cdef DedupeEntry* seen = window.find(seq)
        if seen is not NULL:
            # a duplicate is not a publish: it does not keep the window (DEDUP_TTL_S) alive,
            # as in Redis, where only a publish renews the key's TTL
            return (seen.offset, iso_at(seen.ms), True)
        window.touched = now
        cdef ChannelLog log = self.log(name)
        log.offset += 1
        cdef str ts = iso_now()
        cdef bytes frame = publication_frame(name, content, seq, ts, log.offset,
                                             sender.client_id, sender.user_id)
        window.put(seq, log.offset, iso_ms)
        packed = self.hub.deliver(channel, frame, None if sender.echo else sender, log.offset)
        if channel.history_size > 0:
            # the frame, or its compressed variants with it: a replay never compresses
            history = log.history
            history.append((log.offset, now, frame if packed is None else packed))
            while len(history) > channel.history_size:
                history.popleft()
        return (log.offset, ts, False)
