/* The msgpack subset that biref/1 headers use: a writer with the shortest encoding of each value
 * and a bounds-checked reader. msgpack stores multi-byte numbers big-endian; they are assembled
 * byte by byte here, so the code does not depend on the host's byte order. */
#include <stdlib.h>
#include <string.h>

#include "biref.h"

#define MAX_DEPTH 64   /* nesting that biref_skip follows; headers use 3 */

/* -- writer ------------------------------------------------------------------------------------ */
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

static void put(biref_buffer *buffer, const void *bytes, size_t n)
{
    if (buffer->failed)
        return;
    if (n > buffer->capacity - buffer->size) {
        size_t capacity = buffer->capacity ? buffer->capacity : 256;
        while (capacity - buffer->size < n) {
            if (capacity > ((size_t)-1) / 2) {
                buffer->failed = 1;
                return;
            }
            capacity *= 2;
        }
        uint8_t *data = realloc(buffer->data, capacity);
        if (data == NULL) {
            buffer->failed = 1;
            return;
        }
        buffer->data = data;
        buffer->capacity = capacity;
    }
    memcpy(buffer->data + buffer->size, bytes, n);
    buffer->size += n;
}

/* a marker byte followed by the `width` low bytes of `value`, big-endian */
static void put_be(biref_buffer *buffer, uint8_t marker, uint64_t value, int width)
{
    uint8_t bytes[9];
    bytes[0] = marker;
    for (int i = 0; i < width; i++)
        bytes[1 + i] = (uint8_t)(value >> (8 * (width - 1 - i)));
    put(buffer, bytes, (size_t)(1 + width));
}

void biref_pack_nil(biref_buffer *buffer)
{
    put_be(buffer, 0xc0, 0, 0);
}

void biref_pack_bool(biref_buffer *buffer, int value)
{
    put_be(buffer, value ? 0xc3 : 0xc2, 0, 0);
}

void biref_pack_uint(biref_buffer *buffer, uint64_t value)
{
    if (value < 0x80)
        put_be(buffer, (uint8_t)value, 0, 0);            /* positive fixint */
    else if (value <= 0xff)
        put_be(buffer, 0xcc, value, 1);
    else if (value <= 0xffff)
        put_be(buffer, 0xcd, value, 2);
    else if (value <= 0xffffffffu)
        put_be(buffer, 0xce, value, 4);
    else
        put_be(buffer, 0xcf, value, 8);
}

void biref_pack_int(biref_buffer *buffer, int64_t value)
{
    if (value >= 0)
        biref_pack_uint(buffer, (uint64_t)value);
    else if (value >= -32)
        put_be(buffer, (uint8_t)(0xe0 | (value + 32)), 0, 0);   /* negative fixint 111xxxxx */
    else if (value >= INT8_MIN)
        put_be(buffer, 0xd0, (uint64_t)value, 1);       /* two's complement: the low bytes */
    else if (value >= INT16_MIN)
        put_be(buffer, 0xd1, (uint64_t)value, 2);
    else if (value >= INT32_MIN)
        put_be(buffer, 0xd2, (uint64_t)value, 4);
    else
        put_be(buffer, 0xd3, (uint64_t)value, 8);
}

void biref_pack_double(biref_buffer *buffer, double value)
{
    uint64_t bits;
    memcpy(&bits, &value, sizeof bits);   /* IEEE 754 binary64, in the host's integer byte order */
    put_be(buffer, 0xcb, bits, 8);
}

void biref_pack_str_n(biref_buffer *buffer, const char *utf8, size_t length)
{
    if (length < 32)
        put_be(buffer, (uint8_t)(0xa0 | length), 0, 0);  /* fixstr */
    else if (length <= 0xff)
        put_be(buffer, 0xd9, length, 1);
    else if (length <= 0xffff)
        put_be(buffer, 0xda, length, 2);
    else if ((uint64_t)length <= 0xffffffffu)
        put_be(buffer, 0xdb, length, 4);
    else {
        buffer->failed = 1;   /* msgpack cannot say it */
        return;
    }
    put(buffer, utf8, length);
}

void biref_pack_str(biref_buffer *buffer, const char *utf8)
{
    biref_pack_str_n(buffer, utf8, strlen(utf8));
}

void biref_pack_array(biref_buffer *buffer, uint32_t n_elements)
{
    if (n_elements < 16)
        put_be(buffer, (uint8_t)(0x90 | n_elements), 0, 0);
    else if (n_elements <= 0xffff)
        put_be(buffer, 0xdc, n_elements, 2);
    else
        put_be(buffer, 0xdd, n_elements, 4);
}

void biref_pack_map(biref_buffer *buffer, uint32_t n_pairs)
{
    if (n_pairs < 16)
        put_be(buffer, (uint8_t)(0x80 | n_pairs), 0, 0);
    else if (n_pairs <= 0xffff)
        put_be(buffer, 0xde, n_pairs, 2);
    else
        put_be(buffer, 0xdf, n_pairs, 4);
}

/* -- reader ------------------------------------------------------------------------------------ */
void biref_reader_init(biref_reader *reader, const void *data, size_t size)
{
    reader->position = (const uint8_t *)data;
    reader->end = (const uint8_t *)data + size;
}

static int take_be(biref_reader *reader, int width, uint64_t *value)
{
    if (reader->end - reader->position < width)
        return BIREF_EPROTO;
    uint64_t v = 0;
    for (int i = 0; i < width; i++)
        v = (v << 8) | reader->position[i];
    reader->position += width;
    *value = v;
    return BIREF_OK;
}

static int take_bytes(biref_reader *reader, uint64_t length, biref_mp_object *object)
{
    if ((uint64_t)(reader->end - reader->position) < length)
        return BIREF_EPROTO;
    object->value.bytes.ptr = (const char *)reader->position;
    object->value.bytes.length = (uint32_t)length;
    reader->position += length;
    return BIREF_OK;
}

/* sign-extend the low `width` bytes */
static int64_t signed_of(uint64_t v, int width)
{
    if (width == 8)
        return (int64_t)v;   /* two's complement hosts, as every C99 host with int64_t */
    uint64_t sign = (uint64_t)1 << (8 * width - 1);
    return (int64_t)(v ^ sign) - (int64_t)sign;
}

int biref_read(biref_reader *reader, biref_mp_object *object)
{
    uint64_t v = 0;
    int status;
    if (reader->position >= reader->end)
        return BIREF_EPROTO;
    uint8_t marker = *reader->position++;
    object->ext_type = 0;
    if (marker <= 0x7f) {
        object->type = BIREF_MP_INT;
        object->value.i = marker;
        return BIREF_OK;
    }
    if (marker >= 0xe0) {
        object->type = BIREF_MP_INT;
        object->value.i = (int64_t)marker - 256;
        return BIREF_OK;
    }
    if ((marker & 0xf0) == 0x80 || (marker & 0xf0) == 0x90) {
        object->type = (marker & 0xf0) == 0x80 ? BIREF_MP_MAP : BIREF_MP_ARRAY;
        object->value.n = marker & 0x0f;
        return BIREF_OK;
    }
    if ((marker & 0xe0) == 0xa0) {
        object->type = BIREF_MP_STR;
        return take_bytes(reader, marker & 0x1f, object);
    }
    switch (marker) {
    case 0xc0:
        object->type = BIREF_MP_NIL;
        return BIREF_OK;
    case 0xc2:
    case 0xc3:
        object->type = BIREF_MP_BOOL;
        object->value.boolean = marker == 0xc3;
        return BIREF_OK;
    case 0xc4: case 0xc5: case 0xc6:   /* bin 8/16/32 */
    case 0xd9: case 0xda: case 0xdb: { /* str 8/16/32 */
        int width = marker <= 0xc6 ? 1 << (marker - 0xc4) : 1 << (marker - 0xd9);
        object->type = marker <= 0xc6 ? BIREF_MP_BIN : BIREF_MP_STR;
        if ((status = take_be(reader, width, &v)) != BIREF_OK)
            return status;
        return take_bytes(reader, v, object);
    }
    case 0xc7: case 0xc8: case 0xc9: { /* ext 8/16/32 */
        uint64_t type;
        if ((status = take_be(reader, 1 << (marker - 0xc7), &v)) != BIREF_OK
            || (status = take_be(reader, 1, &type)) != BIREF_OK)
            return status;
        object->type = BIREF_MP_EXT;
        object->ext_type = (int8_t)signed_of(type, 1);
        return take_bytes(reader, v, object);
    }
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: { /* fixext 1/2/4/8/16 */
        uint64_t type;
        if ((status = take_be(reader, 1, &type)) != BIREF_OK)
            return status;
        object->type = BIREF_MP_EXT;
        object->ext_type = (int8_t)signed_of(type, 1);
        return take_bytes(reader, (uint64_t)1 << (marker - 0xd4), object);
    }
    case 0xca: {   /* float 32 */
        float f;
        uint32_t bits;
        if ((status = take_be(reader, 4, &v)) != BIREF_OK)
            return status;
        bits = (uint32_t)v;
        memcpy(&f, &bits, sizeof f);
        object->type = BIREF_MP_FLOAT;
        object->value.f = f;
        return BIREF_OK;
    }
    case 0xcb:
        if ((status = take_be(reader, 8, &v)) != BIREF_OK)
            return status;
        object->type = BIREF_MP_FLOAT;
        memcpy(&object->value.f, &v, sizeof v);
        return BIREF_OK;
    case 0xcc: case 0xcd: case 0xce: case 0xcf:   /* uint 8/16/32/64 */
        if ((status = take_be(reader, 1 << (marker - 0xcc), &v)) != BIREF_OK)
            return status;
        if (v > (uint64_t)INT64_MAX) {
            object->type = BIREF_MP_UINT;
            object->value.u = v;
        } else {
            object->type = BIREF_MP_INT;
            object->value.i = (int64_t)v;
        }
        return BIREF_OK;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: { /* int 8/16/32/64 */
        int width = 1 << (marker - 0xd0);
        if ((status = take_be(reader, width, &v)) != BIREF_OK)
            return status;
        object->type = BIREF_MP_INT;
        object->value.i = signed_of(v, width);
        return BIREF_OK;
    }
    case 0xdc: case 0xdd: case 0xde: case 0xdf:   /* array 16/32, map 16/32 */
        if ((status = take_be(reader, marker == 0xdc || marker == 0xde ? 2 : 4, &v)) != BIREF_OK)
            return status;
        object->type = marker <= 0xdd ? BIREF_MP_ARRAY : BIREF_MP_MAP;
        object->value.n = (uint32_t)v;
        return BIREF_OK;
    default:
        return BIREF_EPROTO;   /* 0xc1 is never used */
    }
}

static int skip_depth(biref_reader *reader, int depth)
{
    biref_mp_object object;
    int status = biref_read(reader, &object);
    if (status != BIREF_OK)
        return status;
    if (object.type != BIREF_MP_ARRAY && object.type != BIREF_MP_MAP)
        return BIREF_OK;
    if (depth >= MAX_DEPTH)
        return BIREF_EPROTO;
    /* each element takes at least one byte: a count beyond the bytes left is malformed, and this
       bound keeps a hostile count from spinning */
    uint64_t n = object.type == BIREF_MP_MAP ? 2 * (uint64_t)object.value.n : object.value.n;
    if (n > (uint64_t)(reader->end - reader->position))
        return BIREF_EPROTO;
    for (uint64_t i = 0; i < n; i++)
        if ((status = skip_depth(reader, depth + 1)) != BIREF_OK)
            return status;
    return BIREF_OK;
}

int biref_skip(biref_reader *reader)
{
    return skip_depth(reader, 0);
}

int biref_mp_str_equals(const biref_mp_object *object, const char *text)
{
    size_t n = strlen(text);
    return object->type == BIREF_MP_STR && object->value.bytes.length == n
           && memcmp(object->value.bytes.ptr, text, n) == 0;
}

int biref_map_find(const void *data, size_t size, const char *key, biref_reader *value)
{
    biref_reader reader;
    biref_mp_object object;
    int status;
    biref_reader_init(&reader, data, size);
    if ((status = biref_read(&reader, &object)) != BIREF_OK)
        return status;
    if (object.type != BIREF_MP_MAP)
        return BIREF_EPROTO;
    for (uint32_t i = 0; i < object.value.n; i++) {
        biref_mp_object name;
        if ((status = biref_read(&reader, &name)) != BIREF_OK)
            return status;
        if (biref_mp_str_equals(&name, key)) {
            *value = reader;
            return BIREF_OK;
        }
        if (name.type == BIREF_MP_ARRAY || name.type == BIREF_MP_MAP)
            return BIREF_EPROTO;   /* keys of biref headers are strings */
        if ((status = biref_skip(&reader)) != BIREF_OK)
            return status;
    }
    return BIREF_ENOTFOUND;
}
