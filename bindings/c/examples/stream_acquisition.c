/* Stream one acquisition to `biref serve` from C and wait for its volume.
 *
 *     stream_acquisition DIR [--ingest ENDPOINT] [--results ENDPOINT|none] [--id ID]
 *                            [--background inline|messages] [--timeout SECONDS] [--out PREFIX]
 *
 * DIR holds acquisition.txt (the geometry and frame format, one "name value ..." line each) and
 * holograms.raw / background.raw ([2][V][H][W] little-endian frames), as export_raw.py writes them
 * from an acquisition file. The frame loop below is where a camera's callback would go.
 *
 * Exit status: 0 volume received (or sent, with --results none), 1 bad input or a send failed,
 * 2 the service reported a fatal error for this acquisition, 3 no volume within the timeout.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "biref.h"

typedef struct {
    biref_geometry geometry;
    biref_format format;
    double *sines;
} manifest;

static int host_is_little_endian(void)
{
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

/* the files are little-endian; the API takes host byte order */
static void little_endian_to_host(void *data, size_t n, size_t itemsize)
{
    uint8_t *bytes = (uint8_t *)data;
    if (host_is_little_endian())
        return;
    for (size_t i = 0; i < n; i++)
        for (size_t b = 0; b < itemsize / 2; b++) {
            uint8_t t = bytes[i * itemsize + b];
            bytes[i * itemsize + b] = bytes[i * itemsize + itemsize - 1 - b];
            bytes[i * itemsize + itemsize - 1 - b] = t;
        }
}

static int read_numbers(FILE *f, double *out, int n)
{
    for (int i = 0; i < n; i++)
        if (fscanf(f, "%lf", &out[i]) != 1)
            return 0;
    return 1;
}

static const char *const ENTRIES[] = {"dtype", "hologram_shape", "n_views", "wavelength_m", "medium_index",
                                      "na_objective", "pixel_size_m", "illumination_sines", "reference_carriers",
                                      "volume_shape", "voxel_size_m"};
#define N_ENTRIES (sizeof ENTRIES / sizeof ENTRIES[0])

/* one entry's values; `entry` indexes ENTRIES */
static int read_entry(FILE *f, size_t entry, manifest *m)
{
    biref_geometry *g = &m->geometry;
    double v[3];
    char dtype[16];
    switch (entry) {
    case 0:
        if (fscanf(f, "%15s", dtype) != 1)
            return 0;
        m->format.dtype = strcmp(dtype, "uint8") == 0 ? BIREF_UINT8
                        : strcmp(dtype, "float32") == 0 ? BIREF_FLOAT32 : BIREF_UINT16;
        return strcmp(biref_dtype_name(m->format.dtype), dtype) == 0;
    case 1:
        if (!read_numbers(f, v, 2) || v[0] < 1 || v[1] < 1 || v[0] > BIREF_MAX_SIDE || v[1] > BIREF_MAX_SIDE)
            return 0;
        m->format.height = (uint32_t)v[0];
        m->format.width = (uint32_t)v[1];
        return 1;
    case 2:
        if (!read_numbers(f, v, 1) || v[0] < 1 || v[0] > BIREF_MAX_VIEWS)
            return 0;
        g->n_views = (uint32_t)v[0];
        return 1;
    case 3: return read_numbers(f, &g->wavelength_m, 1);
    case 4: return read_numbers(f, &g->medium_index, 1);
    case 5: return read_numbers(f, &g->na_objective, 1);
    case 6: return read_numbers(f, &g->pixel_size_m, 1);
    case 7:   /* needs n_views, which comes first */
        if (g->n_views == 0 || (m->sines = malloc(2 * g->n_views * sizeof(double))) == NULL)
            return 0;
        g->illumination_sines = m->sines;
        return read_numbers(f, m->sines, 2 * (int)g->n_views);
    case 8: return read_numbers(f, &g->reference_carriers[0][0], 4);
    case 9:
        if (!read_numbers(f, v, 3))
            return 0;
        for (int i = 0; i < 3; i++)
            g->volume_shape[i] = v[i] >= 1 && v[i] <= BIREF_MAX_VOLUME_VOXELS ? (uint32_t)v[i] : 0;
        return 1;
    default: return read_numbers(f, g->voxel_size_m, 3);
    }
}

/* acquisition.txt: "name value ..." per line, each name once; '#' starts a comment line */
static int read_manifest(const char *path, manifest *m)
{
    char name[64];
    int seen[N_ENTRIES] = {0};
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        perror(path);
        return 0;
    }
    memset(m, 0, sizeof *m);
    while (fscanf(f, "%63s", name) == 1) {
        size_t entry = 0;
        if (name[0] == '#') {
            int c;
            while ((c = fgetc(f)) != EOF && c != '\n')
                ;
            continue;
        }
        while (entry < N_ENTRIES && strcmp(name, ENTRIES[entry]) != 0)
            entry++;
        if (entry == N_ENTRIES || seen[entry]++ || !read_entry(f, entry, m)) {
            fprintf(stderr, "%s: %s %s\n", path, entry == N_ENTRIES ? "unknown entry" : seen[entry] > 1
                    ? "repeated entry" : "bad value for", name);
            fclose(f);
            return 0;
        }
    }
    fclose(f);
    for (size_t i = 0; i < N_ENTRIES; i++)
        if (!seen[i]) {
            fprintf(stderr, "%s: no %s\n", path, ENTRIES[i]);
            return 0;
        }
    return 1;
}

static int write_floats(const char *prefix, const char *name, const float *data, size_t n)
{
    char path[1024];
    FILE *f;
    size_t written;
    float *copy = malloc(n * sizeof(float));
    if (copy == NULL)
        return 0;
    memcpy(copy, data, n * sizeof(float));
    little_endian_to_host(copy, n, sizeof(float));   /* the same swap turns host order into little-endian */
    snprintf(path, sizeof path, "%s_%s.raw", prefix, name);
    if ((f = fopen(path, "wb")) == NULL) {
        perror(path);
        free(copy);
        return 0;
    }
    written = fwrite(copy, sizeof(float), n, f);
    free(copy);
    return fclose(f) == 0 && written == n;
}

static void usage(void)
{
    fprintf(stderr, "usage: stream_acquisition DIR [--ingest ENDPOINT] [--results ENDPOINT|none] [--id ID]\n"
                    "       [--background inline|messages] [--timeout SECONDS] [--out PREFIX]\n");
}

int main(int argc, char **argv)
{
    const char *dir = NULL, *ingest = "tcp://127.0.0.1:5555", *results = "tcp://127.0.0.1:5556";
    const char *id = "c-acquisition", *background_mode = "inline", *out = NULL;
    double timeout_s = 60.0;
    char path[1024];
    manifest m;
    biref_format format;
    size_t frame_bytes, frame_pixels;
    uint8_t *frame = NULL, *background = NULL;
    FILE *holograms = NULL, *backgrounds = NULL;
    void *context = NULL;
    biref_producer *producer = NULL;
    biref_subscriber *subscriber = NULL;
    int status, exit_code = 1, timeout_ms;

    for (int i = 1; i < argc; i++) {
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (argv[i][0] != '-' && dir == NULL) {
            dir = argv[i];
            continue;
        }
        if (value == NULL) {
            usage();
            return 1;
        }
        if (strcmp(argv[i], "--ingest") == 0) ingest = value;
        else if (strcmp(argv[i], "--results") == 0) results = value;
        else if (strcmp(argv[i], "--id") == 0) id = value;
        else if (strcmp(argv[i], "--background") == 0) background_mode = value;
        else if (strcmp(argv[i], "--timeout") == 0) timeout_s = atof(value);
        else if (strcmp(argv[i], "--out") == 0) out = value;
        else {
            usage();
            return 1;
        }
        i++;
    }
    if (dir == NULL || (strcmp(background_mode, "inline") != 0 && strcmp(background_mode, "messages") != 0)
        || timeout_s <= 0) {
        usage();
        return 1;
    }
    timeout_ms = (int)(timeout_s * 1000);
    snprintf(path, sizeof path, "%s/acquisition.txt", dir);
    if (!read_manifest(path, &m))
        return 1;
    format = m.format;
    frame_pixels = (size_t)format.height * format.width;
    frame_bytes = frame_pixels * biref_dtype_size(format.dtype);

    snprintf(path, sizeof path, "%s/holograms.raw", dir);
    if ((holograms = fopen(path, "rb")) == NULL) {
        perror(path);
        goto done;
    }
    snprintf(path, sizeof path, "%s/background.raw", dir);
    if ((backgrounds = fopen(path, "rb")) == NULL) {
        perror(path);
        goto done;
    }
    if ((frame = malloc(frame_bytes)) == NULL)
        goto done;

    /* one context for both sockets: closing the producer then still delivers what it queued */
    if ((context = zmq_ctx_new()) == NULL)
        goto done;
    if (strcmp(results, "none") != 0) {
        const char *const topics[] = {"volume", "error", NULL};
        if ((status = biref_subscriber_open(&subscriber, context, results, topics)) != BIREF_OK
            || (status = biref_subscriber_wait_ready(subscriber, timeout_ms)) != BIREF_OK) {
            fprintf(stderr, "no status from %s: %s (is `biref serve` running?)\n", results, biref_strerror(status));
            exit_code = 3;
            goto done;
        }
    }
    if ((status = biref_producer_open(&producer, context, ingest, timeout_ms)) != BIREF_OK) {
        fprintf(stderr, "cannot connect to %s: %s\n", ingest, biref_strerror(status));
        goto done;
    }

    if (strcmp(background_mode, "inline") == 0) {
        size_t n = 2 * (size_t)m.geometry.n_views * frame_pixels;
        if ((background = malloc(n * biref_dtype_size(format.dtype))) == NULL
            || fread(background, biref_dtype_size(format.dtype), n, backgrounds) != n) {
            fprintf(stderr, "%s/background.raw: too short\n", dir);
            goto done;
        }
        little_endian_to_host(background, n, biref_dtype_size(format.dtype));
    }
    if ((status = biref_producer_start(producer, id, &m.geometry, format, background)) != BIREF_OK) {
        fprintf(stderr, "start %s: %s\n", id, biref_strerror(status));
        goto done;
    }
    for (int kind = background == NULL ? 0 : 1; kind < 2; kind++) {   /* 0: background frames, 1: views */
        FILE *source = kind == 0 ? backgrounds : holograms;
        for (int p = 0; p < 2; p++)
            for (uint32_t v = 0; v < m.geometry.n_views; v++) {
                if (fread(frame, 1, frame_bytes, source) != frame_bytes) {
                    fprintf(stderr, "%s: too short at frame (%d, %u)\n", kind ? "holograms.raw" : "background.raw",
                            p, (unsigned)v);
                    goto done;
                }
                little_endian_to_host(frame, frame_pixels, biref_dtype_size(format.dtype));
                status = kind == 0 ? biref_producer_background(producer, id, p, v, format, frame)
                                   : biref_producer_view(producer, id, p, v, format, frame);
                if (status != BIREF_OK) {
                    fprintf(stderr, "%s (%d, %u): %s\n", kind ? "view" : "background", p, (unsigned)v,
                            biref_strerror(status));
                    goto done;
                }
            }
    }
    if ((status = biref_producer_stop(producer, id)) != BIREF_OK) {
        fprintf(stderr, "stop %s: %s\n", id, biref_strerror(status));
        goto done;
    }
    printf("sent %s: %u views\n", id, 2 * (unsigned)m.geometry.n_views);
    fflush(stdout);
    exit_code = 0;

    while (subscriber != NULL) {
        biref_result r;
        status = biref_subscriber_recv(subscriber, &r, timeout_ms);
        if (status != BIREF_OK) {
            fprintf(stderr, "no volume for %s: %s\n", id, biref_strerror(status));
            exit_code = 3;
            break;
        }
        if (strcmp(r.acquisition_id, id) != 0) {
            biref_result_free(&r);
            continue;
        }
        if (strcmp(r.topic, "error") == 0) {
            fprintf(stderr, "error %s%s: %s\n", r.reason, r.fatal ? " (fatal)" : "", r.detail);
            if (r.fatal) {
                exit_code = 2;
                biref_result_free(&r);
                break;
            }
        } else {
            size_t voxels = (size_t)r.shape[0] * r.shape[1] * r.shape[2];
            printf("volume %s: complete %d, %lld/%lld views, %ux%ux%u, engine %s, %.1f ms after the last view\n",
                   r.acquisition_id, r.complete, (long long)r.views_used, (long long)r.views_expected,
                   (unsigned)r.shape[0], (unsigned)r.shape[1], (unsigned)r.shape[2], r.engine, r.latency_s * 1e3);
            if (r.consistency_views > 0)
                printf("consistency %.4f over %lld views\n", r.consistency_score, (long long)r.consistency_views);
            if (out != NULL && !(write_floats(out, "ne", r.ne, voxels) && write_floats(out, "no", r.no, voxels)
                                 && write_floats(out, "director", r.director, 3 * voxels)
                                 && (r.uncertainty == NULL || write_floats(out, "uncertainty", r.uncertainty, 3 * voxels))))
                exit_code = 1;
            biref_result_free(&r);
            break;
        }
        biref_result_free(&r);
    }

done:
    biref_producer_close(producer, timeout_ms);   /* with the shared context: delivery continues */
    biref_subscriber_close(subscriber);
    if (context != NULL)
        zmq_ctx_term(context);                    /* waits until the queued messages are delivered */
    if (holograms != NULL)
        fclose(holograms);
    if (backgrounds != NULL)
        fclose(backgrounds);
    free(frame);
    free(background);
    free(m.sines);
    return exit_code;
}
