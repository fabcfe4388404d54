//! Compiles the gRPC protocol (`proto/`) and, with the `server` feature, builds the C++ side of
//! the MLX bridge, linked against `libmlx` from the official MLX wheel. A client-only build
//! (`--no-default-features --features client`) needs neither MLX nor a C++ compiler.
//!
//! `MLX_DIR` names the folder the wheel was installed into (`scripts/setup.sh`; default `.mlx` in
//! the crate). The binary keeps a RUNPATH (not RPATH) to that folder's `mlx/lib`, so
//! `LD_LIBRARY_PATH` can select another build with the same soname (the CUDA wheel) at run time.

use std::path::PathBuf;

fn main() {
    let server = std::env::var_os("CARGO_FEATURE_SERVER").is_some();
    compile_protos(server);
    if server {
        build_mlx_bridge();
    }
}

fn build_mlx_bridge() {
    println!("cargo:rerun-if-env-changed=MLX_DIR");
    let sources = ["ffi.rs", "shim.h", "shim.cc", "cpu_kernels.h", "cpu_kernels.cc", "gpu_kernels.h", "gpu_kernels.cc", "nvrtc.h", "nvrtc.cc"];
    for f in sources.map(|f| format!("src/mlx/{f}")) {
        println!("cargo:rerun-if-changed={f}");
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let mlx_dir = std::env::var_os("MLX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join(".mlx"));
    let include = mlx_dir.join("mlx/include");
    let lib = mlx_dir.join("mlx/lib");
    if !include.join("mlx/mlx.h").exists() {
        panic!(
            "MLX headers not found under {}: run `scripts/setup.sh` (or `make setup`), \
             or point MLX_DIR at an installed MLX wheel",
            include.display()
        );
    }

    cxx_build::bridge("src/mlx/ffi.rs")
        .file("src/mlx/shim.cc")
        .file("src/mlx/cpu_kernels.cc")
        .file("src/mlx/gpu_kernels.cc")
        .file("src/mlx/nvrtc.cc")
        .include(&include)
        // The fused CPU kernels are only fast vectorized, in test builds too; clamps and selects
        // on floats become vector code only when comparisons may not trap.
        .opt_level(3)
        .flag_if_supported("-fno-trapping-math")
        .std("c++20")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .compile("mlx_embed_shim");

    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
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
