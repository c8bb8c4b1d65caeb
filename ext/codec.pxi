# codec.pxi: WebSocket frame assembly for server frames and the fixed JSON shapes of the hot
# path. Server frames are unmasked, so one encoded frame is valid for every member.

cdef extern from "time.h" nogil:
    struct tm:
        int tm_sec
        int tm_min
        int tm_hour
        int tm_mday
        int tm_mon
        int tm_year
    tm* gmtime_r(const time_t* timep, tm* result)
    int clock_gettime(int clk_id, void* tp)

cdef extern from *:
    """
    #include <time.h>
    static double aether_wall_time(void) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    static double aether_monotonic(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    """
    double aether_wall_time() nogil
    double aether_monotonic() nogil


cdef bytes frame_bytes(uint8_t opcode, const char* payload, Py_ssize_t n):
    """One final, unmasked frame: the header written once in front of the payload."""
    cdef Py_ssize_t hl = header_size(n)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hl + n)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    write_header(p, opcode, n)
    memcpy(p + hl, payload, n)
    return out


cdef inline bytes text_frame(bytes payload):
    return frame_bytes(0x1, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))


cdef inline bytes json_frame(object obj):
    return text_frame(_dumps(obj))


cdef long long iso_ms = -1
cdef str iso_text = ""


cdef str iso_now():
    """The server's ISO-8601 UTC time with milliseconds, without datetime objects. Made once
    per millisecond: under load, dozens of messages share it (snprintf was ~4% of a
    round trip). `iso_ms` is the millisecond it shows."""
    global iso_ms, iso_text
    cdef long long ms = <long long>(aether_wall_time() * 1000.0)
    if ms == iso_ms:
        return iso_text
    iso_text = iso_at(ms)
    iso_ms = ms
    return iso_text


cdef str iso_at(long long ms):
    """`ms` (milliseconds since the Unix epoch) as the ISO-8601 UTC text of messages."""
    cdef time_t secs = <time_t>(ms // 1000)
    cdef int millis = <int>(ms % 1000)
    cdef tm t
    cdef char buf[32]
    gmtime_r(&secs, &t)
    cdef int n = snprintf(buf, 32, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
                          t.tm_year + 1900, t.tm_mon + 1, t.tm_mday,
                          t.tm_hour, t.tm_min, t.tm_sec, millis)
    return PyUnicode_DecodeUTF8(buf, n, NULL)


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8(object unicode) except NULL


cdef bytes ack_frame(str channel, object sequence, long long offset, str timestamp):
    """The sender's `message/ack`, formatted without a dict or a JSON encoder: a channel
    name is [A-Za-z0-9_.:-] (checked before publishing) and the timestamp ISO digits, so
    nothing needs escaping. The same bytes as orjson gives for the same dict."""
    cdef char buf[400]
    cdef unsigned long long seq = sequence
    cdef int n = snprintf(
        buf, sizeof(buf),
        b'{"type":"message","action":"ack","data":{"channel":"%s","metadata":'
        b'{"sequence":%llu,"offset":%lld,"timestamp":"%s"}}}',
        PyUnicode_AsUTF8(channel), seq, offset, PyUnicode_AsUTF8(timestamp))
    if n < 0 or n >= <int>sizeof(buf):
        raise ValueError("ack does not fit")
    return frame_bytes(0x1, buf, n)


def encode_ack(str channel, object sequence, long long offset, str timestamp) -> bytes:
    """The ack frame (for tests)."""
    return ack_frame(channel, sequence, offset, timestamp)


def encode_text_frame(bytes payload) -> bytes:
    """A final unmasked text frame carrying `payload` (for tests, the broker and the bench)."""
    return text_frame(payload)


def encode_json_frame(object obj) -> bytes:
    """`obj` as JSON (orjson) in a final unmasked text frame."""
    return json_frame(obj)


cdef inline Py_ssize_t header_size(Py_ssize_t n) noexcept:
    return 2 if n < 126 else (4 if n < 65536 else 10)


cdef inline void write_header(uint8_t* p, uint8_t opcode, Py_ssize_t n) noexcept:
    cdef uint64_t ln = <uint64_t>n
    cdef int i
    p[0] = 0x80 | opcode
    if n < 126:
        p[1] = <uint8_t>n
    elif n < 65536:
        p[1] = 126
        p[2] = <uint8_t>(n >> 8)
        p[3] = <uint8_t>(n & 0xFF)
    else:
        p[1] = 127
        for i in range(8):
            p[2 + i] = <uint8_t>((ln >> (56 - 8 * i)) & 0xFF)


cdef inline char* put(char* p, const char* src, Py_ssize_t n) noexcept:
    memcpy(p, src, n)
    return p + n


cdef inline char* put_bytes(char* p, bytes piece) noexcept:
    return put(p, PyBytes_AS_STRING(piece), PyBytes_GET_SIZE(piece))


# the fixed text of a publication, between its values (key order as the dict would give)
cdef bytes PUB_CHANNEL = b'{"type":"message","action":"send","data":{"channel":'
cdef bytes PUB_CONTENT = b',"content":'
cdef bytes PUB_SEQUENCE = b',"metadata":{"sequence":'
cdef bytes PUB_TIMESTAMP = b',"timestamp":'
cdef bytes PUB_OFFSET = b',"offset":'
cdef bytes PUB_CLIENT_ID = b',"client_id":'
cdef bytes PUB_USER_ID = b',"user_id":'
cdef bytes PUB_END = b'}}}'
cdef Py_ssize_t PUB_FIXED = (len(PUB_CHANNEL) + len(PUB_CONTENT) + len(PUB_SEQUENCE)
                             + len(PUB_TIMESTAMP) + len(PUB_OFFSET) + len(PUB_CLIENT_ID)
                             + len(PUB_USER_ID) + len(PUB_END))


cdef inline char* put_publication_head(char* p, bytes ch, bytes body, const char* seq,
                                       int seq_len, bytes ts) noexcept:
    """The publication up to its offset's value (the offset is the only part a Redis
    publish cannot know before its script runs)."""
    p = put_bytes(p, PUB_CHANNEL)
    p = put_bytes(p, ch)
    p = put_bytes(p, PUB_CONTENT)
    p = put_bytes(p, body)
    p = put_bytes(p, PUB_SEQUENCE)
    p = put(p, seq, seq_len)
    p = put_bytes(p, PUB_TIMESTAMP)
    p = put_bytes(p, ts)
    return put_bytes(p, PUB_OFFSET)


cdef inline char* put_publication_tail(char* p, bytes cid, bytes uid) noexcept:
    """The publication after its offset's value."""
    p = put_bytes(p, PUB_CLIENT_ID)
    p = put_bytes(p, cid)
    p = put_bytes(p, PUB_USER_ID)
    p = put_bytes(p, uid)
    return put_bytes(p, PUB_END)


cdef Py_ssize_t PUB_HEAD_FIXED = (len(PUB_CHANNEL) + len(PUB_CONTENT) + len(PUB_SEQUENCE)
                                  + len(PUB_TIMESTAMP) + len(PUB_OFFSET))
cdef Py_ssize_t PUB_TAIL_FIXED = len(PUB_CLIENT_ID) + len(PUB_USER_ID) + len(PUB_END)


cdef bytes publication_frame(str channel, str content, unsigned long long sequence,
                             str timestamp, long long offset, str client_id, object user_id):
    """The fan-out frame, assembled from its parts: orjson escapes only the strings (and
    the user id), the fixed text and the numbers are copied in, and the frame header is
    written in front, in one allocation. The same bytes as orjson gives for the dict."""
    cdef bytes ch = _dumps(channel)
    cdef bytes body = _dumps(content)
    cdef bytes ts = _dumps(timestamp)
    cdef bytes cid = _dumps(client_id)
    cdef bytes uid = _dumps(user_id)
    cdef char seq[24]
    cdef char off[24]
    cdef int seq_len = snprintf(seq, sizeof(seq), "%llu", sequence)
    cdef int off_len = snprintf(off, sizeof(off), "%lld", offset)
    cdef Py_ssize_t n = (PUB_FIXED + len(ch) + len(body) + seq_len + len(ts) + off_len
                         + len(cid) + len(uid))
    cdef Py_ssize_t hl = header_size(n)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hl + n)
    cdef char* p = PyBytes_AS_STRING(out)
    write_header(<uint8_t*>p, 0x1, n)
    p = put_publication_head(p + hl, ch, body, seq, seq_len, ts)
    p = put(p, off, off_len)
    put_publication_tail(p, cid, uid)
    return out


def encode_publication(str channel, str content, unsigned long long sequence, str timestamp,
                       long long offset, str client_id, object user_id) -> bytes:
    """The fan-out frame of one accepted message: encoded once, sent to every member. The
    sequence is a 64-bit unsigned integer (what a client may send: see Session.publish)."""
    return publication_frame(channel, content, sequence, timestamp, offset, client_id, user_id)


def publication_halves(str channel, str content, unsigned long long sequence, str timestamp,
                       str client_id, object user_id) -> tuple:
    """The JSON text of a publication (no frame header) in two halves, before and after
    the offset's digits: the Redis broker's script assigns the offset and joins
    `head + offset + tail`, the same bytes `encode_publication` frames."""
    cdef bytes ch = _dumps(channel)
    cdef bytes body = _dumps(content)
    cdef bytes ts = _dumps(timestamp)
    cdef bytes cid = _dumps(client_id)
    cdef bytes uid = _dumps(user_id)
    cdef char seq[24]
    cdef int seq_len = snprintf(seq, sizeof(seq), "%llu", sequence)
    cdef bytes head = PyBytes_FromStringAndSize(
        NULL, PUB_HEAD_FIXED + len(ch) + len(body) + seq_len + len(ts))
    put_publication_head(PyBytes_AS_STRING(head), ch, body, seq, seq_len, ts)
    cdef bytes tail = PyBytes_FromStringAndSize(NULL, PUB_TAIL_FIXED + len(cid) + len(uid))
    put_publication_tail(PyBytes_AS_STRING(tail), cid, uid)
    return head, tail


def utc_timestamp() -> str:
    """The server's current time as the ISO-8601 UTC string used in messages."""
    return iso_now()


def monotonic() -> float:
    """The clock the hot path uses for rate buckets and timers (CLOCK_MONOTONIC)."""
    return aether_monotonic()
