/*
 * loadgen: a single-threaded epoll WebSocket load generator for the aether-fast benchmarks.
 *
 * One process, one thread, one epoll set. It opens N WebSocket client connections to
 * 127.0.0.0/8 (the HTTP upgrade target of connection i is line i of --urls), parses the
 * server's frames in place in its receive path (payloads are never copied out; a frame cut by
 * a read boundary keeps only its own bytes for the next read), and runs one of these modes:
 *
 *   fanout   line 0 publishes, lines 1..S subscribe. For each window W in --windows, M messages
 *            are published keeping W in flight against the probe subscriber (the last one);
 *            the phase ends when every subscriber has all messages (or the grace time runs
 *            out). Prints deliveries, seconds, deliveries_per_s, lost.
 *   latency  the same connections; the publisher sends at a fixed rate for --duration seconds,
 *            each content starts with the send time in ns; every receive is a latency sample,
 *            twice: when this process read it, and when it arrived in the subscriber's socket
 *            (the kernel's receive timestamp, SO_TIMESTAMPNS), which leaves out the time the
 *            frame waited for this process to get round to reading it.
 *   rtt      for each count C in --conns, the first C connections (each on its own channel, with
 *            echo=1 for aether-fast) publish and wait for their own message, over and over.
 *   connect  open --conns N connections as fast as possible (at most --concurrency handshakes
 *            in flight), print the rate, then hold them idle (answering pings) until stdin is
 *            closed, SIGTERM, or --hold seconds.
 *   parsebench  the frame parser alone on an in-memory buffer (no sockets): its ceiling.
 *
 * --deflate offers permessage-deflate (RFC 7692) in every upgrade and reads the server's answer
 * (negotiated or not, per connection). Compressed frames (RSV1) are counted like any other and
 * never inflated on the hot path; a few --sample-conns subscribers inflate every data frame
 * they get (raw inflate, 00 00 ff ff appended, the context kept when the server keeps its
 * own) and check that it is the JSON that was published; mismatches are counted, not hidden.
 * --json-content N makes the content a realistic, compressible JSON document of about N bytes
 * (escaped in the content string) instead of N 'x's.
 *
 * Every mode is bounded (--timeout) and exits by itself. The result is one JSON object on
 * stdout (connect prints a second one when it stops holding).
 * Build: gcc -O2 -o loadgen loadgen.c -lz
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <strings.h>
#include <unistd.h>
#include <zlib.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define RBUF_SIZE (512 * 1024)
#define CARRY_MAX (64 * 1024)  /* longer frames are skipped, not kept, across reads */
#define MAX_EVENTS 1024
#define MAX_PHASES 16
#define HIST_BUCKETS (64 * 128)

enum { ST_IDLE, ST_CONNECTING, ST_HANDSHAKE, ST_OPEN, ST_CLOSED };
enum { MODE_FANOUT, MODE_LATENCY, MODE_RTT, MODE_CONNECT, MODE_PARSEBENCH };
enum { ROLE_SUB, ROLE_PUB };

typedef struct conn {
    int fd;
    uint8_t state;
    uint8_t role;
    uint8_t scan;        /* look into payloads for the content timestamp */
    uint8_t hit;         /* reached its target in the current stage */
    uint8_t want_send;   /* rtt: its own message came back */
    uint8_t closing;     /* we sent CLOSE: do not answer theirs */
    uint8_t deflate;     /* permessage-deflate negotiated */
    uint8_t ctx_takeover; /* ... and the server keeps its compression context between messages */
    uint8_t check;       /* a sample connection: inflate and check every data frame */
    z_stream *zs;        /* its inflater (sample connections only) */
    uint32_t idx;
    uint64_t frames;     /* data frames received, ever */
    uint64_t base;       /* frames at the start of the phase */
    uint64_t target;     /* frames count that completes the current stage */
    uint64_t skip;       /* payload bytes of a long frame still to discard */
    uint8_t *carry;      /* the incomplete frame (or HTTP response head) of the last read */
    uint32_t carry_len, carry_cap;
    uint8_t *out;        /* bytes the kernel did not take yet */
    uint32_t out_len, out_cap;
    uint64_t rtt_sent;   /* rtt: send time of the outstanding message, 0 = none */
    const char *url;
    const char *chan;
    uint16_t url_len, chan_len;
} conn;

typedef struct {
    uint64_t count, sum, min, max;
    uint64_t b[HIST_BUCKETS];
} hist_t;

typedef struct {
    long param;               /* window, rate or conns */
    uint64_t messages;        /* published in the measured part */
    uint64_t deliveries, expected, lost, extra;
    uint64_t round_trips;
    double seconds;
    double per_s;
    double lg_cpu, srv_cpu;
    uint64_t rx_bytes, rx_frames, rx_reads, waits;
    uint64_t data_wire_bytes, compressed_frames; /* data frames: header + payload bytes; RSV1 */
    uint64_t sample_ok, sample_errors;
    int timed_out;
    int dead;
    int has_hist;
    double p50, p90, p99, p999, max, mean, min;
    double arr_p50, arr_p99, arr_max; /* latency: publish -> arrival in the socket */
    double send_lag_max_us;
    uint64_t foreign;
    double cpu0_busy, cpu1_busy;
} phase_t;

/* ---------------------------------------------------------------- options and state */

static struct {
    int mode;
    const char *host;
    int port;
    int port2;
    const char *urls_path;
    int src_ips;
    long subs;
    long messages;
    long windows[MAX_PHASES];
    int nwindows;
    long rates[MAX_PHASES];
    int nrates;
    long conns[MAX_PHASES];
    int nconns;
    double duration;
    double timeout;
    double grace;
    double hold;
    int ready_frames;
    int payload;
    int server_pid;
    int concurrency;
    long warmup;
    double connect_timeout;
    int deflate;          /* offer permessage-deflate */
    int json_content;     /* content: about this many bytes of JSON (0: --payload 'x's) */
    int sample_conns;     /* subscribers that inflate and check every data frame */
} opt = {
    .mode = -1, .host = "127.0.0.1", .port = 0, .src_ips = 0, .subs = 0, .messages = 1000,
    .duration = 5.0, .timeout = 120.0, .grace = 5.0, .hold = 60.0, .ready_frames = 0,
    .payload = 64, .server_pid = 0, .concurrency = 256, .warmup = 0, .connect_timeout = 60.0,
    .deflate = 0, .json_content = 0, .sample_conns = 4,
};

#define NBODIES 16
#define ZOUT_SIZE (256 * 1024)

/* permessage-deflate: what was negotiated and what the sample connections found */
static struct {
    uint64_t negotiated;      /* connections whose 101 accepted the offer */
    uint64_t ctx_takeover;    /* ... of which the server keeps its context (no server_no_context_takeover) */
    uint64_t unoffered;       /* 101s naming an extension we did not offer (a server bug) */
    uint64_t rsv1_unexpected; /* compressed frames on a connection that did not negotiate */
    char response[200];       /* the first Sec-WebSocket-Extensions answer */
    uint64_t frames;          /* data frames checked on the sample connections */
    uint64_t inflated;        /* ... of which compressed (inflated) */
    uint64_t in_bytes, out_bytes; /* compressed payload bytes in, inflated bytes out */
    uint64_t ok;              /* publications whose content was the one published */
    uint64_t other;           /* well-formed frames that are not publications (replies, acks) */
    uint64_t errors;          /* inflate failures, or not the JSON that was published */
    char first_error[200];
    uint8_t *zin, *zout;
    char *bodies[NBODIES];    /* --json-content: the escaped JSON documents, by batch number */
    size_t body_len[NBODIES];
    size_t content_max;       /* the longest content this run sends */
} dfl;

static struct {
    int ep;
    conn *c;
    long n;               /* connections in use */
    char **lines;
    long nlines;
    uint8_t *rbuf;
    uint64_t frames;      /* data frames, all connections */
    uint64_t rx_bytes;
    uint64_t data_wire_bytes; /* data frames: header + payload */
    uint64_t compressed_frames; /* data frames with RSV1 (permessage-deflate) */
    uint64_t reads;
    uint64_t waits;       /* epoll_wait calls that returned events */
    uint64_t last_frame_ns;
    uint64_t hits;        /* connections that reached their target this stage */
    uint64_t dead_unhit;  /* connections that died before reaching it */
    uint64_t dead;
    uint64_t failed;
    uint64_t opened;
    long open_now;        /* connections in ST_OPEN */
    uint64_t server_closes;
    uint64_t pings;
    int last_close_code;
    char first_error[200];
    uint64_t seq;
    uint64_t deadline_ns;
    volatile sig_atomic_t stop;
    int measuring;        /* latency/rtt: record samples */
    hist_t *hist;
    hist_t *hist_arrival; /* latency: publish -> the kernel's receive timestamp */
    uint64_t arrival_ns;  /* that timestamp of the current read (CLOCK_MONOTONIC), or 0 */
    int64_t real_minus_mono; /* CLOCK_REALTIME - CLOCK_MONOTONIC, ns, at start-up */
    uint64_t foreign;
    uint32_t rng;
    char *pad;
    struct sockaddr_in dst, dst2;
    int stdin_closed;
} g;

static phase_t phases[MAX_PHASES];
static int nphases;

/* ---------------------------------------------------------------- small helpers */

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_self(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}

/* utime + stime of --server-pid in seconds (all its threads), or -1. */
static double cpu_server(void) {
    if (opt.server_pid <= 0) return -1.0;
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", opt.server_pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1.0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1.0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return -1.0;
    p += 2; /* field 3: state */
    for (int field = 3; field < 14 && *p; field++) {
        p = strchr(p, ' ');
        if (!p) return -1.0;
        p++;
    }
    unsigned long long ut = 0, st = 0;
    if (sscanf(p, "%llu %llu", &ut, &st) != 2) return -1.0;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* busy and total jiffies of one CPU from /proc/stat ("cpuN user nice system idle iowait ...") */
static void cpu_jiffies(int cpu, unsigned long long *busy, unsigned long long *total) {
    *busy = *total = 0;
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return;
    char line[512], want[16];
    snprintf(want, sizeof want, "cpu%d ", cpu);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, want, strlen(want)) != 0) continue;
        unsigned long long v[10] = {0};
        int n = sscanf(line + strlen(want), "%llu %llu %llu %llu %llu %llu %llu %llu %llu %llu",
                       &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9]);
        for (int i = 0; i < n && i < 8; i++) *total += v[i]; /* guest time is in user already */
        *busy = *total - v[3] - v[4];
        break;
    }
    fclose(f);
}

typedef struct {
    unsigned long long busy[2], total[2];
} cpus_t;

static void cpus_now(cpus_t *c) {
    for (int i = 0; i < 2; i++) cpu_jiffies(i, &c->busy[i], &c->total[i]);
}

/* share of CPU i that was busy (anything: our processes, others, interrupts) since `a` */
static double cpu_share(const cpus_t *a, int i) {
    cpus_t b;
    cpus_now(&b);
    unsigned long long dt = b.total[i] - a->total[i];
    return dt ? (double)(b.busy[i] - a->busy[i]) / (double)dt : -1.0;
}

static void note_error(const char *fmt, ...) {
    if (g.first_error[0]) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g.first_error, sizeof g.first_error, fmt, ap);
    va_end(ap);
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static inline uint32_t rng32(void) {
    uint32_t x = g.rng;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return g.rng = x;
}

static void on_signal(int sig) {
    (void)sig;
    g.stop = 1;
}

static int parse_list(const char *s, long *out, int max) {
    int n = 0;
    while (*s && n < max) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v <= 0) die("bad number list: %s", s);
        out[n++] = v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') die("bad number list: %s", s);
    }
    return n;
}

/* ---------------------------------------------------------------- histogram (log-linear) */

static inline int hbucket(uint64_t v) {
    if (v < 128) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - 7;
    return ((shift + 1) << 7) | (int)((v >> shift) & 127);
}

static inline uint64_t hlow(int i) {
    int e = i >> 7, m = i & 127;
    if (e == 0) return (uint64_t)m;
    return ((uint64_t)(128 | m)) << (e - 1);
}

static inline void hrecord(hist_t *h, uint64_t v) {
    h->b[hbucket(v)]++;
    h->count++;
    h->sum += v;
    if (v > h->max) h->max = v;
    if (h->count == 1 || v < h->min) h->min = v;
}

/* value (ns) at quantile q: the middle of the bucket holding it, never above max */
static double hquantile(const hist_t *h, double q) {
    if (!h->count) return 0.0;
    uint64_t rank = (uint64_t)(q * (double)h->count);
    if (rank >= h->count) rank = h->count - 1;
    uint64_t seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += h->b[i];
        if (seen > rank) {
            uint64_t lo = hlow(i), hi = hlow(i + 1);
            double mid = (double)lo + (double)(hi - lo) / 2.0;
            if (mid > (double)h->max) mid = (double)h->max;
            if (mid < (double)h->min) mid = (double)h->min;
            return mid;
        }
    }
    return (double)h->max;
}

static void hist_into(phase_t *ph, const hist_t *h) {
    ph->has_hist = 1;
    ph->p50 = hquantile(h, 0.50) / 1e3;
    ph->p90 = hquantile(h, 0.90) / 1e3;
    ph->p99 = hquantile(h, 0.99) / 1e3;
    ph->p999 = hquantile(h, 0.999) / 1e3;
    ph->max = (double)h->max / 1e3;
    ph->min = (double)h->min / 1e3;
    ph->mean = h->count ? (double)h->sum / (double)h->count / 1e3 : 0.0;
}

/* ---------------------------------------------------------------- --json-content */

static uint32_t xorshift(uint32_t x) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return x;
}

/* NBODIES realistic JSON documents (a batch of order events: names, ids, prices, timestamps),
 * each of about `target` bytes once escaped into a JSON string, from a fixed seed: every run
 * sends the same bytes. Batch k starts with {\"batch\":\"kk, so a receiver knows which to expect. */
static void make_bodies(int target) {
    static const char *const types[] = {"order.created", "order.updated", "order.filled",
                                        "order.cancelled", "trade.executed"};
    static const char *const symbols[] = {"BTC-USD", "ETH-USD", "SOL-USD", "ADA-EUR",
                                          "DOT-EUR", "XRP-USD", "LTC-GBP", "AVAX-USD"};
    static const char *const statuses[] = {"open", "partially_filled", "filled", "cancelled"};
    static const char *const tiers[] = {"free", "silver", "gold", "platinum"};
    static const char *const venues[] = {"api", "web", "ios", "android"};
    char *raw = malloc((size_t)target + 1024);
    for (int b = 0; b < NBODIES; b++) {
        uint32_t x = 0x9e3779b9u ^ (uint32_t)(b * 7919 + 1);
        /* escaped length: every '"' of the raw JSON becomes \" */
        size_t n = 0, quotes = 0;
        n += (size_t)sprintf(raw + n, "{\"batch\":\"%02d\",\"source\":\"orders-eu-west-1\","
                                      "\"schema\":\"orders.v3\",\"events\":[", b);
        for (int e = 0;; e++) {
            quotes = 0;
            for (size_t i = 0; i < n; i++) quotes += raw[i] == '"';
            if (n + quotes + 300 > (size_t)target && e > 0) break;
            uint32_t r[16];
            for (int i = 0; i < 16; i++) r[i] = x = xorshift(x);
            uint32_t acct = 10000 + r[0] % 90000;
            n += (size_t)sprintf(
                raw + n,
                "%s{\"id\":\"evt-%02d-%03d\",\"type\":\"%s\",\"account\":{\"id\":%u,"
                "\"name\":\"trader_%u\",\"tier\":\"%s\"},\"symbol\":\"%s\",\"side\":\"%s\","
                "\"price\":%u.%02u,\"qty\":%u.%03u,\"status\":\"%s\",\"venue\":\"%s\","
                "\"ts\":\"2026-12-07T02:%02u:%02u.%03uZ\",\"tags\":[\"spot\",\"%s\"]}",
                e ? "," : "", b, e, types[r[1] % 5], acct, acct, tiers[r[2] % 4],
                symbols[r[3] % 8], r[4] % 2 ? "buy" : "sell", 100 + r[5] % 60000, r[6] % 100,
                r[7] % 20, r[8] % 1000, statuses[r[9] % 4], venues[r[10] % 4], r[11] % 60,
                r[12] % 60, r[13] % 1000, r[14] % 3 ? "maker" : "taker");
        }
        /* then a note of words up to the target's length exactly (when it is not past it) */
        static const char *const words[] = {"client", "requested", "amend", "after", "partial",
                                            "fill", "on", "venue", "retry", "queued", "risk",
                                            "check", "passed", "limit", "order", "the"};
        n += (size_t)sprintf(raw + n, "],\"note\":\"");
        quotes = 0;
        for (size_t i = 0; i < n; i++) quotes += raw[i] == '"';
        for (int w = 0; n + quotes + 12 < (size_t)target; w++) {
            x = xorshift(x);
            n += (size_t)sprintf(raw + n, "%s%s", w ? " " : "", words[x % 16]);
        }
        while (n + quotes + 3 < (size_t)target) raw[n++] = '.';
        n += (size_t)sprintf(raw + n, "\"}");
        char *esc = malloc(2 * n + 1);
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            if (raw[i] == '"' || raw[i] == '\\') esc[k++] = '\\';
            esc[k++] = raw[i];
        }
        esc[k] = 0;
        dfl.bodies[b] = esc;
        dfl.body_len[b] = k;
        if (k > dfl.content_max) dfl.content_max = k;
    }
    free(raw);
}

/* ---------------------------------------------------------------- sample checks */

static void sample_fail(conn *c, const char *fmt, ...) {
    dfl.errors++;
    if (dfl.first_error[0]) return;
    int k = snprintf(dfl.first_error, sizeof dfl.first_error, "connection %u: ", c->idx);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dfl.first_error + k, sizeof dfl.first_error - (size_t)k, fmt, ap);
    va_end(ap);
}

/* A data frame's text as the server sent it (inflated if it was compressed): 1 when it is a
 * publication carrying exactly the content the publisher sent, 0 when it is another JSON
 * object (a reply, an ack), -1 (and counted as an error) otherwise. */
static int check_text(conn *c, const uint8_t *p, size_t n) {
    if (n < 2 || p[0] != '{' || p[n - 1] != '}') {
        char head[41];
        size_t k = n < 40 ? n : 40;
        for (size_t i = 0; i < k; i++) head[i] = p[i] >= 0x20 && p[i] < 0x7f ? (char)p[i] : '?';
        head[k] = 0;
        sample_fail(c, "not a JSON object (%zu bytes: %s)", n, head);
        return -1;
    }
    const uint8_t *k = memmem(p, n, "\"content\"", 9), *e = p + n;
    if (!k) return 0;
    k += 9;
    while (k < e && (*k == ' ' || *k == ':')) k++;
    if (e - k < 22 || *k != '"' || (k[1] != 'M' && k[1] != 'W')) {
        sample_fail(c, "a content the publisher did not send");
        return -1;
    }
    k += 2;
    for (int i = 0; i < 20; i++)
        if (k[i] < '0' || k[i] > '9') {
            sample_fail(c, "the content's send time is not 20 digits");
            return -1;
        }
    k += 20;
    const char *want = g.pad;
    size_t want_len = (size_t)opt.payload;
    if (opt.json_content) {
        static const char mark[] = "{\\\"batch\\\":\\\"";
        size_t ml = sizeof mark - 1;
        unsigned idx = NBODIES;
        if ((size_t)(e - k) >= ml + 2 && !memcmp(k, mark, ml) && k[ml] >= '0' && k[ml] <= '9' &&
            k[ml + 1] >= '0' && k[ml + 1] <= '9')
            idx = (unsigned)(k[ml] - '0') * 10 + (unsigned)(k[ml + 1] - '0');
        if (idx >= NBODIES) {
            sample_fail(c, "the content is not one of the JSON documents published");
            return -1;
        }
        want = dfl.bodies[idx];
        want_len = dfl.body_len[idx];
    }
    if ((size_t)(e - k) < want_len + 1 || memcmp(k, want, want_len) != 0 || k[want_len] != '"') {
        sample_fail(c, "the content differs from what was published");
        return -1;
    }
    return 1;
}

/* Check one data frame of a sample connection: inflate it when it is compressed (raw
 * inflate with 00 00 ff ff appended; the context kept across messages when the server keeps
 * its own, reset otherwise), then check_text. */
static void check_frame(conn *c, uint8_t b0, const uint8_t *p, size_t n) {
    if (!(b0 & 0x80) || (b0 & 0x0f) == 0) {
        sample_fail(c, "a fragmented message: not reassembled, the connection is no longer checked");
        c->check = 0;
        return;
    }
    if ((b0 & 0x0f) != 0x1) return; /* binary: not ours to check */
    dfl.frames++;
    int r;
    if (b0 & 0x40) {
        z_stream *zs = c->zs;
        if (!zs) {
            zs = c->zs = calloc(1, sizeof *zs);
            if (inflateInit2(zs, -15) != Z_OK) die("inflateInit2 failed");
        } else if (!c->ctx_takeover) {
            inflateReset(zs);
        }
        memcpy(dfl.zin, p, n);
        memcpy(dfl.zin + n, "\x00\x00\xff\xff", 4);
        zs->next_in = dfl.zin;
        zs->avail_in = (uInt)(n + 4);
        zs->next_out = dfl.zout;
        zs->avail_out = ZOUT_SIZE;
        int z = inflate(zs, Z_SYNC_FLUSH);
        size_t out = ZOUT_SIZE - zs->avail_out;
        int ended = z == Z_STREAM_END; /* a final block (BFINAL): the 4 bytes are left over */
        if ((z != Z_OK && !ended) || (!ended && zs->avail_in != 0)) {
            sample_fail(c, "inflate failed (%d: %s) on a %zu-byte frame", z,
                        zs->msg ? zs->msg : (zs->avail_out ? "?" : "over 256 KiB"), n);
            c->check = 0;
            return;
        }
        if (ended) inflateReset(zs);
        dfl.inflated++;
        dfl.in_bytes += n;
        dfl.out_bytes += out;
        r = check_text(c, dfl.zout, out);
    } else {
        r = check_text(c, p, n);
    }
    if (r > 0) dfl.ok++;
    else if (r == 0) dfl.other++;
}

/* ---------------------------------------------------------------- URL lines */

static void load_urls(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) die("cannot open --urls %s: %s", path, strerror(errno));
    long cap = 1024;
    g.lines = malloc(sizeof(char *) * cap);
    char *line = NULL;
    size_t lcap = 0;
    ssize_t n;
    while ((n = getline(&line, &lcap, f)) > 0) {
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        if (n == 0) continue;
        if (line[0] != '/') die("URL line %ld must start with '/': %s", g.nlines + 1, line);
        for (ssize_t i = 0; i < n; i++)
            if ((unsigned char)line[i] <= ' ') die("URL line %ld has a space or control", g.nlines + 1);
        if (g.nlines == cap) g.lines = realloc(g.lines, sizeof(char *) * (cap *= 2));
        g.lines[g.nlines++] = strdup(line);
    }
    free(line);
    fclose(f);
}

/* the value of query parameter `channel` in the URL, or "default" */
static void url_channel(const char *url, const char **chan, uint16_t *len) {
    const char *q = strchr(url, '?');
    while (q) {
        q++;
        if (strncmp(q, "channel=", 8) == 0) {
            const char *v = q + 8;
            size_t n = strcspn(v, "&");
            *chan = v;
            *len = (uint16_t)n;
            return;
        }
        q = strchr(q, '&');
    }
    *chan = "default";
    *len = 7;
}

/* ---------------------------------------------------------------- connections */

static void conn_free_buffers(conn *c) {
    free(c->carry);
    c->carry = NULL;
    c->carry_len = c->carry_cap = 0;
    free(c->out);
    c->out = NULL;
    c->out_len = c->out_cap = 0;
}

static void conn_dead(conn *c, const char *why, int err) {
    if (c->state == ST_CLOSED) return;
    int was_open = c->state == ST_OPEN;
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->state = ST_CLOSED;
    conn_free_buffers(c);
    if (was_open) g.open_now--;
    if (c->closing) return;
    if (was_open) {
        g.dead++;
        if (!c->hit) g.dead_unhit++;
    } else {
        g.failed++;
    }
    if (err)
        note_error("connection %u: %s: %s", c->idx, why, strerror(err));
    else
        note_error("connection %u: %s", c->idx, why);
}

static void epoll_set(conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(g.ep, op, c->fd, &ev) < 0 && op != EPOLL_CTL_DEL)
        die("epoll_ctl: %s", strerror(errno));
}

static void out_append(conn *c, const uint8_t *p, size_t n) {
    if (c->out_len + n > c->out_cap) {
        uint32_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + n) cap *= 2;
        c->out = realloc(c->out, cap);
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += (uint32_t)n;
}

/* write now what the kernel takes; keep the rest and wait for EPOLLOUT */
static void conn_send(conn *c, const uint8_t *p, size_t n) {
    if (c->state == ST_CLOSED) return;
    if (c->out_len) {
        out_append(c, p, n);
        return;
    }
    while (n) {
        ssize_t w = write(c->fd, p, n);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            out_append(c, p, n);
            epoll_set(c, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
            return;
        }
        conn_dead(c, "write", errno);
        return;
    }
}

static void conn_flush(conn *c) {
    size_t off = 0;
    while (off < c->out_len) {
        ssize_t w = write(c->fd, c->out + off, c->out_len - off);
        if (w > 0) {
            off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        conn_dead(c, "write", errno);
        return;
    }
    memmove(c->out, c->out + off, c->out_len - off);
    c->out_len -= (uint32_t)off;
    if (!c->out_len) epoll_set(c, EPOLLIN, EPOLL_CTL_MOD);
}

/* one masked client frame of `opcode` carrying payload[0..n) at dst; returns its length */
static size_t build_frame(uint8_t *dst, uint8_t opcode, const uint8_t *payload, size_t n) {
    size_t h;
    dst[0] = (uint8_t)(0x80 | opcode);
    if (n < 126) {
        dst[1] = (uint8_t)(0x80 | n);
        h = 2;
    } else if (n < 65536) {
        dst[1] = 0x80 | 126;
        dst[2] = (uint8_t)(n >> 8);
        dst[3] = (uint8_t)n;
        h = 4;
    } else {
        dst[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++) dst[2 + i] = (uint8_t)((uint64_t)n >> (56 - 8 * i));
        h = 10;
    }
    uint32_t mask = rng32();
    uint8_t *m = dst + h;
    memcpy(m, &mask, 4);
    h += 4;
    for (size_t i = 0; i < n; i++) dst[h + i] = payload[i] ^ m[i & 3];
    return h + n;
}

/* the publish message of aether-fast's protocol (peers re-broadcast the same JSON);
 * content = tag + 20-digit send time in ns + padding. Appends one frame to out. */
static size_t build_publish(uint8_t *out, const conn *c, char tag, uint64_t ns) {
    char payload[CARRY_MAX];
    uint64_t seq = ++g.seq;
    const char *body = opt.json_content ? dfl.bodies[seq % NBODIES] : g.pad;
    int n = snprintf(payload, sizeof payload,
                     "{\"type\":\"message\",\"action\":\"send\",\"data\":{\"channel\":\"%.*s\","
                     "\"content\":\"%c%020llu%s\",\"metadata\":{\"sequence\":%llu}}}",
                     (int)c->chan_len, c->chan, tag, (unsigned long long)ns, body,
                     (unsigned long long)seq);
    return build_frame(out, 0x1, (const uint8_t *)payload, (size_t)n);
}

static void start_conn(conn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        c->state = ST_CONNECTING;
        c->fd = -1;
        conn_dead(c, "socket", errno);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (opt.mode == MODE_LATENCY) setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
    c->fd = fd;
    c->state = ST_CONNECTING;
    if (opt.src_ips > 0) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl((127u << 24) | (uint32_t)(2 + c->idx % (uint32_t)opt.src_ips));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            conn_dead(c, "bind", errno);
            return;
        }
    }
    /* --port2: every odd connection goes to the second server (two nodes, one Redis) */
    struct sockaddr_in *dst = (opt.port2 && (c->idx & 1)) ? &g.dst2 : &g.dst;
    if (connect(fd, (struct sockaddr *)dst, sizeof *dst) < 0 && errno != EINPROGRESS) {
        conn_dead(c, "connect", errno);
        return;
    }
    epoll_set(c, EPOLLIN | EPOLLOUT, EPOLL_CTL_ADD);
}

static void send_handshake(conn *c) {
    char req[CARRY_MAX];
    int n = snprintf(req, sizeof req,
                     "GET %.*s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n%s\r\n",
                     (int)c->url_len, c->url, opt.host, opt.port,
                     opt.deflate ? "Sec-WebSocket-Extensions: permessage-deflate; "
                                   "client_max_window_bits\r\n" : "");
    if (n >= (int)sizeof req) die("URL line %u too long", c->idx + 1);
    c->state = ST_HANDSHAKE;
    epoll_set(c, EPOLLIN, EPOLL_CTL_MOD);
    conn_send(c, (const uint8_t *)req, (size_t)n);
}

static inline void reach(conn *c) {
    if (!c->hit) {
        c->hit = 1;
        g.hits++;
    }
}

/* ---------------------------------------------------------------- the receive path */

static void on_open(conn *c) {
    c->state = ST_OPEN;
    g.opened++;
    g.open_now++;
    c->target = c->frames + (uint64_t)opt.ready_frames;
    c->hit = 0;
    if (opt.ready_frames == 0) reach(c);
}

/* the send time embedded in a publication's content, or 0 when it has none ("content" is
 * found with memmem; whitespace after the colon is allowed for serializers that add it) */
static inline uint64_t content_ns(const uint8_t *p, size_t n, char *tag) {
    const uint8_t *k = memmem(p, n, "\"content\"", 9);
    if (!k) return 0;
    const uint8_t *e = p + n;
    k += 9;
    while (k < e && (*k == ' ' || *k == ':')) k++;
    if (k >= e || *k != '"') return 0;
    k++;
    if (e - k < 21) return 0;
    *tag = (char)k[0];
    uint64_t v = 0;
    for (int i = 1; i <= 20; i++) {
        unsigned d = (unsigned)(k[i] - '0');
        if (d > 9) return 0;
        v = v * 10 + d;
    }
    return v;
}

static inline void on_data(conn *c, uint8_t b0, const uint8_t *p, size_t n, uint64_t now) {
    c->frames++;
    if (c->frames == c->target) reach(c);
    if (c->check) check_frame(c, b0, p, n);
    if (!c->scan) return;
    char tag = 0;
    uint64_t sent = content_ns(p, n, &tag);
    if (!sent || tag != 'M' || !g.measuring) return;
    if (opt.mode == MODE_LATENCY) {
        hrecord(g.hist, now > sent ? now - sent : 0);
        if (g.arrival_ns) hrecord(g.hist_arrival, g.arrival_ns > sent ? g.arrival_ns - sent : 0);
    } else if (opt.mode == MODE_RTT) {
        if (sent == c->rtt_sent) {
            hrecord(g.hist, now - sent);
            c->rtt_sent = 0;
            c->want_send = 1;
        } else {
            g.foreign++;
        }
    }
}

static void on_control(conn *c, uint8_t op, const uint8_t *p, size_t n) {
    if (op == 0x9) { /* PING: answer with a masked PONG carrying the same bytes */
        uint8_t f[160];
        g.pings++;
        conn_send(c, f, build_frame(f, 0xA, p, n > 125 ? 125 : n));
    } else if (op == 0x8) {
        if (!c->closing) {
            g.server_closes++;
            g.last_close_code = n >= 2 ? (p[0] << 8 | p[1]) : 1005;
            uint8_t f[16];
            conn_send(c, f, build_frame(f, 0x8, p, n >= 2 ? 2 : 0));
        }
        conn_dead(c, "closed by the server", 0);
    }
}

/* The wire bytes of a data frame, and whether it is compressed (RSV1); 0 when the frame is
 * compressed on a connection that did not negotiate permessage-deflate (it is then closed). */
static inline int count_data(conn *c, uint8_t b0, uint64_t wire) {
    g.data_wire_bytes += wire;
    if (b0 & 0x40) {
        g.compressed_frames++;
        if (!c->deflate) {
            dfl.rsv1_unexpected++;
            conn_dead(c, "a compressed frame (RSV1) without permessage-deflate", 0);
            return 0;
        }
    }
    return 1;
}

/* Parse every complete frame in p[0..n); returns the bytes consumed. */
static size_t parse_frames(conn *c, const uint8_t *p, size_t n, uint64_t now) {
    const uint8_t *start = p, *end = p + n;
    while (end - p >= 2) {
        uint8_t b0 = p[0], b1 = p[1];
        uint64_t len = b1 & 0x7f;
        size_t hl = 2;
        if (len == 126) {
            if (end - p < 4) break;
            len = (uint64_t)p[2] << 8 | p[3];
            hl = 4;
        } else if (len == 127) {
            if (end - p < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | p[2 + i];
            hl = 10;
        }
        if (b1 & 0x80) {
            conn_dead(c, "masked frame from the server", 0);
            return (size_t)(end - start);
        }
        uint8_t op = b0 & 0x0f;
        size_t avail = (size_t)(end - p) - hl;
        if (len > avail) {
            if (op < 8 && len > CARRY_MAX) { /* count it now, discard its bytes as they come */
                if (!count_data(c, b0, hl + len)) return (size_t)(end - start);
                if (c->check) {
                    sample_fail(c, "a %llu-byte frame: too long to check", (unsigned long long)len);
                    c->check = 0;
                }
                on_data(c, b0, p + hl, 0, now);
                c->skip = len - avail;
                return (size_t)(end - start);
            }
            break;
        }
        if (op < 8) {
            if (!count_data(c, b0, hl + len)) return (size_t)(end - start);
            on_data(c, b0, p + hl, (size_t)len, now);
        } else {
            on_control(c, op, p + hl, (size_t)len);
            if (c->state == ST_CLOSED) return (size_t)(end - start);
        }
        p += hl + len;
    }
    return (size_t)(p - start);
}

static void keep_carry(conn *c, const uint8_t *p, size_t n) {
    if (n > c->carry_cap) {
        uint32_t cap = c->carry_cap ? c->carry_cap : 512;
        while (cap < n) cap *= 2;
        free(c->carry);
        c->carry = malloc(cap);
        c->carry_cap = cap;
    }
    memmove(c->carry, p, n);
    c->carry_len = (uint32_t)n;
}

/* case-insensitive: does p[0..n) contain `needle`? */
static int has_ci(const char *p, size_t n, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (strncasecmp(p + i, needle, k) == 0) return 1;
    return 0;
}

/* The Sec-WebSocket-Extensions answer of a 101 head h[0..n): permessage-deflate negotiated
 * or not, and whether the server keeps its context; an answer to no offer closes it. */
static void read_extensions(conn *c, const char *h, size_t n) {
    static const char name[] = "sec-websocket-extensions:";
    const size_t nl = sizeof name - 1;
    const char *line = h, *end = h + n;
    while (line < end) {
        const char *eol = memchr(line, '\n', (size_t)(end - line));
        if (!eol) eol = end;
        if ((size_t)(eol - line) > nl && strncasecmp(line, name, nl) == 0) {
            const char *v = line + nl, *ve = eol;
            while (v < ve && (*v == ' ' || *v == '\t')) v++;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ')) ve--;
            size_t vn = (size_t)(ve - v);
            if (!dfl.response[0]) snprintf(dfl.response, sizeof dfl.response, "%.*s", (int)vn, v);
            if (!opt.deflate) {
                dfl.unoffered++;
                conn_dead(c, "the 101 answers an extension that was not offered", 0);
                return;
            }
            if (has_ci(v, vn, "permessage-deflate") && !c->deflate) {
                c->deflate = 1;
                c->ctx_takeover = !has_ci(v, vn, "server_no_context_takeover");
                dfl.negotiated++;
                dfl.ctx_takeover += c->ctx_takeover;
            }
        }
        line = eol + 1;
    }
}

static void on_readable(conn *c) {
    uint8_t *buf = g.rbuf;
    size_t pre = c->carry_len;
    if (pre) memcpy(buf, c->carry, pre);
    ssize_t r;
    if (opt.mode == MODE_LATENCY) {
        /* the kernel's receive timestamp of the last segment this read takes: for a frame
         * that came in an earlier segment of the same read it is late, never early */
        struct iovec iov = {.iov_base = buf + pre, .iov_len = RBUF_SIZE - pre};
        union {
            char b[CMSG_SPACE(sizeof(struct timespec))];
            struct cmsghdr align;
        } ctl;
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
                            .msg_controllen = sizeof ctl.b};
        r = recvmsg(c->fd, &mh, 0);
        g.arrival_ns = 0;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); r > 0 && cm; cm = CMSG_NXTHDR(&mh, cm)) {
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPNS) {
                struct timespec ts;
                memcpy(&ts, CMSG_DATA(cm), sizeof ts);
                int64_t real = (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
                g.arrival_ns = (uint64_t)(real - g.real_minus_mono);
            }
        }
    } else {
        r = read(c->fd, buf + pre, RBUF_SIZE - pre);
    }
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        conn_dead(c, r == 0 ? "closed (EOF)" : "read", r == 0 ? 0 : errno);
        return;
    }
    g.rx_bytes += (uint64_t)r;
    g.reads++;
    uint64_t now = now_ns();
    size_t n = pre + (size_t)r, off = 0;
    if (c->state == ST_HANDSHAKE) {
        uint8_t *e = memmem(buf, n, "\r\n\r\n", 4);
        if (!e) {
            if (n > 16384) {
                conn_dead(c, "HTTP response head too long", 0);
                return;
            }
            keep_carry(c, buf, n);
            return;
        }
        if (n < 12 || memcmp(buf, "HTTP/1.1 101", 12) != 0) {
            char line[120];
            size_t k = strcspn((char *)buf, "\r\n");
            if (k > sizeof line - 1) k = sizeof line - 1;
            memcpy(line, buf, k);
            line[k] = 0;
            conn_dead(c, line, 0);
            return;
        }
        off = (size_t)(e + 4 - buf);
        read_extensions(c, (const char *)buf, off);
        if (c->state == ST_CLOSED) return;
        on_open(c);
    }
    if (c->skip) {
        size_t k = c->skip < n - off ? (size_t)c->skip : n - off;
        c->skip -= k;
        off += k;
    }
    uint64_t f0 = c->frames;
    size_t used = parse_frames(c, buf + off, n - off, now);
    if (c->state == ST_CLOSED) return;
    if (c->frames != f0) {
        g.frames += c->frames - f0;
        g.last_frame_ns = now;
    }
    keep_carry(c, buf + off + used, n - off - used);
}

static void on_event(conn *c, uint32_t ev) {
    if (c->state == ST_CLOSED) return;
    if (c->state == ST_CONNECTING) {
        if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            conn_dead(c, "connect", err);
            return;
        }
        send_handshake(c);
        return;
    }
    if ((ev & EPOLLOUT) && c->out_len) {
        conn_flush(c);
        if (c->state == ST_CLOSED) return;
    }
    if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
}

/* ---------------------------------------------------------------- the loop */

typedef int (*pred_fn)(void);
typedef void (*hook_fn)(uint64_t now);

static int stdin_fd_token;

/* Run the event loop until `done()` says so, `until_ns` passes, the global deadline passes
 * or a signal arrives. `hook` runs after every batch of events. Returns 1 if done. */
static int run(pred_fn done, hook_fn hook, uint64_t until_ns, uint64_t wake_ns_step) {
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        uint64_t now = now_ns();
        if (hook) hook(now);
        if (done && done()) return 1;
        if (g.stop || g.stdin_closed || now >= until_ns || now >= g.deadline_ns) return 0;
        uint64_t wait = until_ns - now;
        if (g.deadline_ns - now < wait) wait = g.deadline_ns - now;
        if (wake_ns_step && wake_ns_step < wait) wait = wake_ns_step;
        int nev;
#ifdef SYS_epoll_pwait2
        struct timespec ts = {.tv_sec = (time_t)(wait / 1000000000ull),
                              .tv_nsec = (long)(wait % 1000000000ull)};
        nev = (int)syscall(SYS_epoll_pwait2, g.ep, evs, MAX_EVENTS, &ts, NULL, 0);
        if (nev < 0 && errno == ENOSYS)
#endif
            nev = epoll_wait(g.ep, evs, MAX_EVENTS, (int)((wait + 999999) / 1000000));
        if (nev < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait: %s", strerror(errno));
        }
        if (nev > 0) g.waits++;
        for (int i = 0; i < nev; i++) {
            if (evs[i].data.ptr == &stdin_fd_token) {
                char tmp[256];
                ssize_t r = read(0, tmp, sizeof tmp);
                if (r <= 0) {
                    g.stdin_closed = 1;
                    epoll_ctl(g.ep, EPOLL_CTL_DEL, 0, NULL);
                }
                continue;
            }
            on_event((conn *)evs[i].data.ptr, evs[i].events);
        }
    }
}

/* ---------------------------------------------------------------- stages */

static long next_to_start;
static long connect_n;

static int connect_done(void) { return (long)(g.hits + g.failed + g.dead_unhit) >= connect_n; }

static void connect_hook(uint64_t now) {
    (void)now;
    while (next_to_start < connect_n &&
           (long)(next_to_start - (long)(g.hits + g.failed + g.dead_unhit)) < opt.concurrency) {
        start_conn(&g.c[next_to_start++]);
    }
}

/* Open connections 0..n-1; returns seconds taken. Each is ready once upgraded and
 * --ready-frames data frames arrived (aether-fast's connection/connect reply). */
static double connect_all(long n) {
    connect_n = n;
    next_to_start = 0;
    g.hits = 0;
    uint64_t t0 = now_ns();
    run(connect_done, connect_hook, t0 + (uint64_t)(opt.connect_timeout * 1e9), 20000000ull);
    double secs = (double)(now_ns() - t0) / 1e9;
    for (long i = 0; i < n; i++) {
        conn *c = &g.c[i];
        if (c->state != ST_OPEN && c->state != ST_CLOSED)
            conn_dead(c, "not ready before --connect-timeout", 0);
        else if (c->state == ST_OPEN && !c->hit) {
            conn_dead(c, "no ready frame before --connect-timeout", 0);
        }
    }
    return secs;
}

/* subscribers are g.c[1..subs]; the publisher is g.c[0] */
static conn *pub;
static long nsubs;

static void set_targets(uint64_t add) {
    g.hits = 0;
    g.dead_unhit = 0;
    for (long i = 1; i <= nsubs; i++) {
        conn *c = &g.c[i];
        c->hit = 0;
        c->base = c->frames;
        c->target = c->frames + add;
        if (c->state != ST_OPEN) {
            c->hit = 1; /* counted as dead already */
        }
    }
}

static long alive_subs(void) {
    long k = 0;
    for (long i = 1; i <= nsubs; i++) k += g.c[i].state == ST_OPEN;
    return k;
}

static long stage_need;
static int subs_done(void) { return (long)(g.hits + g.dead_unhit) >= stage_need; }

/* Sending is over and nothing arrived for --grace seconds: what is missing now is lost (a
 * slow server still draining its backlog keeps delivering, so it is waited for). */
static int stalled;
static int drained_or_stalled(int sending_over) {
    if (subs_done()) return 1;
    if (sending_over && now_ns() - g.last_frame_ns > (uint64_t)(opt.grace * 1e9)) {
        stalled = 1;
        return 1;
    }
    return 0;
}

/* Publish again only when no subscriber got its first message for 100 ms: a slow server
 * still fanning out the last one is not sent more, a member registered too late gets one. */
static uint64_t sync_last, sync_progress, sync_hits_seen;
static void sync_hook(uint64_t now) {
    if (g.hits != sync_hits_seen) {
        sync_hits_seen = g.hits;
        sync_progress = now;
    }
    if (sync_last == 0 || (now - sync_last >= 20000000ull && now - sync_progress >= 100000000ull)) {
        uint8_t f[CARRY_MAX];
        conn_send(pub, f, build_publish(f, pub, 'W', now));
        sync_last = now;
        sync_progress = now;
    }
}

static uint64_t quiet_need;
static int quiet_done(void) { return now_ns() - g.last_frame_ns >= quiet_need; }

static void quiesce(double secs) {
    quiet_need = (uint64_t)(secs * 1e9);
    g.last_frame_ns = now_ns();
    run(quiet_done, NULL, now_ns() + 10000000000ull, quiet_need);
}

/* Every live subscriber has received at least one message: membership is settled (peers
 * register a member after the 101 is sent, so a message published at once could miss it). */
static int sync_subs(void) {
    set_targets(1);
    stage_need = alive_subs();
    sync_last = 0;
    sync_hits_seen = 0;
    int ok = run(subs_done, sync_hook, now_ns() + 15000000000ull, 5000000ull);
    if (!ok) note_error("sync: %ld of %ld subscribers received nothing", stage_need - (long)g.hits, stage_need);
    quiesce(0.15);
    return ok;
}

/* fan-out: keep `window` messages in flight against the probe (the last subscriber) */
static conn *probe;
static long fo_window, fo_total, fo_sent;
static uint64_t fo_send_until;
static char fo_tag;
static int fo_stopped_early;

static void fanout_hook(uint64_t now) {
    if (pub->state != ST_OPEN || probe->state != ST_OPEN) return;
    if (fo_sent < fo_total && now >= fo_send_until) {
        /* time is up: expect only what was sent */
        fo_total = fo_sent;
        fo_stopped_early = 1;
        g.hits = 0;
        for (long i = 1; i <= nsubs; i++) {
            conn *c = &g.c[i];
            c->target = c->base + (uint64_t)fo_total;
            c->hit = c->state != ST_OPEN || c->frames >= c->target;
            if (c->hit && c->state == ST_OPEN) g.hits++;
        }
        return;
    }
    long received = (long)(probe->frames - probe->base);
    long room = fo_window - (fo_sent - received);
    if (room <= 0 || fo_sent >= fo_total) return;
    if (room > fo_total - fo_sent) room = fo_total - fo_sent;
    static uint8_t buf[64 * 1024 * 4];
    size_t len = 0;
    while (room-- > 0) {
        len += build_publish(buf + len, pub, fo_tag, now);
        fo_sent++;
        if (len > sizeof buf - dfl.content_max - 1024) break;
    }
    conn_send(pub, buf, len);
}

static int fanout_done(void) { return drained_or_stalled(fo_sent >= fo_total); }

/* What a measured phase reports of its own span: the receive counters, the CPU time of the
 * load generator and of the server, and how busy each CPU was. meter_start at its start,
 * meter_stop into its phase_t at its end. */
typedef struct {
    uint64_t rx_bytes, frames, reads, waits;
    uint64_t data_wire_bytes, compressed_frames, sample_ok, sample_errors;
    double lg_cpu, srv_cpu;
    cpus_t cpus;
} meter_t;

static void meter_start(meter_t *m) {
    m->rx_bytes = g.rx_bytes;
    m->frames = g.frames;
    m->reads = g.reads;
    m->waits = g.waits;
    m->data_wire_bytes = g.data_wire_bytes;
    m->compressed_frames = g.compressed_frames;
    m->sample_ok = dfl.ok;
    m->sample_errors = dfl.errors;
    m->lg_cpu = cpu_self();
    m->srv_cpu = cpu_server();
    cpus_now(&m->cpus);
}

static void meter_stop(const meter_t *m, phase_t *ph) {
    ph->lg_cpu = cpu_self() - m->lg_cpu;
    ph->cpu0_busy = cpu_share(&m->cpus, 0);
    ph->cpu1_busy = cpu_share(&m->cpus, 1);
    double s1 = cpu_server();
    ph->srv_cpu = (m->srv_cpu >= 0 && s1 >= 0) ? s1 - m->srv_cpu : -1;
    ph->rx_bytes = g.rx_bytes - m->rx_bytes;
    ph->rx_frames = g.frames - m->frames;
    ph->rx_reads = g.reads - m->reads;
    ph->waits = g.waits - m->waits;
    ph->data_wire_bytes = g.data_wire_bytes - m->data_wire_bytes;
    ph->compressed_frames = g.compressed_frames - m->compressed_frames;
    ph->sample_ok = dfl.ok - m->sample_ok;
    ph->sample_errors = dfl.errors - m->sample_errors;
}

/* The deliveries of a phase in which each subscriber should get `sent` messages: got (at
 * most `sent` a subscriber), expected, lost, extra (beyond `sent`) and per second over
 * ph->seconds. */
static void count_deliveries(phase_t *ph, uint64_t sent) {
    uint64_t got = 0, extra = 0;
    for (long i = 1; i <= nsubs; i++) {
        conn *c = &g.c[i];
        uint64_t k = c->frames - c->base;
        if (k > sent) {
            extra += k - sent;
            k = sent;
        }
        got += k;
    }
    ph->expected = (uint64_t)nsubs * sent;
    ph->deliveries = got;
    ph->lost = ph->expected - got;
    ph->extra = extra;
    ph->dead = (int)g.dead;
    ph->per_s = ph->seconds > 0 ? (double)got / ph->seconds : 0;
}

static void run_window(phase_t *ph, long window, long messages, char tag) {
    fo_window = window;
    fo_total = messages;
    fo_sent = 0;
    fo_tag = tag;
    fo_stopped_early = 0;
    set_targets((uint64_t)messages);
    stage_need = alive_subs();
    meter_t m;
    meter_start(&m);
    uint64_t t0 = now_ns();
    fo_send_until = t0 + (uint64_t)(opt.duration * 1e9);
    g.last_frame_ns = t0;
    stalled = 0;
    int ok = run(fanout_done, fanout_hook, g.deadline_ns, 2000000ull) && !stalled;
    uint64_t t1 = g.last_frame_ns > t0 ? g.last_frame_ns : now_ns();
    if (!ph) return;
    ph->param = window;
    ph->messages = (uint64_t)fo_total;
    ph->timed_out = !ok;
    ph->seconds = (double)(t1 - t0) / 1e9;
    meter_stop(&m, ph);
    count_deliveries(ph, (uint64_t)fo_total);
}

/* latency: send at a fixed rate, every receive is a sample */
static double lat_rate;
static uint64_t lat_t0, lat_end, lat_next_k, lat_sent;
static double lat_lag_max;

static void latency_hook(uint64_t now) {
    if (pub->state != ST_OPEN) return;
    if (now >= lat_end) return;
    uint64_t due = (uint64_t)((double)(now - lat_t0) * lat_rate / 1e9) + 1;
    static uint8_t buf[64 * 1024 * 4];
    size_t len = 0;
    while (lat_next_k < due && len < sizeof buf - dfl.content_max - 1024) {
        uint64_t sched = lat_t0 + (uint64_t)((double)lat_next_k * 1e9 / lat_rate);
        double lag = (double)(now - sched) / 1e3;
        if (lag > lat_lag_max) lat_lag_max = lag;
        len += build_publish(buf + len, pub, 'M', now_ns());
        lat_next_k++;
        lat_sent++;
    }
    if (len) conn_send(pub, buf, len);
}

static int lat_retargeted;
static int lat_done(void) {
    if (now_ns() < lat_end) return 0;
    if (!lat_retargeted) { /* a late loop may have sent fewer: expect what was sent */
        lat_retargeted = 1;
        g.hits = 0;
        for (long i = 1; i <= nsubs; i++) {
            conn *c = &g.c[i];
            c->target = c->base + lat_sent;
            c->hit = c->state != ST_OPEN || c->frames >= c->target;
            if (c->hit && c->state == ST_OPEN) g.hits++;
        }
    }
    return drained_or_stalled(1);
}

static void run_rate(phase_t *ph, double rate) {
    memset(g.hist, 0, sizeof *g.hist);
    memset(g.hist_arrival, 0, sizeof *g.hist_arrival);
    lat_rate = rate;
    lat_next_k = 0;
    lat_sent = 0;
    lat_lag_max = 0;
    lat_retargeted = 0;
    uint64_t expect_msgs = (uint64_t)(rate * opt.duration);
    if (expect_msgs < 1) expect_msgs = 1;
    set_targets(expect_msgs);
    stage_need = alive_subs();
    meter_t m;
    meter_start(&m);
    g.measuring = 1;
    lat_t0 = now_ns();
    lat_end = lat_t0 + (uint64_t)((double)expect_msgs * 1e9 / rate) - 1;
    uint64_t step = (uint64_t)(1e9 / rate / 4);
    if (step > 2000000) step = 2000000;
    if (step < 50000) step = 50000;
    stalled = 0;
    int ok = run(lat_done, latency_hook, g.deadline_ns, step) && !stalled;
    g.measuring = 0;
    double secs = (double)(now_ns() - lat_t0) / 1e9;
    ph->param = (long)rate;
    ph->messages = lat_sent;
    ph->timed_out = !ok;
    ph->seconds = secs;
    meter_stop(&m, ph);
    count_deliveries(ph, lat_sent);
    ph->send_lag_max_us = lat_lag_max;
    hist_into(ph, g.hist);
    const hist_t *ha = g.hist_arrival;
    ph->arr_p50 = ha->count ? hquantile(ha, 0.50) / 1e3 : -1.0;
    ph->arr_p99 = ha->count ? hquantile(ha, 0.99) / 1e3 : -1.0;
    ph->arr_max = ha->count ? (double)ha->max / 1e3 : -1.0;
}

/* rtt: C connections, each publishes and waits for its own message */
static long rtt_c;
static uint64_t rtt_end;
static uint64_t rtt_count;

static void rtt_send(conn *c, uint64_t now) {
    uint8_t f[CARRY_MAX];
    c->want_send = 0;
    c->rtt_sent = now;
    conn_send(c, f, build_publish(f, c, 'M', now));
}

static void rtt_hook(uint64_t now) {
    for (long i = 0; i < rtt_c; i++) {
        conn *c = &g.c[i];
        if (c->want_send) {
            rtt_count++;
            c->want_send = 0;
            if (now < rtt_end && c->state == ST_OPEN) rtt_send(c, now_ns());
        }
    }
}

static int rtt_done(void) {
    if (now_ns() < rtt_end) return 0;
    for (long i = 0; i < rtt_c; i++)
        if (g.c[i].state == ST_OPEN && g.c[i].rtt_sent) return 0;
    return 1;
}

static void run_rtt(phase_t *ph, long conns, double secs) {
    memset(g.hist, 0, sizeof *g.hist);
    rtt_c = conns;
    rtt_count = 0;
    g.foreign = 0;
    meter_t m;
    meter_start(&m);
    g.measuring = 1;
    uint64_t t0 = now_ns();
    rtt_end = t0 + (uint64_t)(secs * 1e9);
    for (long i = 0; i < conns; i++)
        if (g.c[i].state == ST_OPEN) rtt_send(&g.c[i], now_ns());
    int ok = run(rtt_done, rtt_hook, rtt_end + (uint64_t)(opt.grace * 1e9), 10000000ull);
    rtt_hook(now_ns());
    g.measuring = 0;
    uint64_t t1 = now_ns();
    ph->param = conns;
    ph->round_trips = rtt_count;
    ph->timed_out = !ok;
    ph->seconds = (double)(t1 - t0) / 1e9;
    ph->per_s = ph->seconds > 0 ? (double)rtt_count / ph->seconds : 0;
    meter_stop(&m, ph);
    ph->dead = (int)g.dead;
    ph->foreign = g.foreign;
    long stuck = 0;
    for (long i = 0; i < conns; i++) stuck += g.c[i].rtt_sent != 0;
    ph->lost = (uint64_t)stuck;
    hist_into(ph, g.hist);
    for (long i = 0; i < conns; i++) g.c[i].rtt_sent = 0;
}

/* Say goodbye properly: CLOSE 1000 on every open connection, wait (at most 0.5 s) for the
 * servers to close theirs, then close whatever is left. Servers then log no resets. */
static int none_open(void) { return g.open_now <= 0; }

static void close_all(void) {
    static const uint8_t code[2] = {0x03, 0xE8};
    for (long i = 0; i < g.n; i++) {
        conn *c = &g.c[i];
        if (c->state == ST_OPEN) {
            uint8_t f[16];
            c->closing = 1;
            conn_send(c, f, build_frame(f, 0x8, code, 2));
        } else if (c->state != ST_CLOSED) {
            c->closing = 1;
            conn_dead(c, "closing", 0);
        }
    }
    g.stop = 0;
    g.stdin_closed = 0;
    uint64_t until = now_ns() + 500000000ull;
    g.deadline_ns = until;
    run(none_open, NULL, until, 50000000ull);
    for (long i = 0; i < g.n; i++) {
        conn *c = &g.c[i];
        c->closing = 1;
        conn_dead(c, "closing", 0);
    }
}

/* ---------------------------------------------------------------- output */

static const char *mode_name(int m) {
    static const char *names[] = {"fanout", "latency", "rtt", "connect", "parsebench"};
    return names[m];
}

static void json_str(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

static void print_result(double connect_s, long connected) {
    printf("{\"mode\":\"%s\",\"subs\":%ld,\"connections\":%ld,\"connected\":%ld,"
           "\"failed\":%llu,\"connect_seconds\":%.6f,\"connections_per_s\":%.1f,"
           "\"disconnected\":%llu,\"server_closes\":%llu,\"last_close_code\":%d,"
           "\"pings_answered\":%llu,\"error\":",
           mode_name(opt.mode), nsubs, g.n, connected, (unsigned long long)g.failed, connect_s,
           connect_s > 0 ? (double)connected / connect_s : 0.0, (unsigned long long)g.dead,
           (unsigned long long)g.server_closes, g.last_close_code,
           (unsigned long long)g.pings);
    if (g.first_error[0])
        json_str(g.first_error);
    else
        printf("null");
    printf(",\"deflate\":{\"offered\":%s,\"negotiated\":%llu,\"context_takeover\":%llu,"
           "\"unoffered\":%llu,\"rsv1_unexpected\":%llu,\"response\":",
           opt.deflate ? "true" : "false", (unsigned long long)dfl.negotiated,
           (unsigned long long)dfl.ctx_takeover, (unsigned long long)dfl.unoffered,
           (unsigned long long)dfl.rsv1_unexpected);
    if (dfl.response[0])
        json_str(dfl.response);
    else
        printf("null");
    long sampled = 0;
    for (long i = 0; i < g.n; i++) sampled += g.c[i].check || g.c[i].zs;
    printf("},\"samples\":{\"conns\":%ld,\"frames\":%llu,\"inflated\":%llu,\"ok\":%llu,"
           "\"other\":%llu,\"errors\":%llu,\"in_bytes\":%llu,\"out_bytes\":%llu,\"first_error\":",
           sampled, (unsigned long long)dfl.frames, (unsigned long long)dfl.inflated,
           (unsigned long long)dfl.ok, (unsigned long long)dfl.other,
           (unsigned long long)dfl.errors, (unsigned long long)dfl.in_bytes,
           (unsigned long long)dfl.out_bytes);
    if (dfl.first_error[0])
        json_str(dfl.first_error);
    else
        printf("null");
    printf("},\"content_bytes\":%zu,\"phases\":[", dfl.content_max);
    for (int i = 0; i < nphases; i++) {
        phase_t *p = &phases[i];
        const char *pname = opt.mode == MODE_FANOUT ? "window" : opt.mode == MODE_LATENCY ? "rate" : "conns";
        printf("%s{\"%s\":%ld,\"messages\":%llu,\"deliveries\":%llu,\"expected\":%llu,"
               "\"lost\":%llu,\"extra\":%llu,\"round_trips\":%llu,\"seconds\":%.6f,",
               i ? "," : "", pname, p->param, (unsigned long long)p->messages,
               (unsigned long long)p->deliveries, (unsigned long long)p->expected,
               (unsigned long long)p->lost, (unsigned long long)p->extra,
               (unsigned long long)p->round_trips, p->seconds);
        if (opt.mode == MODE_RTT)
            printf("\"round_trips_per_s\":%.1f,", p->per_s);
        else
            printf("\"deliveries_per_s\":%.1f,", p->per_s);
        printf("\"loadgen_cpu_s\":%.4f,\"loadgen_cpu_util\":%.4f,\"server_cpu_s\":%.4f,"
               "\"server_cpu_util\":%.4f,\"rx_bytes\":%llu,\"rx_frames\":%llu,\"rx_reads\":%llu,\"epoll_waits\":%llu,"
               "\"timed_out\":%s,\"disconnected\":%d,\"foreign\":%llu,"
               "\"cpu0_busy\":%.4f,\"cpu1_busy\":%.4f",
               p->lg_cpu, p->seconds > 0 ? p->lg_cpu / p->seconds : 0.0, p->srv_cpu,
               (p->seconds > 0 && p->srv_cpu >= 0) ? p->srv_cpu / p->seconds : -1.0,
               (unsigned long long)p->rx_bytes, (unsigned long long)p->rx_frames,
               (unsigned long long)p->rx_reads, (unsigned long long)p->waits, p->timed_out ? "true" : "false", p->dead, (unsigned long long)p->foreign,
               p->cpu0_busy, p->cpu1_busy);
        printf(",\"data_wire_bytes\":%llu,\"compressed_frames\":%llu,\"sample_ok\":%llu,"
               "\"sample_errors\":%llu",
               (unsigned long long)p->data_wire_bytes, (unsigned long long)p->compressed_frames,
               (unsigned long long)p->sample_ok, (unsigned long long)p->sample_errors);
        if (p->has_hist)
            printf(",\"p50_us\":%.2f,\"p90_us\":%.2f,\"p99_us\":%.2f,\"p999_us\":%.2f,"
                   "\"max_us\":%.2f,\"min_us\":%.2f,\"mean_us\":%.2f",
                   p->p50, p->p90, p->p99, p->p999, p->max, p->min, p->mean);
        if (opt.mode == MODE_LATENCY)
            printf(",\"send_lag_max_us\":%.1f,\"arrival_p50_us\":%.2f,\"arrival_p99_us\":%.2f,"
                   "\"arrival_max_us\":%.2f",
                   p->send_lag_max_us, p->arr_p50, p->arr_p99, p->arr_max);
        printf("}");
    }
    printf("]}\n");
    fflush(stdout);
}

/* ---------------------------------------------------------------- parsebench */

static int parsebench(void) {
    /* frames shaped like aether-fast's publication (about 280 bytes) */
    char payload[512];
    int plen = snprintf(payload, sizeof payload,
                        "{\"type\":\"message\",\"action\":\"send\",\"data\":{\"channel\":\"bench\","
                        "\"content\":\"M%020llu%s\",\"metadata\":{\"sequence\":12345,"
                        "\"timestamp\":\"2026-01-01T00:00:00.000Z\",\"offset\":12345,"
                        "\"client_id\":\"c-0001\",\"user_id\":\"bench-0001\"}}}",
                        (unsigned long long)now_ns(), g.pad);
    size_t fl = (size_t)plen + (plen < 126 ? 2 : 4);
    size_t nframes = 4096;
    uint8_t *buf = malloc(fl * nframes);
    for (size_t i = 0; i < nframes; i++) {
        uint8_t *f = buf + i * fl;
        f[0] = 0x81;
        if (plen < 126) {
            f[1] = (uint8_t)plen;
        } else {
            f[1] = 126;
            f[2] = (uint8_t)(plen >> 8);
            f[3] = (uint8_t)plen;
        }
        memcpy(f + fl - (size_t)plen, payload, (size_t)plen);
    }
    conn c = {0};
    c.target = UINT64_MAX;
    c.state = ST_OPEN;
    double results[2];
    for (int scan = 0; scan < 2; scan++) {
        c.scan = (uint8_t)scan;
        g.measuring = scan; /* latency mode records into the histogram */
        opt.mode = MODE_LATENCY;
        uint64_t frames0 = c.frames, t0 = now_ns(), t1;
        do {
            /* 16 KiB reads, as a socket would hand them over */
            size_t total = fl * nframes, off = 0;
            while (off < total) {
                size_t k = total - off < 16384 ? total - off : 16384;
                size_t used = parse_frames(&c, buf + off, k, t0);
                off += used ? used : k;
            }
            t1 = now_ns();
        } while (t1 - t0 < 500000000ull);
        results[scan] = (double)(c.frames - frames0) / ((double)(t1 - t0) / 1e9);
    }
    printf("{\"mode\":\"parsebench\",\"frame_bytes\":%zu,\"frames_per_s\":%.0f,"
           "\"frames_per_s_with_scan\":%.0f}\n",
           fl, results[0], results[1]);
    free(buf);
    return 0;
}

/* ---------------------------------------------------------------- main */

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen MODE --port P --urls FILE [options]\n"
            "modes: fanout latency rtt connect parsebench\n"
            "  --host A            server address in 127.0.0.0/8 (127.0.0.1)\n"
            "  --port2 P           odd connections go to this port (two nodes)\n"
            "  --src-ips K         bind connection i to 127.0.0.(2 + i %% K) (0: let the kernel)\n"
            "  --subs S            subscribers (fanout, latency)\n"
            "  --messages M        messages per window (fanout)\n"
            "  --windows 16,64     messages in flight, one phase each (fanout)\n"
            "  --rates 50,200      publish rates, one phase each (latency)\n"
            "  --conns 1,50 | N    connections per phase (rtt) / to open (connect)\n"
            "  --duration s        sending time cap per phase (5)\n"
            "  --grace s           after sending stops, give up once nothing came for s (5)\n"
            "  --timeout s         hard cap for the whole run (120)\n"
            "  --hold s            connect: hold idle connections at most this long (60)\n"
            "  --ready-frames K    data frames each connection gets before it counts as ready (0)\n"
            "  --payload N         content padding characters (64)\n"
            "  --warmup N          fanout: messages before the measured windows (0)\n"
            "  --concurrency N     connect: handshakes in flight (256)\n"
            "  --connect-timeout s (60)\n"
            "  --server-pid PID    also report that process's CPU time per phase\n"
            "  --deflate           offer permessage-deflate; client_max_window_bits\n"
            "  --json-content N    content: about N bytes of realistic JSON (escaped), not --payload\n"
            "  --sample-conns K    subscribers that inflate and check every data frame (4)\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *m = argv[1];
    if (!strcmp(m, "fanout")) opt.mode = MODE_FANOUT;
    else if (!strcmp(m, "latency")) opt.mode = MODE_LATENCY;
    else if (!strcmp(m, "rtt")) opt.mode = MODE_RTT;
    else if (!strcmp(m, "connect")) opt.mode = MODE_CONNECT;
    else if (!strcmp(m, "parsebench")) opt.mode = MODE_PARSEBENCH;
    else usage();
    static struct option lo[] = {
        {"host", 1, 0, 'h'},      {"port", 1, 0, 'p'},         {"urls", 1, 0, 'u'},
        {"port2", 1, 0, '2'},
        {"src-ips", 1, 0, 'i'},   {"subs", 1, 0, 's'},         {"messages", 1, 0, 'm'},
        {"windows", 1, 0, 'w'},   {"rates", 1, 0, 'r'},        {"conns", 1, 0, 'c'},
        {"duration", 1, 0, 'd'},  {"timeout", 1, 0, 't'},      {"grace", 1, 0, 'g'},
        {"hold", 1, 0, 'H'},      {"ready-frames", 1, 0, 'R'}, {"payload", 1, 0, 'P'},
        {"server-pid", 1, 0, 'S'}, {"concurrency", 1, 0, 'C'}, {"warmup", 1, 0, 'W'},
        {"connect-timeout", 1, 0, 'T'}, {"deflate", 0, 0, 'D'}, {"json-content", 1, 0, 'J'},
        {"sample-conns", 1, 0, 'K'}, {0, 0, 0, 0}};
    optind = 2;
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case '2': opt.port2 = atoi(optarg); break;
        case 'u': opt.urls_path = optarg; break;
        case 'i': opt.src_ips = atoi(optarg); break;
        case 's': opt.subs = atol(optarg); break;
        case 'm': opt.messages = atol(optarg); break;
        case 'w': opt.nwindows = parse_list(optarg, opt.windows, MAX_PHASES); break;
        case 'r': opt.nrates = parse_list(optarg, opt.rates, MAX_PHASES); break;
        case 'c': opt.nconns = parse_list(optarg, opt.conns, MAX_PHASES); break;
        case 'd': opt.duration = atof(optarg); break;
        case 't': opt.timeout = atof(optarg); break;
        case 'g': opt.grace = atof(optarg); break;
        case 'H': opt.hold = atof(optarg); break;
        case 'R': opt.ready_frames = atoi(optarg); break;
        case 'P': opt.payload = atoi(optarg); break;
        case 'S': opt.server_pid = atoi(optarg); break;
        case 'C': opt.concurrency = atoi(optarg); break;
        case 'W': opt.warmup = atol(optarg); break;
        case 'T': opt.connect_timeout = atof(optarg); break;
        case 'D': opt.deflate = 1; break;
        case 'J': opt.json_content = atoi(optarg); break;
        case 'K': opt.sample_conns = atoi(optarg); break;
        default: usage();
        }
    }
    if (opt.payload < 0 || opt.payload > 32768) die("--payload must be 0..32768");
    g.pad = malloc((size_t)opt.payload + 1);
    memset(g.pad, 'x', (size_t)opt.payload);
    g.pad[opt.payload] = 0;
    if (opt.json_content < 0 || opt.json_content > 32768) die("--json-content must be 0..32768");
    if (opt.sample_conns < 0) die("--sample-conns must be >= 0");
    dfl.content_max = (size_t)opt.payload;
    if (opt.json_content) make_bodies(opt.json_content);
    dfl.zin = malloc(CARRY_MAX + 8);
    dfl.zout = malloc(ZOUT_SIZE);
    g.rng = (uint32_t)now_ns() | 1u;
    {   /* sequences start at the wall clock in us: a rerun with the same client_ids is never
         * taken for a retry of old messages by aether-fast's per-client dedupe window */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        g.seq = (uint64_t)ts.tv_sec * 1000000ull + (uint64_t)ts.tv_nsec / 1000ull;
    }
    if (opt.mode == MODE_PARSEBENCH) {
        g.hist = calloc(1, sizeof *g.hist);
        return parsebench();
    }

    if (!opt.port || !opt.urls_path) usage();
    if (inet_pton(AF_INET, opt.host, &g.dst.sin_addr) != 1) die("--host must be an IPv4 address");
    if ((ntohl(g.dst.sin_addr.s_addr) >> 24) != 127) die("--host must be in 127.0.0.0/8");
    if (opt.src_ips < 0 || opt.src_ips > 250) die("--src-ips must be 0..250");
    if (opt.timeout <= 0 || opt.timeout > 3600) die("--timeout must be in (0, 3600]");
    if (opt.hold < 0 || opt.hold > 3600) die("--hold must be in [0, 3600]");
    if (opt.concurrency < 1) opt.concurrency = 1;
    g.dst.sin_family = AF_INET;
    g.dst.sin_port = htons((uint16_t)opt.port);
    g.dst2 = g.dst;
    g.dst2.sin_port = htons((uint16_t)opt.port2);

    load_urls(opt.urls_path);
    long need = 0;
    switch (opt.mode) {
    case MODE_FANOUT:
    case MODE_LATENCY:
        if (opt.subs < 1) die("--subs must be >= 1");
        need = opt.subs + 1;
        break;
    case MODE_RTT:
        if (!opt.nconns) die("--conns is required");
        for (int i = 0; i < opt.nconns; i++)
            if (opt.conns[i] > need) need = opt.conns[i];
        break;
    case MODE_CONNECT:
        if (opt.nconns != 1) die("--conns N is required");
        need = opt.conns[0];
        break;
    }
    if (opt.mode == MODE_FANOUT && !opt.nwindows) opt.windows[opt.nwindows++] = 16;
    if (opt.mode == MODE_LATENCY && !opt.nrates) opt.rates[opt.nrates++] = 50;
    if (need > g.nlines) die("need %ld URL lines, %s has %ld", need, opt.urls_path, g.nlines);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)need + 16 > rl.rlim_cur) die("%ld connections exceed the fd limit %llu", need, (unsigned long long)rl.rlim_cur);

    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    alarm((unsigned)(opt.timeout + opt.hold + 30)); /* the last resort: SIGALRM ends us */

    g.ep = epoll_create1(EPOLL_CLOEXEC);
    g.rbuf = malloc(RBUF_SIZE);
    g.hist = calloc(1, sizeof *g.hist);
    g.hist_arrival = calloc(1, sizeof *g.hist_arrival);
    {   /* the kernel stamps arrivals with CLOCK_REALTIME; samples are CLOCK_MONOTONIC */
        struct timespec r, m;
        clock_gettime(CLOCK_REALTIME, &r);
        clock_gettime(CLOCK_MONOTONIC, &m);
        g.real_minus_mono = ((int64_t)r.tv_sec - m.tv_sec) * 1000000000ll + (r.tv_nsec - m.tv_nsec);
    }
    g.n = need;
    g.c = calloc((size_t)need, sizeof(conn));
    for (long i = 0; i < need; i++) {
        conn *c = &g.c[i];
        c->fd = -1;
        c->idx = (uint32_t)i;
        c->target = UINT64_MAX;
        c->url = g.lines[i];
        c->url_len = (uint16_t)strlen(g.lines[i]);
        url_channel(c->url, &c->chan, &c->chan_len);
        c->role = (i == 0 && (opt.mode == MODE_FANOUT || opt.mode == MODE_LATENCY)) ? ROLE_PUB : ROLE_SUB;
        c->scan = (opt.mode == MODE_LATENCY && c->role == ROLE_SUB) || opt.mode == MODE_RTT;
    }
    /* the sample connections: the probe (the last subscriber) and others spread among the
     * subscribers in fanout and latency; the first ones otherwise */
    if (opt.mode == MODE_FANOUT || opt.mode == MODE_LATENCY) {
        long k = opt.sample_conns < opt.subs ? opt.sample_conns : opt.subs;
        if (k > 0) g.c[opt.subs].check = 1;
        for (long j = 1; j < k; j++) g.c[1 + (j - 1) * opt.subs / k].check = 1;
    } else {
        for (long i = 0; i < need && i < opt.sample_conns; i++) g.c[i].check = 1;
    }
    g.deadline_ns = now_ns() + (uint64_t)(opt.timeout * 1e9);

    double connect_s = connect_all(need);
    long connected = 0;
    for (long i = 0; i < need; i++) connected += g.c[i].state == ST_OPEN;

    if (opt.mode == MODE_CONNECT) {
        print_result(connect_s, connected);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLHUP, .data.ptr = &stdin_fd_token};
        if (epoll_ctl(g.ep, EPOLL_CTL_ADD, 0, &ev) < 0) g.stdin_closed = 0; /* not pollable */
        uint64_t t0 = now_ns();
        uint64_t until = t0 + (uint64_t)(opt.hold * 1e9);
        g.deadline_ns = until; /* holding is bounded by --hold, not --timeout */
        while (!g.stop && !g.stdin_closed && now_ns() < until)
            run(NULL, NULL, until, 100000000ull);
        long alive = 0;
        for (long i = 0; i < need; i++) alive += g.c[i].state == ST_OPEN;
        printf("{\"held_seconds\":%.3f,\"alive\":%ld,\"server_closes\":%llu,\"disconnected\":%llu}\n",
               (double)(now_ns() - t0) / 1e9, alive, (unsigned long long)g.server_closes,
               (unsigned long long)g.dead);
        fflush(stdout);
        close_all();
        return 0;
    }

    if (opt.mode == MODE_FANOUT || opt.mode == MODE_LATENCY) {
        pub = &g.c[0];
        nsubs = opt.subs;
        probe = &g.c[nsubs];
        if (pub->state != ST_OPEN) {
            note_error("the publisher did not connect");
        } else if (alive_subs() == 0) {
            note_error("no subscriber connected");
        } else if (sync_subs()) {
            if (opt.mode == MODE_FANOUT) {
                if (opt.warmup > 0) {
                    run_window(NULL, 16, opt.warmup, 'W');
                    quiesce(0.1);
                }
                for (int i = 0; i < opt.nwindows && !g.stop && now_ns() < g.deadline_ns; i++) {
                    run_window(&phases[nphases++], opt.windows[i], opt.messages, 'M');
                    quiesce(0.1);
                }
            } else {
                for (int i = 0; i < opt.nrates && !g.stop && now_ns() < g.deadline_ns; i++) {
                    run_rate(&phases[nphases++], (double)opt.rates[i]);
                    quiesce(0.1);
                }
            }
        }
    } else if (opt.mode == MODE_RTT) {
        for (int i = 0; i < opt.nconns && !g.stop && now_ns() < g.deadline_ns; i++) {
            run_rtt(&phases[nphases++], opt.conns[i], opt.duration);
            quiesce(0.05);
        }
    }
    print_result(connect_s, connected);
    close_all();
    return 0;
}
