/* biref/2 over libzmq: the producer (PUSH) and the subscriber (SUB). */
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

#include "biref_internal.h"

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
    if (payload != NULL && itemsize > 1 && !biref_host_is_little_endian()) {
        size_t nbytes = n_items * itemsize;
        if (nbytes > p->swap_size) {
            void *swap = realloc(p->swap, nbytes);
            if (swap == NULL)
                return BIREF_ENOMEM;
            p->swap = swap;
            p->swap_size = nbytes;
        }
        biref_copy_swapped(p->swap, payload, n_items, itemsize);
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

int biref_producer_start_flat(biref_producer *p, const char *acquisition_id, double wavelength_m,
                              double medium_index, double na_objective, double pixel_size_m, uint32_t n_views,
                              const double *illumination_sines, const double *reference_carriers,
                              const uint32_t *volume_shape, const double *voxel_size_m, uint32_t height,
                              uint32_t width, int32_t dtype, const void *background)
{
    biref_geometry g;
    biref_format format;
    if (reference_carriers == NULL || volume_shape == NULL || voxel_size_m == NULL)
        return BIREF_EINVAL;
    g.wavelength_m = wavelength_m;
    g.medium_index = medium_index;
    g.na_objective = na_objective;
    g.pixel_size_m = pixel_size_m;
    g.n_views = n_views;
    g.illumination_sines = illumination_sines;
    for (int i = 0; i < 4; i++)
        g.reference_carriers[i / 2][i % 2] = reference_carriers[i];
    for (int i = 0; i < 3; i++) {
        g.volume_shape[i] = volume_shape[i];
        g.voxel_size_m[i] = voxel_size_m[i];
    }
    format.height = height;
    format.width = width;
    format.dtype = (biref_dtype)dtype;
    return biref_producer_start(p, acquisition_id, &g, format, background);
}

int biref_producer_frame_flat(biref_producer *p, int32_t kind, const char *acquisition_id, int32_t polarization,
                              uint32_t view, uint32_t height, uint32_t width, int32_t dtype, const void *frame)
{
    biref_format format;
    if (kind != 0 && kind != 1)
        return BIREF_EINVAL;
    format.height = height;
    format.width = width;
    format.dtype = (biref_dtype)dtype;
    return send_frame(p, kind == 0 ? "background" : "view", acquisition_id, polarization, view, format, frame);
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
#define MAX_PARTS 6   /* topic, header, ne, no, director, uncertainty */

struct biref_subscriber {
    void *context;
    int own_context;
    void *socket;
    int subscribed[4];
    int64_t next_seq[4];   /* -1: none seen yet */
    uint64_t missed[4];
    uint64_t rejected;
};

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
            int i = biref_topic_index(*t, strlen(*t));
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
        if (s->subscribed[i] && zmq_setsockopt(s->socket, ZMQ_SUBSCRIBE, biref_topics[i], strlen(biref_topics[i])) != 0) {
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
    int i = topic ? biref_topic_index(topic, strlen(topic)) : -1;
    return i < 0 ? 0 : s->missed[i];
}

uint64_t biref_subscriber_rejected(const biref_subscriber *s)
{
    return s->rejected;
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
    result->consistency_score = NAN;   /* a timeout leaves "no score", not 0 */
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
        {
            const void *frames[MAX_PARTS];
            size_t sizes[MAX_PARTS];
            for (int i = 0; i < (n_parts < MAX_PARTS ? n_parts : MAX_PARTS); i++) {
                frames[i] = zmq_msg_data(&parts[i]);
                sizes[i] = zmq_msg_size(&parts[i]);
            }
            status = biref_result_decode(result, frames, sizes, n_parts);
        }
        for (int i = 0; i < (n_parts < MAX_PARTS ? n_parts : MAX_PARTS); i++)
            zmq_msg_close(&parts[i]);
        if (status == BIREF_ENOMEM)
            return status;
        if (status != BIREF_OK) {
            s->rejected++;
            continue;
        }
        topic = biref_topic_index(result->topic, strlen(result->topic));
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
