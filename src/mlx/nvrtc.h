// NVIDIA's runtime compiler (NVRTC) for the CUDA kernels of gpu_kernels.cc, and the folder their
// compiled images are kept in between processes.
//
// The images go where MLX's CUDA backend looks for a kernel's compiled code before it builds it
// (mlx/backend/cuda/jit_module.cpp, `read_cached_ptx`): `{dir}/{module}.ptx` holds the image and
// `{dir}/{module}.txt` maps the entry point's name to its symbol, where `{module}` is the
// kernel's name, `_`, and the hash of the text MLX is handed for it, in hex. So a process finds
// what an earlier one compiled, and MLX is handed a short text per call instead of the image
// (which MLX hashes at every call).
#pragma once

#include <filesystem>
#include <string>

namespace mlx_embed::nvrtc {

// The functions of an NVRTC library.
struct Library {
  using Program = void*;
  int (*create)(Program*, const char*, const char*, int, const char* const*, const char* const*);
  int (*compile)(Program, int, const char* const*);
  int (*log_size)(Program, size_t*);
  int (*log)(Program, char*);
  int (*cubin_size)(Program, size_t*);
  int (*cubin)(Program, char*);
  int (*destroy)(Program*);
  int (*version)(int*, int*);
};

// NVRTC as loaded in this process (libmlx's CUDA backend links it), or nullptr.
const Library* loaded();

// NVRTC from the shared library at `path` (its builtins, `libnvrtc-builtins.so.*` beside it,
// loaded first), loaded once per path; throws where it cannot be loaded. Never unloaded.
const Library* open(const std::string& path);

// The image of `source` (one `extern "C"` kernel) compiled for `arch` (e.g. "sm_90a"); throws
// with NVRTC's log where it does not compile.
std::string compile(const Library& nvrtc, const std::string& source, const std::string& arch);

// The text MLX is handed for the kernel `name` of `source` compiled for `arch`: short, and
// different for every source, architecture and NVRTC version.
std::string handle(const Library& nvrtc, const std::string& name, const std::string& source,
                   const std::string& arch);

// Where MLX's cache keeps the image of kernel `name` handed over as `text`: the `.ptx` file.
std::filesystem::path cached_image(const std::filesystem::path& dir, const std::string& name,
                                   const std::string& text);

// A kernel kept in the folder: the text MLX is handed for it (`handle`), its image's file, and
// whether `store` compiled it (false: it was there).
struct Stored {
  std::string handle;
  std::filesystem::path image;
  bool compiled;
};

// Compiles `source` for `arch` into `dir` under `handle(nvrtc, name, source, arch)` unless it is
// there already. Each file is written under a temporary name and renamed, so another process
// never reads half of one. Throws `std::filesystem::filesystem_error` where the folder cannot be
// written, `std::runtime_error` where the source does not compile.
Stored store(const Library& nvrtc, const std::filesystem::path& dir, const std::string& name,
             const std::string& source, const std::string& arch);

// MLX's cache folder: `MLX_PTX_CACHE_DIR`, or `mlx/{version}/ptx` in the temporary folder (as
// mlx/backend/cuda/jit_module.cpp chooses it).
std::filesystem::path mlx_cache_dir();

}  // namespace mlx_embed::nvrtc
