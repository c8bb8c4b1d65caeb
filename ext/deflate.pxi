# deflate.pxi: permessage-deflate (RFC 7692) with no context takeover in either direction,
# so no connection holds zlib state: one compressor per server window size (9..15) and one
# inflater, shared by the whole worker and reset for each message.
#
# Rule: a publication is compressed once per window size its channel's deflate members use
# (`Packed`, made by `Hub.deliver`), and every such member gets the same bytes; history and
# recovery keep the `Packed` and never compress again. A client's compressed message is
# inflated into at most MAX_MESSAGE_BYTES + 1 bytes; past them it is only counted, and only
# up to the frame hard limit (max(4 x MAX_MESSAGE_BYTES, 1 MiB)): it is then refused as the
# plain message it inflates to would be (MESSAGE_TOO_LARGE; past the hard limit close 1009),
# so a zip bomb costs MAX_MESSAGE_BYTES of memory and the hard limit of output at most.

cdef extern from "zlib.h" nogil:
    ctypedef struct z_stream:
        unsigned char* next_in
        unsigned int avail_in
        unsigned char* next_out
        unsigned int avail_out
        void* zalloc
        void* zfree
        void* opaque
    int Z_OK
    int Z_STREAM_END
    int Z_BUF_ERROR
    int Z_SYNC_FLUSH
    int Z_DEFLATED
    int Z_DEFAULT_STRATEGY
    int deflateInit2(z_stream* strm, int level, int method, int windowBits, int memLevel,
                     int strategy)
    int deflate(z_stream* strm, int flush)
    int deflateReset(z_stream* strm)
    int deflateEnd(z_stream* strm)
    unsigned long deflateBound(z_stream* strm, unsigned long sourceLen)
    int inflateInit2(z_stream* strm, int windowBits)
    int inflate(z_stream* strm, int flush)
    int inflateReset(z_stream* strm)

#: The server window sizes a client may ask for (server_max_window_bits) that we compress
#: with. zlib's raw deflate has no 256-byte window (8): a member that asked for 8 gets plain
#: frames, which RFC 7692 allows on a deflate connection (RSV1 is per message).
cdef enum:
    DEFLATE_MIN_BITS = 9
    DEFLATE_MAX_BITS = 15
    DEFLATE_MEM_LEVEL = 8
#: the scratch buffer is given back after a message that grew it past this
cdef Py_ssize_t ZBUF_KEEP = 1 << 20

cdef z_stream deflaters[16]
cdef bint deflater_ready[16]
cdef int deflate_level = 1
cdef z_stream inflater
cdef bint inflater_ready = False
cdef unsigned char* zbuf = NULL
cdef Py_ssize_t zbuf_cap = 0

# counters, read by the Hub's properties (metrics)
cdef unsigned long long z_compressions = 0
cdef unsigned long long z_bytes_in = 0
cdef unsigned long long z_bytes_out = 0
cdef double z_seconds = 0.0
cdef unsigned long long z_inflated = 0
cdef unsigned long long z_inflate_refused = 0


def set_compression_level(int level):
    """COMPRESSION_LEVEL (0-9) for every compressor from now on (made again lazily)."""
    global deflate_level
    cdef int b
    if level < 0 or level > 9:
        raise ValueError("compression level must be 0..9")
    deflate_level = level
    for b in range(16):
        if deflater_ready[b]:
            deflateEnd(&deflaters[b])
            deflater_ready[b] = False


cdef int zbuf_reserve(Py_ssize_t need) except -1:
    global zbuf, zbuf_cap
    cdef unsigned char* grown
    if need <= zbuf_cap:
        return 0
    grown = <unsigned char*>PyMem_Realloc(zbuf, need)
    if grown == NULL:
        raise MemoryError("deflate buffer")
    zbuf = grown
    zbuf_cap = need
    return 0


cdef void zbuf_trim() noexcept:
    global zbuf, zbuf_cap
    if zbuf_cap > ZBUF_KEEP:
        PyMem_Free(zbuf)
        zbuf = NULL
        zbuf_cap = 0


cdef inline Py_ssize_t frame_header_size(const uint8_t* p) noexcept:
    """The header length of one of our (unmasked) frames."""
    cdef uint8_t n = p[1] & 0x7F
    return 2 if n < 126 else (4 if n == 126 else 10)


cdef bytes deflate_frame(uint8_t opcode, const char* payload, Py_ssize_t n, int bits):
    """One final frame with RSV1 set carrying `payload` compressed on its own (raw deflate,
    window 2**bits, the 00 00 ff ff tail removed: RFC 7692 §7.2.1)."""
    global z_compressions, z_bytes_in, z_bytes_out, z_seconds
    cdef z_stream* z = &deflaters[bits]
    cdef double started = aether_monotonic()
    cdef Py_ssize_t produced = 0, cap, m, hl
    cdef int rc
    if bits < DEFLATE_MIN_BITS or bits > DEFLATE_MAX_BITS:
        raise ValueError("window bits must be 9..15")
    if not deflater_ready[bits]:
        memset(z, 0, sizeof(z_stream))
        if deflateInit2(z, deflate_level, Z_DEFLATED, -bits, DEFLATE_MEM_LEVEL,
                        Z_DEFAULT_STRATEGY) != Z_OK:
            raise MemoryError("deflateInit2")
        deflater_ready[bits] = True
    else:
        deflateReset(z)
    cap = <Py_ssize_t>deflateBound(z, <unsigned long>n) + 32
    zbuf_reserve(cap)
    z.next_in = <unsigned char*>payload
    z.avail_in = <unsigned int>n
    while True:
        z.next_out = zbuf + produced
        z.avail_out = <unsigned int>(zbuf_cap - produced)
        rc = deflate(z, Z_SYNC_FLUSH)
        produced = zbuf_cap - <Py_ssize_t>z.avail_out
        if rc != Z_OK and rc != Z_BUF_ERROR:
            raise ValueError("deflate failed")
        if z.avail_out > 0 and z.avail_in == 0:
            break
        zbuf_reserve(zbuf_cap * 2)
    m = produced
    if (m >= 4 and zbuf[m - 4] == 0 and zbuf[m - 3] == 0 and zbuf[m - 2] == 0xFF
            and zbuf[m - 1] == 0xFF):
        m -= 4
    hl = header_size(m)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hl + m)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    write_header(p, opcode, m)
    p[0] |= 0x40  # RSV1: this message is compressed
    memcpy(p + hl, zbuf, m)
    zbuf_trim()
    z_compressions += 1
    z_bytes_in += <unsigned long long>n
    z_bytes_out += <unsigned long long>m
    z_seconds += aether_monotonic() - started
    return out


cdef bytes deflate_existing(bytes frame, int bits):
    """`frame` (one of our plain final frames) compressed with window 2**bits."""
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(frame)
    cdef Py_ssize_t hl = frame_header_size(p)
    return deflate_frame(p[0] & 0x0F, <const char*>p + hl, PyBytes_GET_SIZE(frame) - hl, bits)


cdef const unsigned char* INFLATE_TAIL = b"\x00\x00\xff\xff"

#: what `inflate_message` found
cdef enum:
    INFLATED = 0          # the message, at most `limit` bytes
    INFLATED_OVER = 1     # more than `limit`, at most `hard`: refused as a plain one would be
    INFLATED_BOMB = 2     # more than `hard` (inflating stopped there)
    INFLATE_BAD = 3       # not valid deflate data

#: where output past `limit` goes while it is only counted
cdef enum:
    DISCARD_SIZE = 16384
cdef unsigned char discard[DISCARD_SIZE]


cdef inline Py_ssize_t hard_limit(Py_ssize_t limit) noexcept:
    """The largest message we inflate, only to count it, past MAX_MESSAGE_BYTES: the same
    as the largest frame picows takes (`_max_frame` in http/upgrade.py), so that a
    compressed message is refused as the plain one it inflates to would be."""
    cdef Py_ssize_t hard = limit * 4
    return hard if hard > (1 << 20) else (1 << 20)


cdef inline Py_ssize_t deflated_limit(Py_ssize_t limit) noexcept:
    """The most compressed bytes a message of `limit` bytes takes (deflate's worst case is
    stored blocks, 5 bytes per 64 KiB; generous): a fragmented compressed message is kept
    up to this (the plain one up to `limit`), past it it is over `limit` once inflated."""
    return limit + (limit >> 3) + 64


cdef bytes inflate_message(const char* data, Py_ssize_t n, Py_ssize_t limit, int* verdict):
    """One compressed message (RFC 7692 §7.2.2: the 00 00 ff ff tail is added here)
    inflated by the shared inflater, reset first. At most `limit` bytes are kept: the
    message (`verdict` INFLATED); past them output is only counted, in a fixed buffer, up to
    `hard_limit(limit)` (INFLATED_OVER), and inflating stops there (INFLATED_BOMB): a zip
    bomb costs `limit` + 1 bytes of memory and no more than `hard_limit` of output. Not valid
    deflate data: INFLATE_BAD. None unless INFLATED."""
    global inflater_ready, z_inflated, z_inflate_refused
    cdef z_stream* z = &inflater
    cdef Py_ssize_t produced = 0, counted = 0, cap
    cdef Py_ssize_t hard = hard_limit(limit)
    cdef int rc, phase
    cdef bint ended = False, counting = False
    verdict[0] = INFLATE_BAD
    if not inflater_ready:
        memset(z, 0, sizeof(z_stream))
        if inflateInit2(z, -DEFLATE_MAX_BITS) != Z_OK:
            raise MemoryError("inflateInit2")
        inflater_ready = True
    else:
        inflateReset(z)
    # the output buffer holds at most `limit` + 1 bytes, whatever the scratch's size
    cap = n * 4 + 64
    if cap > limit + 1:
        cap = limit + 1
    zbuf_reserve(cap)
    for phase in range(2):
        if ended:
            break
        if phase == 0:
            z.next_in = <unsigned char*>data
            z.avail_in = <unsigned int>n
        else:
            z.next_in = <unsigned char*>INFLATE_TAIL
            z.avail_in = 4
        while True:
            if counting:
                z.next_out = discard
                z.avail_out = DISCARD_SIZE
            else:
                if produced == cap:
                    if cap > limit:
                        counting = True  # over the limit: from here on only counted
                        counted = produced
                        continue
                    cap = cap * 2 if cap * 2 <= limit + 1 else limit + 1
                    zbuf_reserve(cap)
                z.next_out = zbuf + produced
                z.avail_out = <unsigned int>(cap - produced)
            rc = inflate(z, Z_SYNC_FLUSH)
            if counting:
                counted += DISCARD_SIZE - <Py_ssize_t>z.avail_out
                if counted > hard:
                    z_inflate_refused += 1
                    zbuf_trim()
                    verdict[0] = INFLATED_BOMB
                    return None
            else:
                produced = cap - <Py_ssize_t>z.avail_out
            if rc == Z_STREAM_END:
                # the client ended the stream (BFINAL): nothing may follow in the message
                if phase == 0 and z.avail_in != 0:
                    zbuf_trim()
                    return None
                ended = True
                break
            if rc == Z_BUF_ERROR:
                if z.avail_in == 0 and z.avail_out > 0:
                    break  # no progress possible: this input is done
                if z.avail_out == 0:
                    continue  # more room needed
                zbuf_trim()
                return None
            if rc != Z_OK:
                zbuf_trim()
                return None
            if z.avail_in == 0 and z.avail_out > 0:
                break
    if counting or produced > limit:
        z_inflate_refused += 1
        zbuf_trim()
        verdict[0] = INFLATED_OVER
        return None
    cdef bytes out = PyBytes_FromStringAndSize(<char*>zbuf, produced)
    zbuf_trim()
    z_inflated += 1
    verdict[0] = INFLATED
    return out


cdef class Packed:
    """A publication's frame and its compressed variants, one per server window size in use
    (`Hub.deliver` makes them, once): what history keeps and recovery replays. Reading a
    variant never compresses (`frame_for`); a window size that was not in use when it was
    published gets the plain frame."""
    cdef readonly bytes plain
    cdef list variants        # window bits - 9 -> the RSV1 frame, or None

    def __init__(self, bytes plain):
        self.plain = plain
        self.variants = [None] * (DEFLATE_MAX_BITS - DEFLATE_MIN_BITS + 1)

    cdef bytes make(self, int bits):
        cdef bytes v = self.variants[bits - DEFLATE_MIN_BITS]
        if v is None:
            v = deflate_existing(self.plain, bits)
            self.variants[bits - DEFLATE_MIN_BITS] = v
        return v

    cdef inline bytes pick(self, int bits):
        cdef object v
        if bits < DEFLATE_MIN_BITS:
            return self.plain
        v = self.variants[bits - DEFLATE_MIN_BITS]
        return self.plain if v is None else <bytes>v

    cpdef bytes frame_for(self, int bits):
        """The frame for a member whose server window is 2**bits (0: no deflate)."""
        return self.pick(bits)

    @property
    def compressed(self) -> list:
        """The window sizes this publication was compressed for."""
        return [b + DEFLATE_MIN_BITS for b in range(len(self.variants))
                if self.variants[b] is not None]


cdef inline bytes frame_of(object item, int bits):
    """A replayed item (a frame, or a `Packed`) as the frame a member with window bits
    `bits` gets."""
    if type(item) is Packed:
        return (<Packed>item).pick(bits)
    return <bytes>item


def compress_frame(bytes frame, int bits) -> bytes:
    """`frame` (a plain final frame of ours) compressed with window 2**bits (for tests).
    ValueError when `frame` is shorter than its own header says."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(frame)
    if n < 2 or n < frame_header_size(<const uint8_t*>PyBytes_AS_STRING(frame)):
        raise ValueError("not a whole frame")
    return deflate_existing(frame, bits)


def inflate_payload(bytes data, Py_ssize_t limit) -> tuple:
    """`data` inflated as one message (for tests): (verdict, the message or None); the
    verdict is "ok", "over" (past `limit`), "bomb" (past 4 x `limit`, at least 1 MiB: no
    more was inflated) or "bad"."""
    cdef int verdict = INFLATE_BAD
    out = inflate_message(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), limit, &verdict)
    return (("ok", "over", "bomb", "bad")[verdict], out)


def compression_stats() -> dict:
    """This worker's compression counters."""
    return {
        "compressions": z_compressions,
        "compress_bytes_in": z_bytes_in,
        "compress_bytes_out": z_bytes_out,
        "compress_seconds": z_seconds,
        "inflated_messages": z_inflated,
        "inflate_refused": z_inflate_refused,
    }
