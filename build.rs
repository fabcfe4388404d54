//! Compiles the gRPC protocol (`proto/`) and, with the `server` feature, builds the C++ side of
//! the MLX bridge, linked against `libmlx` from the official MLX wheel. A client-only build
//! (`--no-default-features --features client`) needs neither MLX nor a C++ compiler.
//!
//! `MLX_DIR` names the folder the wheel was installed into (`scripts/install-mlx.sh`; default
//! `.mlx` in the crate): headers in `mlx/include`, the library in `mlx/lib`. On Linux (mlx-cpu,
//! mlx-cuda-13) the binary keeps a RUNPATH (not RPATH) to that `mlx/lib`, so `LD_LIBRARY_PATH` can
//! select another build with the same soname (the CUDA wheel) at run time. On macOS (mlx-metal) it
//! keeps an LC_RPATH to `mlx/lib`, which resolves libmlx.dylib's install name
//! `@rpath/libmlx.dylib`; libmlx then finds its Metal kernels, `mlx.metallib`, beside itself.
//!
//! The bridge's C++ sources and the compiler arguments they are built with are also written to
//! `OUT_DIR/bridge-cxx.txt`, for `tests/platforms.rs`, which compiles the same for arm64.

use std::path::PathBuf;

fn main() {
    let server = std::env::var_os("CARGO_FEATURE_SERVER").is_some();
    compile_protos(server);
    if server {
        build_mlx_bridge();
    }
}

/// The bridge's C++ files in `src/mlx/`.
const CXX_SOURCES: [&str; 4] = ["shim.cc", "cpu_kernels.cc", "gpu_kernels.cc", "nvrtc.cc"];
/// Flags beyond `-O3 -std=c++20`, where the compiler takes them. The fused CPU kernels are only
/// fast vectorized (so `-O3`, in test builds too); clamps and selects on floats become vector code
/// only when comparisons may not trap.
const CXX_FLAGS: [&str; 3] = ["-fno-trapping-math", "-Wno-unused-parameter", "-Wno-deprecated-declarations"];

fn build_mlx_bridge() {
    println!("cargo:rerun-if-env-changed=MLX_DIR");
    let headers = ["ffi.rs", "shim.h", "cpu_kernels.h", "gpu_kernels.h", "nvrtc.h"];
    for f in headers.iter().chain(&CXX_SOURCES).map(|f| format!("src/mlx/{f}")) {
        println!("cargo:rerun-if-changed={f}");
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let mlx_dir = std::env::var_os("MLX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join(".mlx"));
    let include = mlx_dir.join("mlx/include");
    let lib = mlx_dir.join("mlx/lib");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").expect("set by cargo");
    let macos = target_os == "macos";
    if !include.join("mlx/mlx.h").exists() {
        panic!(
            "MLX headers not found under {}: run `scripts/setup.sh` (or `make setup`), \
             or point MLX_DIR at an installed MLX wheel (on macOS: mlx-metal, not mlx)",
            include.display()
        );
    }
    let library = lib.join(if macos { "libmlx.dylib" } else { "libmlx.so" });
    if !library.exists() {
        panic!("{} not found: MLX_DIR holds no MLX library for this platform; run `scripts/setup.sh`", library.display());
    }
    if macos && !lib.join("mlx.metallib").exists() {
        println!(
            "cargo:warning=no mlx.metallib beside {}: MLX will find no Metal kernels (scripts/install-mlx.sh installs both)",
            library.display()
        );
    }

    let mut bridge = cxx_build::bridge("src/mlx/ffi.rs");
    bridge
        .files(CXX_SOURCES.map(|f| format!("src/mlx/{f}")))
        .include(&include)
        .opt_level(3)
        .std("c++20");
    for flag in CXX_FLAGS {
        bridge.flag_if_supported(flag);
    }
    let files = bridge.get_files().map(|f| std::path::absolute(f).expect("current folder")).collect();
    record_bridge(files, bridge.get_compiler().args(), [("mlx-dir", &mlx_dir), ("mlx-include", &include), ("mlx-lib", &lib)]);
    bridge.compile("mlx_embed_shim");

    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    if target_os == "linux" {
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
    }
    // A RUNPATH entry on Linux, an LC_RPATH load command on macOS.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}

/// Writes `OUT_DIR/bridge-cxx.txt`, one `key value` a line: MLX_DIR (`mlx-dir`), the folders of
/// its headers (`mlx-include`) and of its library, which is also the binary's rpath (`mlx-lib`),
/// each C++ file the bridge compiles (`file`, the generated `ffi.rs.cc` included), and every other
/// compiler argument (`arg`, the include folders of the generated headers among them).
fn record_bridge(files: Vec<PathBuf>, args: &[std::ffi::OsString], folders: [(&str, &PathBuf); 3]) {
    let mlx_include = folders[1].1.as_path();
    let mut lines: Vec<String> = folders.iter().map(|(key, dir)| format!("{key} {}", dir.display())).collect();
    lines.extend(files.iter().map(|f| format!("file {}", f.display())));
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy();
        if arg == "-I" {
            let dir = PathBuf::from(args.next().expect("-I takes a folder"));
            if dir != mlx_include {
                lines.push(format!("arg -I{}", dir.display()));
            }
        } else if let Some(dir) = arg.strip_prefix("-I") {
            if std::path::Path::new(dir) != mlx_include {
                lines.push(format!("arg {arg}"));
            }
        } else {
            lines.push(format!("arg {arg}"));
        }
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    std::fs::write(out.join("bridge-cxx.txt"), lines.join("\n") + "\n").expect("writing OUT_DIR/bridge-cxx.txt");
}

/// Generated code goes to OUT_DIR (never committed), with a descriptor set for server reflection.
fn compile_protos(server: bool) {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    tonic_prost_build::configure()
        .build_server(server)
        .file_descriptor_set_path(out.join("embedding_descriptor.bin"))
        .codec_path("crate::grpc::codec::StrictCodec")
        .compile_protos(&["proto/embedding/v1/embedding.proto"], &["proto"])
        .unwrap_or_else(|e| panic!("compiling proto/embedding/v1/embedding.proto (is protoc installed? scripts/setup.sh installs it): {e}"));
}
