/* biref/2 headers of the microscope side (start, background, view, stop), packed by msgpack-c,
 * and what the library's sources share. docs/protocol.md is the contract; the Python reference is
 * biref_sdk/streaming/protocol.py. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <msgpack.h>

#include "biref_internal.h"

const char *const biref_topics[BIREF_N_TOPICS] = {"volume", "preview", "error", "status"};

const char *biref_version(void)
{
    return BIREF_VERSION_STRING;
}

const char *biref_strerror(int status)
{
    switch (status) {
    case BIREF_OK: return "success";
    case BIREF_EINVAL: return "invalid argument for the biref protocol";
    case BIREF_ENOMEM: return "out of memory";
    case BIREF_EZMQ: return "libzmq error";
    case BIREF_ETIMEOUT: return "timed out";
    case BIREF_EPROTO: return "message breaks the biref protocol";
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

int biref_topic_index(const char *topic, size_t length)
{
    for (int i = 0; i < BIREF_N_TOPICS; i++)
        if (strlen(biref_topics[i]) == length && memcmp(biref_topics[i], topic, length) == 0)
            return i;
    return -1;
}

int biref_host_is_little_endian(void)
{
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

void biref_copy_swapped(void *out, const void *in, size_t n, size_t itemsize)
{
    const uint8_t *src = (const uint8_t *)in;
    uint8_t *dst = (uint8_t *)out;
    for (size_t i = 0; i < n; i++)
        for (size_t b = 0; b < itemsize; b++)
            dst[i * itemsize + b] = src[i * itemsize + itemsize - 1 - b];
}

void biref_buffer_init(biref_buffer *buffer)
{
    buffer->data = NULL;
    buffer->size = 0;
    buffer->capacity = 0;
    buffer->failed = 0;
}

void biref_buffer_reset(biref_buffer *buffer)
{
    buffer->size = 0;
    buffer->failed = 0;
}

void biref_buffer_free(biref_buffer *buffer)
{
    free(buffer->data);
    biref_buffer_init(buffer);
}

int biref_buffer_status(const biref_buffer *buffer)
{
    return buffer->failed ? BIREF_ENOMEM : BIREF_OK;
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

/* -- header encoders: keys in the order of biref_sdk.streaming.protocol, and msgpack-c packs each
 *    value in its shortest form as the reference packer does, so the bytes are the reference
 *    encoder's ------------------------------------------------------------------------------------ */
static int buffer_write(void *data, const char *bytes, size_t n)
{
    biref_buffer *buffer = (biref_buffer *)data;
    if (buffer->failed)
        return -1;
    if (buffer->size + n > buffer->capacity) {
        size_t capacity = buffer->capacity ? buffer->capacity : 256;
        uint8_t *grown;
        while (capacity < buffer->size + n)
            capacity *= 2;
        if ((grown = realloc(buffer->data, capacity)) == NULL) {
            buffer->failed = 1;
            return -1;
        }
        buffer->data = grown;
        buffer->capacity = capacity;
    }
    memcpy(buffer->data + buffer->size, bytes, n);
    buffer->size += n;
    return 0;
}

static void pack_text(msgpack_packer *pk, const char *text)
{
    size_t n = strlen(text);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, text, n);
}
static void pack_pair_list(msgpack_packer *pk, const double *values, uint32_t rows)
{
    msgpack_pack_array(pk, rows);
    for (uint32_t r = 0; r < rows; r++) {
        msgpack_pack_array(pk, 2);
        msgpack_pack_double(pk, values[2 * r]);
        msgpack_pack_double(pk, values[2 * r + 1]);
    }
}

/* The "shape" and "dtype" entries every frame-carrying header has (two map entries). */
static void pack_frame_format(msgpack_packer *pk, biref_format format)
{
    pack_text(pk, "shape");
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint64(pk, format.height);
    msgpack_pack_uint64(pk, format.width);
    pack_text(pk, "dtype");
    pack_text(pk, biref_dtype_name(format.dtype));
}

int biref_encode_start(biref_buffer *out, const char *acquisition_id, const biref_geometry *g, biref_format format)
{
    msgpack_packer packer, *pk = &packer;
    if (!valid_id(acquisition_id) || !valid_geometry(g) || !valid_format(format))
        return BIREF_EINVAL;
    msgpack_packer_init(pk, out, buffer_write);
    msgpack_pack_map(pk, 7);
    pack_text(pk, "protocol");
    pack_text(pk, BIREF_PROTOCOL);
    pack_text(pk, "type");
    pack_text(pk, "start");
    pack_text(pk, "acquisition_id");
    pack_text(pk, acquisition_id);
    pack_text(pk, "geometry");
    msgpack_pack_map(pk, 8);   /* docs/formats.md names, in its order */
    pack_text(pk, "wavelength_m");
    msgpack_pack_double(pk, g->wavelength_m);
    pack_text(pk, "medium_index");
    msgpack_pack_double(pk, g->medium_index);
    pack_text(pk, "na_objective");
    msgpack_pack_double(pk, g->na_objective);
    pack_text(pk, "pixel_size_m");
    msgpack_pack_double(pk, g->pixel_size_m);
    pack_text(pk, "illumination_sines");
    pack_pair_list(pk, g->illumination_sines, g->n_views);
    pack_text(pk, "reference_carriers");
    pack_pair_list(pk, &g->reference_carriers[0][0], 2);
    pack_text(pk, "volume_shape");
    msgpack_pack_array(pk, 3);
    for (int i = 0; i < 3; i++)
        msgpack_pack_uint64(pk, g->volume_shape[i]);
    pack_text(pk, "voxel_size_m");
    msgpack_pack_array(pk, 3);
    for (int i = 0; i < 3; i++)
        msgpack_pack_double(pk, g->voxel_size_m[i]);
    pack_frame_format(pk, format);
    pack_text(pk, "n_views");
    msgpack_pack_uint64(pk, g->n_views);
    return biref_buffer_status(out);
}

int biref_encode_frame(biref_buffer *out, const char *type, const char *acquisition_id, int polarization,
                       uint32_t view, biref_format format)
{
    msgpack_packer packer, *pk = &packer;
    if (type == NULL || (strcmp(type, "view") != 0 && strcmp(type, "background") != 0) || !valid_id(acquisition_id)
        || (polarization != 0 && polarization != 1) || view >= BIREF_MAX_VIEWS || !valid_format(format))
        return BIREF_EINVAL;
    msgpack_packer_init(pk, out, buffer_write);
    msgpack_pack_map(pk, 7);
    pack_text(pk, "protocol");
    pack_text(pk, BIREF_PROTOCOL);
    pack_text(pk, "type");
    pack_text(pk, type);
    pack_text(pk, "acquisition_id");
    pack_text(pk, acquisition_id);
    pack_text(pk, "polarization");
    msgpack_pack_uint64(pk, (uint64_t)polarization);
    pack_text(pk, "view");
    msgpack_pack_uint64(pk, view);
    pack_frame_format(pk, format);
    return biref_buffer_status(out);
}

int biref_encode_stop(biref_buffer *out, const char *acquisition_id)
{
    msgpack_packer packer, *pk = &packer;
    if (!valid_id(acquisition_id))
        return BIREF_EINVAL;
    msgpack_packer_init(pk, out, buffer_write);
    msgpack_pack_map(pk, 3);
    pack_text(pk, "protocol");
    pack_text(pk, BIREF_PROTOCOL);
    pack_text(pk, "type");
    pack_text(pk, "stop");
    pack_text(pk, "acquisition_id");
    pack_text(pk, acquisition_id);
    return biref_buffer_status(out);
}

