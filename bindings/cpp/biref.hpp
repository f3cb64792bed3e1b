// biref.hpp - header-only C++17 wrapper of the biref/2 C binding (bindings/c/include/biref.h).
//
// RAII owners of the C objects (producer, subscriber, result: move-only, closed/freed by their
// destructors); failures throw biref::error (a std::runtime_error with the biref_status), except
// a receive timeout, which is an ordinary outcome: subscriber::recv returns an empty optional.
// A result's arrays are views (biref::floats) over the library's buffers, valid while the
// result lives. Link the C library: biref_c::biref_c (CMake) or `pkg-config --libs biref_c`.
#ifndef BIREF_HPP
#define BIREF_HPP

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "biref.h"

namespace biref {

class error : public std::runtime_error {
public:
    error(int status, const std::string &what)
        : std::runtime_error(what + ": " + biref_strerror(status)), status_(status) {}
    int status() const noexcept { return status_; }   // a biref_status

private:
    int status_;
};

inline void check(int status, const char *what)
{
    if (status != BIREF_OK)
        throw error(status, what);
}

// the library loaded at run time; BIREF_VERSION_STRING is the header's
inline std::string_view version() { return biref_version(); }

// a read-only view of contiguous floats (std::span is C++20)
class floats {
public:
    floats() = default;
    floats(const float *data, std::size_t size) : data_(data), size_(size) {}
    const float *data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }
    bool empty() const noexcept { return size_ == 0; }
    const float *begin() const noexcept { return data_; }
    const float *end() const noexcept { return data_ + size_; }
    float operator[](std::size_t i) const noexcept { return data_[i]; }

private:
    const float *data_ = nullptr;
    std::size_t size_ = 0;
};

// one received result; owns the library's buffers
class result {
public:
    result() { reset_fields(); }
    ~result() { biref_result_free(&r_); }
    result(result &&other) noexcept : r_(other.r_) { other.reset_fields(); }
    result &operator=(result &&other) noexcept
    {
        if (this != &other) {
            biref_result_free(&r_);
            r_ = other.r_;
            other.reset_fields();
        }
        return *this;
    }
    result(const result &) = delete;
    result &operator=(const result &) = delete;

    std::string_view topic() const noexcept { return r_.topic; }
    std::int64_t seq() const noexcept { return r_.seq; }
    std::string_view acquisition_id() const noexcept { return r_.acquisition_id; }
    std::string_view engine() const noexcept { return r_.engine; }
    bool complete() const noexcept { return r_.complete != 0; }
    std::int64_t views_used() const noexcept { return r_.views_used; }
    std::int64_t views_expected() const noexcept { return r_.views_expected; }
    double latency_s() const noexcept { return r_.latency_s; }
    std::string_view reason() const noexcept { return r_.reason; }
    std::string_view detail() const noexcept { return r_.detail; }
    bool fatal() const noexcept { return r_.fatal != 0; }

    bool has_volume() const noexcept { return r_.ne != nullptr; }
    std::array<std::uint32_t, 3> shape() const noexcept { return {r_.shape[0], r_.shape[1], r_.shape[2]}; }   // Z, Y, X
    std::size_t voxels() const noexcept
    {
        return has_volume() ? std::size_t(r_.shape[0]) * r_.shape[1] * r_.shape[2] : 0;
    }
    floats ne() const noexcept { return {r_.ne, voxels()}; }                  // [Z][Y][X]
    floats no() const noexcept { return {r_.no, voxels()}; }                  // [Z][Y][X]
    floats director() const noexcept { return {r_.director, 3 * voxels()}; }  // [3][Z][Y][X]
    // [3][Z][Y][X]: sigma n_e, sigma n_o, director spread (rad); empty when the engine gives none
    floats uncertainty() const noexcept { return {r_.uncertainty, r_.uncertainty ? 3 * voxels() : 0}; }
    // the consistency score: the median relative residual of the re-simulated fields over the
    // checked views (lower is better); NaN when the service does not run the check
    double consistency_score() const noexcept { return r_.consistency_score; }
    std::int64_t consistency_views() const noexcept { return r_.consistency_views; }
    bool has_consistency() const noexcept { return r_.consistency_views > 0; }
    // the whole header as msgpack bytes (read other keys with msgpack-c)
    std::string_view header() const noexcept
    {
        return {reinterpret_cast<const char *>(r_.header), r_.header_size};
    }

    const biref_result &c_result() const noexcept { return r_; }
    biref_result *c_result_out() noexcept   // for biref_subscriber_recv / biref_result_decode
    {
        biref_result_free(&r_);
        return &r_;
    }

private:
    void reset_fields() noexcept
    {
        r_ = biref_result{};
        r_.consistency_score = std::numeric_limits<double>::quiet_NaN();
    }
    biref_result r_;
};

class producer {
public:
    // send_timeout_ms: how long a send may block under back-pressure (-1: no limit)
    explicit producer(const std::string &endpoint, int send_timeout_ms = 30000, void *zmq_context = nullptr)
    {
        check(biref_producer_open(&p_, zmq_context, endpoint.c_str(), send_timeout_ms), "biref producer open");
    }
    ~producer() { biref_producer_close(p_, linger_ms_); }
    producer(producer &&other) noexcept : p_(std::exchange(other.p_, nullptr)), linger_ms_(other.linger_ms_) {}
    producer &operator=(producer &&other) noexcept
    {
        if (this != &other) {
            biref_producer_close(p_, linger_ms_);
            p_ = std::exchange(other.p_, nullptr);
            linger_ms_ = other.linger_ms_;
        }
        return *this;
    }
    producer(const producer &) = delete;
    producer &operator=(const producer &) = delete;

    // how long the destructor waits for queued messages to be delivered (-1: until delivered)
    void set_close_linger_ms(int linger_ms) noexcept { linger_ms_ = linger_ms; }

    // background: [2][V][H][W] inline, or nullptr to send background frames
    void start(const std::string &acquisition_id, const biref_geometry &geometry, biref_format format,
               const void *background = nullptr)
    {
        check(biref_producer_start(p_, acquisition_id.c_str(), &geometry, format, background), "biref start");
    }
    void background(const std::string &acquisition_id, int polarization, std::uint32_t view, biref_format format,
                    const void *frame)
    {
        check(biref_producer_background(p_, acquisition_id.c_str(), polarization, view, format, frame),
              "biref background");
    }
    // frame [H][W] in host byte order; copied before the call returns
    void view(const std::string &acquisition_id, int polarization, std::uint32_t view, biref_format format,
              const void *frame)
    {
        check(biref_producer_view(p_, acquisition_id.c_str(), polarization, view, format, frame), "biref view");
    }
    void stop(const std::string &acquisition_id)
    {
        check(biref_producer_stop(p_, acquisition_id.c_str()), "biref stop");
    }

    biref_producer *c_producer() const noexcept { return p_; }

private:
    biref_producer *p_ = nullptr;
    int linger_ms_ = 30000;
};

class subscriber {
public:
    // topics: any of "volume", "preview", "error", "status"; empty for all four
    explicit subscriber(const std::string &endpoint, const std::vector<std::string> &topics = {},
                        void *zmq_context = nullptr)
    {
        std::vector<const char *> names;
        for (const auto &topic : topics)
            names.push_back(topic.c_str());
        names.push_back(nullptr);
        check(biref_subscriber_open(&s_, zmq_context, endpoint.c_str(), topics.empty() ? nullptr : names.data()),
              "biref subscriber open");
    }
    ~subscriber() { biref_subscriber_close(s_); }
    subscriber(subscriber &&other) noexcept : s_(std::exchange(other.s_, nullptr)) {}
    subscriber &operator=(subscriber &&other) noexcept
    {
        if (this != &other) {
            biref_subscriber_close(s_);
            s_ = std::exchange(other.s_, nullptr);
        }
        return *this;
    }
    subscriber(const subscriber &) = delete;
    subscriber &operator=(const subscriber &) = delete;

    // wait for a status heartbeat: from then on the subscription is live
    void wait_ready(int timeout_ms) { check(biref_subscriber_wait_ready(s_, timeout_ms), "biref wait_ready"); }

    // the next result, or nothing after timeout_ms (-1: no limit)
    std::optional<result> recv(int timeout_ms)
    {
        result r;
        int status = biref_subscriber_recv(s_, r.c_result_out(), timeout_ms);
        if (status == BIREF_ETIMEOUT)
            return std::nullopt;
        check(status, "biref recv");
        return r;
    }

    std::uint64_t missed(const std::string &topic) const { return biref_subscriber_missed(s_, topic.c_str()); }
    std::uint64_t rejected() const { return biref_subscriber_rejected(s_); }
    biref_subscriber *c_subscriber() const noexcept { return s_; }

private:
    biref_subscriber *s_ = nullptr;
};

}   // namespace biref

#endif   // BIREF_HPP
