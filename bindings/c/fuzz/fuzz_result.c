/* libFuzzer target: the subscriber's decoding of result messages (biref_result_decode), the
 * untrusted input of every subscriber, and the flat accessors over what it decoded.
 *
 *     clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
 *         -Ibindings/c/include bindings/c/fuzz/fuzz_result.c bindings/c/src/biref_result.c \
 *         bindings/c/src/biref_encode.c $(pkg-config --cflags --libs msgpack) -o fuzz_result
 *     ./fuzz_result -max_total_time=60 CORPUS_DIR
 *
 * Input: byte 0 picks the number of frames (1-6); each frame but the last is a 2-byte
 * little-endian length and its bytes; the last frame is the rest (tests/test_bindings_fuzz.py
 * writes real messages in this form as the seed corpus). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "biref.h"

#define MAX_FRAMES 6   /* topic, header, ne, no, director, uncertainty (biref/2) */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const void *frames[MAX_FRAMES];
    size_t sizes[MAX_FRAMES];
    int n_frames;
    biref_result result;
    if (size < 1)
        return 0;
    n_frames = 1 + data[0] % MAX_FRAMES;
    data++;
    size--;
    for (int i = 0; i < n_frames - 1; i++) {
        size_t length;
        if (size < 2)
            return 0;
        length = (size_t)data[0] | (size_t)data[1] << 8;
        data += 2;
        size -= 2;
        if (length > size)
            return 0;
        frames[i] = data;
        sizes[i] = length;
        data += length;
        size -= length;
    }
    frames[n_frames - 1] = data;
    sizes[n_frames - 1] = size;
    if (biref_result_decode(&result, frames, sizes, n_frames) == BIREF_OK) {
        char text[64];
        int64_t seq, used, expected, views;
        int32_t complete, fatal;
        double latency_s, score;
        uint32_t shape[3];
        static const char *const fields[] = {"topic", "acquisition_id", "engine", "reason", "detail"};
        for (int i = 0; i < 5; i++)
            if (biref_result_text(&result, fields[i], text, sizeof text) != BIREF_OK || strlen(text) >= sizeof text)
                abort();
        biref_result_numbers(&result, &seq, &complete, &used, &expected, &latency_s, &fatal, shape);
        if (biref_result_consistency(&result, &score, &views) != BIREF_OK || views < 0
            || (result.ne == NULL && (views != 0 || !isnan(score))))   /* a check only comes with a volume */
            abort();
        if (result.ne != NULL) {
            uint64_t voxels = (uint64_t)shape[0] * shape[1] * shape[2];
            float *copy = malloc(8 * voxels * sizeof(float));   /* ne, no, director, uncertainty */
            int uncertainty = copy != NULL ? biref_result_copy_uncertainty(&result, copy + 5 * voxels, voxels)
                                           : BIREF_ENOMEM;
            if (copy != NULL && (biref_result_copy_volume(&result, copy, copy + voxels, copy + 2 * voxels, voxels)
                                     != BIREF_OK
                                 || uncertainty != (result.uncertainty != NULL ? BIREF_OK : BIREF_ENOTFOUND)))
                abort();
            free(copy);
        } else if (result.uncertainty != NULL) {
            abort();
        }
        biref_result_free(&result);
    }
    return 0;
}
