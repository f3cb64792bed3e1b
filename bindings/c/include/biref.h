/* biref.h - C99 binding of the biref/1 streaming protocol (docs/protocol.md) over libzmq.
 *
 * The microscope side (a producer: start, background, view, stop over PUSH) and the consumer side
 * (a subscriber: volume, preview, error, status over SUB) of the biref SDK's streaming service
 * (`biref serve`), for vendor code written in C or C++. The msgpack headers are written and read
 * by the small codec below; payload frames are raw arrays, C order, little-endian on the wire
 * (this library converts on big-endian hosts: the API takes and returns host byte order).
 *
 * Every function that can fail returns a biref_status (0 on success, a negative code otherwise);
 * biref_strerror names it. No function keeps a pointer to caller memory after it returns.
 * Objects are not thread-safe: use one producer or subscriber per thread (libzmq sockets are not
 * thread-safe either); several may share one zmq context.
 */
#ifndef BIREF_H
#define BIREF_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BIREF_PROTOCOL "biref/1"

/* limits of docs/protocol.md (the service's defaults) */
#define BIREF_MAX_HEADER_BYTES (64 * 1024)
#define BIREF_MAX_ID_CHARS 128
#define BIREF_MAX_VIEWS 1024
#define BIREF_MAX_SIDE 8192
#define BIREF_MAX_VOLUME_VOXELS (1L << 24)

typedef enum {
    BIREF_OK = 0,
    BIREF_EINVAL = -1,    /* an argument the protocol does not allow; nothing was sent */
    BIREF_ENOMEM = -2,    /* out of memory */
    BIREF_EZMQ = -3,      /* libzmq failed: zmq_errno() and zmq_strerror() say why */
    BIREF_ETIMEOUT = -4,  /* nothing could be sent (back-pressure) or received within the timeout */
    BIREF_EPROTO = -5,    /* data that break biref/1 or msgpack */
    BIREF_ENOTFOUND = -6  /* biref_map_find: no such key */
} biref_status;

const char *biref_strerror(int status);

/* -- frames ------------------------------------------------------------------------------------ */
typedef enum { BIREF_UINT8 = 0, BIREF_UINT16 = 1, BIREF_FLOAT32 = 2 } biref_dtype;

const char *biref_dtype_name(biref_dtype dtype);   /* "uint8", "uint16", "float32"; NULL if invalid */
size_t biref_dtype_size(biref_dtype dtype);        /* bytes per pixel; 0 if invalid */

/* the shape and dtype of every hologram and background frame of one acquisition */
typedef struct {
    uint32_t height;    /* H, rows */
    uint32_t width;     /* W, columns */
    biref_dtype dtype;
} biref_format;

/* The acquisition geometry: the attributes of docs/formats.md, SI units. */
typedef struct {
    double wavelength_m;
    double medium_index;
    double na_objective;
    double pixel_size_m;
    uint32_t n_views;                  /* V, illuminations per polarization */
    const double *illumination_sines;  /* [V][2]: (s_x, s_y) of each illumination, row-major */
    double reference_carriers[2][2];   /* [reference][f_x, f_y], cycles per pixel */
    uint32_t volume_shape[3];          /* Z, Y, X */
    double voxel_size_m[3];            /* dz, dy, dx */
} biref_geometry;

/* -- msgpack writer ------------------------------------------------------------------------------
 * Appends to a growing buffer with the shortest encoding of each value (as the reference msgpack
 * packer does). An allocation failure is sticky: check biref_buffer_status once at the end. */
typedef struct {
    uint8_t *data;
    size_t size;
    size_t capacity;
    int failed;
} biref_buffer;

void biref_buffer_init(biref_buffer *buffer);
void biref_buffer_reset(biref_buffer *buffer);   /* empty it, keep the memory */
void biref_buffer_free(biref_buffer *buffer);
int biref_buffer_status(const biref_buffer *buffer);   /* BIREF_OK or BIREF_ENOMEM */

void biref_pack_nil(biref_buffer *buffer);
void biref_pack_bool(biref_buffer *buffer, int value);
void biref_pack_int(biref_buffer *buffer, int64_t value);
void biref_pack_uint(biref_buffer *buffer, uint64_t value);
void biref_pack_double(biref_buffer *buffer, double value);       /* always float64 */
void biref_pack_str(biref_buffer *buffer, const char *utf8);      /* NUL-terminated UTF-8 */
void biref_pack_str_n(biref_buffer *buffer, const char *utf8, size_t length);
void biref_pack_array(biref_buffer *buffer, uint32_t n_elements); /* then the n elements */
void biref_pack_map(biref_buffer *buffer, uint32_t n_pairs);      /* then n (key, value) pairs */

/* -- msgpack reader ------------------------------------------------------------------------------
 * biref_read reads one value; for an array or a map only its length, its elements follow. Every
 * read is bounds-checked against the buffer; strings point into it and are not NUL-terminated. */
typedef enum {
    BIREF_MP_NIL,
    BIREF_MP_BOOL,
    BIREF_MP_INT,    /* any integer that fits int64_t (value.i) */
    BIREF_MP_UINT,   /* an integer above INT64_MAX (value.u) */
    BIREF_MP_FLOAT,  /* float32 or float64 (value.f) */
    BIREF_MP_STR,    /* value.bytes */
    BIREF_MP_BIN,    /* value.bytes */
    BIREF_MP_EXT,    /* value.bytes (the data), value.ext_type */
    BIREF_MP_ARRAY,  /* value.n elements follow */
    BIREF_MP_MAP     /* value.n key-value pairs follow */
} biref_mp_type;

typedef struct {
    biref_mp_type type;
    int8_t ext_type;
    union {
        int boolean;
        int64_t i;
        uint64_t u;
        double f;
        struct {
            const char *ptr;
            uint32_t length;
        } bytes;
        uint32_t n;
    } value;
} biref_mp_object;

typedef struct {
    const uint8_t *position;
    const uint8_t *end;
} biref_reader;

void biref_reader_init(biref_reader *reader, const void *data, size_t size);
int biref_read(biref_reader *reader, biref_mp_object *object);
int biref_skip(biref_reader *reader);   /* one whole value, nested containers included (depth <= 64) */
/* Find string key `key` in the map that `data` holds; on success `value` reads its value. */
int biref_map_find(const void *data, size_t size, const char *key, biref_reader *value);
/* 1 if `object` is the string `text`, else 0 */
int biref_mp_str_equals(const biref_mp_object *object, const char *text);

/* -- header encoders (for a transport of your own; the producer below uses them) -------------- */
int biref_encode_start(biref_buffer *out, const char *acquisition_id, const biref_geometry *geometry,
                       biref_format format);
/* type: "view" or "background" */
int biref_encode_frame(biref_buffer *out, const char *type, const char *acquisition_id, int polarization,
                       uint32_t view, biref_format format);
int biref_encode_stop(biref_buffer *out, const char *acquisition_id);

/* -- producer: the microscope side (PUSH, connects to the service's ingest endpoint) ----------
 * Sends block while the service applies back-pressure, at most send_timeout_ms (-1: no limit);
 * then BIREF_ETIMEOUT and nothing of that message was sent. Frames are in host byte order and
 * are copied before the call returns (the camera buffer may be reused at once). */
typedef struct biref_producer biref_producer;

/* zmq_context: a context to share, or NULL for one of its own */
int biref_producer_open(biref_producer **producer, void *zmq_context, const char *endpoint, int send_timeout_ms);
/* background: the whole [2][V][H][W] background inline, or NULL to send it as background frames */
int biref_producer_start(biref_producer *producer, const char *acquisition_id, const biref_geometry *geometry,
                         biref_format format, const void *background);
int biref_producer_background(biref_producer *producer, const char *acquisition_id, int polarization,
                              uint32_t view, biref_format format, const void *frame);
int biref_producer_view(biref_producer *producer, const char *acquisition_id, int polarization, uint32_t view,
                        biref_format format, const void *frame);
int biref_producer_stop(biref_producer *producer, const char *acquisition_id);
/* Waits up to linger_ms (-1: until delivered, 0: discard) for queued messages, then closes. */
void biref_producer_close(biref_producer *producer, int linger_ms);

/* -- subscriber: results (SUB, connects to the service's results endpoint) -------------------- */
typedef struct {
    char topic[16];              /* "volume", "preview", "error" or "status" */
    int64_t seq;                 /* per-topic sequence number; gaps are counted as missed */
    char acquisition_id[4 * BIREF_MAX_ID_CHARS + 1];   /* UTF-8; "" when absent or nil */
    char engine[64];             /* volume, preview, status */
    /* volume and preview */
    int complete;
    int64_t views_used;
    int64_t views_expected;
    double latency_s;
    uint32_t shape[3];           /* Z, Y, X */
    float *ne;                   /* [Z][Y][X], host byte order; owned by the result */
    float *no;                   /* [Z][Y][X] */
    float *director;             /* [3][Z][Y][X]: components x, y, z */
    /* error */
    char reason[32];
    char detail[512];            /* truncated if longer */
    int fatal;
    /* the whole header, a msgpack map: read any other key with biref_map_find */
    uint8_t *header;
    size_t header_size;
} biref_result;

void biref_result_free(biref_result *result);   /* frees the arrays and the header; the struct stays */

typedef struct biref_subscriber biref_subscriber;

/* topics: NULL-terminated list of the topics to receive, or NULL for all four */
int biref_subscriber_open(biref_subscriber **subscriber, void *zmq_context, const char *endpoint,
                          const char *const *topics);
/* The next result, or BIREF_ETIMEOUT after timeout_ms (-1: no limit). Messages that break the
 * protocol are dropped and counted (biref_subscriber_rejected); `result` is overwritten (free the
 * previous one first). */
int biref_subscriber_recv(biref_subscriber *subscriber, biref_result *result, int timeout_ms);
/* Wait for a status heartbeat: from then on the subscription is live (PUB/SUB drops what is
 * published before the connection is made). Results of other topics meanwhile are discarded. */
int biref_subscriber_wait_ready(biref_subscriber *subscriber, int timeout_ms);
uint64_t biref_subscriber_missed(const biref_subscriber *subscriber, const char *topic);
uint64_t biref_subscriber_rejected(const biref_subscriber *subscriber);
void biref_subscriber_close(biref_subscriber *subscriber);

#ifdef __cplusplus
}
#endif

#endif /* BIREF_H */
