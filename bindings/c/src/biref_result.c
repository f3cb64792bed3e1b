/* Decoding of result messages (volume, preview, error, status) with msgpack-c: the untrusted
 * input of a subscriber (fuzzed by bindings/c/fuzz/fuzz_result.c). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <msgpack.h>

#include "biref_internal.h"

#define MAX_PARTS 6   /* topic, header, ne, no, director, uncertainty */

/* the payload frames' order: the volume, then (biref/2) the uncertainty when the engine gives one */
static const char *const VOLUME_ARRAYS[4] = {"ne", "no", "director", "uncertainty"};

void biref_result_free(biref_result *r)
{
    free(r->ne);
    free(r->no);
    free(r->director);
    free(r->uncertainty);
    free(r->header);
    r->ne = r->no = r->director = r->uncertainty = NULL;
    r->header = NULL;
    r->header_size = 0;
}

/* msgpack-c keeps non-negative integers as POSITIVE_INTEGER, negative ones as NEGATIVE_INTEGER */
static int as_int(const msgpack_object *o, int64_t *value)
{
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *value = o->via.i64;
        return 1;
    }
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= (uint64_t)INT64_MAX) {
        *value = (int64_t)o->via.u64;
        return 1;
    }
    return 0;
}

static int is_text(const msgpack_object *o, const char *text)
{
    size_t n = strlen(text);
    return o->type == MSGPACK_OBJECT_STR && o->via.str.size == n && memcmp(o->via.str.ptr, text, n) == 0;
}

/* copy a string value into a fixed field, truncating; nil leaves it empty */
static int copy_text(const msgpack_object *o, char *field, size_t capacity)
{
    size_t n;
    if (o->type == MSGPACK_OBJECT_NIL) {
        field[0] = '\0';
        return BIREF_OK;
    }
    if (o->type != MSGPACK_OBJECT_STR)
        return BIREF_EPROTO;
    n = o->via.str.size < capacity - 1 ? o->via.str.size : capacity - 1;
    memcpy(field, o->via.str.ptr, n);
    field[n] = '\0';
    return BIREF_OK;
}

/* "shape": [Z, Y, X] of positive integers within the volume limit */
static int read_shape(const msgpack_object *o, uint32_t shape[3])
{
    if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != 3)
        return 0;
    for (int i = 0; i < 3; i++) {
        int64_t side;
        if (!as_int(&o->via.array.ptr[i], &side) || side < 1 || side > BIREF_MAX_VOLUME_VOXELS)
            return 0;
        shape[i] = (uint32_t)side;
    }
    return 1;
}

/* "arrays": exactly ["ne", "no", "director"] or ["ne", "no", "director", "uncertainty"], the order
   of the payload frames; returns how many (0: neither) */
static int read_arrays(const msgpack_object *o)
{
    if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size < 3 || o->via.array.size > 4)
        return 0;
    for (uint32_t i = 0; i < o->via.array.size; i++)
        if (!is_text(&o->via.array.ptr[i], VOLUME_ARRAYS[i]))
            return 0;
    return (int)o->via.array.size;
}

static int as_double(const msgpack_object *o, double *value)
{
    int64_t number;
    if (o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_FLOAT32) {
        *value = o->via.f64;
        return 1;
    }
    if (as_int(o, &number)) {
        *value = (double)number;
        return 1;
    }
    return 0;
}

/* "consistency": nil, or a map whose "score" is a number (and "views_checked" an integer) */
static int read_consistency(const msgpack_object *o, biref_result *result)
{
    if (o->type == MSGPACK_OBJECT_NIL)
        return BIREF_OK;
    if (o->type != MSGPACK_OBJECT_MAP)
        return BIREF_EPROTO;
    for (uint32_t pair = 0; pair < o->via.map.size; pair++) {
        const msgpack_object *key = &o->via.map.ptr[pair].key, *value = &o->via.map.ptr[pair].val;
        int64_t number;
        if (is_text(key, "score") && !as_double(value, &result->consistency_score))
            return BIREF_EPROTO;
        if (is_text(key, "views_checked")) {
            if (!as_int(value, &number) || number < 0)
                return BIREF_EPROTO;
            result->consistency_views = number;
        }
    }
    return BIREF_OK;
}

/* Read the header map's known keys into `result` (unknown keys are ignored, as the protocol asks);
   `volume` is set to the number of payload arrays (3 or 4) when shape, dtype and arrays announce
   the volume payload of docs/protocol.md, else 0. */
static int read_header(const msgpack_object *map, const char *topic, biref_result *result, int *volume)
{
    int protocol_ok = 0, type_ok = 0, shape_ok = 0, dtype_ok = 0, arrays = 0;
    if (map->type != MSGPACK_OBJECT_MAP)
        return BIREF_EPROTO;
    for (uint32_t pair = 0; pair < map->via.map.size; pair++) {
        const msgpack_object *key = &map->via.map.ptr[pair].key, *o = &map->via.map.ptr[pair].val;
        int64_t number;
        if (key->type != MSGPACK_OBJECT_STR)
            return BIREF_EPROTO;
        if (is_text(key, "shape"))
            shape_ok = read_shape(o, result->shape);
        else if (is_text(key, "arrays"))
            arrays = read_arrays(o);
        else if (is_text(key, "protocol"))   /* biref/2 results, and biref/1 from older services */
            protocol_ok = is_text(o, BIREF_PROTOCOL) || is_text(o, "biref/1");
        else if (is_text(key, "consistency") && (strcmp(topic, "volume") == 0 || strcmp(topic, "preview") == 0)) {
            /* a volume's key: on error and status it is an unknown key, ignored (as by the Python client) */
            if (read_consistency(o, result) != BIREF_OK)
                return BIREF_EPROTO;
        }
        else if (is_text(key, "type"))
            type_ok = is_text(o, topic);
        else if (is_text(key, "seq") && as_int(o, &number))
            result->seq = number;
        else if (is_text(key, "acquisition_id")) {
            if (copy_text(o, result->acquisition_id, sizeof result->acquisition_id) != BIREF_OK)
                return BIREF_EPROTO;
        } else if (is_text(key, "engine") && o->type == MSGPACK_OBJECT_STR)
            copy_text(o, result->engine, sizeof result->engine);
        else if (is_text(key, "complete") && o->type == MSGPACK_OBJECT_BOOLEAN)
            result->complete = o->via.boolean;
        else if (is_text(key, "views_used") && as_int(o, &number))
            result->views_used = number;
        else if (is_text(key, "views_expected") && as_int(o, &number))
            result->views_expected = number;
        else if (is_text(key, "latency_s") && (o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_FLOAT32))
            result->latency_s = o->via.f64;
        else if (is_text(key, "latency_s") && as_int(o, &number))
            result->latency_s = (double)number;
        else if (is_text(key, "dtype"))
            dtype_ok = is_text(o, "float32");
        else if (is_text(key, "reason") && o->type == MSGPACK_OBJECT_STR)
            copy_text(o, result->reason, sizeof result->reason);
        else if (is_text(key, "detail") && o->type == MSGPACK_OBJECT_STR)
            copy_text(o, result->detail, sizeof result->detail);
        else if (is_text(key, "fatal") && o->type == MSGPACK_OBJECT_BOOLEAN)
            result->fatal = o->via.boolean;
    }
    if (!protocol_ok || !type_ok)
        return BIREF_EPROTO;
    *volume = shape_ok && dtype_ok ? arrays : 0;
    return BIREF_OK;
}

/* msgpack-c reserves memory for all of a container's declared elements before it reads them (24
 * bytes each, 48 per map pair): a 6-byte header could make it ask for 200 GB, and nested 3-byte
 * array headers for 1.5 MB each. So before msgpack-c decodes a header, this walk checks only that
 * the elements declared so far fit in the bytes left (each takes at least one byte), which bounds
 * what msgpack-c allocates to a few times the header's size. It decodes nothing. */
static int declared_sizes_fit(const uint8_t *p, size_t size)
{
    static const uint8_t fixed[] = {1, 2, 4, 8};   /* widths of 0xcc-0xcf, 0xd0-0xd3 */
    const uint8_t *end = p + size;
    uint64_t pending = 1;   /* values still to read: the header itself */
    while (pending > 0) {
        uint8_t m;
        uint64_t skip = 0, count = 0;   /* bytes after the marker and length; elements it declares */
        size_t left = (size_t)(end - p);
        if (left < 1 || pending > left)
            return 0;
        m = *p++;
        left--;
        pending--;
        if (m <= 0x7f || m >= 0xe0 || (m >= 0xc0 && m <= 0xc3))
            continue;                                   /* fixint, nil, (reserved), bool */
        if (m >= 0x80 && m <= 0x8f)
            count = 2u * (m & 0x0f);                    /* fixmap */
        else if (m >= 0x90 && m <= 0x9f)
            count = m & 0x0f;                           /* fixarray */
        else if (m >= 0xa0 && m <= 0xbf)
            skip = m & 0x1f;                            /* fixstr */
        else if (m >= 0xcc && m <= 0xd3)
            skip = fixed[(m - 0xcc) % 4];
        else if (m == 0xca || m == 0xcb)
            skip = m == 0xca ? 4 : 8;
        else if (m >= 0xd4 && m <= 0xd8)
            skip = 1 + (1u << (m - 0xd4));              /* fixext: type and 1-16 bytes */
        else {
            /* a 1, 2 or 4-byte big-endian length: bin/str/ext 8-16-32, array/map 16-32 */
            int width = (m == 0xc4 || m == 0xc7 || m == 0xd9) ? 1
                      : (m == 0xc5 || m == 0xc8 || m == 0xda || m == 0xdc || m == 0xde) ? 2 : 4;
            uint64_t n = 0;
            if (left < (size_t)width)
                return 0;
            for (int i = 0; i < width; i++)
                n = n << 8 | *p++;
            left -= (size_t)width;
            if (m == 0xdc || m == 0xdd)
                count = n;
            else if (m == 0xde || m == 0xdf)
                count = 2 * n;
            else
                skip = n + (m >= 0xc7 && m <= 0xc9);   /* ext: its type byte too */
        }
        if (skip > left)
            return 0;
        p += skip;
        pending += count;
    }
    return 1;
}

/* unpack the whole header (one msgpack value, nothing after it) and read it */
static int decode_header(const uint8_t *data, size_t size, const char *topic, biref_result *result, int *volume)
{
    msgpack_unpacked unpacked;
    size_t offset = 0;
    int status = BIREF_EPROTO;
    if (!declared_sizes_fit(data, size))
        return BIREF_EPROTO;
    msgpack_unpacked_init(&unpacked);
    if (msgpack_unpack_next(&unpacked, (const char *)data, size, &offset) == MSGPACK_UNPACK_SUCCESS
        && offset == size)
        status = read_header(&unpacked.data, topic, result, volume);
    msgpack_unpacked_destroy(&unpacked);
    return status;
}

/* a little-endian float32 frame -> a new host-order float array */
static int copy_floats(const void *frame, size_t size, size_t count, float **out)
{
    if (size != count * sizeof(float))
        return BIREF_EPROTO;
    if ((*out = malloc(count * sizeof(float))) == NULL)
        return BIREF_ENOMEM;
    if (biref_host_is_little_endian())
        memcpy(*out, frame, count * sizeof(float));
    else
        biref_copy_swapped(*out, frame, count, sizeof(float));
    return BIREF_OK;
}

/* a refused message leaves no arrays and no trust data (flat callers read the result anyway) */
static int refuse(biref_result *result, int status)
{
    biref_result_free(result);
    result->consistency_score = NAN;
    result->consistency_views = 0;
    return status;
}

int biref_result_decode(biref_result *result, const void *const *frames, const size_t *sizes, int n_parts)
{
    int topic, volume = 0, status;
    size_t voxels;
    memset(result, 0, sizeof *result);
    result->consistency_score = NAN;
    if (n_parts < 2 || n_parts > MAX_PARTS)
        return BIREF_EPROTO;
    topic = biref_topic_index((const char *)frames[0], sizes[0]);
    if (topic < 0 || sizes[1] > BIREF_MAX_HEADER_BYTES)
        return BIREF_EPROTO;
    strcpy(result->topic, biref_topics[topic]);
    status = decode_header((const uint8_t *)frames[1], sizes[1], biref_topics[topic], result,
                           &volume);
    if (status != BIREF_OK)
        return refuse(result, status);   /* the header may have been read in part */
    if (topic >= 2)   /* error, status: a header only */
        status = n_parts == 2 ? BIREF_OK : BIREF_EPROTO;
    else if (!volume || n_parts != 2 + volume)
        status = BIREF_EPROTO;
    else {
        voxels = (size_t)result->shape[0] * result->shape[1] * result->shape[2];
        if ((double)result->shape[0] * result->shape[1] * result->shape[2] > (double)BIREF_MAX_VOLUME_VOXELS)
            status = BIREF_EPROTO;
        else if ((status = copy_floats(frames[2], sizes[2], voxels, &result->ne)) == BIREF_OK
                 && (status = copy_floats(frames[3], sizes[3], voxels, &result->no)) == BIREF_OK
                 && (status = copy_floats(frames[4], sizes[4], 3 * voxels, &result->director)) == BIREF_OK
                 && volume == 4)
            status = copy_floats(frames[5], sizes[5], 3 * voxels, &result->uncertainty);
    }
    if (status == BIREF_OK) {
        result->header_size = sizes[1];
        if ((result->header = malloc(result->header_size + 1)) == NULL)
            status = BIREF_ENOMEM;
        else
            memcpy(result->header, frames[1], result->header_size);
    }
    return status == BIREF_OK ? status : refuse(result, status);
}


/* -- flat accessors (LabVIEW, C#) -------------------------------------------------------------- */
biref_result *biref_result_new(void)
{
    biref_result *result = calloc(1, sizeof(biref_result));
    if (result != NULL)
        result->consistency_score = NAN;   /* "none", as after a decode without one */
    return result;
}

void biref_result_delete(biref_result *result)
{
    if (result == NULL)
        return;
    biref_result_free(result);
    free(result);
}

int biref_result_text(const biref_result *r, const char *field, char *out, int32_t capacity)
{
    const char *text;
    size_t n;
    if (r == NULL || field == NULL || out == NULL || capacity < 1)
        return BIREF_EINVAL;
    if (strcmp(field, "topic") == 0)
        text = r->topic;
    else if (strcmp(field, "acquisition_id") == 0)
        text = r->acquisition_id;
    else if (strcmp(field, "engine") == 0)
        text = r->engine;
    else if (strcmp(field, "reason") == 0)
        text = r->reason;
    else if (strcmp(field, "detail") == 0)
        text = r->detail;
    else
        return BIREF_ENOTFOUND;
    n = strlen(text) < (size_t)capacity - 1 ? strlen(text) : (size_t)capacity - 1;
    memcpy(out, text, n);
    out[n] = '\0';
    return BIREF_OK;
}

int biref_result_numbers(const biref_result *r, int64_t *seq, int32_t *complete, int64_t *views_used,
                         int64_t *views_expected, double *latency_s, int32_t *fatal, uint32_t *shape)
{
    if (r == NULL)
        return BIREF_EINVAL;
    if (seq)
        *seq = r->seq;
    if (complete)
        *complete = r->complete;
    if (views_used)
        *views_used = r->views_used;
    if (views_expected)
        *views_expected = r->views_expected;
    if (latency_s)
        *latency_s = r->latency_s;
    if (fatal)
        *fatal = r->fatal;
    if (shape)
        for (int i = 0; i < 3; i++)
            shape[i] = r->ne ? r->shape[i] : 0;
    return BIREF_OK;
}

int biref_result_copy_volume(const biref_result *r, float *ne, float *no, float *director, uint64_t n_voxels)
{
    if (r == NULL || r->ne == NULL || ne == NULL || no == NULL || director == NULL
        || n_voxels != (uint64_t)r->shape[0] * r->shape[1] * r->shape[2])
        return BIREF_EINVAL;
    memcpy(ne, r->ne, n_voxels * sizeof(float));
    memcpy(no, r->no, n_voxels * sizeof(float));
    memcpy(director, r->director, 3 * n_voxels * sizeof(float));
    return BIREF_OK;
}

int biref_result_copy_uncertainty(const biref_result *r, float *uncertainty, uint64_t n_voxels)
{
    if (r == NULL || r->ne == NULL || uncertainty == NULL
        || n_voxels != (uint64_t)r->shape[0] * r->shape[1] * r->shape[2])
        return BIREF_EINVAL;
    if (r->uncertainty == NULL)
        return BIREF_ENOTFOUND;
    memcpy(uncertainty, r->uncertainty, 3 * n_voxels * sizeof(float));
    return BIREF_OK;
}

int biref_result_consistency(const biref_result *r, double *score, int64_t *views_checked)
{
    if (r == NULL)
        return BIREF_EINVAL;
    if (score)
        *score = r->consistency_score;
    if (views_checked)
        *views_checked = r->consistency_views;
    return BIREF_OK;
}
