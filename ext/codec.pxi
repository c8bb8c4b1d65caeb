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


cdef bytes publication_frame(str channel, str content, object sequence, str timestamp,
                             long long offset, str client_id, object user_id):
    """The fan-out frame, assembled from its parts: orjson escapes only the strings (and
    the user id), the fixed text and the numbers are copied in, and the frame header is
    written in front, in one allocation. The same bytes as orjson gives for the dict."""
    if type(sequence) is not int or sequence < 0 or sequence > 0xFFFFFFFFFFFFFFFF:
        return json_frame(publication_dict(channel, content, sequence, timestamp, offset,
                                           client_id, user_id))
    cdef bytes ch = _dumps(channel)
    cdef bytes body = _dumps(content)
    cdef bytes ts = _dumps(timestamp)
    cdef bytes cid = _dumps(client_id)
    cdef bytes uid = _dumps(user_id)
    cdef char nums[64]
    cdef int seq_len = snprintf(nums, 32, "%llu", <unsigned long long>sequence)
    cdef int off_len = snprintf(nums + 32, 32, "%lld", offset)
    cdef const char* a = b'{"type":"message","action":"send","data":{"channel":'
    cdef const char* b = b',"content":'
    cdef const char* c = b',"metadata":{"sequence":'
    cdef const char* d = b',"timestamp":'
    cdef const char* e = b',"offset":'
    cdef const char* f = b',"client_id":'
    cdef const char* g = b',"user_id":'
    cdef const char* h = b'}}}'
    cdef Py_ssize_t n = (52 + len(ch) + 11 + len(body) + 24 + seq_len + 13 + len(ts) + 10
                         + off_len + 13 + len(cid) + 11 + len(uid) + 3)
    cdef Py_ssize_t hl = header_size(n)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hl + n)
    cdef char* p = PyBytes_AS_STRING(out)
    write_header(<uint8_t*>p, 0x1, n)
    p += hl
    p = put(p, a, 52)
    p = put(p, PyBytes_AS_STRING(ch), len(ch))
    p = put(p, b, 11)
    p = put(p, PyBytes_AS_STRING(body), len(body))
    p = put(p, c, 24)
    p = put(p, nums, seq_len)
    p = put(p, d, 13)
    p = put(p, PyBytes_AS_STRING(ts), len(ts))
    p = put(p, e, 10)
    p = put(p, nums + 32, off_len)
    p = put(p, f, 13)
    p = put(p, PyBytes_AS_STRING(cid), len(cid))
    p = put(p, g, 11)
    p = put(p, PyBytes_AS_STRING(uid), len(uid))
    put(p, h, 3)
    return out


cdef dict publication_dict(str channel, str content, object sequence, str timestamp,
                           long long offset, str client_id, object user_id):
    return {
        "type": "message",
        "action": "send",
        "data": {
            "channel": channel,
            "content": content,
            "metadata": {
                "sequence": sequence,
                "timestamp": timestamp,
                "offset": offset,
                "client_id": client_id,
                "user_id": user_id,
            },
        },
    }


def encode_publication(str channel, str content, object sequence, str timestamp,
                       long long offset, str client_id, object user_id) -> bytes:
    """The fan-out frame of one accepted message: encoded once, sent to every member."""
    return publication_frame(channel, content, sequence, timestamp, offset, client_id, user_id)


def utc_timestamp() -> str:
    """The server's current time as the ISO-8601 UTC string used in messages."""
    return iso_now()


def monotonic() -> float:
    """The clock the hot path uses for rate buckets and timers (CLOCK_MONOTONIC)."""
    return aether_monotonic()
