// Checks of biref.hpp that need no service (tests/test_bindings_cpp.py): errors become
// biref::error with the C status, a receive timeout is an empty optional, results move, and a
// result's views cover the library's buffers. Exit status 0 when all hold; prints what failed.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>

#include "biref.hpp"

static int failures = 0;
#define EXPECT(condition) ((condition) ? (void)0 : (void)(std::printf("FAILED: %s\n", #condition), failures++))

template <class F> static int status_of(F f)
{
    try {
        f();
    } catch (const biref::error &e) {
        return e.status();
    }
    return BIREF_OK;
}

int main(int argc, char **argv)
{
    static_assert(!std::is_copy_constructible_v<biref::result> && std::is_nothrow_move_constructible_v<biref::result>);
    static_assert(!std::is_copy_constructible_v<biref::producer> && !std::is_copy_constructible_v<biref::subscriber>);
    EXPECT(biref::version() == BIREF_VERSION_STRING);
    EXPECT(status_of([] { biref::producer p("not-an-endpoint"); }) == BIREF_EZMQ);
    EXPECT(status_of([] { biref::subscriber s("tcp://127.0.0.1:1", {"volumes"}); }) == BIREF_EINVAL);
    {
        biref::subscriber s("tcp://127.0.0.1:1");   // nothing listens there: nothing arrives
        EXPECT(!s.recv(10).has_value());
        biref::subscriber moved = std::move(s);
        EXPECT(moved.c_subscriber() != nullptr && s.c_subscriber() == nullptr);
    }
    {
        biref::producer p("tcp://127.0.0.1:1", 0);
        biref_format format{4, 4, BIREF_UINT16};
        unsigned short frame[16] = {0};
        EXPECT(status_of([&] { p.view("", 0, 0, format, frame); }) == BIREF_EINVAL);   // empty id
        EXPECT(status_of([&] { p.view("a", 2, 0, format, frame); }) == BIREF_EINVAL);  // polarization 2
        p.set_close_linger_ms(0);
    }
    if (argc == 2) {   // a volume message as frames in files: argv[1] = prefix of PREFIX.0 ... PREFIX.5
        std::string frames[6];
        const void *data[6];
        size_t sizes[6];
        int n = 0;
        for (int i = 0; i < 6; i++, n++) {
            std::FILE *f = std::fopen((std::string(argv[1]) + "." + std::to_string(i)).c_str(), "rb");
            if (!f)
                break;   // the uncertainty frame is optional
            for (int c; (c = std::fgetc(f)) != EOF;)
                frames[i].push_back(static_cast<char>(c));
            std::fclose(f);
            data[i] = frames[i].data();
            sizes[i] = frames[i].size();
        }
        biref::result fresh;
        EXPECT(std::isnan(fresh.consistency_score()) && !fresh.has_consistency() && fresh.uncertainty().empty());
        biref::result r;
        biref::check(biref_result_decode(r.c_result_out(), data, sizes, n), "decode");
        biref::result moved(std::move(r));
        EXPECT(!r.has_volume() && moved.has_volume() && std::isnan(r.consistency_score()));
        EXPECT(moved.ne().size() == moved.voxels() && moved.director().size() == 3 * moved.voxels());
        EXPECT(std::memcmp(moved.ne().data(), frames[2].data(), frames[2].size()) == 0);   // little-endian host
        EXPECT(std::memcmp(moved.director().data(), frames[4].data(), frames[4].size()) == 0);
        EXPECT(moved.topic() == "volume" && moved.acquisition_id() == "cpp-µ" && moved.complete());
        EXPECT(moved.header().size() == frames[1].size());
        if (n == 6) {
            EXPECT(moved.uncertainty().size() == 3 * moved.voxels());
            EXPECT(std::memcmp(moved.uncertainty().data(), frames[5].data(), frames[5].size()) == 0);
            EXPECT(moved.has_consistency() && moved.consistency_views() == 4);
            std::printf("consistency %.3f\n", moved.consistency_score());
        }
        std::printf("volume %ux%ux%u\n", moved.shape()[0], moved.shape()[1], moved.shape()[2]);
    }
    return failures != 0;
}
