/* Test driver of the msgpack codec in biref_msgpack.c (used by tests/test_bindings_c.py).
 *
 *     msgpack_check pack         writes the values of the table below, each packed, to stdout as
 *                                [uint32 little-endian length][bytes] records
 *     msgpack_check dump         reads one msgpack value from stdin, checks it whole (biref_skip),
 *                                and prints it as JSON (floats, bin, ext and maps tagged, below)
 *     msgpack_check find KEY     reads a map from stdin and dumps the value of KEY (biref_map_find)
 *     msgpack_check dump-many    reads [uint32 little-endian length][bytes] records from stdin and
 *                                prints one line per record: its dump, or "error <status>"
 *
 * Failures print "error <status>" (and exit 1, except in dump-many).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "biref.h"

static void emit(biref_buffer *b)
{
    uint8_t length[4];
    for (int i = 0; i < 4; i++)
        length[i] = (uint8_t)(b->size >> (8 * i));
    fwrite(length, 1, 4, stdout);
    fwrite(b->data, 1, b->size, stdout);
    biref_buffer_reset(b);
}

static void pack_text_of_length(biref_buffer *b, size_t n)
{
    char *s = malloc(n + 1);
    for (size_t i = 0; i < n; i++)
        s[i] = (char)('a' + i % 26);
    s[n] = '\0';
    biref_pack_str(b, s);
    free(s);
}

/* keep in step with PACKED in tests/test_bindings_c.py */
static int pack_all(void)
{
    static const int64_t ints[] = {0, 1, 127, 128, 255, 256, 65535, 65536, 4294967295LL, 4294967296LL, INT64_MAX,
                                   -1, -32, -33, -128, -129, -32768, -32769, INT32_MIN, (int64_t)INT32_MIN - 1,
                                   INT64_MIN};
    static const double doubles[] = {0.0, -0.0, 1.5, -2.25e-300, 5.32e-07, 1e308, 0.1};
    static const size_t lengths[] = {0, 1, 31, 32, 255, 256, 65535, 65536};
    static const uint32_t counts[] = {0, 15, 16, 65535, 65536};
    biref_buffer b;
    biref_buffer_init(&b);
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        biref_pack_int(&b, ints[i]);
        emit(&b);
    }
    biref_pack_uint(&b, UINT64_MAX);
    emit(&b);
    for (size_t i = 0; i < sizeof doubles / sizeof doubles[0]; i++) {
        biref_pack_double(&b, doubles[i]);
        emit(&b);
    }
    biref_pack_bool(&b, 1);
    emit(&b);
    biref_pack_bool(&b, 0);
    emit(&b);
    biref_pack_nil(&b);
    emit(&b);
    for (size_t i = 0; i < sizeof lengths / sizeof lengths[0]; i++) {
        pack_text_of_length(&b, lengths[i]);
        emit(&b);
    }
    biref_pack_str(&b, "\xc2\xb5m \xc3\x85ngstr\xc3\xb6m");   /* "µm Ångström" in UTF-8 */
    emit(&b);
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {   /* [0, 1, ..., n-1] mod 128 */
        biref_pack_array(&b, counts[i]);
        for (uint32_t k = 0; k < counts[i]; k++)
            biref_pack_uint(&b, k % 128);
        emit(&b);
    }
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {   /* {"k0": 0, "k1": -1, ...} */
        char key[16];
        biref_pack_map(&b, counts[i]);
        for (uint32_t k = 0; k < counts[i]; k++) {
            snprintf(key, sizeof key, "k%u", (unsigned)k);
            biref_pack_str(&b, key);
            biref_pack_int(&b, -(int64_t)k);
        }
        emit(&b);
    }
    biref_pack_map(&b, 2);   /* {"a": [1, [2.5, {"b": None}]], "c": True} */
    biref_pack_str(&b, "a");
    biref_pack_array(&b, 2);
    biref_pack_int(&b, 1);
    biref_pack_array(&b, 2);
    biref_pack_double(&b, 2.5);
    biref_pack_map(&b, 1);
    biref_pack_str(&b, "b");
    biref_pack_nil(&b);
    biref_pack_str(&b, "c");
    biref_pack_bool(&b, 1);
    emit(&b);
    if (biref_buffer_status(&b) != BIREF_OK)
        return 1;
    biref_buffer_free(&b);
    return 0;
}

static void print_bytes_hex(const biref_mp_object *o)
{
    for (uint32_t i = 0; i < o->value.bytes.length; i++)
        printf("%02x", (unsigned char)o->value.bytes.ptr[i]);
}

/* prints one value; the input was checked whole by biref_skip, so reads cannot fail here */
static void dump(biref_reader *r)
{
    biref_mp_object o;
    biref_read(r, &o);
    switch (o.type) {
    case BIREF_MP_NIL: printf("null"); break;
    case BIREF_MP_BOOL: printf(o.value.boolean ? "true" : "false"); break;
    case BIREF_MP_INT: printf("%" PRId64, o.value.i); break;
    case BIREF_MP_UINT: printf("%" PRIu64, o.value.u); break;
    case BIREF_MP_FLOAT: printf("{\"$float\": \"%.17g\"}", o.value.f); break;
    case BIREF_MP_STR:
        putchar('"');
        for (uint32_t i = 0; i < o.value.bytes.length; i++) {
            unsigned char c = (unsigned char)o.value.bytes.ptr[i];
            if (c == '"' || c == '\\')
                printf("\\%c", c);
            else if (c < 0x20)
                printf("\\u%04x", c);
            else
                putchar(c);   /* UTF-8 passes through */
        }
        putchar('"');
        break;
    case BIREF_MP_BIN: printf("{\"$bin\": \""); print_bytes_hex(&o); printf("\"}"); break;
    case BIREF_MP_EXT: printf("{\"$ext\": [%d, \"", o.ext_type); print_bytes_hex(&o); printf("\"]}"); break;
    case BIREF_MP_ARRAY:
        putchar('[');
        for (uint32_t i = 0; i < o.value.n; i++) {
            if (i)
                printf(", ");
            dump(r);
        }
        putchar(']');
        break;
    case BIREF_MP_MAP:
        printf("{\"$map\": [");
        for (uint32_t i = 0; i < o.value.n; i++) {
            printf(i ? ", [" : "[");
            dump(r);
            printf(", ");
            dump(r);
            putchar(']');
        }
        printf("]}");
        break;
    }
}

static int fail(int status)
{
    printf("error %d\n", status);
    return 1;
}

/* one whole value and nothing after it, dumped; else "error <status>" */
static int dump_one(const uint8_t *data, size_t size)
{
    biref_reader r, check;
    int status;
    biref_reader_init(&r, data, size);
    check = r;
    if ((status = biref_skip(&check)) != BIREF_OK)
        return fail(status);
    if (check.position != check.end)
        return fail(BIREF_EPROTO);   /* trailing bytes */
    dump(&r);
    putchar('\n');
    return 0;
}

static int dump_many(const uint8_t *data, size_t size)
{
    size_t i = 0;
    while (size - i >= 4) {
        size_t n = (size_t)data[i] | (size_t)data[i + 1] << 8 | (size_t)data[i + 2] << 16 | (size_t)data[i + 3] << 24;
        if (n > size - i - 4)
            return 2;
        /* a copy of exactly the record's size, so that reading past it is caught by memory checkers */
        uint8_t *record = malloc(n ? n : 1);
        memcpy(record, data + i + 4, n);
        dump_one(record, n);
        free(record);
        i += 4 + n;
    }
    return 0;
}

int main(int argc, char **argv)
{
    static uint8_t input[1 << 22];
    size_t size;
    biref_reader r;
    int status;
    if (argc == 2 && strcmp(argv[1], "pack") == 0)
        return pack_all();
    if (!((argc == 2 && (strcmp(argv[1], "dump") == 0 || strcmp(argv[1], "dump-many") == 0))
          || (argc == 3 && strcmp(argv[1], "find") == 0))) {
        fprintf(stderr, "usage: msgpack_check pack | dump | dump-many | find KEY\n");
        return 2;
    }
    size = fread(input, 1, sizeof input, stdin);
    if (strcmp(argv[1], "dump") == 0)
        return dump_one(input, size);
    if (strcmp(argv[1], "dump-many") == 0)
        return dump_many(input, size);
    if ((status = biref_map_find(input, size, argv[2], &r)) != BIREF_OK)
        return fail(status);
    {
        biref_reader check = r;
        if ((status = biref_skip(&check)) != BIREF_OK)
            return fail(status);
    }
    dump(&r);
    putchar('\n');
    return 0;
}
