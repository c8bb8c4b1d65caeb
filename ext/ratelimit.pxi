# ratelimit.pxi: token buckets as C structs. A bucket of capacity N refills N tokens per
# `per_seconds`; capacity <= 0 means "no limit". Checking never allocates. A `Budget` is one
# bucket shared by every session of one user (one peer address when anonymous).

cdef struct Bucket:
    double tokens
    double capacity
    double rate        # tokens per second
    double stamp       # monotonic seconds of the last refill


cdef inline void bucket_init(Bucket* b, double capacity, double per_seconds,
                             double now) noexcept:
    b.capacity = capacity
    b.rate = capacity / per_seconds if capacity > 0 and per_seconds > 0 else 0.0
    b.tokens = capacity
    b.stamp = now


cdef inline double bucket_wait(Bucket* b, double now) noexcept:
    """Refill, then the seconds until one token is there (0.0: one is there now)."""
    if b.capacity <= 0:
        return 0.0
    if now > b.stamp:
        b.tokens += (now - b.stamp) * b.rate
        if b.tokens > b.capacity:
            b.tokens = b.capacity
        b.stamp = now
    if b.tokens >= 1.0 - 1e-9:  # float refill may land a hair below a whole token
        return 0.0
    return (1.0 - b.tokens) / b.rate


cdef inline void bucket_take(Bucket* b) noexcept:
    if b.capacity > 0:
        b.tokens -= 1.0


cdef class Budget:
    """The inbound budget of one user (of one peer address, for anonymous clients) on this
    worker: every frame of any of their sessions takes a token from it. The Node keeps it
    while they have a connection, and after, until it is full again: reconnecting does not
    refill it."""
    cdef Bucket b

    def __init__(self, double capacity, double per_seconds):
        bucket_init(&self.b, capacity, per_seconds, aether_monotonic())

    cdef inline double take(self, double now) noexcept:
        """Take one token: 0.0 when taken, else the seconds to wait (nothing taken)."""
        cdef double wait = bucket_wait(&self.b, now)
        if wait == 0.0:
            bucket_take(&self.b)
        return wait

    def try_take(self) -> float:
        """`take` now, for tests."""
        return self.take(aether_monotonic())

    def full(self) -> bool:
        """Refilled to capacity: forgetting it now gives nobody anything."""
        bucket_wait(&self.b, aether_monotonic())
        return self.b.tokens >= self.b.capacity - 1e-9

    @property
    def tokens(self) -> float:
        bucket_wait(&self.b, aether_monotonic())
        return self.b.tokens


cdef class RateBucket:
    """A Python handle on one bucket, for tests and benchmarks: the same C code as the
    hot path."""
    cdef Bucket b

    def __init__(self, double capacity, double per_seconds, double now):
        bucket_init(&self.b, capacity, per_seconds, now)

    def try_take(self, double now) -> float:
        """Take one token: 0.0 when taken, else the seconds to wait (nothing taken)."""
        cdef double wait = bucket_wait(&self.b, now)
        if wait == 0.0:
            bucket_take(&self.b)
        return wait

    @property
    def tokens(self) -> float:
        return self.b.tokens
