/* biref.h - C99 binding of the biref/2 streaming protocol (docs/protocol.md) over libzmq.
 *
 * The microscope side (a producer: start, background, view, stop over PUSH) and the consumer side
 * (a subscriber: volume, preview, error, status over SUB) of the biref SDK's streaming service
 * (`biref serve`), for vendor code written in C, C++, C# or LabVIEW. The msgpack headers are
 * written and read with msgpack-c; payload frames are raw arrays, C order, little-endian on the wire
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

/* the library's version (semantic versioning; bindings/README.md states the ABI policy) */
#define BIREF_VERSION_MAJOR 3
#define BIREF_VERSION_MINOR 0
#define BIREF_VERSION_PATCH 0
#define BIREF_VERSION_STRING "3.0.0"

/* Only the functions marked BIREF_API are exported from the shared library. Define BIREF_STATIC
 * when linking the static library on Windows. */
#if defined(_WIN32) && !defined(BIREF_STATIC)
#  if defined(BIREF_BUILDING)
#    define BIREF_API __declspec(dllexport)
#  else
#    define BIREF_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__) || defined(__clang__)
#  define BIREF_API __attribute__((visibility("default")))
#else
#  define BIREF_API
#endif

#define BIREF_PROTOCOL "biref/2"

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
    BIREF_EPROTO = -5,    /* data that break the protocol or msgpack */
    BIREF_ENOTFOUND = -6  /* no such field (biref_result_text) */
} biref_status;

BIREF_API const char *biref_strerror(int status);
/* the version of the library loaded at run time ("3.0.0"); compare with BIREF_VERSION_STRING */
BIREF_API const char *biref_version(void);

/* -- frames ------------------------------------------------------------------------------------ */
typedef enum { BIREF_UINT8 = 0, BIREF_UINT16 = 1, BIREF_FLOAT32 = 2 } biref_dtype;

BIREF_API const char *biref_dtype_name(biref_dtype dtype);   /* "uint8", "uint16", "float32"; NULL if invalid */
BIREF_API size_t biref_dtype_size(biref_dtype dtype);        /* bytes per pixel; 0 if invalid */

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

/* -- output buffer of the header encoders (msgpack-c packs into it) -------------------------------
 * An allocation failure is sticky: check biref_buffer_status once at the end. */
typedef struct {
    uint8_t *data;
    size_t size;
    size_t capacity;
    int failed;
} biref_buffer;

BIREF_API void biref_buffer_init(biref_buffer *buffer);
BIREF_API void biref_buffer_reset(biref_buffer *buffer);   /* empty it, keep the memory */
BIREF_API void biref_buffer_free(biref_buffer *buffer);
BIREF_API int biref_buffer_status(const biref_buffer *buffer);   /* BIREF_OK or BIREF_ENOMEM */

/* -- header encoders (for a transport of your own; the producer below uses them) -------------- */
BIREF_API int biref_encode_start(biref_buffer *out, const char *acquisition_id, const biref_geometry *geometry,
                       biref_format format);
/* type: "view" or "background" */
BIREF_API int biref_encode_frame(biref_buffer *out, const char *type, const char *acquisition_id, int polarization,
                       uint32_t view, biref_format format);
BIREF_API int biref_encode_stop(biref_buffer *out, const char *acquisition_id);

/* -- producer: the microscope side (PUSH, connects to the service's ingest endpoint) ----------
 * Sends block while the service applies back-pressure, at most send_timeout_ms (-1: no limit);
 * then BIREF_ETIMEOUT and nothing of that message was sent. Frames are in host byte order and
 * are copied before the call returns (the camera buffer may be reused at once). */
typedef struct biref_producer biref_producer;

/* zmq_context: a context to share, or NULL for one of its own */
BIREF_API int biref_producer_open(biref_producer **producer, void *zmq_context, const char *endpoint, int send_timeout_ms);
/* background: the whole [2][V][H][W] background inline, or NULL to send it as background frames */
BIREF_API int biref_producer_start(biref_producer *producer, const char *acquisition_id, const biref_geometry *geometry,
                         biref_format format, const void *background);
BIREF_API int biref_producer_background(biref_producer *producer, const char *acquisition_id, int polarization,
                              uint32_t view, biref_format format, const void *frame);
BIREF_API int biref_producer_view(biref_producer *producer, const char *acquisition_id, int polarization, uint32_t view,
                        biref_format format, const void *frame);
BIREF_API int biref_producer_stop(biref_producer *producer, const char *acquisition_id);
/* Waits up to linger_ms (-1: until delivered, 0: discard) for queued messages, then closes. */
BIREF_API void biref_producer_close(biref_producer *producer, int linger_ms);

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
    float *uncertainty;          /* [3][Z][Y][X]: sigma n_e, sigma n_o, director spread (rad); NULL if none */
    double consistency_score;    /* median relative residual of the re-simulated fields over the checked
                                    views (lower is better; docs/formats.md); NaN if none */
    int64_t consistency_views;   /* views the consistency check re-simulated; 0 if none */
    /* error */
    char reason[32];
    char detail[512];            /* truncated if longer */
    int fatal;
    /* the whole header, a msgpack map: read any other key with msgpack-c (msgpack_unpack_next) */
    uint8_t *header;
    size_t header_size;
} biref_result;

BIREF_API void biref_result_free(biref_result *result);   /* frees the arrays and the header; the struct stays */

/* Decode one result message from its frames (topic, header, and for volume/preview ne, no,
 * director and, when the header's arrays announce it, uncertainty), for a transport of your own;
 * biref_subscriber_recv uses it. Results of biref/2 and of biref/1 (no uncertainty, no
 * consistency) decode. BIREF_EPROTO for a message that breaks the protocol (then `result` holds
 * nothing to free). */
BIREF_API int biref_result_decode(biref_result *result, const void *const *frames, const size_t *sizes, int n_frames);

typedef struct biref_subscriber biref_subscriber;

/* topics: NULL-terminated list of the topics to receive, or NULL for all four */
BIREF_API int biref_subscriber_open(biref_subscriber **subscriber, void *zmq_context, const char *endpoint,
                          const char *const *topics);
/* The next result, or BIREF_ETIMEOUT after timeout_ms (-1: no limit). Messages that break the
 * protocol are dropped and counted (biref_subscriber_rejected); `result` is overwritten (free the
 * previous one first). */
BIREF_API int biref_subscriber_recv(biref_subscriber *subscriber, biref_result *result, int timeout_ms);
/* Wait for a status heartbeat: from then on the subscription is live (PUB/SUB drops what is
 * published before the connection is made). Results of other topics meanwhile are discarded. */
BIREF_API int biref_subscriber_wait_ready(biref_subscriber *subscriber, int timeout_ms);
BIREF_API uint64_t biref_subscriber_missed(const biref_subscriber *subscriber, const char *topic);
BIREF_API uint64_t biref_subscriber_rejected(const biref_subscriber *subscriber);
BIREF_API void biref_subscriber_close(biref_subscriber *subscriber);

/* -- flat entry points for LabVIEW's Call Library Function Node and C# P/Invoke ------------------
 * Plain types only (integers, doubles, NUL-terminated strings, pointers to caller-allocated
 * arrays), no structs by value, no callbacks. Handles are pointer-sized integers. */

/* geometry as arrays: reference_carriers [4] = f_x0, f_y0, f_x1, f_y1 (cycles per pixel),
 * volume_shape [3] = Z, Y, X, voxel_size_m [3] = dz, dy, dx; dtype a biref_dtype value;
 * background [2][V][H][W] or NULL (then background frames follow) */
BIREF_API int biref_producer_start_flat(biref_producer *producer, const char *acquisition_id, double wavelength_m,
                                        double medium_index, double na_objective, double pixel_size_m,
                                        uint32_t n_views, const double *illumination_sines,
                                        const double *reference_carriers, const uint32_t *volume_shape,
                                        const double *voxel_size_m, uint32_t height, uint32_t width, int32_t dtype,
                                        const void *background);
/* kind 0: a background frame, 1: a view; frame [H][W] in host byte order */
BIREF_API int biref_producer_frame_flat(biref_producer *producer, int32_t kind, const char *acquisition_id,
                                        int32_t polarization, uint32_t view, uint32_t height, uint32_t width,
                                        int32_t dtype, const void *frame);

/* an empty result on the heap (for callers that cannot lay out biref_result): zeroed, its
 * consistency_score NaN; NULL out of memory */
BIREF_API biref_result *biref_result_new(void);
BIREF_API void biref_result_delete(biref_result *result);   /* frees its contents and itself */
/* field: "topic", "acquisition_id", "engine", "reason" or "detail"; copies it NUL-terminated into
 * out[capacity] (truncated to fit); BIREF_ENOTFOUND for another name */
BIREF_API int biref_result_text(const biref_result *result, const char *field, char *out, int32_t capacity);
/* the numbers of a result; any pointer may be NULL; shape [3] is 0 0 0 without a volume */
BIREF_API int biref_result_numbers(const biref_result *result, int64_t *seq, int32_t *complete, int64_t *views_used,
                                   int64_t *views_expected, double *latency_s, int32_t *fatal, uint32_t *shape);
/* copy the volume into caller arrays of n_voxels = Z*Y*X floats (ne, no) and 3*n_voxels
 * (director); BIREF_EINVAL when the result has no volume or n_voxels differs */
BIREF_API int biref_result_copy_volume(const biref_result *result, float *ne, float *no, float *director,
                                       uint64_t n_voxels);
/* copy the uncertainty [3][Z][Y][X] into a caller array of 3*n_voxels floats; BIREF_ENOTFOUND when
 * the volume has none (the formula, or the network without quarter turns), BIREF_EINVAL as above */
BIREF_API int biref_result_copy_uncertainty(const biref_result *result, float *uncertainty, uint64_t n_voxels);
/* the consistency score (NaN when the service does not run the check) and the views it checked;
 * either pointer may be NULL */
BIREF_API int biref_result_consistency(const biref_result *result, double *score, int64_t *views_checked);

#ifdef __cplusplus
}
#endif

#endif /* BIREF_H */
