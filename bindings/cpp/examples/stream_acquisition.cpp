// Stream one acquisition to `biref serve` from C++ and wait for its volume (the C++ wrapper's
// counterpart of bindings/c/examples/stream_acquisition.c, same input and output files).
//
//     stream_acquisition_cpp DIR --ingest ENDPOINT --results ENDPOINT [--id ID] [--timeout SECONDS]
//                            [--out PREFIX]
//
// DIR is what bindings/c/examples/export_raw.py writes: acquisition.txt ("name value ..." lines),
// holograms.raw and background.raw ([2][V][H][W], little-endian; this example assumes a
// little-endian host). --out PREFIX writes PREFIX_ne.raw, PREFIX_no.raw, PREFIX_director.raw.
// Exit status: 0 volume received, 1 bad input or a library error, 2 a fatal error for this
// acquisition, 3 no volume within the timeout.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "biref.hpp"

namespace {

std::map<std::string, std::vector<std::string>> read_manifest(const std::string &path)
{
    std::ifstream file(path);
    if (!file)
        throw std::runtime_error("cannot read " + path);
    std::map<std::string, std::vector<std::string>> entries;
    for (std::string line; std::getline(file, line);) {
        std::istringstream words(line);
        std::string name;
        if (!(words >> name) || name[0] == '#')
            continue;
        for (std::string value; words >> value;)
            entries[name].push_back(value);
    }
    return entries;
}

std::vector<double> numbers(const std::map<std::string, std::vector<std::string>> &m, const std::string &name,
                            std::size_t count)
{
    auto found = m.find(name);
    if (found == m.end() || found->second.size() != count)
        throw std::runtime_error("acquisition.txt: " + name + " needs " + std::to_string(count) + " values");
    std::vector<double> values;
    for (const auto &text : found->second)
        values.push_back(std::stod(text));
    return values;
}

std::vector<char> read_file(const std::string &path, std::size_t size)
{
    std::vector<char> data(size);
    std::ifstream file(path, std::ios::binary);
    if (!file.read(data.data(), static_cast<std::streamsize>(size)))
        throw std::runtime_error("cannot read " + std::to_string(size) + " bytes from " + path);
    return data;
}

void write_floats(const std::string &path, biref::floats values)
{
    std::ofstream file(path, std::ios::binary);
    file.write(reinterpret_cast<const char *>(values.data()), static_cast<std::streamsize>(values.size() * 4));
    if (!file)
        throw std::runtime_error("cannot write " + path);
}

}   // namespace

int main(int argc, char **argv)
{
    if (argc < 2) {
        std::cerr << "usage: stream_acquisition_cpp DIR --ingest ENDPOINT --results ENDPOINT [--id ID] "
                     "[--timeout SECONDS] [--out PREFIX]\n";
        return 1;
    }
    std::map<std::string, std::string> options{{"--ingest", "tcp://127.0.0.1:5555"},
                                               {"--results", "tcp://127.0.0.1:5556"},
                                               {"--id", "sample-1"}, {"--timeout", "60"}, {"--out", ""}};
    for (int i = 2; i + 1 < argc; i += 2)
        options[argv[i]] = argv[i + 1];
    const std::string dir = argv[1], id = options["--id"];
    const int timeout_ms = static_cast<int>(std::stod(options["--timeout"]) * 1000);
    try {
        auto m = read_manifest(dir + "/acquisition.txt");
        const auto hw = numbers(m, "hologram_shape", 2);
        const auto n_views = static_cast<std::uint32_t>(numbers(m, "n_views", 1)[0]);
        const auto sines = numbers(m, "illumination_sines", 2 * n_views);
        const auto carriers = numbers(m, "reference_carriers", 4);
        const auto shape = numbers(m, "volume_shape", 3), voxel = numbers(m, "voxel_size_m", 3);
        const std::string dtype = m["dtype"].empty() ? "" : m["dtype"][0];
        biref_format format{static_cast<std::uint32_t>(hw[0]), static_cast<std::uint32_t>(hw[1]),
                            dtype == "uint8" ? BIREF_UINT8 : dtype == "float32" ? BIREF_FLOAT32 : BIREF_UINT16};
        if (biref_dtype_name(format.dtype) != dtype)
            throw std::runtime_error("acquisition.txt: dtype " + dtype + " cannot travel in the biref protocol");
        biref_geometry g{};
        g.wavelength_m = numbers(m, "wavelength_m", 1)[0];
        g.medium_index = numbers(m, "medium_index", 1)[0];
        g.na_objective = numbers(m, "na_objective", 1)[0];
        g.pixel_size_m = numbers(m, "pixel_size_m", 1)[0];
        g.n_views = n_views;
        g.illumination_sines = sines.data();
        for (int i = 0; i < 4; i++)
            g.reference_carriers[i / 2][i % 2] = carriers[i];
        for (int i = 0; i < 3; i++) {
            g.volume_shape[i] = static_cast<std::uint32_t>(shape[i]);
            g.voxel_size_m[i] = voxel[i];
        }
        const std::size_t frame_bytes = std::size_t(format.height) * format.width * biref_dtype_size(format.dtype);
        const auto background = read_file(dir + "/background.raw", 2 * n_views * frame_bytes);
        const auto holograms = read_file(dir + "/holograms.raw", 2 * n_views * frame_bytes);

        biref::subscriber results(options["--results"], {"volume", "error"});
        results.wait_ready(timeout_ms);
        biref::producer ingest(options["--ingest"], timeout_ms);
        ingest.start(id, g, format, background.data());
        for (int p = 0; p < 2; p++)
            for (std::uint32_t v = 0; v < n_views; v++)   // a camera callback would call view() here
                ingest.view(id, p, v, format, holograms.data() + (p * n_views + v) * frame_bytes);
        ingest.stop(id);
        std::cout << "sent " << id << ": " << 2 * n_views << " views" << std::endl;

        while (auto r = results.recv(timeout_ms)) {
            if (r->acquisition_id() != id)
                continue;
            if (r->topic() == "error") {
                std::cerr << "error " << r->reason() << (r->fatal() ? " (fatal)" : "") << ": " << r->detail() << "\n";
                if (r->fatal())
                    return 2;
                continue;
            }
            const auto s = r->shape();
            std::cout << "volume " << id << ": complete " << r->complete() << ", " << r->views_used() << "/"
                      << r->views_expected() << " views, " << s[0] << "x" << s[1] << "x" << s[2] << ", engine "
                      << r->engine() << std::endl;
            if (r->has_consistency())
                std::cout << "consistency " << r->consistency_score() << " over " << r->consistency_views()
                          << " views" << std::endl;
            if (!options["--out"].empty()) {
                write_floats(options["--out"] + "_ne.raw", r->ne());
                write_floats(options["--out"] + "_no.raw", r->no());
                write_floats(options["--out"] + "_director.raw", r->director());
                if (!r->uncertainty().empty())
                    write_floats(options["--out"] + "_uncertainty.raw", r->uncertainty());
            }
            return 0;
        }
        std::cerr << "no volume for " << id << " within " << options["--timeout"] << " s\n";
        return 3;
    } catch (const std::exception &e) {
        std::cerr << e.what() << "\n";
        return 1;
    }
}
