/* biref/1 messages over libzmq: header encoders, the producer (PUSH) and the subscriber (SUB).
 * docs/protocol.md is the contract; the Python reference is biref_sdk/streaming/protocol.py. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200112L   /* clock_gettime */
#endif

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#if defined(_WIN32)
#include <windows.h>
#else
#include <time.h>
#endif

#include "biref.h"

static const char *const TOPICS[4] = {"volume", "preview", "error", "status"};
static const char *const VOLUME_ARRAYS[3] = {"ne", "no", "director"};

const char *biref_strerror(int status)
{
    switch (status) {
    case BIREF_OK: return "success";
    case BIREF_EINVAL: return "invalid argument for biref/1";
    case BIREF_ENOMEM: return "out of memory";
    case BIREF_EZMQ: return "libzmq error";
    case BIREF_ETIMEOUT: return "timed out";
    case BIREF_EPROTO: return "message breaks biref/1";
    case BIREF_ENOTFOUND: return "key not found";
    default: return "unknown biref status";
    }
}

const char *biref_dtype_name(biref_dtype dtype)
{
    switch (dtype) {
    case BIREF_UINT8: return "uint8";
    case BIREF_UINT16: return "uint16";
    case BIREF_FLOAT32: return "float32";
    default: return NULL;
    }
}

size_t biref_dtype_size(biref_dtype dtype)
{
    switch (dtype) {
    case BIREF_UINT8: return 1;
    case BIREF_UINT16: return 2;
    case BIREF_FLOAT32: return 4;
    default: return 0;
    }
}

static int host_is_little_endian(void)
{
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

/* copy n items of `itemsize` bytes, reversing each one's bytes: host order <-> little-endian on a
   big-endian host */
static void copy_swapped(void *out, const void *in, size_t n, size_t itemsize)
{
    const uint8_t *src = (const uint8_t *)in;
    uint8_t *dst = (uint8_t *)out;
    for (size_t i = 0; i < n; i++)
        for (size_t b = 0; b < itemsize; b++)
            dst[i * itemsize + b] = src[i * itemsize + itemsize - 1 - b];
}

static int64_t now_ms(void)
{
#if defined(_WIN32)
    return (int64_t)GetTickCount64();
#else
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
#endif
}

/* -- validation of what we send (the service checks again; failing here names the argument) ---- */
static int valid_id(const char *acquisition_id)
{
    size_t characters = 0;
    const unsigned char *c;
    if (acquisition_id == NULL || acquisition_id[0] == '\0')
        return 0;
    for (c = (const unsigned char *)acquisition_id; *c; c++) {
        if (*c < 0x20 || *c == 0x7f)
            return 0;                      /* control characters are not printable */
        if ((*c & 0xc0) != 0x80)
            characters++;                  /* UTF-8: count the lead bytes */
    }
    return characters <= BIREF_MAX_ID_CHARS;
}

static int valid_format(biref_format format)
{
    return format.height >= 1 && format.height <= BIREF_MAX_SIDE && format.width >= 1
           && format.width <= BIREF_MAX_SIDE && biref_dtype_name(format.dtype) != NULL;
}

static int valid_geometry(const biref_geometry *g)
{
    double voxels = 1.0;
    if (g == NULL || g->n_views < 1 || g->n_views > BIREF_MAX_VIEWS || g->illumination_sines == NULL)
        return 0;
    if (!isfinite(g->wavelength_m) || !isfinite(g->medium_index) || !isfinite(g->na_objective)
        || !isfinite(g->pixel_size_m))
        return 0;
    for (uint32_t i = 0; i < 2 * g->n_views; i++)
        if (!isfinite(g->illumination_sines[i]))
            return 0;
    for (int i = 0; i < 4; i++)
        if (!isfinite(g->reference_carriers[i / 2][i % 2]))
            return 0;
    for (int i = 0; i < 3; i++) {
        if (g->volume_shape[i] < 1 || !isfinite(g->voxel_size_m[i]))
            return 0;
        voxels *= g->volume_shape[i];
    }
    return voxels <= (double)BIREF_MAX_VOLUME_VOXELS;
}

/* -- header encoders: keys in the order of biref_sdk.streaming.protocol, so the bytes are the
 *    reference encoder's ------------------------------------------------------------------------ */
static void pack_pair_list(biref_buffer *out, const double *values, uint32_t rows)
{
    biref_pack_array(out, rows);
    for (uint32_t r = 0; r < rows; r++) {
        biref_pack_array(out, 2);
        biref_pack_double(out, values[2 * r]);
        biref_pack_double(out, values[2 * r + 1]);
    }
}

/* The "shape" and "dtype" entries every frame-carrying header has (two map entries). */
static void pack_frame_format(biref_buffer *out, biref_format format)
{
    biref_pack_str(out, "shape");
    biref_pack_array(out, 2);
    biref_pack_uint(out, format.height);
    biref_pack_uint(out, format.width);
    biref_pack_str(out, "dtype");
    biref_pack_str(out, biref_dtype_name(format.dtype));
}

int biref_encode_start(biref_buffer *out, const char *acquisition_id, const biref_geometry *g, biref_format format)
{
    if (!valid_id(acquisition_id) || !valid_geometry(g) || !valid_format(format))
        return BIREF_EINVAL;
    biref_pack_map(out, 7);
    biref_pack_str(out, "protocol");
    biref_pack_str(out, BIREF_PROTOCOL);
    biref_pack_str(out, "type");
    biref_pack_str(out, "start");
    biref_pack_str(out, "acquisition_id");
    biref_pack_str(out, acquisition_id);
    biref_pack_str(out, "geometry");
    biref_pack_map(out, 8);   /* docs/formats.md names, in its order */
    biref_pack_str(out, "wavelength_m");
    biref_pack_double(out, g->wavelength_m);
    biref_pack_str(out, "medium_index");
    biref_pack_double(out, g->medium_index);
    biref_pack_str(out, "na_objective");
    biref_pack_double(out, g->na_objective);
    biref_pack_str(out, "pixel_size_m");
    biref_pack_double(out, g->pixel_size_m);
    biref_pack_str(out, "illumination_sines");
    pack_pair_list(out, g->illumination_sines, g->n_views);
    biref_pack_str(out, "reference_carriers");
    pack_pair_list(out, &g->reference_carriers[0][0], 2);
    biref_pack_str(out, "volume_shape");
    biref_pack_array(out, 3);
    for (int i = 0; i < 3; i++)
        biref_pack_uint(out, g->volume_shape[i]);
    biref_pack_str(out, "voxel_size_m");
    biref_pack_array(out, 3);
    for (int i = 0; i < 3; i++)
        biref_pack_double(out, g->voxel_size_m[i]);
    pack_frame_format(out, format);
    biref_pack_str(out, "n_views");
    biref_pack_uint(out, g->n_views);
    return biref_buffer_status(out);
}

int biref_encode_frame(biref_buffer *out, const char *type, const char *acquisition_id, int polarization,
                       uint32_t view, biref_format format)
{
    if (type == NULL || (strcmp(type, "view") != 0 && strcmp(type, "background") != 0) || !valid_id(acquisition_id)
        || (polarization != 0 && polarization != 1) || view >= BIREF_MAX_VIEWS || !valid_format(format))
        return BIREF_EINVAL;
    biref_pack_map(out, 7);
    biref_pack_str(out, "protocol");
    biref_pack_str(out, BIREF_PROTOCOL);
    biref_pack_str(out, "type");
    biref_pack_str(out, type);
    biref_pack_str(out, "acquisition_id");
    biref_pack_str(out, acquisition_id);
    biref_pack_str(out, "polarization");
    biref_pack_uint(out, (uint64_t)polarization);
    biref_pack_str(out, "view");
    biref_pack_uint(out, view);
    pack_frame_format(out, format);
    return biref_buffer_status(out);
}

int biref_encode_stop(biref_buffer *out, const char *acquisition_id)
{
    if (!valid_id(acquisition_id))
        return BIREF_EINVAL;
    biref_pack_map(out, 3);
    biref_pack_str(out, "protocol");
    biref_pack_str(out, BIREF_PROTOCOL);
    biref_pack_str(out, "type");
    biref_pack_str(out, "stop");
    biref_pack_str(out, "acquisition_id");
    biref_pack_str(out, acquisition_id);
    return biref_buffer_status(out);
}

/* -- producer ---------------------------------------------------------------------------------- */
struct biref_producer {
    void *context;
    int own_context;
    void *socket;
    biref_buffer header;
    void *swap;          /* byte-swapped frame on big-endian hosts */
    size_t swap_size;
};

static void *own_or_shared_context(void *zmq_context, int *own)
{
    *own = zmq_context == NULL;
    return zmq_context ? zmq_context : zmq_ctx_new();
}

int biref_producer_open(biref_producer **out, void *zmq_context, const char *endpoint, int send_timeout_ms)
{
    biref_producer *p;
    int hwm = 64, linger = 0;
    *out = NULL;
    if (endpoint == NULL)
        return BIREF_EINVAL;
    if ((p = calloc(1, sizeof *p)) == NULL)
        return BIREF_ENOMEM;
    biref_buffer_init(&p->header);
    if ((p->context = own_or_shared_context(zmq_context, &p->own_context)) == NULL
        || (p->socket = zmq_socket(p->context, ZMQ_PUSH)) == NULL
        || zmq_setsockopt(p->socket, ZMQ_SNDHWM, &hwm, sizeof hwm) != 0
        || zmq_setsockopt(p->socket, ZMQ_SNDTIMEO, &send_timeout_ms, sizeof send_timeout_ms) != 0
        || zmq_setsockopt(p->socket, ZMQ_LINGER, &linger, sizeof linger) != 0
        || zmq_connect(p->socket, endpoint) != 0) {
        biref_producer_close(p, 0);
        return BIREF_EZMQ;
    }
    *out = p;
    return BIREF_OK;
}

/* header then (optionally) one payload frame, as one multipart message */
static int send_message(biref_producer *p, const void *payload, size_t n_items, size_t itemsize)
{
    const void *wire = payload;
    if (biref_buffer_status(&p->header) != BIREF_OK)
        return BIREF_ENOMEM;
    if (payload != NULL && itemsize > 1 && !host_is_little_endian()) {
        size_t nbytes = n_items * itemsize;
        if (nbytes > p->swap_size) {
            void *swap = realloc(p->swap, nbytes);
            if (swap == NULL)
                return BIREF_ENOMEM;
            p->swap = swap;
            p->swap_size = nbytes;
        }
        copy_swapped(p->swap, payload, n_items, itemsize);
        wire = p->swap;
    }
    if (zmq_send(p->socket, p->header.data, p->header.size, payload ? ZMQ_SNDMORE : 0) < 0)
        return zmq_errno() == EAGAIN ? BIREF_ETIMEOUT : BIREF_EZMQ;
    /* once the first part is queued, libzmq queues the rest of the message (the high-water mark
       counts whole messages), so a message is never left half sent */
    if (payload != NULL && zmq_send(p->socket, wire, n_items * itemsize, 0) < 0)
        return BIREF_EZMQ;
    return BIREF_OK;
}

int biref_producer_start(biref_producer *p, const char *acquisition_id, const biref_geometry *geometry,
                         biref_format format, const void *background)
{
    int status;
    biref_buffer_reset(&p->header);
    if ((status = biref_encode_start(&p->header, acquisition_id, geometry, format)) != BIREF_OK)
        return status;
    return send_message(p, background, background ? (size_t)2 * geometry->n_views * format.height * format.width : 0,
                        biref_dtype_size(format.dtype));
}

static int send_frame(biref_producer *p, const char *type, const char *acquisition_id, int polarization,
                      uint32_t view, biref_format format, const void *frame)
{
    int status;
    if (frame == NULL)
        return BIREF_EINVAL;
    biref_buffer_reset(&p->header);
    if ((status = biref_encode_frame(&p->header, type, acquisition_id, polarization, view, format)) != BIREF_OK)
        return status;
    return send_message(p, frame, (size_t)format.height * format.width, biref_dtype_size(format.dtype));
}

int biref_producer_background(biref_producer *p, const char *acquisition_id, int polarization, uint32_t view,
                              biref_format format, const void *frame)
{
    return send_frame(p, "background", acquisition_id, polarization, view, format, frame);
}

int biref_producer_view(biref_producer *p, const char *acquisition_id, int polarization, uint32_t view,
                        biref_format format, const void *frame)
{
    return send_frame(p, "view", acquisition_id, polarization, view, format, frame);
}

int biref_producer_stop(biref_producer *p, const char *acquisition_id)
{
    int status;
    biref_buffer_reset(&p->header);
    if ((status = biref_encode_stop(&p->header, acquisition_id)) != BIREF_OK)
        return status;
    return send_message(p, NULL, 0, 0);
}

void biref_producer_close(biref_producer *p, int linger_ms)
{
    if (p == NULL)
        return;
    if (p->socket != NULL) {
        zmq_setsockopt(p->socket, ZMQ_LINGER, &linger_ms, sizeof linger_ms);
        zmq_close(p->socket);
    }
    if (p->own_context && p->context != NULL)
        zmq_ctx_term(p->context);   /* waits for the linger period */
    biref_buffer_free(&p->header);
    free(p->swap);
    free(p);
}

/* -- subscriber -------------------------------------------------------------------------------- */
#define MAX_PARTS 5   /* topic, header, ne, no, director */

struct biref_subscriber {
    void *context;
    int own_context;
    void *socket;
    int subscribed[4];
    int64_t next_seq[4];   /* -1: none seen yet */
    uint64_t missed[4];
    uint64_t rejected;
};

static int topic_index(const char *topic, size_t length)
{
    for (int i = 0; i < 4; i++)
        if (strlen(TOPICS[i]) == length && memcmp(TOPICS[i], topic, length) == 0)
            return i;
    return -1;
}

int biref_subscriber_open(biref_subscriber **out, void *zmq_context, const char *endpoint,
                          const char *const *topics)
{
    biref_subscriber *s;
    int linger = 0, hwm = 64;
    /* a subscriber must not be made to allocate whatever a (spoofed) publisher sends */
    int64_t max_message = (int64_t)BIREF_MAX_VOLUME_VOXELS * 12;
    *out = NULL;
    if (endpoint == NULL)
        return BIREF_EINVAL;
    if ((s = calloc(1, sizeof *s)) == NULL)
        return BIREF_ENOMEM;
    for (int i = 0; i < 4; i++)
        s->next_seq[i] = -1;
    if (topics == NULL) {
        for (int i = 0; i < 4; i++)
            s->subscribed[i] = 1;
    } else {
        for (const char *const *t = topics; *t != NULL; t++) {
            int i = topic_index(*t, strlen(*t));
            if (i < 0) {
                free(s);
                return BIREF_EINVAL;
            }
            s->subscribed[i] = 1;
        }
    }
    if ((s->context = own_or_shared_context(zmq_context, &s->own_context)) == NULL
        || (s->socket = zmq_socket(s->context, ZMQ_SUB)) == NULL
        || zmq_setsockopt(s->socket, ZMQ_LINGER, &linger, sizeof linger) != 0
        || zmq_setsockopt(s->socket, ZMQ_RCVHWM, &hwm, sizeof hwm) != 0
        || zmq_setsockopt(s->socket, ZMQ_MAXMSGSIZE, &max_message, sizeof max_message) != 0) {
        biref_subscriber_close(s);
        return BIREF_EZMQ;
    }
    for (int i = 0; i < 4; i++)
        if (s->subscribed[i] && zmq_setsockopt(s->socket, ZMQ_SUBSCRIBE, TOPICS[i], strlen(TOPICS[i])) != 0) {
            biref_subscriber_close(s);
            return BIREF_EZMQ;
        }
    if (zmq_connect(s->socket, endpoint) != 0) {
        biref_subscriber_close(s);
        return BIREF_EZMQ;
    }
    *out = s;
    return BIREF_OK;
}

void biref_subscriber_close(biref_subscriber *s)
{
    if (s == NULL)
        return;
    if (s->socket != NULL)
        zmq_close(s->socket);
    if (s->own_context && s->context != NULL)
        zmq_ctx_term(s->context);
    free(s);
}

uint64_t biref_subscriber_missed(const biref_subscriber *s, const char *topic)
{
    int i = topic ? topic_index(topic, strlen(topic)) : -1;
    return i < 0 ? 0 : s->missed[i];
}

uint64_t biref_subscriber_rejected(const biref_subscriber *s)
{
    return s->rejected;
}

void biref_result_free(biref_result *r)
{
    free(r->ne);
    free(r->no);
    free(r->director);
    free(r->header);
    r->ne = r->no = r->director = NULL;
    r->header = NULL;
    r->header_size = 0;
}

/* copy a string value into a fixed field, truncating; nil leaves it empty */
static int copy_text(const biref_mp_object *o, char *field, size_t capacity)
{
    size_t n;
    if (o->type == BIREF_MP_NIL) {
        field[0] = '\0';
        return BIREF_OK;
    }
    if (o->type != BIREF_MP_STR)
        return BIREF_EPROTO;
    n = o->value.bytes.length < capacity - 1 ? o->value.bytes.length : capacity - 1;
    memcpy(field, o->value.bytes.ptr, n);
    field[n] = '\0';
    return BIREF_OK;
}

/* "shape": [Z, Y, X] of positive integers within the volume limit */
static int read_shape(biref_reader *r, uint32_t shape[3])
{
    biref_mp_object o;
    if (biref_read(r, &o) != BIREF_OK || o.type != BIREF_MP_ARRAY || o.value.n != 3)
        return 0;
    for (int i = 0; i < 3; i++) {
        if (biref_read(r, &o) != BIREF_OK || o.type != BIREF_MP_INT || o.value.i < 1
            || o.value.i > BIREF_MAX_VOLUME_VOXELS)
            return 0;
        shape[i] = (uint32_t)o.value.i;
    }
    return 1;
}

/* "arrays": exactly ["ne", "no", "director"], the order of the payload frames */
static int read_arrays(biref_reader *r)
{
    biref_mp_object o;
    if (biref_read(r, &o) != BIREF_OK || o.type != BIREF_MP_ARRAY || o.value.n != 3)
        return 0;
    for (int i = 0; i < 3; i++)
        if (biref_read(r, &o) != BIREF_OK || !biref_mp_str_equals(&o, VOLUME_ARRAYS[i]))
            return 0;
    return 1;
}

/* Read the header map's known keys into `result` (unknown keys are skipped, as biref/1 asks);
   `volume` is set when shape, dtype and arrays announce the volume payload of docs/protocol.md. */
static int decode_header(const uint8_t *data, size_t size, const char *topic, biref_result *result, int *volume)
{
    biref_reader r;
    biref_mp_object o, key;
    int protocol_ok = 0, type_ok = 0, shape_ok = 0, dtype_ok = 0, arrays_ok = 0;
    biref_reader_init(&r, data, size);
    if (biref_read(&r, &o) != BIREF_OK || o.type != BIREF_MP_MAP)
        return BIREF_EPROTO;
    for (uint32_t pair = 0, n = o.value.n; pair < n; pair++) {
        biref_reader value;
        if (biref_read(&r, &key) != BIREF_OK || key.type != BIREF_MP_STR)
            return BIREF_EPROTO;
        value = r;   /* the value is checked whole (skipped) first, then read if its key is known */
        if (biref_skip(&r) != BIREF_OK)
            return BIREF_EPROTO;
        if (biref_mp_str_equals(&key, "shape")) {
            shape_ok = read_shape(&value, result->shape);
            continue;
        }
        if (biref_mp_str_equals(&key, "arrays")) {
            arrays_ok = read_arrays(&value);
            continue;
        }
        if (biref_read(&value, &o) != BIREF_OK)
            return BIREF_EPROTO;
        if (biref_mp_str_equals(&key, "protocol"))
            protocol_ok = biref_mp_str_equals(&o, BIREF_PROTOCOL);
        else if (biref_mp_str_equals(&key, "type"))
            type_ok = biref_mp_str_equals(&o, topic);
        else if (biref_mp_str_equals(&key, "seq") && o.type == BIREF_MP_INT)
            result->seq = o.value.i;
        else if (biref_mp_str_equals(&key, "acquisition_id")) {
            if (copy_text(&o, result->acquisition_id, sizeof result->acquisition_id) != BIREF_OK)
                return BIREF_EPROTO;
        } else if (biref_mp_str_equals(&key, "engine") && o.type == BIREF_MP_STR)
            copy_text(&o, result->engine, sizeof result->engine);
        else if (biref_mp_str_equals(&key, "complete") && o.type == BIREF_MP_BOOL)
            result->complete = o.value.boolean;
        else if (biref_mp_str_equals(&key, "views_used") && o.type == BIREF_MP_INT)
            result->views_used = o.value.i;
        else if (biref_mp_str_equals(&key, "views_expected") && o.type == BIREF_MP_INT)
            result->views_expected = o.value.i;
        else if (biref_mp_str_equals(&key, "latency_s") && (o.type == BIREF_MP_FLOAT || o.type == BIREF_MP_INT))
            result->latency_s = o.type == BIREF_MP_FLOAT ? o.value.f : (double)o.value.i;
        else if (biref_mp_str_equals(&key, "dtype"))
            dtype_ok = biref_mp_str_equals(&o, "float32");
        else if (biref_mp_str_equals(&key, "reason") && o.type == BIREF_MP_STR)
            copy_text(&o, result->reason, sizeof result->reason);
        else if (biref_mp_str_equals(&key, "detail") && o.type == BIREF_MP_STR)
            copy_text(&o, result->detail, sizeof result->detail);
        else if (biref_mp_str_equals(&key, "fatal") && o.type == BIREF_MP_BOOL)
            result->fatal = o.value.boolean;
    }
    if (!protocol_ok || !type_ok || r.position != r.end)
        return BIREF_EPROTO;
    *volume = shape_ok && dtype_ok && arrays_ok;
    return BIREF_OK;
}

/* a little-endian float32 frame -> a new host-order float array */
static int copy_floats(zmq_msg_t *part, size_t count, float **out)
{
    if (zmq_msg_size(part) != count * sizeof(float))
        return BIREF_EPROTO;
    if ((*out = malloc(count * sizeof(float))) == NULL)
        return BIREF_ENOMEM;
    if (host_is_little_endian())
        memcpy(*out, zmq_msg_data(part), count * sizeof(float));
    else
        copy_swapped(*out, zmq_msg_data(part), count, sizeof(float));
    return BIREF_OK;
}

static int decode_result(zmq_msg_t *parts, int n_parts, biref_result *result)
{
    int topic, volume = 0, status;
    size_t voxels;
    memset(result, 0, sizeof *result);
    if (n_parts < 2 || n_parts > MAX_PARTS)
        return BIREF_EPROTO;
    topic = topic_index((const char *)zmq_msg_data(&parts[0]), zmq_msg_size(&parts[0]));
    if (topic < 0 || zmq_msg_size(&parts[1]) > BIREF_MAX_HEADER_BYTES)
        return BIREF_EPROTO;
    strcpy(result->topic, TOPICS[topic]);
    status = decode_header((const uint8_t *)zmq_msg_data(&parts[1]), zmq_msg_size(&parts[1]), TOPICS[topic], result,
                           &volume);
    if (status != BIREF_OK)
        return status;
    if (topic >= 2)   /* error, status: a header only */
        status = n_parts == 2 ? BIREF_OK : BIREF_EPROTO;
    else if (!volume || n_parts != 5)
        status = BIREF_EPROTO;
    else {
        voxels = (size_t)result->shape[0] * result->shape[1] * result->shape[2];
        if ((double)result->shape[0] * result->shape[1] * result->shape[2] > (double)BIREF_MAX_VOLUME_VOXELS)
            status = BIREF_EPROTO;
        else if ((status = copy_floats(&parts[2], voxels, &result->ne)) == BIREF_OK
                 && (status = copy_floats(&parts[3], voxels, &result->no)) == BIREF_OK)
            status = copy_floats(&parts[4], 3 * voxels, &result->director);
    }
    if (status == BIREF_OK) {
        result->header_size = zmq_msg_size(&parts[1]);
        if ((result->header = malloc(result->header_size + 1)) == NULL)
            status = BIREF_ENOMEM;
        else
            memcpy(result->header, zmq_msg_data(&parts[1]), result->header_size);
    }
    if (status != BIREF_OK)
        biref_result_free(result);
    return status;
}

/* receive one whole multipart message (assumes one is ready); parts beyond MAX_PARTS are drained
   and make n_parts MAX_PARTS + 1 */
static int receive_parts(void *socket, zmq_msg_t *parts, int *n_parts)
{
    int more = 1;
    size_t more_size = sizeof more;
    *n_parts = 0;
    while (more) {
        zmq_msg_t *part = &parts[*n_parts < MAX_PARTS ? *n_parts : MAX_PARTS];
        zmq_msg_init(part);
        if (zmq_msg_recv(part, socket, 0) < 0) {
            zmq_msg_close(part);
            for (int i = 0; i < (*n_parts < MAX_PARTS ? *n_parts : MAX_PARTS); i++)
                zmq_msg_close(&parts[i]);
            return BIREF_EZMQ;
        }
        if (zmq_getsockopt(socket, ZMQ_RCVMORE, &more, &more_size) != 0)
            more = 0;
        if (*n_parts < MAX_PARTS)
            (*n_parts)++;
        else {
            zmq_msg_close(part);
            *n_parts = MAX_PARTS + 1;
        }
    }
    return BIREF_OK;
}

int biref_subscriber_recv(biref_subscriber *s, biref_result *result, int timeout_ms)
{
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    zmq_msg_t parts[MAX_PARTS + 1];
    memset(result, 0, sizeof *result);
    for (;;) {
        zmq_pollitem_t item;
        long wait = -1;
        int n_parts, status, topic;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            wait = left > 0 ? (long)left : 0;
        }
        item.socket = s->socket;
        item.fd = 0;
        item.events = ZMQ_POLLIN;
        item.revents = 0;
        status = zmq_poll(&item, 1, wait);
        if (status < 0) {
            if (zmq_errno() == EINTR)
                continue;
            return BIREF_EZMQ;
        }
        if (status == 0)
            return BIREF_ETIMEOUT;
        if (receive_parts(s->socket, parts, &n_parts) != BIREF_OK)
            return BIREF_EZMQ;
        status = decode_result(parts, n_parts, result);
        for (int i = 0; i < (n_parts < MAX_PARTS ? n_parts : MAX_PARTS); i++)
            zmq_msg_close(&parts[i]);
        if (status == BIREF_ENOMEM)
            return status;
        if (status != BIREF_OK) {
            s->rejected++;
            continue;
        }
        topic = topic_index(result->topic, strlen(result->topic));
        if (s->next_seq[topic] >= 0 && result->seq > s->next_seq[topic])
            s->missed[topic] += (uint64_t)(result->seq - s->next_seq[topic]);
        s->next_seq[topic] = result->seq + 1;
        return BIREF_OK;
    }
}

int biref_subscriber_wait_ready(biref_subscriber *s, int timeout_ms)
{
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    int temporary = !s->subscribed[3], status;
    if (temporary && zmq_setsockopt(s->socket, ZMQ_SUBSCRIBE, "status", 6) != 0)
        return BIREF_EZMQ;
    for (;;) {
        biref_result result;
        int left = -1;
        if (deadline >= 0) {
            int64_t remaining = deadline - now_ms();
            left = remaining > 0 ? (int)remaining : 0;
        }
        status = biref_subscriber_recv(s, &result, left);
        if (status == BIREF_OK) {
            int is_status = strcmp(result.topic, "status") == 0;
            biref_result_free(&result);
            if (!is_status)
                continue;
        }
        break;
    }
    if (temporary) {
        zmq_setsockopt(s->socket, ZMQ_UNSUBSCRIBE, "status", 6);
        s->next_seq[3] = -1;   /* not following status: later gaps are not losses */
    }
    return status;
}
