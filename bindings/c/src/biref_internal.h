/* Internal to the library (not installed): what its source files share. */
#ifndef BIREF_INTERNAL_H
#define BIREF_INTERNAL_H

#include "biref.h"

#define BIREF_N_TOPICS 4
extern const char *const biref_topics[BIREF_N_TOPICS];   /* volume, preview, error, status */

int biref_topic_index(const char *topic, size_t length);   /* -1 if not a topic */
int biref_host_is_little_endian(void);
/* copy n items of `itemsize` bytes, reversing each one's bytes (host order <-> little-endian on a
   big-endian host) */
void biref_copy_swapped(void *out, const void *in, size_t n, size_t itemsize);

#endif
