// NVRTC and the compiled kernels' folder: see nvrtc.h.
#include "mlx-embed/src/mlx/nvrtc.h"

#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <type_traits>

#include "mlx/version.h"

namespace mlx_embed::nvrtc {

namespace fs = std::filesystem;

namespace {

// The functions looked up in `handle` (RTLD_DEFAULT: the process), or nullptr where one is missing.
const Library* resolve(void* handle) {
  auto* lib = new Library;
  bool found = true;
  auto get = [&](auto& fn, const char* symbol) {
    void* p = dlsym(handle, symbol);
    found = found && p != nullptr;
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
  };
  get(lib->create, "nvrtcCreateProgram");
  get(lib->compile, "nvrtcCompileProgram");
  get(lib->log_size, "nvrtcGetProgramLogSize");
  get(lib->log, "nvrtcGetProgramLog");
  get(lib->cubin_size, "nvrtcGetCUBINSize");
  get(lib->cubin, "nvrtcGetCUBIN");
  get(lib->destroy, "nvrtcDestroyProgram");
  get(lib->version, "nvrtcVersion");
  if (!found) {
    delete lib;
    return nullptr;
  }
  return lib;  // kept for the process's life, as the library is
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%llx", (unsigned long long)v);
  return buf;
}

// FNV-1a over `parts`, each followed by a zero byte.
uint64_t fnv1a(std::initializer_list<const std::string*> parts) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const auto* p : parts) {
    for (unsigned char c : *p) h = (h ^ c) * 0x100000001b3ull;
    h *= 0x100000001b3ull;
  }
  return h;
}

// Writes `data` to `path` through a temporary file renamed over it.
void write_file(const fs::path& path, const std::string& data) {
  static std::atomic<unsigned> serial{0};
  const fs::path tmp = path.string() + ".tmp." + std::to_string(getpid()) + "." + std::to_string(serial++);
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(data.data(), (std::streamsize)data.size());
    out.close();
    if (!out) {
      std::error_code ignored;
      fs::remove(tmp, ignored);
      throw fs::filesystem_error("cannot write", tmp, std::make_error_code(std::errc::io_error));
    }
  }
  fs::rename(tmp, path);
}

}  // namespace

const Library* loaded() {
  static const Library* lib = resolve(RTLD_DEFAULT);
  return lib;
}

const Library* open(const std::string& path) {
  static std::mutex mutex;
  static std::map<std::string, const Library*> opened;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = opened.find(path); it != opened.end()) return it->second;
  const fs::path lib_path(path);
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(lib_path.parent_path(), ec)) {
    if (entry.path().filename().string().rfind("libnvrtc-builtins.so", 0) == 0) {
      dlopen(entry.path().c_str(), RTLD_NOW | RTLD_GLOBAL);
    }
  }
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (!handle) throw std::runtime_error("cannot load NVRTC from " + path + ": " + dlerror());
  const Library* lib = resolve(handle);
  if (!lib) throw std::runtime_error(path + " lacks NVRTC's functions");
  opened.emplace(path, lib);
  return lib;
}

std::string compile(const Library& nvrtc, const std::string& source, const std::string& arch) {
  Library::Program prog = nullptr;
  if (nvrtc.create(&prog, source.c_str(), "kernel.cu", 0, nullptr, nullptr) != 0) {
    throw std::runtime_error("nvrtcCreateProgram failed");
  }
  const std::string target = "--gpu-architecture=" + arch;
  const char* options[] = {target.c_str(), "--std=c++17"};
  const int result = nvrtc.compile(prog, 2, options);
  std::string image;
  if (result == 0) {
    size_t size = 0;
    if (nvrtc.cubin_size(prog, &size) == 0 && size > 0) {
      image.resize(size);
      if (nvrtc.cubin(prog, image.data()) != 0) image.clear();
    }
  }
  std::string log;
  size_t log_size = 0;
  if (nvrtc.log_size(prog, &log_size) == 0 && log_size > 1) {
    log.resize(log_size);
    nvrtc.log(prog, log.data());
    log.resize(log_size - 1);
  }
  nvrtc.destroy(&prog);
  if (result != 0 || image.empty()) {
    throw std::runtime_error("NVRTC could not compile a kernel for " + arch + " (result " +
                             std::to_string(result) + "): " + log);
  }
  return image;
}

std::string handle(const Library& nvrtc, const std::string& name, const std::string& source,
                   const std::string& arch) {
  int major = 0, minor = 0;
  nvrtc.version(&major, &minor);
  const std::string version = std::to_string(major) + "." + std::to_string(minor);
  return "mlx-embed " + name + " " + arch + " nvrtc " + version + " " + hex(fnv1a({&source, &arch, &version}));
}

fs::path cached_image(const fs::path& dir, const std::string& name, const std::string& text) {
  // MLX: fmt::format("{}_{:x}", name, std::hash<std::string>{}(source)) + ".ptx".
  return dir / (name + "_" + hex(std::hash<std::string>{}(text)) + ".ptx");
}

Stored store(const Library& nvrtc, const fs::path& dir, const std::string& name, const std::string& source,
             const std::string& arch) {
  Stored stored{handle(nvrtc, name, source, arch), {}, false};
  stored.image = cached_image(dir, name, stored.handle);
  fs::path names_path = stored.image;
  names_path.replace_extension(".txt");
  std::error_code ec;
  const auto size = fs::file_size(stored.image, ec);
  if (!ec && size > 0 && fs::exists(names_path, ec)) return stored;
  const std::string image = compile(nvrtc, source, arch);
  fs::create_directories(dir);
  // The names first: MLX takes the image's presence to mean both are there.
  write_file(names_path, name + "\t" + name + "\n");
  write_file(stored.image, image);
  stored.compiled = true;
  return stored;
}

fs::path mlx_cache_dir() {
  if (const char* dir = std::getenv("MLX_PTX_CACHE_DIR")) return dir;
  return fs::temp_directory_path() / "mlx" / mlx::core::version() / "ptx";
}

}  // namespace mlx_embed::nvrtc
